"""Admission control: at most N generations at once, up to Q more waiting, 429 beyond.

A request takes ``weight`` slots (its number of generations, capped at the
capacity, so that an ``n > N`` request still fits and runs its choices in
turn). Waiters are served first come, first served; a waiter that is cancelled
(client gone, timeout) leaves the queue at once. ``close()`` starts draining:
every later ``acquire`` fails with :class:`ShuttingDownError`.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Callable


class QueueFullError(Exception):
    """All slots are busy and the queue is full (HTTP 429)."""

    def __init__(self, retry_after_s: int):
        super().__init__(f"the server is at capacity and its queue is full; retry in {retry_after_s}s")
        self.retry_after_s = retry_after_s


class ShuttingDownError(Exception):
    """The server is draining for shutdown (HTTP 503)."""

    retry_after_s = 5


class Admission:
    def __init__(
        self,
        max_concurrency: int,
        max_queue: int,
        on_change: Callable[[int, int], None] | None = None,
    ):
        if max_concurrency < 1 or max_queue < 0:
            raise ValueError("max_concurrency must be >= 1 and max_queue >= 0")
        self.capacity = max_concurrency
        self.max_queue = max_queue
        self.in_use = 0
        self.closed = False
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()
        self._on_change = on_change
        # Exponential moving average of how long a slot is held, for Retry-After.
        self._hold_ema_s = 1.0

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def retry_after_s(self) -> int:
        """Seconds until a slot is likely free: the queue ahead, served ``capacity`` at a time."""
        rounds = (self.waiting + 1) / self.capacity
        return max(1, min(60, math.ceil(self._hold_ema_s * rounds)))

    async def acquire(self, weight: int = 1) -> Slot:
        """Wait for ``weight`` slots; raise QueueFullError or ShuttingDownError.

        Returns a :class:`Slot`; release it exactly once (``slot.release()``).
        """
        weight = max(1, min(weight, self.capacity))
        if self.closed:
            raise ShuttingDownError("the server is shutting down")
        if not self._waiters and self.in_use + weight <= self.capacity:
            self.in_use += weight
            self._changed()
            return Slot(self, weight)
        if len(self._waiters) >= self.max_queue:
            raise QueueFullError(self.retry_after_s())
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (weight, fut)
        self._waiters.append(entry)
        self._changed()
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                # Granted just as we were cancelled: hand the slots back.
                self._release(weight)
            else:
                try:
                    self._waiters.remove(entry)
                except ValueError:
                    pass
                self._wake()
                self._changed()
            raise
        return Slot(self, weight)

    def close(self) -> None:
        """Refuse new requests; fail the queued ones with ShuttingDownError."""
        self.closed = True
        while self._waiters:
            _, fut = self._waiters.popleft()
            if not fut.done():
                fut.set_exception(ShuttingDownError("the server is shutting down"))
        self._changed()

    def _release(self, weight: int, held_s: float | None = None) -> None:
        self.in_use -= weight
        if held_s is not None:
            self._hold_ema_s = 0.8 * self._hold_ema_s + 0.2 * held_s
        self._wake()
        self._changed()

    def _wake(self) -> None:
        while self._waiters:
            weight, fut = self._waiters[0]
            if fut.done():
                self._waiters.popleft()
                continue
            if self.in_use + weight > self.capacity:
                break
            self._waiters.popleft()
            self.in_use += weight
            fut.set_result(None)

    def _changed(self) -> None:
        if self._on_change is not None:
            self._on_change(self.in_use, len(self._waiters))


class Slot:
    __slots__ = ("_admission", "weight", "_t0", "_released")

    def __init__(self, admission: Admission, weight: int):
        self._admission = admission
        self.weight = weight
        self._t0 = time.monotonic()
        self._released = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._admission._release(self.weight, time.monotonic() - self._t0)


class RequestTimeoutError(Exception):
    """The request ran past ``request_timeout_s`` (queueing included); HTTP 504."""

    def __init__(self, timeout_s: float):
        super().__init__(f"the request did not complete within the server's request timeout of {timeout_s:g}s")
        self.timeout_s = timeout_s
