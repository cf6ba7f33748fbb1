"""The verify routes inside vLLM's API server: ``/tandem/v1/info``, ``/verify``, ``/sessions/{id}``.

The large model stays in a stock vLLM engine (tensor parallelism, prefix
caching, batching, metrics: all vLLM's). These routes run in the same process
as vLLM's engine client and share its FastAPI app:

``GET /tandem/v1/info``
    protocol version, model, vocabulary size and fingerprint, limits.
``POST /tandem/v1/verify``
    score ``context + draft`` and return the top-K logprobs of the k+1
    verification positions only.
``DELETE /tandem/v1/sessions/{session}``
    forget a session's context early (it also expires on its own).
``GET /tandem/v1/tokenizer``
    the served model's tokenizer files, for an edge that has no model
    directory of its own (the n-gram drafter).

Why a route and not ``/v1/completions``: a stock request with
``prompt_logprobs`` bypasses the prefix cache (vLLM sets
``skip_reading_prefix_cache`` for it, because cached positions have no
logprobs) and returns logprobs for every prompt position, so each round
recomputes and re-sends the whole context. Here the route keeps each
session's committed context (:mod:`service.vllm.sessions`; the client sends
only the tokens committed since the previous round plus the draft, O(k)
bytes), submits the request with ``skip_reading_prefix_cache=False`` so vLLM
recomputes only the blocks it lacks, and returns only the k+1 rows it needs.
Rows served from the prefix cache hold uninitialised memory in vLLM, so the
route checks ``num_cached_tokens``: the first needed row sits at the last
committed token, which must have been computed; if a cache hit covered it (the
same context+draft was seen before, e.g. by another session), the round is
recomputed under a per-session cache salt and the client keeps that salt.
Every number is validated before it leaves the server; the client validates
again.

The wire format lives in :mod:`decoding.protocol` (both sides import it) and
is documented in ``docs/vllm-verifier.md``. The routes are attached by the
launcher (:mod:`service.vllm.launcher`, ``tandem verifier``) or by the
endpoint plugin (:mod:`service.vllm.plugin`, ``VLLM_PLUGINS=tandem_verify``).
"""

# No `from __future__ import annotations`: FastAPI must see the handlers' real annotations.

import asyncio
import json
import logging
import math
import os
import tempfile
import time
import uuid
from pathlib import Path
from collections.abc import Mapping
from typing import Any

from decoding.protocol import (
    INFO_PATH,
    LOGPROB_SLACK,
    MAX_DRAFT,
    SESSIONS_PATH,
    TOKENIZER_FILES,
    TOKENIZER_PATH,
    UNKNOWN_SESSION,
    VERIFY_PATH,
    VERIFY_PROTOCOL_VERSION,
    TokenizerResponse,
    VerifyResponse,
    is_cache_salt,
    is_session_id,
    vocab_fingerprint,
)
from service.http import APIKeys, dumps, json_error
from service.vllm.engine_verify import DecideSpec, Decision
from service.vllm.logprobs_trim import EXTRA_ARGS_ROWS_KEY, install_prompt_logprobs_trim
from service.vllm.sessions import ContextStore, StoreFullError, StoreLimits, UnknownSessionError

logger = logging.getLogger("tandem.vllm_route")


class VerifyFailure(Exception):
    """A request the route answers with an error (status, OpenAI error code, message)."""

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
    """Per-app state of the routes: the engine client and the session contexts."""

    def __init__(self, engine_client, *, limits: StoreLimits = StoreLimits(), model_name: str | None = None):
        self.engine = engine_client
        self.sessions = ContextStore(limits)
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
        self.counters = {"rounds": 0, "decided_rounds": 0, "recomputed_rounds": 0, "unknown_session": 0,
                         "refused_full": 0}  # fmt: skip
        self._tokenizer_files: TokenizerResponse | None = None
        #: Whether the engine decides rounds (service.vllm.engine_verify loaded in the engine process);
        #: None until probed with a one-token round.
        self.server_decides: bool | None = None

    async def probe(self) -> bool:
        """Find out once whether the engine decides rounds (its plugin may be missing or fail to patch)."""
        if self.server_decides is None:
            try:
                out = await self._run([0, 0], 1, 1, None, skip_cache=True, decide=DecideSpec(1, 0.0, 0, 1.0, 0))
                self.server_decides = isinstance((out.prompt_logprobs or [None])[0], Decision)
            except Exception as exc:  # the engine is not up yet: ask again next time
                logger.warning("tandem: could not probe engine-side verification (%s: %s)", type(exc).__name__, exc)
                return False
            if not self.server_decides:
                logger.warning("tandem: the engine does not decide rounds (plugin service.vllm.engine_verify not "
                               "loaded); clients get top-K rows and sampling is exact only for top_k <= K")  # fmt: skip
        return self.server_decides

    def tokenizer_files(self) -> TokenizerResponse | None:
        """The tokenizer as ``save_pretrained`` writes it (data files only), or None without a HF tokenizer."""
        if self._tokenizer_files is None and self.vocab_sha256 is not None:
            try:
                tokenizer = self.engine.get_tokenizer()
                with tempfile.TemporaryDirectory(prefix="tandem-tokenizer-") as tmp:
                    tokenizer.save_pretrained(tmp)
                    files = {name: (Path(tmp) / name).read_text(encoding="utf-8") for name in TOKENIZER_FILES
                             if (Path(tmp) / name).is_file()}  # fmt: skip
            except Exception as exc:  # e.g. a tokenizer that is not a Hugging Face one
                logger.warning("tandem: cannot serve the tokenizer (%s: %s)", type(exc).__name__, exc)
                return None
            if "tokenizer.json" not in files:
                return None
            self._tokenizer_files = {"vocab_sha256": self.vocab_sha256, "files": files}
        return self._tokenizer_files

    def info(self) -> dict:
        return {
            "protocol": VERIFY_PROTOCOL_VERSION,
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
            "server_decides": bool(self.server_decides),
            "sessions": len(self.sessions),
            "counters": dict(self.counters),
        }

    def _check_sampling(self, value: Any) -> tuple[float, int, float, int] | None:
        """The optional ``sampling`` object of a request the server decides: (temperature, top_k, top_p, seed)."""
        if value is None:
            return None

        def bad(msg: str, param: str) -> VerifyFailure:
            return VerifyFailure(400, "invalid_request", f"sampling.{param}: {msg}")

        if not isinstance(value, dict):
            raise VerifyFailure(400, "invalid_request", "sampling: must be an object")
        t, top_k, top_p, seed = (value.get(key) for key in ("temperature", "top_k", "top_p", "seed"))
        if type(t) not in (int, float) or not 0 <= t < float("inf"):
            raise bad("must be a finite number >= 0", "temperature")
        if type(top_k) is not int or top_k < 0:
            raise bad("must be an integer >= 0 (0 disables it)", "top_k")
        if type(top_p) not in (int, float) or not 0 < top_p <= 1:
            raise bad("must be in (0, 1]", "top_p")
        if type(seed) is not int or not 0 <= seed < 2**63:
            raise bad("must be an integer in [0, 2^63)", "seed")
        return float(t), top_k, float(top_p), seed

    def _check_request(self, body: Mapping[str, Any]) -> tuple[str, int, list[int], list[int], int, str | None]:
        def bad(msg: str, param: str) -> VerifyFailure:
            return VerifyFailure(400, "invalid_request", f"{param}: {msg}")

        session = body.get("session")
        if not is_session_id(session):
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
        k_max = min(self.max_logprobs, self.vocab_size)
        if top_k is None and body.get("sampling") is not None:
            top_k = 1  # the server decides: no rows are returned
        if type(top_k) is not int or not 1 <= top_k <= k_max:
            raise bad(f"must be an integer in [1, {k_max}] (vLLM --max-logprobs)", "top_k")
        salt = body.get("cache_salt")
        if not is_cache_salt(salt):
            raise bad("must be a string of 1-128 characters without '@', '/', '\\' or NUL", "cache_salt")
        return session, base, lists["append"], lists["draft"], top_k, salt

    async def _run(self, prompt: list[int], k: int, top_k: int, salt: str | None, skip_cache: bool,
                   decide: DecideSpec | None = None):  # fmt: skip
        from vllm.sampling_params import RequestOutputKind, SamplingParams

        if decide is not None:
            # The engine decides (service.vllm.engine_verify): it computes the k+1 rows' logits
            # itself, so one prompt logprob is enough to route the request through its hook,
            # and the token vLLM samples at the end of the prompt is not used.
            params = SamplingParams(
                max_tokens=1, temperature=0.0, prompt_logprobs=1, skip_reading_prefix_cache=skip_cache,
                detokenize=False, output_kind=RequestOutputKind.FINAL_ONLY, extra_args=decide.to_extra_args(),
            )  # fmt: skip
        else:
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
        # Already rendered (a dict with "type"): vLLM processes it in this task, without a thread-pool hop.
        tokens_prompt: dict = {"type": "token", "prompt_token_ids": prompt}
        if salt is not None:
            tokens_prompt["cache_salt"] = salt
        final = None
        async for out in self.engine.generate(tokens_prompt, params, f"tandem-verify-{uuid.uuid4().hex}"):
            final = out
        if final is None or not final.outputs:
            raise VerifyFailure(500, "invalid_engine_output", "the engine returned no output")
        return final

    async def verify(self, body: Mapping[str, Any]) -> VerifyResponse:
        session, base, append, draft, top_k, salt = self._check_request(body)
        sampling = self._check_sampling(body.get("sampling"))
        if sampling is not None and not await self.probe():
            raise VerifyFailure(400, "server_cannot_decide", "this verifier's engine does not decide rounds "
                                "(its engine plugin is not loaded); send top_k without sampling")  # fmt: skip
        try:
            ctx = self.sessions.resolve(session, base, append)
        except StoreFullError as exc:
            self.counters["refused_full"] += 1
            raise VerifyFailure(503, "verifier_full", f"the verifier is full ({exc}); retry later") from None
        except UnknownSessionError:
            self.counters["unknown_session"] += 1
            raise VerifyFailure(
                409, UNKNOWN_SESSION, f"session {session!r} holds fewer than base={base} tokens here; resend the context with base=0"
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
        decide = DecideSpec(k, *sampling) if sampling is not None else None
        t0 = time.perf_counter()
        out = await self._run(prompt, k, top_k, salt, skip_cache=False, decide=decide)
        recomputed = False
        # Row i (predicting draft[i], or the bonus token for i == k) is computed
        # at prompt position n-1+i; a cache hit covering position n-1 means
        # those rows were not computed in this request (vLLM leaves them
        # uninitialised; the engine-side verification has no logits for them).
        if (k > 0 or decide is not None) and (out.num_cached_tokens or 0) > n - 1:
            recomputed = True
            self.counters["recomputed_rounds"] += 1
            salt = f"tandem-{session}"
            out = await self._run(prompt, k, top_k, salt, skip_cache=False, decide=decide)
            if (out.num_cached_tokens or 0) > n - 1:
                out = await self._run(prompt, k, top_k, salt, skip_cache=True, decide=decide)
        envelope = {
            "protocol": VERIFY_PROTOCOL_VERSION,
            "server_id": self.server_id,
            "session": session,
            "context_len": n,
            "num_prompt_tokens": n + k,
            "num_cached_tokens": int(out.num_cached_tokens or 0),
            "recomputed": recomputed,
            "cache_salt": salt,
            "engine_s": round(time.perf_counter() - t0, 6),
        }
        if decide is not None:
            return {**envelope, **self._decided(out, k, draft)}

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
        return {**envelope, "top_ids": top_ids, "top_logprobs": top_lps, "draft_logprobs": draft_lps,
                "draft_ranks": draft_ranks}  # fmt: skip

    def _decided(self, out, k: int, draft: list[int]) -> dict:
        """The engine's decision, validated: the accepted tokens and one correction or bonus token."""
        decision = (out.prompt_logprobs or [None])[0]
        if not isinstance(decision, Decision) or not decision.computed:
            raise VerifyFailure(500, "invalid_engine_output", "the engine did not decide the round")
        tokens, accepted = decision.tokens, decision.accepted
        if len(tokens) != accepted + 1 or tokens[:accepted] != draft[:accepted] or not 0 <= accepted <= k:
            raise VerifyFailure(500, "invalid_engine_output", "the engine's decision does not fit the draft")
        if not all(0 <= t < self.vocab_size for t in tokens) or (accepted < k and tokens[accepted] == draft[accepted]):
            raise VerifyFailure(500, "invalid_engine_output", "the engine's decision holds an invalid token")
        lps = decision.draft_logprobs
        if len(lps) != k or not all(math.isfinite(x) and x <= LOGPROB_SLACK for x in lps):
            raise VerifyFailure(500, "invalid_engine_output", "the engine's draft logprobs are invalid")
        self.counters["rounds"] += 1
        self.counters["decided_rounds"] += 1
        return {"tokens": tokens, "accepted": accepted, "draft_logprobs": [float(f"{min(x, 0.0):.9g}") for x in lps]}


# -- FastAPI wiring ----------------------------------------------------------------


def _api_keys(state) -> APIKeys:
    """vLLM's own keys (``--api-key``, else ``VLLM_API_KEY``), which vLLM itself checks on /v1/* only."""
    keys = getattr(state, "tandem_api_keys", None)
    if keys is None:
        args = getattr(state, "args", None)
        given = getattr(args, "api_key", None) or [os.environ.get("VLLM_API_KEY")]
        keys = APIKeys([k for k in given if k])  # vLLM treats an unset or empty key as "no auth"
        state.tandem_api_keys = keys
    return keys


def build_router(limits: StoreLimits = StoreLimits()):
    """The tandem routes as a FastAPI router; their state is created on first use
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
            svc = TandemVerifyService(engine, limits=limits, model_name=names[0] if names else None)
            state.tandem_verify = svc
        return svc

    def refuse(request: Request) -> Response | None:
        """The error a request gets before it reaches the service (auth, engine not up), or None."""
        if not _api_keys(request.app.state).allows(request.headers.get("Authorization")):
            return json_error(401, "missing or invalid API key", "unauthorized")
        if service(request) is None:
            return json_error(503, "the engine is not initialised", "engine_unavailable")
        return None

    @router.get(INFO_PATH)
    async def info(request: Request):
        if (refused := refuse(request)) is not None:
            return refused
        svc = service(request)
        await svc.probe()
        return svc.info()

    @router.post(VERIFY_PATH)
    async def verify(request: Request):
        if (refused := refuse(request)) is not None:
            return refused
        svc = service(request)
        try:
            body = json.loads(await request.body())
            if not isinstance(body, dict):
                raise ValueError("body is not a JSON object")
        except ValueError as exc:
            return json_error(400, f"invalid JSON body: {exc}", "invalid_json")
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
            return json_error(exc.status, exc.message, exc.code)
        except Exception as exc:  # an engine error: dead engine, bad input it rejected
            logger.exception("tandem verify failed")
            name = type(exc).__name__
            status = 400 if "Validation" in name or isinstance(exc, ValueError) else 503
            return json_error(status, f"{name}: {exc}", "engine_error")
        return Response(dumps(result), media_type="application/json")

    @router.get(TOKENIZER_PATH)
    async def tokenizer(request: Request):
        if (refused := refuse(request)) is not None:
            return refused
        files = await asyncio.to_thread(service(request).tokenizer_files)
        if files is None:
            return json_error(404, "this server has no Hugging Face tokenizer to share", "tokenizer_unavailable")
        return Response(dumps(files), media_type="application/json")

    @router.delete(f"{SESSIONS_PATH}/{{session}}")
    async def drop_session(session: str, request: Request):
        if (refused := refuse(request)) is not None:
            return refused
        return Response(status_code=204 if service(request).sessions.drop(session) else 404)

    return router


async def _wait_disconnect(request) -> None:
    # The body has been read; the next message is a disconnect (or nothing).
    while True:
        message = await request.receive()
        if message.get("type") == "http.disconnect":
            return


if __name__ == "__main__":  # `python -m service.vllm.route`, as before `python -m service.vllm`
    import sys

    from service.vllm.launcher import main

    sys.exit(main())
