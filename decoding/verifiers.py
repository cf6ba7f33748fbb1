"""Verifiers: the large model that scores a draft at all k+1 positions in one pass.

A verifier is a factory of per-request sessions. A session holds the request's
committed context (and whatever cache the backend keeps for it); ``score``
returns the target logits for the draft positions plus the bonus position, and
``extend`` commits the round's accepted tokens, letting the backend roll its
cache back to them.

Backends: :class:`HFVerifier` (in-process, the embedded default). The
vLLM-hosted and split-inference backends implement the same protocol.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch

from decoding.batching import ForwardBatcher, batcher_for
from decoding.causal_lm import CachedSequence, CausalLM
from decoding.events import TransportEvent
from decoding.sampling import SamplingParams


class VerifierUnavailableError(RuntimeError):
    """The verifier cannot be reached or answered something unusable (HTTP 503).

    ``reason`` is a short label for metrics (``unreachable``, a worker's error code, ...)."""

    def __init__(self, message: str, reason: str = "unavailable"):
        super().__init__(message)
        self.reason = reason


@runtime_checkable
class VerifySession(Protocol):
    forward_passes: int
    #: What the latest ``score`` cost on the wire; None for an in-process backend.
    last_transport: TransportEvent | None

    async def score(self, draft: Sequence[int]) -> torch.Tensor:
        """Score the context followed by ``draft`` (k ids, k >= 0).

        Returns logits [k+1, V] float32 on the verifier's device: row i is the target's
        next-token distribution after ``draft[:i]``; row k gives the bonus token.
        Entries a backend did not compute (top-K transports) are -inf.
        """
        ...

    def extend(self, tokens: Sequence[int]) -> None:
        """Commit the round's accepted tokens to the context."""
        ...

    async def close(self) -> None: ...


@runtime_checkable
class DecidingSession(Protocol):
    """A session whose backend can verify a draft itself, where the verifier's full distribution lives
    (a remote verifier that would otherwise send only top-K rows). The router then calls ``decide``
    instead of ``score`` + its own verification, when ``decides`` is true."""

    decides: bool

    async def decide(self, draft: Sequence[int], params: SamplingParams, seed: int) -> tuple[list[int], int]:
        """Verify ``draft`` under ``params`` (draws seeded with ``seed``); return
        (the accepted drafts plus one correction or bonus token, the number accepted)."""
        ...


@runtime_checkable
class Verifier(Protocol):
    name: str
    vocab_size: int
    max_context: int

    async def start(self, prompt_ids: Sequence[int]) -> VerifySession: ...

    async def check_ready(self) -> None:
        """Raise VerifierUnavailableError unless the backend can serve now."""
        ...

    async def aclose(self) -> None: ...


class HFVerifier:
    """The in-process verifier: a local Hugging Face causal LM.

    With ``max_batch > 1`` the verify passes of concurrent requests that are ready at
    the same moment run as one forward (:mod:`decoding.batching`), for the decoder
    families that support it; other models verify one request per pass.
    """

    def __init__(self, lm: CausalLM, *, max_batch: int = 1):
        self.lm = lm
        self.name = lm.name
        self.vocab_size = lm.vocab_size
        self.max_context = lm.max_context
        self.batcher = batcher_for(lm, max_batch)

    @classmethod
    def from_pretrained(cls, path: str | Path, **kwargs) -> HFVerifier:
        return cls(CausalLM(path, **kwargs))

    async def start(self, prompt_ids: Sequence[int]) -> HFVerifySession:
        return HFVerifySession(self.lm.sequence(prompt_ids), self.batcher)

    async def check_ready(self) -> None:
        return None

    async def prompt_logits(self, prompt_ids: Sequence[int]) -> torch.Tensor:
        """Logits [len(prompt_ids) - 1, V] float32: row i is the distribution of ``prompt_ids[i + 1]``
        (prompt logprobs; one extra forward pass over the prompt, not cached)."""

        @torch.inference_mode()
        def run() -> torch.Tensor:
            ids = torch.tensor([list(prompt_ids)], dtype=torch.long, device=self.lm.device)
            return self.lm.model(input_ids=ids).logits[0, :-1].float()

        return await self.lm.run(run)

    async def aclose(self) -> None:
        self.lm.close()


class HFVerifySession:
    last_transport = None  # in process: nothing crosses a network

    def __init__(self, seq: CachedSequence, batcher: ForwardBatcher | None = None):
        self.seq = seq
        self.batcher = batcher

    @property
    def forward_passes(self) -> int:
        return self.seq.forward_passes

    async def score(self, draft: Sequence[int]) -> torch.Tensor:
        if self.batcher is not None:
            return await self.batcher.feed(self.seq, self.seq.pending() + list(draft), keep=len(draft) + 1)

        def run() -> torch.Tensor:
            # One pass over the uncached context tail plus the whole draft.
            return self.seq.feed(self.seq.pending() + list(draft), keep=len(draft) + 1)

        return await self.seq.lm.run(run)

    def extend(self, tokens: Sequence[int]) -> None:
        self.seq.extend(tokens)

    async def close(self) -> None:
        self.seq = None  # type: ignore[assignment]  # frees the KV cache now, not at GC
