"""The verify route's per-session contexts: committed token ids, bounded in number, expiring when idle.

The client sends only the tokens committed since its previous round; the
route rebuilds the context from what it stored. 4 bytes per token. A new
session beyond ``max_sessions`` (after the idle ones expired) is refused
(:class:`StoreFullError`, a 503 with Retry-After at the route) rather than
evicting a live session's context.
"""

from __future__ import annotations

import time
from array import array
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class StoreLimits:
    """How many sessions the route holds at once and how long an idle one lives (``tandem verifier --tandem-*``,
    the plugin's env)."""

    max_sessions: int = 4096
    ttl_s: float = 900.0

    def __post_init__(self) -> None:
        if self.max_sessions < 1 or not self.ttl_s > 0:
            raise ValueError(f"max_sessions must be >= 1 and ttl_s > 0, got {self.max_sessions}, {self.ttl_s}")


class UnknownSessionError(KeyError):
    """The store does not hold ``base`` tokens of this session (never seen, expired, dropped)."""


class StoreFullError(RuntimeError):
    """A new session would exceed ``max_sessions`` live (not idle-expired) sessions."""


class ContextStore:
    """Committed contexts by session id, at most ``max_sessions``, expiring when idle.

    ``resolve`` is idempotent: a retried request with the same ``base`` and
    ``append`` gives the same context.
    """

    def __init__(self, limits: StoreLimits = StoreLimits()):
        self.limits = limits
        self._data: OrderedDict[str, tuple[array, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._data)

    def _expire(self, now: float) -> None:
        while self._data:  # least recently used first
            sid, (_, seen) = next(iter(self._data.items()))
            if now - seen <= self.limits.ttl_s:
                break
            del self._data[sid]

    def resolve(self, session: str, base: int, append: Sequence[int]) -> array:
        """Store and return ``stored[:base] + append`` (int32). Raises UnknownSessionError, StoreFullError."""
        now = time.monotonic()
        self._expire(now)
        if session not in self._data and len(self._data) >= self.limits.max_sessions:
            raise StoreFullError(
                f"{len(self._data)} live sessions, at the limit --tandem-max-sessions={self.limits.max_sessions}"
            )
        if base == 0:
            ctx = array("i", append)
        else:
            entry = self._data.get(session)
            if entry is None or len(entry[0]) < base:
                raise UnknownSessionError(session)
            ctx = entry[0][:base]
            ctx.extend(append)
        self._data[session] = (ctx, now)
        self._data.move_to_end(session)
        return ctx

    def drop(self, session: str) -> bool:
        return self._data.pop(session, None) is not None
