"""The gateway's ASGI middleware: request id, body limit, auth, request metrics and the log line."""

from __future__ import annotations

import logging
import re
import uuid
from typing import Any

from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Message, Receive, Scope, Send

from service.errors import APIError, error_response, to_api_error
from service.gateway import Gateway
from service.logs import RequestRecord, log_request

log = logging.getLogger("tandem.gateway")

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
#: Larger request bodies get 413 before they are read whole.
MAX_BODY_BYTES = 32 * 2**20
#: Read as JSON whatever their Content-Type.
_JSON_ROUTES = {"/v1/completions", "/v1/chat/completions"}
#: The route label of a request that matched no route (a 404 on one of these still names it).
_ROUTE_PATHS = {"/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/ready", "/metrics"}


class GatewayMiddleware:
    """Around every HTTP request: its id, the body limit, auth on ``/v1/*``, the request metrics and log line.

    Nothing escapes it as a traceback page: an unexpected error becomes a 500
    with OpenAI's body (if the response has not started).
    """

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
        head_bytes = _head_bytes(scope)
        too_large = False
        content_length = next((v for k, v in scope.get("headers", ()) if k == b"content-length"), None)
        if content_length is not None and content_length.isdigit() and int(content_length) > MAX_BODY_BYTES:
            too_large = True
        else:
            receive = _limit_body(receive, MAX_BODY_BYTES)
        try:
            if head_bytes > gw.settings.max_header_bytes:
                # h11 bounds a head that arrives in pieces; one that arrives whole (up to a read, 256 KiB) ends here.
                record.error = APIError(
                    431, f"the request line and headers are {head_bytes} bytes; the limit is {gw.settings.max_header_bytes}",
                    code="request_header_fields_too_large", reason="invalid",
                )  # fmt: skip
                await error_response(record.error)(scope, receive, send_wrapper)
            elif too_large:
                record.error = APIError(413, "the request body is too large", code="request_too_large", reason="invalid")
                await error_response(record.error)(scope, receive, send_wrapper)
            elif gw.api_keys and (path == "/v1" or path.startswith("/v1/")) and not gw.api_keys.allows_scope(scope):
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
            # A refused request is a rejection; one that failed after its first token is not.
            if err is not None and getattr(err, "reason", None) and record.ttft_s is None:
                gw.metrics.requests_rejected.labels(err.reason).inc()
            log_request(record, gw.settings.log_prompts)


def _head_bytes(scope: Scope) -> int:
    """The size of the request line and headers as sent (give or take the HTTP version and separators)."""
    size = len(scope["method"]) + len(scope.get("raw_path") or b"") + len(scope.get("query_string") or b"") + 12
    return size + sum(len(k) + len(v) + 4 for k, v in scope.get("headers", ()))


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
