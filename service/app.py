"""The OpenAI-compatible gateway: a FastAPI app in front of the speculative router.

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions``,
``GET /v1/models``, ``GET /health`` (liveness), ``GET /ready`` (models loaded
and verifier answering), ``GET /metrics`` (Prometheus text).

A generation request goes through, in order: authentication (middleware,
``/v1/*`` only), schema validation (400 on failure), model and parameter
checks (404/400), tokenization and context checks (400
``context_length_exceeded``), admission (a slot, or a place in the queue, or
429), then one producer task per choice that drives ``router.stream`` and
feeds a queue that the response (JSON or Server-Sent Events) drains. The
request's deadline (``request_timeout_s``) covers queueing and generation. A
client disconnect, the deadline or the shutdown cut-off cancels the producers,
which stops the router within one round and frees its caches and its slot.

Run it with ``tandem serve`` (service/server.py), or
``uvicorn --factory service.app:create_app`` with TANDEM_* variables.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import hmac
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send

from decoding.sampling import InvalidRequestError, SamplingParams
from decoding.speculative import Chunk, GenerationStats, SpecOptions, SpeculativeRouter
from service.plan import route as split_route
from decoding.verifiers import VerifierUnavailableError
from service.admission import Admission, RequestTimeoutError, ShuttingDownError, Slot
from service.backends import Backends, build_backends, spec_options
from service.config import TandemSettings
from service.errors import APIError, bad_request, dumps, error_response, install_exception_handlers, to_api_error
from service.logs import RequestRecord, log_request
from service.metrics import CONTENT_TYPE, Metrics
from service.openai_api import (
    MAX_CHOICES,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ErrorResponse,
    ModelCard,
    ModelList,
    TandemOptions,
    render_chat,
    stats_dict,
    usage_dict,
)

log = logging.getLogger("tandem.gateway")

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
#: Larger request bodies get 413 before they are read whole.
MAX_BODY_BYTES = 32 * 2**20
#: Prompts longer than this (characters) are tokenized on a worker thread.
_TOKENIZE_INLINE_CHARS = 8192

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "Invalid parameter (param names it), or context length exceeded"},
    401: {"model": ErrorResponse, "description": "Missing or wrong API key (when keys are configured)"},
    404: {"model": ErrorResponse, "description": "Unknown model"},
    429: {"model": ErrorResponse, "description": "Queue full; see Retry-After"},
    503: {"model": ErrorResponse, "description": "Verifier unavailable or shutting down; see Retry-After"},
    504: {"model": ErrorResponse, "description": "Request timeout"},
}


class ClientGone(Exception):
    """The client disconnected before the response was ready."""


# -- the gateway's state -------------------------------------------------------------------


class Gateway:
    """Everything the routes share: settings, backends, metrics, admission, live jobs."""

    def __init__(self, settings: TandemSettings, backends: Backends | None):
        self.settings = settings
        self.backends = backends
        self.metrics = Metrics()
        self.metrics.max_concurrency.set(settings.max_concurrency)
        self.admission = Admission(settings.max_concurrency, settings.max_queue, on_change=self._admission_changed)
        self.default_options = spec_options(settings)
        self.api_keys = [k.get_secret_value().encode() for k in settings.api_keys]
        self.jobs: set[Job] = set()
        self.draining = False
        self.created = int(time.time())
        self._cutoff: asyncio.TimerHandle | None = None
        self._fingerprint: str | None = None

    def _admission_changed(self, in_use: int, waiting: int) -> None:
        self.metrics.requests_running.set(in_use)
        self.metrics.requests_waiting.set(waiting)

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            b = self.backends
            parts = [self.settings.model_name, self.settings.dtype, self.settings.device]
            if b is not None:
                parts += [b.verifier.name, b.drafter.name if b.drafter else "-"]
            self._fingerprint = "fp_tandem_" + hashlib.sha1("|".join(parts).encode()).hexdigest()[:10]
        return self._fingerprint

    def authorized(self, scope: Scope) -> bool:
        token = b""
        for name, value in scope.get("headers", ()):
            if name == b"authorization":
                scheme, _, rest = value.partition(b" ")
                if scheme.lower() == b"bearer":
                    token = rest.strip()
                break
        ok = False
        for key in self.api_keys:  # compare against every key: constant time whichever matches
            ok |= hmac.compare_digest(token, key)
        return ok

    def request_options(self, t: TandemOptions | None) -> SpecOptions:
        base = self.default_options
        if t is None:
            return base
        lo = t.min_draft_tokens
        hi = t.max_draft_tokens
        if lo is None:
            lo = base.min_draft_tokens if hi is None else min(base.min_draft_tokens, hi)
        if hi is None:
            hi = max(base.max_draft_tokens, lo)
        if t.num_draft_tokens is not None:
            num = t.num_draft_tokens
            if not lo <= num <= hi:
                raise bad_request(
                    f"num_draft_tokens ({num}) must lie within [min_draft_tokens, max_draft_tokens] = [{lo}, {hi}]",
                    "tandem.num_draft_tokens",
                )
        else:
            num = min(max(base.num_draft_tokens, lo), hi)
        return SpecOptions(
            mode=base.mode if t.mode in (None, "split") else t.mode,
            num_draft_tokens=num,
            min_draft_tokens=lo,
            max_draft_tokens=hi,
            adaptive=base.adaptive if t.adaptive is None else t.adaptive,
        )

    def route(self, t: TandemOptions | None, options: SpecOptions) -> tuple[SpeculativeRouter, SpecOptions, str]:
        """(router, options, mode label) for a request: split by the privacy policy or ``tandem.mode``."""
        use_split, mode = split_route(
            self.settings, t.mode if t is not None else None, has_drafter=self.backends.drafter is not None
        )
        if not use_split:
            return self.backends.router, options, options.mode
        if self.backends.split_router is None:
            raise bad_request("mode 'split' needs a split worker: set split_worker_url on the server", "tandem.mode")
        return self.backends.split_router, dataclasses.replace(options, mode=mode), "split"

    def begin_drain(self, grace_s: float) -> None:
        """Stop admitting requests; cut off the remaining generations after ``grace_s``."""
        if self.draining:
            return
        self.draining = True
        self.admission.close()
        log.info("draining: %d generation(s) in flight, grace %.1fs", len(self.jobs), grace_s)
        self._cutoff = asyncio.get_running_loop().call_later(grace_s, self.cut_off)

    def cut_off(self) -> None:
        if self.jobs:
            log.warning("shutdown grace period over: cutting off %d request(s)", len(self.jobs))
        for job in list(self.jobs):
            job.abort("shutdown")

    async def aclose(self) -> None:
        if self._cutoff is not None:
            self._cutoff.cancel()
        self.cut_off()
        if self.backends is not None:
            await self.backends.aclose()


# -- one request's generations ---------------------------------------------------------------

CHUNK, ERROR, DONE, ABORT = "chunk", "error", "done", "abort"


@dataclass
class ChoiceSpec:
    index: int
    prompt_ids: list[int]
    params: SamplingParams


class Job:
    """The generations of one request (one per choice) and their event queue."""

    def __init__(
        self,
        gw: Gateway,
        router: SpeculativeRouter,
        receive: Receive,
        record: RequestRecord,
        choices: list[ChoiceSpec],
        options: SpecOptions,
        prompt_tokens: int,
    ):
        self.gw = gw
        self.router = router  # the speculative core, or the same core over the split verifier
        self.record = record
        self.choices = choices
        self.options = options
        self.prompt_tokens = prompt_tokens
        loop = asyncio.get_running_loop()
        self.timeout_s = gw.settings.request_timeout_s
        self.deadline = loop.time() + self.timeout_s - (time.perf_counter() - record.t_start)
        self.events: asyncio.Queue[tuple[str, int, Any]] = asyncio.Queue()
        self.tasks: list[asyncio.Task[None]] = []
        self.slot: Slot | None = None
        self.abort_reason: str | None = None
        self.finished = False
        self.failed = False
        self.remaining = len(choices)
        self.texts: list[list[str]] = [[] for _ in choices]
        self.stats: list[GenerationStats | None] = [None] * len(choices)
        self.finish: list[str | None] = [None] * len(choices)
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
        gw, m, record, mode = self.gw, self.gw.metrics, self.record, self.record.mode
        generated = m.generation_tokens.labels(mode)
        label = "abort"
        t_prev: float | None = None
        deadline = asyncio.timeout_at(self.deadline)
        try:
            stream = self.router.stream(spec.prompt_ids, spec.params, self.options)
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
                    self.texts[spec.index].append(chunk.text)
                    self.stats[spec.index] = chunk.stats
                    if chunk.finish_reason is not None:
                        self.finish[spec.index] = label = chunk.finish_reason
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
            if self.record.mode == "split":
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


# -- Server-Sent Events ---------------------------------------------------------------------


class EventStreamResponse(Response):
    """``text/event-stream`` from an async iterator of ready-made ``data: ...\\n\\n`` events.

    Closes the job whatever happens, so the generation and its slot never
    outlive the response.
    """

    media_type = "text/event-stream"

    def __init__(self, job: Job, body: AsyncIterator[bytes], headers: dict[str, str] | None = None):
        self.job = job
        self.body_iterator = body
        self.status_code = 200
        self.background = None
        self.init_headers({"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **(headers or {})})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            async for data in self.body_iterator:
                await send({"type": "http.response.body", "body": data, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:  # the client went away
            pass
        finally:
            await self.body_iterator.aclose()  # type: ignore[attr-defined]
            self.job.close()


def _sse(obj: Any) -> bytes:
    return b"data: " + dumps(obj) + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"


async def _stream_events(
    job: Job, first: tuple[str, int, Any], head: dict[str, Any], chat: bool, include_usage: bool
) -> AsyncIterator[bytes]:
    """OpenAI's streaming chunks for ``job``, starting with the already-received ``first`` event."""
    usage_null = {"usage": None} if include_usage else {}
    obj_name = "chat.completion.chunk" if chat else "text_completion"

    def chunk(index: int, text: str | None, finish: str | None, extra: dict[str, Any] | None = None) -> bytes:
        if chat:
            delta = {"content": text} if text else {}
            choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish}
        obj = {**head, "object": obj_name, "choices": [choice], **usage_null}
        if extra:
            obj.update(extra)
        return _sse(obj)

    if chat:  # OpenAI opens every chat choice with the assistant role
        for c in job.choices:
            yield _sse({
                **head, "object": obj_name,
                "choices": [{"index": c.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                             "finish_reason": None}],
                **usage_null,
            })  # fmt: skip
    event = first
    while True:
        kind, index, payload = event
        if kind == DONE:
            break
        if kind == CHUNK:
            c: Chunk = payload
            if c.finish_reason is not None:
                yield chunk(index, c.text, c.finish_reason, {"tandem": stats_dict(job.record.mode, [c.stats])})
            elif c.text:
                yield chunk(index, c.text, None)
        else:
            if not (kind == ABORT and payload in ("disconnect", "closed")):
                err = _error_of(kind, payload, job.record)
                job.record.error = err
                yield _sse(err.body())
            yield SSE_DONE
            return
        event = await job.next_event()
    if job.gw.settings.log_prompts:
        job.record.output = ["".join(t) for t in job.texts]
    if include_usage:
        yield _sse({
            **head, "object": obj_name, "choices": [],
            "usage": usage_dict(job.prompt_tokens, job.completion_tokens),
            "tandem": stats_dict(job.record.mode, [s for s in job.stats if s is not None]),
        })  # fmt: skip
    yield SSE_DONE


def _error_of(kind: str, payload: Any, record: RequestRecord) -> APIError:
    try:
        Job.raise_for(kind, payload)
    except ClientGone:
        return APIError(499, "client closed the request", code="client_closed")
    except Exception as exc:
        return to_api_error(exc, record.request_id)
    return APIError(500, "unknown event", "server_error")  # pragma: no cover


# -- the generation handler ---------------------------------------------------------------------


async def _encode(gw: Gateway, text: str, add_special_tokens: bool = True) -> list[int]:
    tok = gw.backends.tokenizer

    def run() -> list[int]:
        return tok.encode(text, add_special_tokens=add_special_tokens)

    if len(text) > _TOKENIZE_INLINE_CHARS:
        return await asyncio.to_thread(run)
    return run()


async def _generate(request: Request, body: CompletionRequest | ChatCompletionRequest, chat: bool) -> Response:
    gw: Gateway = request.app.state.gateway
    record: RequestRecord = request.scope["tandem.record"]
    n = body.n or 1
    record.stream, record.n = bool(body.stream), n
    if gw.backends is None:
        raise APIError(503, "the models are still loading", "service_unavailable_error", code="not_ready",
                       headers={"Retry-After": "5"})  # fmt: skip
    if body.model != gw.settings.model_name:
        raise APIError(
            404, f"the model {body.model!r} does not exist; this server serves {gw.settings.model_name!r}",
            param="model", code="model_not_found", reason="not_found",
        )  # fmt: skip
    body.check_supported()
    options = gw.request_options(body.tandem)
    router, options, record.mode = gw.route(body.tandem, options)

    prompts: list[list[int]] = []
    if isinstance(body, ChatCompletionRequest):
        text, special = render_chat(gw.backends.tokenizer, body.conversation())
        prompts.append(await _encode(gw, text, special))
        record.prompt = text if gw.settings.log_prompts else None
    else:
        raw = body.prompts()
        if len(raw) * n > MAX_CHOICES:  # before tokenizing them all
            raise bad_request(f"{len(raw)} prompts x n={n} exceeds {MAX_CHOICES} choices per request", "n")
        for p in raw:
            prompts.append(await _encode(gw, p) if isinstance(p, str) else p)
        record.prompt = raw if gw.settings.log_prompts else None

    requested = body.requested_max_tokens()
    limit = gw.settings.max_prompt_tokens
    max_context = router.verifier.max_context
    choices: list[ChoiceSpec] = []
    for ids in prompts:
        if limit is not None and len(ids) > limit:
            raise APIError(
                400, f"prompt is {len(ids)} tokens; this server accepts at most {limit} prompt tokens",
                param="prompt", code="context_length_exceeded", reason="context_length",
            )  # fmt: skip
        if requested is not None:
            max_tokens = requested
        else:
            default = gw.settings.default_max_tokens or (max_context if chat else 16)
            max_tokens = max(1, min(default, max_context - len(ids)))
        params = SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if body.temperature is None else body.temperature,
            top_k=0 if body.top_k in (None, -1) else body.top_k,
            top_p=1.0 if body.top_p is None else body.top_p,
            seed=body.seed,
            stop=body.stop_list(),
            ignore_eos=bool(body.ignore_eos),
        )
        router.check_request(ids, params, options)
        for j in range(n):
            p = params if j == 0 or body.seed is None else dataclasses.replace(params, seed=body.seed + j)
            choices.append(ChoiceSpec(index=len(choices), prompt_ids=ids, params=p))
    prompt_tokens = sum(len(ids) for ids in prompts)
    record.prompt_tokens = prompt_tokens

    job = Job(gw, router, request.receive, record, choices, options, prompt_tokens)
    head = {
        "id": ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex,
        "object": "",  # set per message; placed here for OpenAI's key order
        "created": int(time.time()),
        "model": gw.settings.model_name,
        "system_fingerprint": gw.fingerprint,
    }
    handed_off = False
    try:
        await job.admit()
        job.start()
        if body.stream:
            first = await job.next_event()
            if first[0] in (ERROR, ABORT):
                job.raise_for(first[0], first[2])
            handed_off = True
            stream = _stream_events(job, first, head, chat, body.include_usage)
            return EventStreamResponse(job, stream)
        await job.wait()
    except ClientGone:
        return error_response(APIError(499, "client closed the request", code="client_closed"))
    finally:
        if not handed_off:
            job.close()

    texts = ["".join(t) for t in job.texts]
    if gw.settings.log_prompts:
        record.output = texts
    if chat:
        out_choices = [
            {"index": c.index, "message": {"role": "assistant", "content": texts[c.index]}, "logprobs": None,
             "finish_reason": job.finish[c.index]}
            for c in choices
        ]  # fmt: skip
    else:
        out_choices = [
            {"index": c.index, "text": texts[c.index], "logprobs": None, "finish_reason": job.finish[c.index]}
            for c in choices
        ]
    out = {
        **head,
        "object": "chat.completion" if chat else "text_completion",
        "choices": out_choices,
        "usage": usage_dict(prompt_tokens, job.completion_tokens),
        "tandem": stats_dict(record.mode, [s for s in job.stats if s is not None]),
    }
    return Response(dumps(out), media_type="application/json")


# -- middleware: request id, auth, request metrics, the log line ------------------------------------


class GatewayMiddleware:
    def __init__(self, app: Any, gateway: Gateway):
        self.app = app
        self.gw = gateway

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        gw = self.gw
        request_id = None
        for name, value in scope.get("headers", ()):
            if name == b"x-request-id":
                candidate = value.decode("latin-1")
                if _REQUEST_ID.match(candidate):
                    request_id = candidate
                break
        if scope["path"] in _JSON_ROUTES:
            _force_json_content_type(scope)
        record = RequestRecord(request_id=request_id or uuid.uuid4().hex, method=scope["method"], path=scope["path"])
        scope["tandem.record"] = record
        scope.setdefault("state", {})["request_id"] = record.request_id
        started = False

        async def send_wrapper(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                record.status = message["status"]
                MutableHeaders(scope=message).append("X-Request-Id", record.request_id)
            await send(message)

        path = scope["path"]
        too_large = False
        content_length = next((v for k, v in scope.get("headers", ()) if k == b"content-length"), None)
        if content_length is not None and content_length.isdigit() and int(content_length) > MAX_BODY_BYTES:
            too_large = True
        else:
            receive = _limit_body(receive, MAX_BODY_BYTES)
        try:
            if too_large:
                record.error = APIError(413, "the request body is too large", code="request_too_large", reason="invalid")
                await error_response(record.error)(scope, receive, send_wrapper)
            elif gw.api_keys and (path == "/v1" or path.startswith("/v1/")) and not gw.authorized(scope):
                record.error = APIError(
                    401, "invalid or missing API key: send 'Authorization: Bearer <key>'",
                    code="invalid_api_key", reason="unauthorized",
                    headers={"WWW-Authenticate": "Bearer"},
                )  # fmt: skip
                await error_response(record.error)(scope, receive, send_wrapper)
            else:
                await self.app(scope, receive, send_wrapper)
        except Exception as exc:  # nothing may escape as a traceback page
            log.error("unhandled error (request id %s)", record.request_id, exc_info=exc)
            if not started:
                record.error = to_api_error(exc, record.request_id)
                await error_response(record.error)(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            record.route = getattr(route, "path", None) or ("other" if path not in _ROUTE_PATHS else path)
            status = str(record.status or 500)
            gw.metrics.requests.labels(record.route, status, record.mode).inc()
            err = record.error
            if err is not None and getattr(err, "reason", None) and not started_generation(record):
                gw.metrics.requests_rejected.labels(err.reason).inc()
            log_request(record, gw.settings.log_prompts)


_JSON_ROUTES = {"/v1/completions", "/v1/chat/completions"}


def _limit_body(receive: Receive, limit: int) -> Receive:
    """Fail a body without Content-Length (chunked) once it passes ``limit`` bytes: 413."""
    total = 0

    async def limited() -> Message:
        nonlocal total
        message = await receive()
        if message["type"] == "http.request":
            total += len(message.get("body", b""))
            if total > limit:
                raise StarletteHTTPException(413, "the request body is too large")
        return message

    return limited


def _force_json_content_type(scope: Scope) -> None:
    """Read the generation routes' bodies as JSON whatever the Content-Type (``curl -d`` sends a form type)."""
    headers = [(k, v) for k, v in scope.get("headers", ()) if k != b"content-type"]
    headers.append((b"content-type", b"application/json"))
    scope["headers"] = headers


def started_generation(record: RequestRecord) -> bool:
    return record.ttft_s is not None


_ROUTE_PATHS = {"/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/ready", "/metrics"}


# -- the app -----------------------------------------------------------------------------------------


def create_app(settings: TandemSettings | None = None, backends: Backends | None = None) -> FastAPI:
    """The gateway app. Without ``backends``, its lifespan loads them from ``settings``.

    The app owns the backends either way: its shutdown closes them.
    """
    settings = settings or TandemSettings.load()
    gw = Gateway(settings, backends)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if gw.backends is None:
            gw.backends = await asyncio.to_thread(build_backends, settings)
        if gw.backends.split_router is not None:
            split_verifier = gw.backends.split_router.verifier
            gw.metrics.split_sessions.set_function(lambda: split_verifier.open_sessions)
        log.info(
            "ready: model %r (verifier %s, drafter %s), mode %s, %d slots, queue %d, auth %s",
            settings.model_name, gw.backends.verifier.name, gw.backends.drafter.name if gw.backends.drafter else "-",
            settings.mode, settings.max_concurrency, settings.max_queue, "on" if gw.api_keys else "off",
        )  # fmt: skip
        try:
            yield
        finally:
            await gw.aclose()

    app = FastAPI(
        title="tandem",
        summary="OpenAI-compatible gateway for collaborative (speculative) decoding",
        version=_version(),
        lifespan=lifespan,
        strict_content_type=False,
    )
    app.state.gateway = gw
    install_exception_handlers(app)
    app.add_middleware(GatewayMiddleware, gateway=gw)

    @app.post(
        "/v1/completions",
        response_model=None,
        responses={200: {"model": CompletionResponse, "content": {"text/event-stream": {}}}, **ERROR_RESPONSES},
        summary="Create a completion (OpenAI-compatible)",
    )
    async def completions(request: Request, body: CompletionRequest) -> Response:
        return await _generate(request, body, chat=False)

    @app.post(
        "/v1/chat/completions",
        response_model=None,
        responses={200: {"model": ChatCompletionResponse, "content": {"text/event-stream": {}}}, **ERROR_RESPONSES},
        summary="Create a chat completion (OpenAI-compatible)",
    )
    async def chat_completions(request: Request, body: ChatCompletionRequest) -> Response:
        return await _generate(request, body, chat=True)

    def model_card() -> dict[str, Any]:
        card = ModelCard(id=settings.model_name, created=gw.created, owned_by="tandem")
        if gw.backends is not None:
            card.max_model_len = gw.backends.verifier.max_context
        return card.model_dump()

    @app.get("/v1/models", response_model=ModelList, summary="List the served model")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}", response_model=ModelCard, responses={404: ERROR_RESPONSES[404]})
    async def get_model(model_id: str) -> dict[str, Any]:
        if model_id != settings.model_name:
            raise APIError(404, f"the model {model_id!r} does not exist", param="model", code="model_not_found",
                           reason="not_found")  # fmt: skip
        return model_card()

    @app.get("/health", summary="Liveness: the process answers")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready", summary="Readiness: models loaded and the verifier answering", responses={503: ERROR_RESPONSES[503]})
    async def ready() -> Response:
        if gw.draining:
            raise ShuttingDownError("the server is shutting down")
        if gw.backends is None:
            raise APIError(503, "the models are still loading", "service_unavailable_error", code="not_ready",
                           headers={"Retry-After": "5"})  # fmt: skip
        body = {"status": "ready", "model": settings.model_name}
        split_router = gw.backends.split_router
        try:
            await asyncio.wait_for(gw.backends.verifier.check_ready(), timeout=10)
            if split_router is not None:
                try:
                    await asyncio.wait_for(split_router.verifier.check_ready(), timeout=10)
                    body["split_worker"] = "ready"
                except (VerifierUnavailableError, TimeoutError):
                    # Only private requests need the worker: unless every request does, the gateway
                    # stays in rotation for the others and says what is missing.
                    if settings.split_policy == "always":
                        raise
                    body["split_worker"] = "unavailable"
        except (VerifierUnavailableError, TimeoutError) as exc:
            gw.metrics.verifier_errors.labels("unavailable" if isinstance(exc, VerifierUnavailableError) else "timeout").inc()
            raise VerifierUnavailableError(str(exc) or "the readiness check timed out") from None
        return Response(dumps(body), media_type="application/json")

    @app.get("/metrics", summary="Prometheus metrics", response_class=Response)
    async def metrics() -> Response:
        return Response(gw.metrics.render(), media_type=CONTENT_TYPE)

    return app


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("tandem")
    except Exception:
        return "0.0.0"
