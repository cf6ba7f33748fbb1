"""HTTP/1.1 connections: uvicorn's h11 protocol, plus the limits uvicorn (0.55) has no setting for.

What uvicorn already does is configured, not rewritten (``service.server``): the size of a request head
(``h11_max_incomplete_event_size``), the idle keep-alive timeout (``timeout_keep_alive``), the listen
``backlog``, the drain on shutdown. What it lacks, :class:`LimitedH11Protocol` adds:

* **A request-head deadline.** uvicorn's keep-alive timer stops at the first byte of the next request and
  nothing times the head itself: one header byte every 2 s holds a connection forever, and a connection
  that sends nothing at all is never timed out. Here the request line and headers must be complete within
  ``header_timeout_s`` of the connection's opening or of the end of its previous response; otherwise the
  connection is closed. (No response: there is no request to answer yet.)
* **A cap on open connections.** uvicorn's ``limit_concurrency`` answers 503 only once a request arrives,
  so silent connections are never refused, and it counts the connection asking (N allows N - 1). Here,
  when a connection is accepted beyond ``max_connections``, the connection that has waited longest for a
  request head (a silent one, or an idle keep-alive one) is closed to make room; only when every
  connection has a request in flight is the new one closed instead. So the process holds at most
  ``max_connections`` connections (plus what one accept batch brings in before they are closed), and a
  flood of idle connections cannot keep a prompt client (a health probe) out.
* **Protocol errors in OpenAI's envelope.** h11 refuses a malformed request line or header, a non-numeric
  Content-Length or a head over the size limit; uvicorn answers those with a text/plain 400. Here the 400
  carries ``{"error": {...}}`` with code ``invalid_http_request``, like every other error.

The warnings of a flood (bad requests, refused connections) are rate-limited by ``service.logs``.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any, ClassVar

import h11
from uvicorn.protocols.http.h11_impl import STATUS_PHRASES, H11Protocol

from service.http import dumps, error_body

log = logging.getLogger("tandem.connections")


@dataclass(frozen=True)
class ConnectionLimits:
    header_timeout_s: float = 10.0
    max_connections: int = 1024


def limited_protocol(limits: ConnectionLimits) -> type[LimitedH11Protocol]:
    """A protocol class for one server (``uvicorn.Config(http=...)``), with ``limits`` and its own waiting list."""
    return type("LimitedH11Protocol", (LimitedH11Protocol,), {"limits": limits, "waiting": {}})


class LimitedH11Protocol(H11Protocol):
    limits: ClassVar[ConnectionLimits] = ConnectionLimits()
    #: The server's connections waiting for a request head, longest-waiting first (a dict: ordered, O(1) removal).
    waiting: ClassVar[dict[LimitedH11Protocol, None]] = {}

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.limits.max_connections:
            if self.waiting:  # make room: the connection that has waited longest for a request
                oldest = next(iter(self.waiting))
                oldest._close_waiting()
                reason = "closing the connection that waited longest for a request"
            else:  # every connection has a request in flight
                transport.close()
                reason = "every connection has a request in flight: closing new ones"
            log.warning(
                "connection limit reached (max_connections=%d): %s", self.limits.max_connections, reason,
                extra={"rate_limit": "max_connections"},
            )  # fmt: skip
            if transport.is_closing():
                return
        self._arm_head_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_deadline()
        super().connection_lost(exc)

    def handle_events(self) -> None:
        super().handle_events()
        if self.conn.their_state is not h11.IDLE:  # a request head is complete (or the connection failed)
            self._cancel_head_deadline()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        # Waiting for the next request on this connection: its head has the same deadline as the first.
        if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
            self._arm_head_deadline()

    def _arm_head_deadline(self) -> None:
        self._cancel_head_deadline()
        self._head_deadline = self.loop.call_later(self.limits.header_timeout_s, self._head_timed_out)
        self.waiting[self] = None

    def _cancel_head_deadline(self) -> None:
        self.waiting.pop(self, None)
        if self._head_deadline is not None:
            self._head_deadline.cancel()
            self._head_deadline = None

    def _head_timed_out(self) -> None:
        self._head_deadline = None
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            self.waiting.pop(self, None)
            return
        log.info(
            "closed a connection whose request head did not arrive within %gs", self.limits.header_timeout_s,
            extra={"rate_limit": "header_timeout"},
        )  # fmt: skip
        self._close_waiting()

    def _close_waiting(self) -> None:
        """Close this connection, which is waiting for a request head (nothing is lost: no request has begun)."""
        self._cancel_head_deadline()
        try:
            self.conn.send(h11.ConnectionClosed())
        except h11.LocalProtocolError:
            pass
        self.transport.close()

    def send_400_response(self, msg: str) -> None:
        """h11 refused the request: OpenAI's envelope instead of uvicorn's text/plain (``msg`` is uvicorn's fixed
        "Invalid HTTP request received.", which says no more than this)."""
        body = dumps(error_body(
            "the request is not valid HTTP/1.1: a malformed request line or header, a non-numeric Content-Length, "
            "or a request head over the size limit", "invalid_request_error", None, "invalid_http_request",
        ))  # fmt: skip
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
        ]
        try:
            output = self.conn.send(h11.Response(status_code=400, headers=headers, reason=STATUS_PHRASES[400]))
            output += self.conn.send(h11.Data(data=body))
            output += self.conn.send(h11.EndOfMessage())
            self.transport.write(output)
        except h11.LocalProtocolError:  # a response had already started: nothing more can be said on it
            pass
        self.transport.close()
