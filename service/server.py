"""``tandem serve``: the gateway under uvicorn, with a graceful drain on SIGTERM.

Shutdown (SIGTERM or Ctrl-C): the listening socket closes; idle keep-alive
connections are closed at once (uvicorn's shutdown: a clean close, no
response); a connection with a request in flight finishes it with
``Connection: close``; queued requests, and requests already read but not yet
admitted, get 503 ``shutting_down``; in-flight generations may finish for
``shutdown_grace_s`` seconds; after that they are cut off (a stream gets an
error event and ``[DONE]``), the models are released and the process exits 0.
A second Ctrl-C forces the exit.

Connections: uvicorn's own settings where it has them (``timeout_keep_alive``,
``h11_max_incomplete_event_size``), and :mod:`service.connections` for what it
lacks (a request-head deadline, a cap on open connections, protocol errors as
OpenAI errors). Accept errors (out of file descriptors) are retried by asyncio
after 1 s; their log line is rate-limited here.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import resource
import signal
import threading
from collections.abc import Generator
from typing import Any

import uvicorn

from service.backends import build_backends
from service.config import ConfigError, TandemSettings
from service.connections import ConnectionLimits, limited_protocol
from service.logs import configure_logging

log = logging.getLogger("tandem.server")

#: Extra seconds uvicorn waits past the grace period before cancelling what is left.
_BACKSTOP_S = 3.0
#: File descriptors kept for everything but client connections: the listening socket, logs, model files being
#: read, the event loop, connections to a remote verifier or split worker.
FD_RESERVE = 128
#: uvicorn's default listen backlog, stated: it is also how many connections asyncio accepts per loop tick.
BACKLOG = 2048


class GatewayServer(uvicorn.Server):
    """uvicorn.Server that drains the gateway first and does not re-raise the signal on exit.

    (uvicorn re-raises a captured SIGTERM after its own shutdown, which would
    end the process with -SIGTERM instead of exit status 0.)
    """

    def __init__(self, config: uvicorn.Config, grace_s: float):
        super().__init__(config)
        self.grace_s = grace_s

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        handled = (signal.SIGINT, signal.SIGTERM)
        original = {sig: signal.signal(sig, self.handle_exit) for sig in handled}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)
            # The drain is over and the process is about to exit 0: a repeated SIGTERM
            # (a supervisor insisting) must not turn that into death by signal.
            signal.signal(signal.SIGTERM, signal.SIG_IGN)

    def handle_exit(self, sig: int, frame: object) -> None:
        if not self.should_exit:
            log.info("received %s: draining for up to %.1fs", signal.Signals(sig).name, self.grace_s)
        super().handle_exit(sig, frame)  # type: ignore[arg-type]

    async def startup(self, sockets: list | None = None) -> None:
        asyncio.get_running_loop().set_exception_handler(_log_accept_errors)
        await super().startup(sockets)

    async def shutdown(self, sockets: list | None = None) -> None:
        gateway = getattr(getattr(self.config.loaded_app, "state", None), "gateway", None)
        if gateway is None:  # the app is wrapped by uvicorn's middlewares
            app = self.config.loaded_app
            while gateway is None and app is not None:
                gateway = getattr(getattr(app, "state", None), "gateway", None)
                app = getattr(app, "app", None)
        if gateway is not None:
            gateway.begin_drain(self.grace_s)
        await super().shutdown(sockets)


def _log_accept_errors(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """asyncio's accept loop, out of file descriptors, stops accepting for 1 s and reports each failed accept()
    (hundreds per tick): one rate-limited line, without the traceback, instead of a flood."""
    if str(context.get("message", "")).startswith("socket.accept() out of system resource"):
        log.error(
            "accept() failed: %s; asyncio retries in 1s, new connections wait in the listen backlog meanwhile",
            context.get("exception"), extra={"rate_limit": "accept"},
        )  # fmt: skip
        return
    loop.default_exception_handler(context)


def ensure_fd_limit(max_connections: int, backlog: int) -> int:
    """Raise the soft RLIMIT_NOFILE to fit ``max_connections`` + one accept batch (``backlog``) + FD_RESERVE, as far
    as the hard limit allows; ConfigError when it cannot fit the connections and the reserve. Returns the limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = max_connections + FD_RESERVE
    cap = hard if hard != resource.RLIM_INFINITY else need + backlog
    if cap < need:
        raise ConfigError(
            f"invalid setting 'max_connections': {max_connections} connections need {need} file descriptors "
            f"({FD_RESERVE} kept for logs, models and backends), but this process may open at most {hard} "
            "(RLIMIT_NOFILE); lower max_connections or raise the limit (ulimit -n)"
        )
    wanted = min(cap, need + backlog)  # room for one accept batch before the excess is closed
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        soft = wanted
    return soft


def uvicorn_connection_settings(settings: Any) -> dict[str, Any]:
    """The connection limits as ``uvicorn.Config`` arguments (``settings``: anything with GatewaySettings' fields)."""
    limits = ConnectionLimits(header_timeout_s=settings.header_timeout_s, max_connections=settings.max_connections)
    return dict(
        http=limited_protocol(limits),
        timeout_keep_alive=settings.keep_alive_s,
        h11_max_incomplete_event_size=settings.max_header_bytes,
        backlog=BACKLOG,
    )


@contextlib.contextmanager
def _exit_on_sigterm() -> Generator[None, None, None]:
    """While the models load (nothing to drain yet), SIGTERM exits at once, with status 0."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(sig: int, frame: object) -> None:
        log.info("received SIGTERM while loading the models: exiting")
        raise SystemExit(0)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def serve(settings: TandemSettings) -> int:
    """Load the models, serve until SIGTERM/SIGINT, drain; return the exit status."""
    from service.app import create_app

    configure_logging(settings.log_level, settings.log_json)
    nofile = ensure_fd_limit(settings.max_connections, BACKLOG)
    log.info(
        "connections: at most %d open (file limit %d), request head within %gs, keep-alive %gs, head <= %d bytes",
        settings.max_connections, nofile, settings.header_timeout_s, settings.keep_alive_s, settings.max_header_bytes,
    )  # fmt: skip
    with _exit_on_sigterm():
        backends = build_backends(settings)  # fails here, before binding, with a clear message
    app = create_app(settings, backends)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=settings.shutdown_grace_s + _BACKSTOP_S,
        server_header=False,
        **uvicorn_connection_settings(settings),
    )
    server = GatewayServer(config, settings.shutdown_grace_s)
    # The models and libraries loaded so far live as long as the process: out of the cyclic collector's sight, a
    # full collection (which a burst of parsed requests triggers) walks the requests' objects only, not the
    # millions of start-up objects (it took up to 1.5 s of event-loop time, /health included, on the test box).
    gc.collect()
    gc.freeze()
    try:
        server.run()
    finally:
        gc.unfreeze()  # collectable again at exit (native bindings report frozen objects as leaks)
    if not server.started:
        return 1
    log.info("stopped")
    return 0
