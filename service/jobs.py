"""One request's generations: admission, one producer task per choice, and the event queue the response drains.

A :class:`Job` admits its request (a slot, or a place in the queue, or 429),
then runs one producer per choice that drives ``router.stream`` and feeds
:attr:`Job.events`. The response (JSON or Server-Sent Events) consumes them
with :meth:`Job.next_event`. The request's deadline (``request_timeout_s``)
covers queueing and generation. A client disconnect, the deadline or the
shutdown cut-off cancels the producers, which stops the router within one
round and frees its caches and its slot.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from starlette.types import Receive

from decoding.logprobs import TokenLogprob
from decoding.sampling import InvalidRequestError
from decoding.speculative import GenerationStats
from decoding.verifiers import VerifierUnavailableError
from service.admission import RequestTimeoutError, ShuttingDownError, Slot
from service.gateway import Gateway
from service.logs import RequestRecord
from service.plan import ChoiceSpec, Plan

log = logging.getLogger("tandem.gateway")


class ClientGone(Exception):
    """The client disconnected before the response was ready."""


#: Event kinds on a job's queue: (kind, choice index, payload).
CHUNK, ERROR, DONE, ABORT = "chunk", "error", "done", "abort"


class Job:
    """The generations of one request (one per choice) and their event queue."""

    def __init__(self, gw: Gateway, plan: Plan, receive: Receive, record: RequestRecord):
        self.gw = gw
        self.plan = plan
        self.record = record
        self.choices = plan.choices
        self.prompt_tokens = plan.prompt_tokens
        loop = asyncio.get_running_loop()
        self.timeout_s = gw.settings.request_timeout_s
        self.deadline = loop.time() + self.timeout_s - (time.perf_counter() - record.t_start)
        self.events: asyncio.Queue[tuple[str, int, Any]] = asyncio.Queue()
        self.tasks: list[asyncio.Task[None]] = []
        self.slot: Slot | None = None
        self.abort_reason: str | None = None
        self.finished = False
        self.failed = False
        self.remaining = len(self.choices)
        self.texts: list[list[str]] = [[] for _ in self.choices]
        self.stats: list[GenerationStats | None] = [None] * len(self.choices)
        self.finish: list[str | None] = [None] * len(self.choices)
        self.stop_reasons: list[int | str | None] = [None] * len(self.choices)
        self.logprobs: list[list[TokenLogprob]] = [[] for _ in self.choices]
        self.prompt_logprobs: list[list[TokenLogprob] | None] = [None] * len(self.choices)
        #: Prompt tokens the verifier's prefix cache served, where the backend reports it (vLLM): read off
        #: the first verify round of the first choice to run one (usage.prompt_tokens_details.cached_tokens).
        self.cached_tokens: int | None = None
        self._admit: asyncio.Future[Slot] | None = None
        self._t_admitted: float | None = None
        gw.jobs.add(self)
        self._watcher = asyncio.ensure_future(self._watch(receive))

    # -- lifecycle ---------------------------------------------------------------------

    async def _watch(self, receive: Receive) -> None:
        """Abort when the client disconnects (the body is already read: the next message is the disconnect)."""
        try:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    self.abort("disconnect")
                    return
        except Exception:  # the server may refuse receive() once the response is over
            return

    async def admit(self) -> None:
        t0 = time.perf_counter()
        # acquire() caps the weight at the capacity: n > slots runs on every slot.
        self._admit = asyncio.ensure_future(self.gw.admission.acquire(len(self.choices)))
        remaining = self.deadline - asyncio.get_running_loop().time()
        done, _ = await asyncio.wait({self._admit}, timeout=max(0.0, remaining))
        if not done:
            self._admit.cancel()
            await asyncio.gather(self._admit, return_exceptions=True)
            raise RequestTimeoutError(self.timeout_s)
        if not self._admit.cancelled():
            self.slot = self._admit.result()  # raises QueueFullError / ShuttingDownError
        if self.abort_reason is not None:
            self._release()
            if self.abort_reason == "shutdown":
                raise ShuttingDownError("the server is shutting down")
            raise ClientGone(self.abort_reason)
        if self.slot is None:  # cancelled by something other than abort(): treat as gone
            raise ClientGone("cancelled")
        self._t_admitted = time.perf_counter()
        self.record.queue_s = self._t_admitted - t0
        self.gw.metrics.queue_time.observe(self.record.queue_s)

    def start(self) -> None:
        assert self.slot is not None
        self.gw.metrics.prompt_tokens.inc(self.prompt_tokens)
        width = self.slot.weight
        sem = asyncio.Semaphore(width) if width < len(self.choices) else None
        self.tasks = [asyncio.ensure_future(self._run_choice(c, sem)) for c in self.choices]

    def abort(self, reason: str) -> None:
        if self.finished or self.abort_reason is not None:
            return
        self.abort_reason = reason
        if reason != "closed":
            self.record.aborted = reason
            # The response may end (and be logged) before the cancelled choices wind down.
            self.record.completion_tokens = self.completion_tokens
        if self._admit is not None and not self._admit.done():
            self._admit.cancel()
        for t in self.tasks:
            t.cancel()
        self.events.put_nowait((ABORT, -1, reason))

    def close(self) -> None:
        """The response is over (or never started): stop whatever still runs."""
        self.abort("closed")
        self._watcher.cancel()
        if not self.tasks:
            self._release()
        self.gw.jobs.discard(self)

    def _release(self) -> None:
        if self.slot is not None:
            self.slot.release()

    # -- the producers ---------------------------------------------------------------------

    async def _run_choice(self, spec: ChoiceSpec, sem: asyncio.Semaphore | None) -> None:
        m, record, mode = self.gw.metrics, self.record, self.plan.mode
        generated = m.generation_tokens.labels(mode)
        label = "abort"
        t_prev: float | None = None
        first_round = True  # its context is the prompt: its prefix-cache hits are the prompt's
        deadline = asyncio.timeout_at(self.deadline)
        try:
            stream = self.plan.router.stream(spec.prompt_ids, spec.params, self.plan.options)
            async with deadline, (sem if sem is not None else contextlib.nullcontext()), contextlib.aclosing(stream):
                async for chunk in stream:
                    now = time.perf_counter()
                    n = len(chunk.token_ids)
                    if n:
                        generated.inc(n)
                        if t_prev is None:
                            ttft = now - record.t_start
                            m.time_to_first_token.observe(ttft)
                            if record.ttft_s is None:
                                record.ttft_s = ttft
                        else:
                            gap = (now - t_prev) / n
                            for _ in range(n):
                                m.inter_token_latency.observe(gap)
                        t_prev = now
                    m.observe_round(chunk.event)
                    transport = chunk.event.transport
                    if first_round and self.cached_tokens is None and transport and transport.cached_tokens is not None:
                        self.cached_tokens = min(transport.cached_tokens, self.prompt_tokens)
                    first_round = False
                    self.texts[spec.index].append(chunk.text)
                    if chunk.logprobs:
                        self.logprobs[spec.index] += chunk.logprobs
                    if chunk.prompt_logprobs is not None:
                        self.prompt_logprobs[spec.index] = chunk.prompt_logprobs
                    self.stats[spec.index] = chunk.stats
                    if chunk.finish_reason is not None:
                        self.finish[spec.index] = label = chunk.finish_reason
                        self.stop_reasons[spec.index] = chunk.stop_reason
                    self.events.put_nowait((CHUNK, spec.index, chunk))
        except asyncio.CancelledError:
            pass  # abort(): the reason is on the record; the task just ends
        except Exception as exc:
            if isinstance(exc, TimeoutError) and deadline.expired():
                self.record.aborted = "timeout"
                self._fail(spec.index, RequestTimeoutError(self.timeout_s))
            else:
                label = "error"
                self._fail(spec.index, exc)
        finally:
            m.requests_finished.labels(label, mode).inc()
            self.remaining -= 1
            if self.remaining == 0:
                self._all_done()
            self.events.put_nowait((DONE, spec.index, None))

    def _fail(self, index: int, exc: BaseException) -> None:
        if isinstance(exc, VerifierUnavailableError):
            self.gw.metrics.verifier_errors.labels("unavailable").inc()
            if self.plan.mode == "split":
                self.gw.metrics.split_failures.labels(exc.reason).inc()
        elif not isinstance(exc, (RequestTimeoutError, InvalidRequestError)):
            log.error("generation failed (request id %s)", self.record.request_id, exc_info=exc)
        if not self.failed:
            self.failed = True
            self.events.put_nowait((ERROR, index, exc))
            for t in self.tasks:  # one failed choice fails the request
                if t is not asyncio.current_task():
                    t.cancel()

    def _all_done(self) -> None:
        self.finished = True
        self._release()
        if self.abort_reason is None and not self.failed:
            self.gw.metrics.e2e_latency.observe(time.perf_counter() - self.record.t_start)
        self.record.finish_reasons = [f for f in self.finish if f]
        self.record.completion_tokens = self.completion_tokens

    @property
    def completion_tokens(self) -> int:
        return sum(s.generated_tokens for s in self.stats if s is not None)

    @property
    def outputs(self) -> list[str]:
        """Each choice's text so far."""
        return ["".join(t) for t in self.texts]

    @property
    def choice_stats(self) -> list[GenerationStats]:
        """The statistics of the choices that produced a round."""
        return [s for s in self.stats if s is not None]

    # -- the consumers -----------------------------------------------------------------------

    async def next_event(self) -> tuple[str, int, Any]:
        """The next CHUNK, ERROR or ABORT event; (DONE, -1, None) once every choice is done."""
        while True:
            if self.abort_reason is not None:  # an abort jumps the queue: chunks still buffered are dropped
                return ABORT, -1, self.abort_reason
            if self.remaining == 0 and self.events.empty():
                return DONE, -1, None
            kind, index, payload = await self.events.get()
            if kind != DONE:
                return kind, index, payload

    @staticmethod
    def raise_for(kind: str, payload: Any) -> None:
        """Turn an ERROR/ABORT event into the exception the client should see."""
        if kind == ERROR:
            raise payload
        if kind == ABORT:
            if payload == "shutdown":
                raise ShuttingDownError("the server is shutting down")
            raise ClientGone(payload)

    async def wait(self) -> None:
        while True:
            kind, _, payload = await self.next_event()
            if kind == DONE:
                return
            if kind != CHUNK:
                self.raise_for(kind, payload)
