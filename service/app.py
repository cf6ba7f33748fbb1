"""The OpenAI-compatible gateway: a FastAPI app in front of the speculative router.

The app wires the parts together:

* :mod:`service.gateway`      the shared state (settings, backends, metrics, admission, live jobs, drain)
* :mod:`service.middleware`   request id, body limit, auth, request metrics, the log line
* :mod:`service.routes`       the routes; a generation is planned (:mod:`service.plan`), run as a
  job (:mod:`service.jobs`) and answered as JSON or Server-Sent Events (:mod:`service.sse`)
* :mod:`service.errors`       exceptions to OpenAI's error body

Run it with ``tandem serve`` (service/server.py), or
``uvicorn --factory service.app:create_app`` with TANDEM_* variables.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from service.backends import Backends, build_backends
from service.config import TandemSettings
from service.errors import install_exception_handlers
from service.gateway import Gateway
from service.middleware import GatewayMiddleware
from service.plan import log_prompt_bound
from service.routes import router

log = logging.getLogger("tandem.gateway")


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
        await asyncio.to_thread(log_prompt_bound, gw.backends, settings)  # reads the vocabulary once, off the loop
        for model, backend in (("verifier", gw.backends.verifier), ("drafter", gw.backends.drafter)):
            if getattr(backend, "batcher", None) is not None:
                gw.metrics.observe_batches(model, backend.batcher)
        if gw.backends.split_router is not None:
            split_verifier = gw.backends.split_router.verifier
            gw.metrics.split_sessions.set_function(lambda: split_verifier.open_sessions)
        log.info(
            "ready: model %r (verifier %s, drafter %s), mode %s, %d slots, queue %d, auth %s",
            settings.model_name, gw.backends.verifier.name, gw.backends.drafter.name if gw.backends.drafter else "-",
            settings.mode, settings.max_concurrency, settings.max_queue,
            f"on ({len(gw.api_keys)} API key{'s' * (len(gw.api_keys) != 1)} active)" if gw.api_keys else "off (no API keys)",
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
    app.include_router(router)
    return app


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("tandem")
    except Exception:
        return "0.0.0"
