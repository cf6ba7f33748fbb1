"""Several ``tandem verifier`` replicas behind one gateway: a session sticks to its replica, and a replica lost
mid-session is replaced by another one that replays the committed context.

:class:`ReplicatedVerifier` implements the :class:`~decoding.verifiers.Verifier`
protocol over one :class:`~decoding.backends.vllm_client.VLLMVerifier` per URL
(each with its own connection pool, handshake and vocabulary check). A new
session goes to the healthy replica with the fewest open sessions and stays
there: its context lives in that replica's route and prefix cache. When a
round on it fails after the client's own retries, the replica is marked down
for ``cooldown_s`` and the session moves: a new session on the next healthy
replica, whose first round sends the whole committed context (a replay), then
the round itself. Greedy output is unchanged (the replicas serve the same
model); the round's :class:`~decoding.events.TransportEvent` reports the replay
as a resync (``reason="replica_lost"``, with the tokens resent). Only when no
replica can take the round does it fail (VerifierUnavailableError).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Sequence

import torch

from decoding.backends.vllm_client import StreamedTokens, VLLMVerifier, VLLMVerifySession
from decoding.events import TransportEvent
from decoding.sampling import SamplingParams
from decoding.verifiers import VerifierUnavailableError

logger = logging.getLogger("tandem.vllm_verifier")

REPLICA_LOST = "replica_lost"


class ReplicatedVerifier:
    """One verifier over several replicas of the same model (see the module docstring)."""

    def __init__(self, replicas: Sequence[VLLMVerifier], cooldown_s: float = 5.0):
        if not replicas:
            raise ValueError("give at least one verifier replica")
        self.replicas = list(replicas)
        self.cooldown_s = cooldown_s
        self.down_until = [0.0] * len(self.replicas)
        self.open_sessions = [0] * len(self.replicas)
        self.replays = 0
        self.name = "replicas[" + ", ".join(r.url for r in self.replicas) + "]"

    # The limits are the replicas' (one model): read from the first that has connected.
    @property
    def _first(self) -> VLLMVerifier:
        return next((r for r in self.replicas if r._connected), self.replicas[0])

    @property
    def vocab_size(self) -> int:
        return self._first.vocab_size

    @property
    def max_context(self) -> int:
        return min(r.max_context for r in self.replicas)

    @property
    def streams(self) -> bool:
        return any(r.streams for i, r in enumerate(self.replicas) if self._up(i))

    def _up(self, i: int) -> bool:
        return time.monotonic() >= self.down_until[i]

    def _order(self, exclude: int | None = None) -> list[int]:
        """Replicas to try: healthy ones by fewest open sessions, then the ones marked down."""
        ids = [i for i in range(len(self.replicas)) if i != exclude]
        return sorted(ids, key=lambda i: (not self._up(i), self.open_sessions[i], i))

    def mark_down(self, i: int) -> None:
        self.down_until[i] = time.monotonic() + self.cooldown_s

    def connect_at_start(self) -> ReplicatedVerifier:
        for r in self.replicas:
            r.connect_at_start()
        return self

    async def check_ready(self) -> None:
        errors = []
        for i, r in enumerate(self.replicas):
            try:
                await r.check_ready()
                return
            except VerifierUnavailableError as exc:
                self.mark_down(i)
                errors.append(str(exc))
        raise VerifierUnavailableError("no verifier replica is ready: " + "; ".join(errors))

    async def start(self, prompt_ids: Sequence[int]) -> ReplicatedSession:
        return await ReplicatedSession.open(self, list(prompt_ids))

    async def stream_tokens(
        self, prompt_ids: Sequence[int], params: SamplingParams, max_tokens: int, seed: int
    ) -> AsyncIterator[StreamedTokens]:
        """One replica's stream (the first healthy one that starts it)."""
        last: Exception | None = None
        for i in self._order():
            stream = self.replicas[i].stream_tokens(prompt_ids, params, max_tokens, seed)
            try:
                first = await anext(stream, None)
            except VerifierUnavailableError as exc:
                self.mark_down(i)
                last = exc
                continue
            if first is None:
                return
            yield first
            async for chunk in stream:
                yield chunk
            return
        raise VerifierUnavailableError(f"no verifier replica could stream: {last}")

    async def aclose(self) -> None:
        for r in self.replicas:
            await r.aclose()


class ReplicatedSession:
    """A session on one replica; moved (with a replay of its context) when that replica is lost."""

    def __init__(self, owner: ReplicatedVerifier, ids: list[int]):
        self.owner = owner
        self.ids = ids
        self.replica: int | None = None
        self.inner: VLLMVerifySession | None = None
        self.forward_passes = 0
        self.last_transport: TransportEvent | None = None
        self.closed = False

    @classmethod
    async def open(cls, owner: ReplicatedVerifier, ids: list[int]) -> ReplicatedSession:
        session = cls(owner, ids)
        await session._move(exclude=None)
        return session

    async def _move(self, exclude: int | None) -> None:
        """Start this session's context on the best replica other than ``exclude``."""
        errors = []
        for i in self.owner._order(exclude):
            # Count the session on its replica before awaiting the start: sessions opened at the same
            # moment then spread over the replicas instead of all seeing the same counts.
            self.owner.open_sessions[i] += 1
            try:
                inner = await self.owner.replicas[i].start(self.ids)
            except BaseException as exc:
                self.owner.open_sessions[i] -= 1
                if not isinstance(exc, VerifierUnavailableError):
                    raise
                self.owner.mark_down(i)
                errors.append(str(exc))
                continue
            if self.inner is not None:
                self.owner.open_sessions[self.replica] -= 1
                await self.inner.close()
            self.replica, self.inner = i, inner
            return
        raise VerifierUnavailableError("no verifier replica can take the session: " + "; ".join(errors))

    @property
    def decides(self) -> bool:
        return self.inner is not None and self.inner.decides

    async def _call(self, method: str, *args):
        """``self.inner.<method>(*args)``; on a lost replica, move and replay (once per other replica)."""
        moved_from = None
        for _ in range(len(self.owner.replicas)):
            try:
                result = await getattr(self.inner, method)(*args)
            except VerifierUnavailableError as exc:
                logger.warning("verifier replica %s lost (%s); replaying %d tokens on another",
                               self.owner.replicas[self.replica].url, exc, len(self.ids))  # fmt: skip
                self.owner.mark_down(self.replica)
                if len(self.owner.replicas) == 1:
                    raise
                moved_from = self.replica
                await self._move(exclude=self.replica)
                continue
            event = self.inner.last_transport
            if moved_from is not None and event is not None:
                self.owner.replays += 1
                event = dataclasses.replace(event, resync_reason=REPLICA_LOST, resync_tokens=len(self.ids))
            self.last_transport = event
            self.forward_passes += 1
            return result
        raise VerifierUnavailableError("every verifier replica failed this round")

    async def score(self, draft: Sequence[int]) -> torch.Tensor:
        self.last_transport = None
        return await self._call("score", draft)

    async def decide(self, draft: Sequence[int], params: SamplingParams, seed: int) -> tuple[list[int], int]:
        self.last_transport = None
        return await self._call("decide", draft, params, seed)

    def extend(self, tokens: Sequence[int]) -> None:
        self.ids.extend(int(t) for t in tokens)
        self.inner.extend(tokens)

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.inner is not None:
            self.owner.open_sessions[self.replica] -= 1
            await self.inner.close()
