"""HTTP conventions shared by every tandem server: bearer auth and the OpenAI error envelope.

The gateway, the split worker and the verify route inside vLLM all answer with
``{"error": {"message", "type", "param", "code"}}`` and check API keys the same
way, so a client (or an operator reading logs) meets one contract.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Iterable
from typing import Any

from starlette.responses import Response


def error_type(status: int) -> str:
    """OpenAI's error ``type`` for an HTTP status."""
    return {429: "rate_limit_error", 503: "service_unavailable_error", 504: "timeout_error"}.get(
        status, "invalid_request_error" if status < 500 else "server_error"
    )


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def dumps(obj: Any) -> bytes:
    """JSON for the wire. Falls back to ASCII escapes for lone surrogates (which UTF-8 cannot carry)."""
    try:
        return json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode("utf-8")
    except (UnicodeEncodeError, ValueError):
        return json.dumps(obj, ensure_ascii=True, separators=(",", ":"), default=str).encode("ascii")


def json_error(
    status: int,
    message: str,
    code: str | None = None,
    *,
    type: str | None = None,
    param: str | None = None,
    headers: dict[str, str] | None = None,
) -> Response:
    """An OpenAI error response. 429 and 503 carry ``Retry-After`` (1 s unless given)."""
    headers = dict(headers or {})
    if status in (429, 503):
        headers.setdefault("Retry-After", "1")
    body = error_body(message, type or error_type(status), param, code)
    return Response(dumps(body), status_code=status, headers=headers, media_type="application/json")


class APIKeys:
    """Bearer keys compared in constant time: every key is compared, whichever matches.

    An empty or whitespace key is a ValueError, never dropped: dropping it would turn auth off
    while the operator believes a key is set.
    """

    def __init__(self, keys: Iterable[str | bytes]):
        self._keys = [k.encode() if isinstance(k, str) else k for k in keys]
        if any(not k.strip() for k in self._keys):
            raise ValueError("an API key is empty or whitespace")

    def __bool__(self) -> bool:
        return bool(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def allows(self, authorization: str | bytes | None) -> bool:
        """True when no keys are set, or ``authorization`` is ``Bearer <one of the keys>``."""
        if not self._keys:
            return True
        if isinstance(authorization, str):
            authorization = authorization.encode("latin-1", "replace")
        scheme, _, token = (authorization or b"").partition(b" ")
        token = token.strip() if scheme.lower() == b"bearer" else b""
        ok = False
        for key in self._keys:
            ok |= hmac.compare_digest(token, key)
        return ok

    def allows_scope(self, scope: Any) -> bool:
        """``allows`` on an ASGI scope's Authorization header (the first one)."""
        value = next((v for k, v in scope.get("headers", ()) if k == b"authorization"), None)
        return self.allows(value)
