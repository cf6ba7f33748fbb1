"""The gateway's ASGI middleware: request id, head and body limits, auth, the preparation gate, request metrics
and the log line."""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from typing import Any

from starlette.datastructures import MutableHeaders
from starlette.requests import ClientDisconnect
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Message, Receive, Scope, Send

from service.admission import QueueFullError, RequestTimeoutError, ShuttingDownError
from service.errors import APIError, bad_request, error_response, to_api_error
from service.gateway import Gateway
from service.logs import RequestRecord, log_request
from service.memory import max_json_values

log = logging.getLogger("tandem.gateway")

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
#: Read as JSON whatever their Content-Type; a POST to one of them passes the preparation gate.
_JSON_ROUTES = {"/v1/completions", "/v1/chat/completions"}
_PREPARATION = "tandem.preparation"
#: The route label of a request that matched no route (a 404 on one of these still names it).
_ROUTE_PATHS = {"/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/ready", "/metrics"}


class PreparationGate:
    """At most ``slots`` generation requests between their body and their plan: a large body read, the JSON parsed,
    validated, templated and tokenized (:func:`service.plan.plan_request`), the part of a request whose memory grows
    with its body. The others wait here with their large bodies unread (uvicorn stops reading a connection past
    64 KiB), so N requests at once cost ``slots`` parsed bodies, not N.

    A request leaves the gate when its plan is made (:func:`prepared`, called by the route) or when it ends.
    Waiting counts toward the request's timeout; when ``max_waiting`` already wait, or the admission queue is
    full (the request would get 429 after its preparation anyway), the answer is 429 at once, body unread.
    """

    def __init__(self, slots: int, max_waiting: int):
        self.slots = slots
        self.max_waiting = max_waiting
        self.waiting = 0
        self._sem = asyncio.Semaphore(slots)

    async def enter(self, gw: Gateway, scope: Scope, record: RequestRecord) -> APIError | None:
        """Wait for a slot; None once in, else the refusal to send (429, 503 while draining, 504)."""
        admission = gw.admission
        if admission.closed:
            return to_api_error(ShuttingDownError("the server is shutting down"))
        queue_full = admission.waiting >= admission.max_queue and admission.in_use >= admission.capacity
        if queue_full or self.waiting >= self.max_waiting:
            return to_api_error(QueueFullError(admission.retry_after_s()))
        timeout_s = gw.settings.request_timeout_s - (time.perf_counter() - record.t_start)
        self.waiting += 1
        try:
            async with asyncio.timeout(max(0.0, timeout_s)):
                await self._sem.acquire()
        except TimeoutError:
            return to_api_error(RequestTimeoutError(gw.settings.request_timeout_s))
        finally:
            self.waiting -= 1
        scope[_PREPARATION] = self
        return None

    def leave(self, scope: Scope) -> None:
        if scope.pop(_PREPARATION, None) is self:
            self._sem.release()


def prepared(scope: Scope) -> None:
    """The request's plan is made: it leaves the preparation gate (idempotent; a no-op for requests outside it)."""
    gate = scope.get(_PREPARATION)
    if gate is not None:
        gate.leave(scope)


class GatewayMiddleware:
    """Around every HTTP request: its id, the head and body limits, auth on ``/v1/*``, the preparation gate of the
    generation routes, the request metrics and log line.

    Nothing escapes it as a traceback page: an unexpected error becomes a 500
    with OpenAI's body (if the response has not started).
    """

    def __init__(self, app: Any, gateway: Gateway):
        self.app = app
        self.gw = gateway
        self.gate = PreparationGate(gateway.settings.max_preparing, max(1, gateway.settings.max_queue))

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
        settings = gw.settings
        head_bytes = _head_bytes(scope)
        too_large = False
        content_length = _content_length(scope)
        if content_length is not None and content_length > settings.max_request_bytes:
            too_large = True
        else:
            receive = _limit_body(receive, settings.max_request_bytes, settings.body_timeout_s)
        gated = scope["method"] == "POST" and path in _JSON_ROUTES
        try:
            if head_bytes > gw.settings.max_header_bytes:
                # h11 bounds a head that arrives in pieces; one that arrives whole (up to a read, 256 KiB) ends here.
                record.error = APIError(
                    431, f"the request line and headers are {head_bytes} bytes; the limit is {gw.settings.max_header_bytes}",
                    code="request_header_fields_too_large", reason="invalid",
                )  # fmt: skip
                await error_response(record.error)(scope, receive, send_wrapper)
            elif too_large:
                # Closing saves reading (and discarding) the body to keep the connection.
                record.error = APIError(413, "the request body is too large", code="request_too_large", reason="invalid",
                                        headers={"Connection": "close"})  # fmt: skip
                await error_response(record.error)(scope, receive, send_wrapper)
            elif gw.api_keys and (path == "/v1" or path.startswith("/v1/")) and not gw.api_keys.allows_scope(scope):
                record.error = APIError(
                    401, "invalid or missing API key: send 'Authorization: Bearer <key>'",
                    code="invalid_api_key", reason="unauthorized",
                    headers={"WWW-Authenticate": "Bearer"},
                )  # fmt: skip
                await error_response(record.error)(scope, receive, send_wrapper)
            elif gated:
                await self._call_prepared(scope, receive, send_wrapper, record)
            else:
                await self.app(scope, receive, send_wrapper)
        except Exception as exc:  # nothing may escape as a traceback page
            log.error("unhandled error (request id %s)", record.request_id, exc_info=exc)
            if not started:
                record.error = to_api_error(exc, record.request_id)
                await error_response(record.error)(scope, receive, send_wrapper)
        finally:
            self.gate.leave(scope)
            route = scope.get("route")
            record.route = getattr(route, "path", None) or ("other" if path not in _ROUTE_PATHS else path)
            status = str(record.status or 500)
            gw.metrics.requests.labels(record.route, status, record.mode).inc()
            err = record.error
            # A refused request is a rejection; one that failed after its first token is not.
            if err is not None and getattr(err, "reason", None) and record.ttft_s is None:
                gw.metrics.requests_rejected.labels(err.reason).inc()
            log_request(record, gw.settings.log_prompts)


    async def _call_prepared(self, scope: Scope, receive: Receive, send: Send, record: RequestRecord) -> None:
        """A generation request: its body read whole, through the gate, its JSON structure counted before the app
        parses it (the app then reads the body from memory).

        A small body (Content-Length within uvicorn's 64 KiB buffer, memory every connection may hold anyway) is
        read before the gate, so a client sending it slowly holds its own connection only, never a slot; a larger
        or chunked one is read inside the gate, which is what bounds how many of those are in memory."""
        small = _content_length(scope) is not None and _content_length(scope) <= SMALL_BODY_BYTES
        refusal: APIError | None = None
        body = b""
        if not small:
            refusal = await self.gate.enter(self.gw, scope, record)
        if refusal is None:
            try:
                body = await _read_body(receive)
            except StarletteHTTPException as exc:  # 413 or 408 from _limit_body; the rest of the body is unread: close
                code, reason = ("request_too_large", "invalid") if exc.status_code == 413 else ("body_timeout", "timeout")
                refusal = APIError(exc.status_code, str(exc.detail), code=code, reason=reason, headers={"Connection": "close"})
            except ClientDisconnect:
                record.status, record.aborted = 499, "disconnect"
                return
        if refusal is None and small:
            refusal = await self.gate.enter(self.gw, scope, record)
        if refusal is None and self.gw.backends is not None:
            limit = max_json_values(self.gw.settings, self.gw.backends.verifier.max_context)
            values = await json_values(body, limit)
            if values > limit:
                refusal = bad_request(
                    f"the request body holds {values} JSON values (arrays, objects, numbers, strings); this server "
                    f"parses at most {limit}"
                )
        if refusal is not None:
            record.error = refusal
            await error_response(refusal)(scope, receive, send)
            return
        await self.app(scope, _replay(body, receive), send)


#: A JSON string, quotes and escapes included (unrolled: no backtracking per character).
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')


async def json_values(body: bytes, limit: int) -> int:
    """The values in the JSON text ``body``, exact enough to compare with ``limit``: the separators and openers
    outside strings, plus one. Counted in C (``bytes.count``): first ignoring strings (an over-count); past
    ``limit``, a lower bound, the strings themselves (every unescaped quote pair is one value); only in between
    are the strings removed (a regex, on a worker thread) and the count made again: the text of a few large
    strings full of commas, a cheap case."""
    quick = body.count(b",") + body.count(b"[") + body.count(b"{") + 1
    if quick <= limit:
        return quick
    strings = (body.count(b'"') - body.count(b'\\"')) // 2
    if strings > limit:
        return strings

    def exact() -> int:
        bare = _JSON_STRING.sub(b'""', body)
        return bare.count(b",") + bare.count(b"[") + bare.count(b"{") + 1

    return await asyncio.to_thread(exact)


async def _read_body(receive: Receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    """``receive`` for the app: the body read already, then the connection's own (its disconnect)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


#: A body this small is read before the preparation gate (uvicorn buffers 64 KiB of a connection regardless).
SMALL_BODY_BYTES = 64 << 10


def _content_length(scope: Scope) -> int | None:
    value = next((v for k, v in scope.get("headers", ()) if k == b"content-length"), None)
    return int(value) if value is not None and value.isdigit() else None


def _head_bytes(scope: Scope) -> int:
    """The size of the request line and headers as sent (give or take the HTTP version and separators)."""
    size = len(scope["method"]) + len(scope.get("raw_path") or b"") + len(scope.get("query_string") or b"") + 12
    return size + sum(len(k) + len(v) + 4 for k, v in scope.get("headers", ()))


def _limit_body(receive: Receive, limit: int, timeout_s: float) -> Receive:
    """Fail a body without Content-Length (chunked) once it passes ``limit`` bytes: 413; and a body that has not
    arrived whole ``timeout_s`` after the first read: 408. (Once the body is complete, ``receive`` is only waited
    on for the client's disconnect, without a deadline.)"""
    total = 0
    deadline: float | None = None
    complete = False

    async def limited() -> Message:
        nonlocal total, deadline, complete
        if complete:
            return await receive()
        loop = asyncio.get_running_loop()
        if deadline is None:
            deadline = loop.time() + timeout_s
        try:
            async with asyncio.timeout_at(deadline):
                message = await receive()
        except TimeoutError:
            raise StarletteHTTPException(408, f"the request body did not arrive within {timeout_s:g}s") from None
        if message["type"] == "http.request":
            total += len(message.get("body", b""))
            if total > limit:
                raise StarletteHTTPException(413, "the request body is too large")
            complete = not message.get("more_body", False)
        else:
            complete = True
        return message

    return limited


def _force_json_content_type(scope: Scope) -> None:
    """Read the generation routes' bodies as JSON whatever the Content-Type (``curl -d`` sends a form type)."""
    headers = [(k, v) for k, v in scope.get("headers", ()) if k != b"content-type"]
    headers.append((b"content-type", b"application/json"))
    scope["headers"] = headers
