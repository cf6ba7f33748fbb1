"""``tandem serve``: the gateway under uvicorn, with a graceful drain on SIGTERM.

Shutdown (SIGTERM or Ctrl-C): the listening socket closes, requests that
still arrive on open connections get 503 ``shutting_down``, in-flight
generations may finish for ``shutdown_grace_s`` seconds; after that they are
cut off (a stream gets an error event and ``[DONE]``), the models are released
and the process exits 0. A second Ctrl-C forces the exit.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Generator

import uvicorn

from service.backends import build_backends
from service.config import TandemSettings
from service.logs import configure_logging

log = logging.getLogger("tandem.server")

#: Extra seconds uvicorn waits past the grace period before cancelling what is left.
_BACKSTOP_S = 3.0


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
        timeout_keep_alive=5,
        server_header=False,
    )
    server = GatewayServer(config, settings.shutdown_grace_s)
    server.run()
    if not server.started:
        return 1
    log.info("stopped")
    return 0
