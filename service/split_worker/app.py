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
A session the worker does not hold (never seen, evicted, or the worker
restarted) can only be started at ``start == 0``; anything else answers 409
with code ``unknown_session`` / ``session_evicted`` / ``cache_mismatch`` and
the edge replays the context. ``return_from`` (default ``start``) lets a
replay send the whole context and get back only the rows it lacks.

Sessions expire after ``session_ttl_s`` idle seconds; the caches' total size
is bounded by ``max_kv_bytes`` (least recently used sessions are evicted to
make room; a single session larger than the bound is refused with 413).
With a token configured, every /v1/split/* request needs
``Authorization: Bearer <token>`` (compared in constant time).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import re
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from transformers import DynamicCache

from decoding import protocol as wire
from decoding.partition import BodyModel, cache_bytes, crop_cache

log = logging.getLogger("tandem.split.worker")

SESSION_ID = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
# vLLM's inter-token-latency bucket edges (ops conventions), with finer low end for a CPU body.
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1, 2.5, 5, 7.5, 10, 20, 40, 80)
MAX_TOMBSTONES = 10_000


class StepError(Exception):
    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def error_response(status: int, code: str, message: str) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    headers = {"Retry-After": "1"} if status in (429, 503) else None
    return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": code}}, status, headers=headers)


@dataclass
class BodySession:
    id: str
    cache: DynamicCache
    last_used: float = field(default_factory=time.monotonic)
    nbytes: int = 0

    @property
    def length(self) -> int:
        return self.cache.get_seq_length()


class WorkerMetrics:
    def __init__(self, registry: CollectorRegistry):
        self.sessions = Gauge("tandem_split_worker_sessions", "Sessions whose KV cache the worker holds", registry=registry)
        self.kv_bytes = Gauge("tandem_split_worker_kv_cache_bytes", "Bytes held by all sessions' KV caches", registry=registry)
        self.kv_limit = Gauge("tandem_split_worker_kv_cache_limit_bytes", "Bound on the KV caches' total size", registry=registry)
        self.evictions = Counter(
            "tandem_split_worker_evictions_total", "Sessions evicted, by reason (ttl, memory)", ["reason"], registry=registry
        )
        self.steps = Counter("tandem_split_worker_steps_total", "Steps served", registry=registry)
        self.tokens = Counter("tandem_split_worker_tokens_total", "Positions run through the body", registry=registry)
        self.errors = Counter("tandem_split_worker_errors_total", "Refused requests, by error code", ["code"], registry=registry)
        self.received = Counter("tandem_split_worker_received_bytes_total", "Request frame bytes received", registry=registry)
        self.sent = Counter("tandem_split_worker_sent_bytes_total", "Response frame bytes sent", registry=registry)
        self.step_seconds = Histogram(
            "tandem_split_worker_step_seconds", "Body compute time of one step", buckets=STEP_BUCKETS, registry=registry
        )


class SessionStore:
    """Sessions in least-recently-used order, with tombstones saying why one is gone."""

    def __init__(self, ttl_s: float, max_kv_bytes: int, metrics: WorkerMetrics):
        self.ttl_s = ttl_s
        self.max_kv_bytes = max_kv_bytes
        self.metrics = metrics
        self.sessions: OrderedDict[str, BodySession] = OrderedDict()
        self.tombstones: OrderedDict[str, str] = OrderedDict()
        metrics.kv_limit.set(max_kv_bytes)

    @property
    def total_bytes(self) -> int:
        return sum(s.nbytes for s in self.sessions.values())

    def publish(self) -> None:
        self.metrics.sessions.set(len(self.sessions))
        self.metrics.kv_bytes.set(self.total_bytes)

    def evict(self, sid: str, reason: str, why: str) -> None:
        if self.sessions.pop(sid, None) is not None:
            self.metrics.evictions.labels(reason).inc()
            self.tombstones[sid] = why
            while len(self.tombstones) > MAX_TOMBSTONES:
                self.tombstones.popitem(last=False)
            log.info("evicted split session (%s)", reason)

    def expire(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        for sid in [sid for sid, s in self.sessions.items() if now - s.last_used > self.ttl_s]:
            self.evict(sid, "ttl", f"it was idle for more than the worker's session TTL ({self.ttl_s:g} s)")
        self.publish()

    def make_room(self, keep: str, needed: int) -> None:
        """Evict least recently used sessions (never ``keep``) until ``needed`` more bytes fit."""
        for sid in list(self.sessions):
            if self.total_bytes + needed <= self.max_kv_bytes:
                break
            if sid != keep:
                self.evict(sid, "memory", f"the worker's KV memory bound ({self.max_kv_bytes} bytes) needed room")

    def close(self, sid: str) -> bool:
        found = self.sessions.pop(sid, None) is not None
        self.publish()
        return found


def create_app(
    body: BodyModel,
    *,
    token: str | None = None,
    session_ttl_s: float = 300.0,
    max_kv_bytes: int = 1 << 30,
    max_body_bytes: int = 64 << 20,
) -> FastAPI:
    registry = CollectorRegistry()
    metrics = WorkerMetrics(registry)
    store = SessionStore(session_ttl_s, max_kv_bytes, metrics)
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tandem-split-body")
    lock = asyncio.Lock()  # one step at a time: the body runs on one thread anyway
    cfg = body.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    itemsize = torch.empty((), dtype=body.dtype).element_size()
    kv_bytes_per_token = 2 * (body.b - body.a) * cfg.num_key_value_heads * head_dim * itemsize
    expected_token = token.encode() if token else None

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
    app.state.body = body
    app.state.store = store
    app.state.registry = registry

    def authorized(request: Request) -> bool:
        if expected_token is None:
            return True
        given = request.headers.get("authorization", "")
        scheme, _, value = given.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(value.strip().encode(), expected_token)

    def refuse(status: int, code: str, message: str) -> JSONResponse:
        metrics.errors.labels(code).inc()
        return error_response(status, code, message)

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

    def check_step(header: dict, hidden: torch.Tensor | None) -> tuple[str, int, int]:
        sid = header.get("session")
        if not isinstance(sid, str) or not SESSION_ID.match(sid):
            raise StepError(400, "bad_header", "header 'session' must be 1-128 characters of [A-Za-z0-9_-]")
        start, return_from = header.get("start"), header.get("return_from", header.get("start"))
        for name, value in (("start", start), ("return_from", return_from)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise StepError(400, "bad_header", f"header {name!r} must be a non-negative integer, got {value!r}")
        if header.get("fingerprint") not in (None, body.fingerprint) or (
            header.get("layers") is not None and list(header["layers"]) != [body.a, body.b]
        ):
            raise StepError(
                400,
                "model_mismatch",
                f"this worker serves layers {body.a}:{body.b} of model fingerprint {body.fingerprint}; the request "
                f"expects layers {header.get('layers')} of fingerprint {header.get('fingerprint')}",
            )
        if hidden is None:
            raise StepError(400, "bad_tensor", "a step must carry hidden states [n, hidden_size]")
        if hidden.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise StepError(400, "bad_tensor", f"hidden states must be float16, bfloat16 or float32, got {hidden.dtype}")
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
                store.expire()
                session = store.sessions.get(sid)
                if session is None:
                    if start != 0:
                        why = store.tombstones.get(sid)
                        if why is not None:
                            raise StepError(409, "session_evicted", f"session {sid} was evicted: {why}; replay from position 0")
                        raise StepError(409, "unknown_session", f"unknown session {sid} (the worker may have restarted); replay from position 0")
                    session = BodySession(sid, body.new_cache())
                    store.sessions[sid] = session
                    store.tombstones.pop(sid, None)
                elif start > session.length:
                    raise StepError(
                        409, "cache_mismatch", f"session {sid} holds {session.length} positions but the step starts at {start}"
                    )
                store.sessions.move_to_end(sid)
                session.last_used = time.monotonic()
                needed = (start + n) * kv_bytes_per_token
                if needed > max_kv_bytes:
                    store.sessions.pop(sid, None)
                    raise StepError(
                        413, "kv_memory_exceeded",
                        f"session {sid} would need {needed} bytes of KV cache; the worker's bound is {max_kv_bytes}",
                    )
                store.make_room(sid, needed - session.nbytes)

                def run() -> torch.Tensor:
                    crop_cache(session.cache, start)
                    x = hidden.to(device=body.device, dtype=body.dtype).unsqueeze(0)
                    return body(x, session.cache, start)[0, return_from - start :]

                t0 = time.perf_counter()
                try:
                    out = await asyncio.get_running_loop().run_in_executor(executor, run)
                except Exception:
                    store.sessions.pop(sid, None)  # its cache may be half-updated
                    raise
                metrics.step_seconds.observe(time.perf_counter() - t0)
                session.nbytes = cache_bytes(session.cache)
                session.last_used = time.monotonic()
                store.publish()
            metrics.steps.inc()
            metrics.tokens.inc(n)
            frame = wire.encode({"session": sid, "start": return_from}, out.to(hidden.dtype))
            metrics.sent.inc(len(frame))
            return Response(frame, media_type=wire.CONTENT_TYPE)
        except StepError as exc:
            return refuse(exc.status, exc.code, exc.message)

    return app


def run_worker(
    model: str,
    layers: tuple[int, int],
    *,
    host: str = "127.0.0.1",
    port: int = 8100,
    token: str | None = None,
    session_ttl_s: float = 300.0,
    max_kv_bytes: int = 1 << 30,
    max_body_bytes: int = 64 << 20,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    log_level: str = "info",
) -> int:
    import uvicorn

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    body = BodyModel(model, *layers, dtype=dtype, device=device)
    app = create_app(body, token=token, session_ttl_s=session_ttl_s, max_kv_bytes=max_kv_bytes, max_body_bytes=max_body_bytes)
    log.info(
        "split worker: layers %d:%d of %s (%d tensors, %d parameters) on %s:%d%s",
        body.a, body.b, body.path, len(body.loaded_keys), sum(p.numel() for p in body.parameters()), host, port,
        "" if token else " (no auth token)",
    )
    # A long keep-alive: the edge holds one persistent connection per worker.
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_keep_alive=120, access_log=False)
    return 0
