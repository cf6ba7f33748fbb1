"""The split worker's sessions: one body KV cache per edge request, bounded in idle time and bytes.

A session the worker does not hold (never seen, evicted, or the worker
restarted) can only be started at position 0; a step that continues anything
else is refused with 409 (``unknown_session``, ``session_evicted`` or
``cache_mismatch``) and the edge replays its context. Sessions expire after
``ttl_s`` idle seconds; the caches' total size is bounded by ``max_kv_bytes``
(least recently used sessions are evicted to make room; a single session
larger than the bound is refused with 413). A tombstone remembers why a
session went, so the 409 can say so.

A session's size is what it costs the process: the bytes of its KV tensors'
storages (:func:`decoding.partition.cache_bytes`) plus a fixed overhead per
session and per layer, for the Python and torch objects that hold them
(measured on CPython 3.11 / torch 2: about 0.35 KiB per session and 1.3 KiB per
layer; the constants below leave a margin). So the bound is on resident memory,
not on the logical tensor sizes alone.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from transformers import DynamicCache

from decoding.partition import cache_bytes
from service.split_worker.metrics import WorkerMetrics

log = logging.getLogger("tandem.split.worker")

MAX_TOMBSTONES = 10_000
#: Resident bytes a session costs besides its KV storages: the session, its cache and its dict entries ...
SESSION_OVERHEAD_BYTES = 1024
#: ... and, per layer of the body, the layer object and the two tensor objects (keys, values).
LAYER_OVERHEAD_BYTES = 2048


def session_overhead_bytes(num_layers: int) -> int:
    """The fixed resident cost of one session of a ``num_layers``-layer body, besides its KV storages."""
    return SESSION_OVERHEAD_BYTES + LAYER_OVERHEAD_BYTES * num_layers


class StepError(Exception):
    """A refused step: the HTTP status, the error code and the message of its error envelope."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


@dataclass
class BodySession:
    id: str
    cache: DynamicCache
    last_used: float = field(default_factory=time.monotonic)
    nbytes: int = 0

    @property
    def length(self) -> int:
        return self.cache.get_seq_length()


class KVSessionStore:
    """The body caches of the edges' sessions, in least-recently-used order, with tombstones."""

    def __init__(
        self,
        *,
        ttl_s: float,
        max_kv_bytes: int,
        kv_bytes_per_token: int,
        overhead_bytes: int,
        new_cache: Callable[[], DynamicCache],
        metrics: WorkerMetrics,
    ):
        self.ttl_s = ttl_s
        self.max_kv_bytes = max_kv_bytes
        self.kv_bytes_per_token = kv_bytes_per_token
        self.overhead_bytes = overhead_bytes
        self.new_cache = new_cache
        self.metrics = metrics
        self.sessions: OrderedDict[str, BodySession] = OrderedDict()
        self.tombstones: OrderedDict[str, str] = OrderedDict()
        metrics.kv_limit.set(max_kv_bytes)

    @property
    def total_bytes(self) -> int:
        return sum(s.nbytes for s in self.sessions.values())

    def publish(self) -> None:
        self.metrics.sessions.set(len(self.sessions))
        self.metrics.kv_bytes.set(self.total_bytes)

    def open(self, sid: str, start: int, n: int) -> BodySession:
        """The session that a step of ``n`` positions from ``start`` continues (new at ``start == 0``),
        marked most recently used, with room made for its cache. Raises :class:`StepError`: 409 when
        the worker does not hold what the step continues, 413 when the session alone exceeds the bound."""
        self.expire()
        session = self.sessions.get(sid)
        if session is None:
            if start != 0:
                why = self.tombstones.get(sid)
                if why is not None:
                    raise StepError(409, "session_evicted", f"session {sid} was evicted: {why}; replay from position 0")
                raise StepError(409, "unknown_session", f"unknown session {sid} (the worker may have restarted); replay from position 0")
            session = BodySession(sid, self.new_cache())
            self.sessions[sid] = session
            self.tombstones.pop(sid, None)
        elif start > session.length:
            raise StepError(409, "cache_mismatch", f"session {sid} holds {session.length} positions but the step starts at {start}")
        self.sessions.move_to_end(sid)
        session.last_used = time.monotonic()
        needed = (start + n) * self.kv_bytes_per_token + self.overhead_bytes
        if needed > self.max_kv_bytes:
            self.sessions.pop(sid, None)
            raise StepError(
                413, "kv_memory_exceeded",
                f"session {sid} would need {needed} bytes of KV cache; the worker's bound is {self.max_kv_bytes}",
            )  # fmt: skip
        self._make_room(sid, needed - session.nbytes)
        return session

    def stepped(self, session: BodySession) -> None:
        """Account for the cache a step has just grown (or cropped)."""
        session.nbytes = cache_bytes(session.cache) + self.overhead_bytes
        session.last_used = time.monotonic()
        self.publish()

    def discard(self, sid: str) -> None:
        """Forget a session whose cache a failed step may have left half-updated."""
        self.sessions.pop(sid, None)

    def close(self, sid: str) -> bool:
        found = self.sessions.pop(sid, None) is not None
        self.publish()
        return found

    def expire(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        for sid in [sid for sid, s in self.sessions.items() if now - s.last_used > self.ttl_s]:
            self._evict(sid, "ttl", f"it was idle for more than the worker's session TTL ({self.ttl_s:g} s)")
        self.publish()

    def _make_room(self, keep: str, needed: int) -> None:
        """Evict least recently used sessions (never ``keep``) until ``needed`` more bytes fit."""
        for sid in list(self.sessions):
            if self.total_bytes + needed <= self.max_kv_bytes:
                break
            if sid != keep:
                self._evict(sid, "memory", f"the worker's KV memory bound ({self.max_kv_bytes} bytes) needed room")

    def _evict(self, sid: str, reason: str, why: str) -> None:
        if self.sessions.pop(sid, None) is not None:
            self.metrics.evictions.labels(reason).inc()
            self.tombstones[sid] = why
            while len(self.tombstones) > MAX_TOMBSTONES:
                self.tombstones.popitem(last=False)
            log.info("evicted split session (%s)", reason)
