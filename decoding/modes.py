"""The decoding modes, apart from the router so that configuration and the CLI name them without importing torch.

``speculative``: the drafter proposes, the verifier decides (greedy output token-identical to the verifier alone);
``verifier-only``: the same loop with k = 0; ``drafter-only``: the drafter alone, unverified.
"""

from __future__ import annotations

from typing import Literal, get_args

Mode = Literal["speculative", "verifier-only", "drafter-only"]
MODES: tuple[str, ...] = get_args(Mode)
