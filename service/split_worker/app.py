"""The split worker: holds the body (layers [a, b)) and one KV cache per session.

Endpoints
    POST   /v1/split/step            one binary frame in (hidden states at layer a), one out (at layer b)
    DELETE /v1/split/sessions/{id}   free a session's cache
    GET    /v1/split/info            the model slice and the checkpoint tensors this process loaded
    GET    /health                   liveness, with the slice's identity (no auth)
    GET    /metrics                  Prometheus text (no auth)

A step's header names the session and ``start``, the position of its first
row. The worker crops the session's cache to ``start`` first (this is how the
edge rolls back rejected drafts, in the same round trip) and then appends.
Which sessions the worker holds, and when it refuses a step for that, is
:mod:`service.split_worker.sessions`. ``return_from`` (default ``start``) lets
a replay send the whole context and get back only the rows it lacks.

With a token configured, every /v1/split/* request needs
``Authorization: Bearer <token>`` (:class:`service.http.APIKeys`); errors are
the OpenAI envelope (:func:`service.http.json_error`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from decoding import protocol as wire
from decoding.causal_lm import crop_cache
from decoding.partition import BodyModel
from service.connections import ConnectionLimits, limited_protocol
from service.http import APIKeys, json_error
from service.logs import configure_logging
from service.split_worker.metrics import WorkerMetrics
from service.split_worker.sessions import KVSessionStore, StepError, session_overhead_bytes

log = logging.getLogger("tandem.split.worker")

def create_app(
    body: BodyModel, *, token: str | None, session_ttl_s: float, max_kv_bytes: int, max_body_bytes: int
) -> FastAPI:
    """The worker's app over ``body``. The limits have no defaults here: the settings
    (``split_session_ttl_s``, ``split_max_kv_bytes``, ``split_max_body_bytes``) hold them."""
    registry = CollectorRegistry()
    metrics = WorkerMetrics(registry)
    store = KVSessionStore(
        ttl_s=session_ttl_s, max_kv_bytes=max_kv_bytes, kv_bytes_per_token=body.kv_bytes_per_token,
        overhead_bytes=session_overhead_bytes(body.b - body.a), new_cache=body.new_cache, metrics=metrics,
    )  # fmt: skip
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tandem-split-body")
    lock = asyncio.Lock()  # one step at a time: the body runs on one thread anyway
    keys = APIKeys([token] if token else [])

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        async def sweep() -> None:
            while True:
                await asyncio.sleep(max(0.05, min(session_ttl_s / 4, 5.0)))
                async with lock:
                    store.expire()

        task = asyncio.create_task(sweep())
        try:
            yield
        finally:
            task.cancel()
            executor.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="tandem split worker", lifespan=lifespan, docs_url=None, redoc_url=None)
    _install_error_envelopes(app, metrics)
    app.state.body = body
    app.state.store = store
    app.state.registry = registry

    def authorized(request: Request) -> bool:
        return keys.allows(request.headers.get("authorization"))

    def refuse(status: int, code: str, message: str) -> Response:
        metrics.errors.labels(code).inc()
        return json_error(status, message, code)

    def identity() -> dict:
        return {
            "model": body.path.name,
            "fingerprint": body.fingerprint,
            "layers": [body.a, body.b],
            "num_layers": body.num_layers,
            "hidden_size": body.hidden_size,
            "max_context": body.max_context,
            "dtype": str(body.dtype).removeprefix("torch."),
        }

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", **identity(), "sessions": len(store.sessions), "kv_cache_bytes": store.total_bytes}

    @app.get("/metrics")
    async def prometheus() -> Response:
        store.publish()
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/split/info")
    async def info(request: Request) -> Response:
        if not authorized(request):
            return refuse(401, "unauthorized", "missing or wrong bearer token")
        # stack.named_parameters() names are "layers.{local}.{rest}"; report checkpoint names.
        params = []
        for n, _ in body.stack.named_parameters():
            _, local, rest = n.split(".", 2)
            params.append(f"model.layers.{body.a + int(local)}.{rest}")
        return JSONResponse({
            **identity(),
            "loaded_tensors": sorted(body.loaded_keys),
            "parameters": sorted(params),
            "num_parameters": sum(p.numel() for p in body.parameters()),
            "max_kv_bytes": max_kv_bytes,
            "session_ttl_s": session_ttl_s,
            "max_body_bytes": max_body_bytes,
        })

    @app.delete("/v1/split/sessions/{sid}")
    async def close_session(sid: str, request: Request) -> Response:
        if not authorized(request):
            return refuse(401, "unauthorized", "missing or wrong bearer token")
        async with lock:
            found = store.close(sid)
        return Response(status_code=204) if found else refuse(404, "unknown_session", f"no session {sid!r}")

    async def read_body(request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > max_body_bytes:
            raise StepError(413, "body_too_large", f"request body is {declared} bytes; the worker accepts at most {max_body_bytes}")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_body_bytes:
                raise StepError(413, "body_too_large", f"request body exceeds the worker's {max_body_bytes}-byte limit")
            chunks.append(chunk)
        return b"".join(chunks)

    def check_step(raw: dict, hidden: torch.Tensor | None) -> tuple[str, int, int]:
        try:
            header = wire.StepHeader.model_validate(raw)
        except ValidationError as exc:
            err = exc.errors()[0]
            field = ".".join(str(p) for p in err["loc"]) or "header"
            raise StepError(400, "bad_header", f"header {field!r}: {err['msg']}") from None
        sid, start = header.session, header.start
        return_from = start if header.return_from is None else header.return_from
        if header.fingerprint not in (None, body.fingerprint) or header.layers not in (None, [body.a, body.b]):
            raise StepError(
                400,
                "model_mismatch",
                f"this worker serves layers {body.a}:{body.b} of model fingerprint {body.fingerprint}; the request "
                f"expects layers {header.layers} of fingerprint {header.fingerprint}",
            )
        if hidden is None:
            raise StepError(400, "bad_tensor", "a step must carry hidden states [n, hidden_size]")
        if hidden.dtype not in wire.DTYPE_NAMES:
            raise StepError(400, "bad_tensor", f"hidden states must be one of {', '.join(wire.DTYPES)}, got {hidden.dtype}")
        if hidden.ndim != 2 or hidden.shape[0] < 1 or hidden.shape[1] != body.hidden_size:
            raise StepError(
                400, "bad_tensor", f"hidden states must have shape [n >= 1, {body.hidden_size}], got {list(hidden.shape)}"
            )
        n = hidden.shape[0]
        if start + n > body.max_context:
            raise StepError(400, "context_too_long", f"positions {start}..{start + n} exceed the model's {body.max_context}")
        if not start <= return_from < start + n:
            raise StepError(400, "bad_header", f"return_from ({return_from}) must lie in [start, start + n) = [{start}, {start + n})")
        if not torch.isfinite(hidden).all():
            raise StepError(400, "bad_tensor", "hidden states contain NaN or infinity")
        return sid, start, return_from

    @app.post("/v1/split/step")
    async def step(request: Request) -> Response:
        if not authorized(request):
            return refuse(401, "unauthorized", "missing or wrong bearer token")
        try:
            data = await read_body(request)
            metrics.received.inc(len(data))
            try:
                header, hidden = wire.decode(data)
            except wire.WireError as exc:
                raise StepError(400, "bad_frame", str(exc)) from None
            sid, start, return_from = check_step(header, hidden)
            n = hidden.shape[0]
            async with lock:
                session = store.open(sid, start, n)

                def run() -> torch.Tensor:
                    crop_cache(session.cache, start)
                    x = hidden.to(device=body.device, dtype=body.dtype).unsqueeze(0)
                    return body(x, session.cache, start)[0, return_from - start :]

                t0 = time.perf_counter()
                try:
                    out = await asyncio.get_running_loop().run_in_executor(executor, run)
                except Exception:
                    store.discard(sid)  # its cache may be half-updated
                    raise
                metrics.step_seconds.observe(time.perf_counter() - t0)
                store.stepped(session)
            metrics.steps.inc()
            metrics.tokens.inc(n)
            frame = wire.encode({"session": sid, "start": return_from}, out.to(hidden.dtype))
            metrics.sent.inc(len(frame))
            return Response(frame, media_type=wire.CONTENT_TYPE)
        except StepError as exc:
            return refuse(exc.status, exc.code, exc.message)

    return app


def _install_error_envelopes(app: FastAPI, metrics: WorkerMetrics) -> None:
    """Every error the worker sends is the JSON envelope, whatever raised it: unknown routes and methods,
    FastAPI's validation, and anything unexpected (a 500 that names no exception; the log has it)."""

    async def on_http(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, f"http_{exc.status_code}")
        metrics.errors.labels(code).inc()
        return json_error(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", code)

    async def on_validation(request: Request, exc: Exception) -> Response:
        metrics.errors.labels("bad_request").inc()
        return json_error(400, "invalid request", "bad_request")

    async def on_unexpected(request: Request, exc: Exception) -> Response:
        log.error("unhandled error in %s %s", request.method, request.url.path, exc_info=exc)
        metrics.errors.labels("internal_error").inc()
        return json_error(500, "the split worker had an internal error; its log has the details", "internal_error")

    app.add_exception_handler(StarletteHTTPException, on_http)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(Exception, on_unexpected)


def run_worker(
    model: str,
    layers: tuple[int, int | None],
    *,
    host: str,
    port: int,
    token: str | None,
    session_ttl_s: float,
    max_kv_bytes: int,
    max_body_bytes: int,
    dtype: torch.dtype,
    device: str,
    log_level: str,
) -> int:
    """``tandem split-worker``: load layers [a, b) of ``model`` and serve them until stopped.
    Every argument is explicit: the caller (the CLI) reads them from the settings."""
    import uvicorn

    configure_logging(log_level)  # the gateway's escaped one-line records, uvicorn's included
    body = BodyModel(model, *layers, dtype=dtype, device=device)
    app = create_app(body, token=token, session_ttl_s=session_ttl_s, max_kv_bytes=max_kv_bytes, max_body_bytes=max_body_bytes)
    log.info(
        "split worker: layers %d:%d of %s (%d tensors, %d parameters) on %s:%d%s",
        body.a, body.b, body.path, len(body.loaded_keys), sum(p.numel() for p in body.parameters()), host, port,
        "" if token else " (no auth token)",
    )
    # A long keep-alive: the edge holds one persistent connection per worker.
    # The default connection limits (request-head deadline, connection cap) and protocol errors as JSON envelopes.
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_keep_alive=120, access_log=False,
                log_config=None, http=limited_protocol(ConnectionLimits()))  # fmt: skip
    return 0
