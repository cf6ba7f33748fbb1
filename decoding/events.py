"""What one speculative round did, as immutable events.

The router yields a :class:`RoundEvent` with every chunk it streams; a remote
verifier backend attaches a :class:`TransportEvent` describing what the round
cost on the wire. Consumers (the gateway's Prometheus metrics, benchmarks) read
the events; nothing in ``decoding/`` keeps process-global counters, and no
consumer has to diff cumulative statistics to recover a round.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class TransportEvent:
    """A remote verifier's round on the wire (the vLLM client or the split edge).

    ``round_trips`` counts exchanges that succeeded; ``retries`` failed attempts
    that were retried. A resync re-sends the committed context in full (a new
    server, an evicted session, a replay onto another replica); ``tail_mass`` is
    the exactness bound of a top-K transport (None when the round was exact).
    """

    backend: Literal["vllm", "split"]
    round_s: float
    round_trips: int = 1
    bytes_up: int = 0
    bytes_down: int = 0
    retries: int = 0
    resync_reason: str | None = None
    resync_tokens: int = 0
    tail_mass: float | None = None
    server_s: float | None = None  # the server's own time on the round, when it reports it (RTT = round_s - server_s)
    cached_tokens: int | None = None  # context positions the server's prefix cache served (vLLM), when it reports them


@dataclass(frozen=True)
class RoundEvent:
    """One round of the router.

    k: draft tokens proposed (0 for a verifier-only round or a drafter-only step).
    accepted: draft tokens the verifier accepted (<= k).
    emitted: tokens committed by the round (after EOS, stop and max_tokens trimming).
    verified: the round went through the verifier (False: drafter-only).
    draft_s, verify_s: wall time of proposing and of scoring.
    next_k: the draft length the adaptive controller picked for the next round.
    fallback: set on the round where the request switched to drafter-only.
    transport: what a remote verifier reported for this round.
    streamed: the tokens came from a plain streaming request to the verifier, not from a round.
    switched: set on the first event after the request switched between speculative rounds
        (``"rounds"``) and one stream from the verifier (``"stream"``).
    """

    k: int
    accepted: int
    emitted: int
    verified: bool
    draft_s: float
    verify_s: float
    next_k: int = 0
    fallback: str | None = None
    transport: TransportEvent | None = None
    streamed: bool = False
    switched: str | None = None
