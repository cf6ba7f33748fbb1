"""The gateway's exceptions as OpenAI errors, and the FastAPI handlers that send them.

Every error the gateway returns has OpenAI's shape,
``{"error": {"message", "type", "param", "code"}}`` (the envelope of
:mod:`service.http`, which every tandem server shares), so that OpenAI clients
raise their usual exceptions (BadRequestError, AuthenticationError, ...):

====== ============================ ==================================================
status type                         when
====== ============================ ==================================================
400    invalid_request_error        a parameter is invalid (``param`` names it);
                                    code ``context_length_exceeded`` for a prompt or
                                    max_tokens beyond the context; FastAPI's 422 is
                                    never sent
401    invalid_request_error        missing/wrong API key (code ``invalid_api_key``)
404    invalid_request_error        unknown model (code ``model_not_found``) or route
408    invalid_request_error        the body did not arrive within ``body_timeout_s`` (``body_timeout``)
413    invalid_request_error        request body over ``max_request_bytes`` (code ``request_too_large``)
429    rate_limit_error             queue full (code ``queue_full``), with Retry-After
503    service_unavailable_error    verifier unavailable / shutting down, Retry-After
504    timeout_error                the request ran past ``request_timeout_s``
500    server_error                 anything unexpected; the message never carries
                                    the exception text or a traceback (the log does)
====== ============================ ==================================================
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from decoding.sampling import InvalidRequestError
from decoding.verifiers import VerifierUnavailableError
from service.admission import QueueFullError, RequestTimeoutError, ShuttingDownError
from service.http import error_body, json_error

log = logging.getLogger("tandem.errors")


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
        reason: str | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}
        #: the ``reason`` label of tandem_requests_rejected_total, if this is a rejection
        self.reason = reason

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, "invalid_request_error", param, code, reason="invalid")


def to_api_error(exc: BaseException, request_id: str | None = None) -> APIError:
    """Map any exception to the OpenAI error the client should see."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, InvalidRequestError):
        if exc.code == "context_length_exceeded":
            return APIError(400, str(exc), param=exc.param, code=exc.code, reason="context_length")
        return bad_request(str(exc), exc.param)
    if isinstance(exc, QueueFullError):
        return APIError(
            429, str(exc), "rate_limit_error", code="queue_full",
            headers={"Retry-After": str(exc.retry_after_s)}, reason="queue_full",
        )  # fmt: skip
    if isinstance(exc, ShuttingDownError):
        return APIError(
            503, "the server is shutting down and accepts no new requests", "service_unavailable_error",
            code="shutting_down", headers={"Retry-After": str(exc.retry_after_s)}, reason="shutting_down",
        )  # fmt: skip
    if isinstance(exc, VerifierUnavailableError):
        return APIError(
            503, f"the verifier is unavailable: {exc}", "service_unavailable_error",
            code="verifier_unavailable", headers={"Retry-After": "5"},
        )  # fmt: skip
    if isinstance(exc, RequestTimeoutError):
        return APIError(504, str(exc), "timeout_error", code="request_timeout", reason="timeout")
    suffix = f" (request id {request_id})" if request_id else ""
    return APIError(500, f"the server had an internal error while processing the request{suffix}", "server_error")


def error_response(err: APIError) -> Response:
    return json_error(err.status, err.message, err.code, type=err.type, param=err.param, headers=err.headers)


# -- FastAPI's validation errors -> 400 ------------------------------------------------

_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none", "null", "literal"}


def _param_of(loc: tuple[Any, ...]) -> str | None:
    """('body', 'messages', 0, 'content', 'str') -> 'messages[0].content'."""
    parts: list[str] = []
    for seg in loc[1:] if loc and loc[0] == "body" else loc:
        if isinstance(seg, int):
            if not parts:
                break
            parts[-1] += f"[{seg}]"
            continue
        seg = str(seg)
        # pydantic names the union member it tried: 'str', 'list[int]', 'function-after[...]'
        if seg.lower() in _TYPE_TAGS or "[" in seg or "-" in seg:
            break
        parts.append(seg)
    return ".".join(parts) or None


def validation_error(exc: RequestValidationError) -> APIError:
    errors = list(exc.errors())
    if not errors:
        return bad_request("invalid request body")
    first = errors[0]
    etype = first.get("type", "")
    loc = tuple(first.get("loc", ()))
    if etype == "json_invalid":
        return bad_request(f"request body is not valid JSON: {first.get('ctx', {}).get('error', first.get('msg'))}")
    if loc in (("body",), ()):
        if etype == "missing":
            return bad_request("request body is missing: send a JSON object (Content-Type: application/json)")
        return bad_request(f"request body must be a JSON object: {first.get('msg')}")
    param = _param_of(loc)
    seen: dict[str | None, str] = {}
    for err in errors:
        p = _param_of(tuple(err.get("loc", ())))
        if p not in seen:
            msg = str(err.get("msg", "invalid value"))
            if err.get("type") == "missing":
                msg = "this parameter is required"
            elif err.get("type") == "extra_forbidden":
                msg = "unknown field"
            seen[p] = msg.removeprefix("Value error, ")
        if len(seen) >= 3:
            break
    message = "; ".join(f"{p}: {m}" if p else m for p, m in seen.items())
    return bad_request(message, param)


def install_exception_handlers(app: FastAPI) -> None:
    async def on_api_error(request: Request, exc: Exception) -> Response:
        err = to_api_error(exc)
        _note_rejection(request, err)
        return error_response(err)

    async def on_validation_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        err = validation_error(exc)
        _note_rejection(request, err)
        return error_response(err)

    async def on_http_exception(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        if exc.status_code == 404:
            err = APIError(404, f"no route {request.method} {request.url.path}", code="not_found", reason="not_found")
        elif exc.status_code == 413:
            err = APIError(413, "the request body is too large", code="request_too_large", reason="invalid")
        elif exc.status_code == 408:
            err = APIError(408, str(exc.detail), code="body_timeout", reason="timeout")
        elif exc.status_code == 405:
            err = APIError(405, f"method {request.method} is not allowed on {request.url.path}", code="method_not_allowed")
        else:
            err = APIError(exc.status_code, str(exc.detail), "invalid_request_error" if exc.status_code < 500 else "server_error")
        _note_rejection(request, err)
        return error_response(err)

    async def on_unexpected(request: Request, exc: Exception) -> Response:
        request_id = getattr(request.state, "request_id", None)
        log.error("unhandled error (request id %s)", request_id, exc_info=exc)
        err = to_api_error(exc, request_id)
        _note_rejection(request, err)
        return error_response(err)

    for exc_type in (
        APIError, InvalidRequestError, QueueFullError, ShuttingDownError, VerifierUnavailableError, RequestTimeoutError
    ):
        app.add_exception_handler(exc_type, on_api_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(StarletteHTTPException, on_http_exception)
    app.add_exception_handler(Exception, on_unexpected)


def _note_rejection(request: Request, err: APIError) -> None:
    record = request.scope.get("tandem.record")
    if record is not None:
        record.error = err
