"""The two server APIs the vLLM client speaks: request building, response parsing and the handshake of each.

:class:`TandemApi` -- a vLLM started with ``tandem verifier`` (``service.vllm``):
    vLLM's OpenAI server plus ``/tandem/v1/*`` next to the engine. Per round:
    O(k) bytes up (the server keeps the session's context), O(k·K) bytes down,
    and vLLM's prefix cache serves the context so only the last block(s) plus
    the draft are recomputed. Wire format: :mod:`decoding.protocol`.

:class:`StockApi` -- any vLLM ``/v1/completions`` the user cannot change (a
    managed endpoint). Each round sends the whole context as token ids with
    ``prompt_logprobs=K, max_tokens=1``. vLLM skips the prefix cache for
    requests with ``prompt_logprobs`` (cached positions have no logprobs), so
    the whole context is recomputed every round; the request carries the whole
    context (O(n) bytes up) and the response top-K logprobs for every prompt
    position (O(n·K) bytes down, ~100 bytes per position per logprob), which
    vLLM's API process also builds. Use it only when the server cannot be changed.

Both implement :class:`VerifyApi`; the transport (:class:`~decoding.backends.vllm_client.VLLMVerifier`:
HTTP, retries, resyncs, events) never asks which one it holds. Every parser
validates strictly (types, shapes, ids in range, finite logprobs <= 0, sorted,
mass <= 1) and raises ValueError/TypeError/KeyError/IndexError on a body that
fails: the transport retries it and never accepts a draft on it.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Protocol

from decoding.causal_lm import ModelLoadError
from decoding.protocol import (
    INFO_PATH,
    LOGPROB_SLACK,
    SESSIONS_PATH,
    UNKNOWN_SESSION,
    VERIFY_PATH,
    VERIFY_PROTOCOL_VERSION,
    VerifyRequest,
    vocab_fingerprint,
)
from decoding.verifiers import VerifierUnavailableError

logger = logging.getLogger("tandem.vllm_verifier")

#: Text whose tokenisation must agree between client and a stock server (vocabulary probe).
VOCAB_PROBE = (
    "def verify(draft, context):\n    return [t for t in draft if t in context]  # 0123456789 "
    "The quick brown fox jumps over the lazy dog. éàü ✓ 日本語 \t{}[]()<>=+-*/%!?@#$^&|~`'\""
)
#: Top-K probabilities may sum above 1 by this much (float rounding), no more.
MASS_SLACK = 1e-3


class VerifierIncompatibleError(VerifierUnavailableError, ModelLoadError):
    """The server answers but its model cannot verify these drafts (other vocabulary, protocol)."""


class RetryableError(Exception):
    """An attempt failed in a way a retry may fix (transport, 5xx/408/429, invalid body)."""


class NotFoundError(Exception):
    """The server answered 404 for a path."""


class JsonHttp(Protocol):
    """What a handshake needs from the transport. Raises RetryableError, NotFoundError or VerifierUnavailableError."""

    url: str

    async def get_json(self, path: str) -> dict: ...

    async def post_json(self, path: str, body: dict) -> dict: ...

    async def get_status(self, path: str) -> int: ...


@dataclass(frozen=True)
class ServerLimits:
    """What a handshake learned: the limits the client adopts."""

    model: str | None
    vocab_size: int  # logits width
    max_context: int  # max_model_len
    top_logprobs: int  # K in effect (the requested K, clamped to what the server allows)
    info: dict  # the server's description, as received (tandem) or summarised (stock)


@dataclass(frozen=True)
class ScoredRows:
    """A round's answer, validated: k+1 rows of the top-K, and the draft tokens' own logprobs."""

    top_ids: list[list[int]]  # [k+1][K] token ids, sorted by rank
    top_logprobs: list[list[float]]  # [k+1][K], <= 0, non-increasing
    draft_logprobs: list[float]  # [k]: logprob of draft[i] in row i (also outside the top-K)
    num_cached_tokens: int | None = None  # vLLM prefix-cache hits (tandem API only)
    recomputed: bool = False
    engine_s: float | None = None
    cache_salt: str | None = None


@dataclass(frozen=True)
class DecidedRound:
    """A round the server decided, validated: the accepted draft prefix plus one correction or bonus token."""

    tokens: list[int]
    accepted: int
    draft_logprobs: list[float]  # [k]: raw target logprob of each draft token
    num_cached_tokens: int | None = None
    recomputed: bool = False
    engine_s: float | None = None
    cache_salt: str | None = None


class WireSession(Protocol):
    """The part of a verify session an API reads and updates."""

    sid: str
    ids: list[int]  # the committed context
    sent: int  # how much of ids the server holds (tandem API)
    salt: str | None


class VerifyApi(Protocol):
    name: str
    #: POST path of a verify round.
    round_path: str

    async def handshake(self, http: JsonHttp, top_logprobs: int) -> ServerLimits:
        """Read the server's limits and check its vocabulary (VerifierIncompatibleError if it differs)."""
        ...

    async def check_ready(self, http: JsonHttp, known: dict | None, top_logprobs: int) -> ServerLimits | None:
        """Raise unless the server answers; new limits when it must be (re)adopted (a new or restarted server)."""
        ...

    def request(self, session: WireSession, draft: list[int], top_k: int, sampling: dict | None = None) -> dict:
        """The body of a round scoring ``session.ids + draft`` (deciding it on the server with ``sampling``)."""
        ...

    def parse(self, body: Any, session: WireSession, draft: list[int], top_k: int, vocab_size: int) -> ScoredRows:
        """Validate a 200 answer to :meth:`request` without sampling."""
        ...

    def parse_decided(self, body: Any, session: WireSession, draft: list[int], vocab_size: int) -> DecidedRound:
        """Validate a 200 answer to :meth:`request` with sampling."""
        ...

    def needs_resync(self, status: int, error_code: str | None) -> bool:
        """Whether an error answer means the server lost the session's context (resend it whole)."""
        ...

    def committed(self, session: WireSession, request: dict, rows: ScoredRows) -> None:
        """The round succeeded: record what the server now holds."""
        ...

    def release_path(self, session: WireSession) -> str | None:
        """DELETE this path when the session closes (None: the server keeps nothing)."""
        ...


def _is_int(x: Any) -> bool:
    return type(x) is int


def _is_num(x: Any) -> bool:
    return (type(x) is float or type(x) is int) and math.isfinite(x)


def check_row(ids: Any, lps: Any, top_k: int, vocab_size: int, what: str) -> None:
    """One row: min(K, V) unique ids in [0, V), finite logprobs <= 0, non-increasing, mass <= 1."""
    if not isinstance(ids, list) or not isinstance(lps, list) or len(ids) != len(lps):
        raise ValueError(f"{what}: ids/logprobs are not equal-length lists")
    if len(ids) != min(top_k, vocab_size):
        raise ValueError(f"{what}: {len(ids)} logprobs, expected {min(top_k, vocab_size)}")
    if not all(_is_int(t) and 0 <= t < vocab_size for t in ids) or len(set(ids)) != len(ids):
        raise ValueError(f"{what}: token ids out of range or repeated")
    if not all(_is_num(x) and x <= LOGPROB_SLACK for x in lps):
        raise ValueError(f"{what}: logprobs not finite numbers <= 0")
    if any(b > a + LOGPROB_SLACK for a, b in zip(lps, lps[1:])):
        raise ValueError(f"{what}: logprobs not sorted")
    if math.fsum(math.exp(min(x, 0.0)) for x in lps) > 1 + MASS_SLACK:
        raise ValueError(f"{what}: probabilities sum above 1")


class TandemApi:
    """``/tandem/v1/*`` of a ``tandem verifier``: the server keeps each session's context."""

    name = "tandem"
    round_path = VERIFY_PATH

    def __init__(self, url: str, tokenizer: Any | None, vocab_size: int | None):
        self.url = url
        self.tokenizer = tokenizer
        self.declared_vocab_size = vocab_size

    async def handshake(self, http: JsonHttp, top_logprobs: int) -> ServerLimits:
        try:
            info = await http.get_json(INFO_PATH)
        except NotFoundError:
            raise VerifierIncompatibleError(
                f"{self.url} has no {INFO_PATH}: it is not a `tandem verifier`. Start the server with "
                "`tandem verifier --model DIR ...`, or set verifier_api: stock for a plain vLLM endpoint "
                "(slower: see docs/vllm-verifier.md)"
            ) from None
        return self._limits(info, top_logprobs)

    async def check_ready(self, http: JsonHttp, known: dict | None, top_logprobs: int) -> ServerLimits | None:
        info = await http.get_json(INFO_PATH)
        if known is None or info.get("server_id") != known.get("server_id"):
            return self._limits(info, top_logprobs)  # a new server (restart, replica): re-check its vocabulary
        return None

    def _limits(self, info: dict, top_logprobs: int) -> ServerLimits:
        if info.get("protocol") != VERIFY_PROTOCOL_VERSION:
            problem = f"protocol {info.get('protocol')!r} (this client speaks {VERIFY_PROTOCOL_VERSION})"
        else:
            problem = None
        for key in ("vocab_size", "max_model_len", "max_logprobs"):
            if not _is_int(info.get(key)) or info[key] <= 0:
                raise VerifierUnavailableError(f"verifier {self.url}: /info has no valid {key!r}")
        if problem:
            raise VerifierIncompatibleError(f"verifier {self.url} is incompatible: {problem}")
        if self.tokenizer is not None:
            local = vocab_fingerprint(self.tokenizer.get_vocab())
            if info.get("vocab_sha256") is None:
                raise VerifierIncompatibleError(
                    f"verifier {self.url} serves {info.get('model')!r} without a tokenizer (--skip-tokenizer-init), "
                    "so its vocabulary cannot be checked against the drafter's; start it with its tokenizer"
                )
            if info.get("vocab_sha256") != local:
                raise VerifierIncompatibleError(
                    f"verifier {self.url} serves {info.get('model')!r} whose tokenizer vocabulary differs from the "
                    f"drafter's ({info.get('tokenizer_vocab_size')} vs {len(self.tokenizer.get_vocab())} tokens, "
                    f"sha256 {str(info.get('vocab_sha256'))[:12]} vs {local[:12]}). Drafter and verifier must share "
                    "one tokenizer."
                )
        server_vocab = info["vocab_size"]
        if self.declared_vocab_size and server_vocab != self.declared_vocab_size:
            raise VerifierIncompatibleError(
                f"verifier {self.url}: model has {server_vocab} output logits, the drafter {self.declared_vocab_size}; "
                "they must share one vocabulary"
            )
        k_max = min(info["max_logprobs"], server_vocab)
        if top_logprobs > k_max:
            logger.warning(
                "verifier %s allows %d logprobs per position (vLLM --max-logprobs); using K=%d instead of %d",
                self.url, k_max, k_max, top_logprobs,
            )  # fmt: skip
        return ServerLimits(info.get("model"), server_vocab, info["max_model_len"], min(top_logprobs, k_max), info)

    def request(self, session: WireSession, draft: list[int], top_k: int, sampling: dict | None = None) -> VerifyRequest:
        body: VerifyRequest = {
            "session": session.sid,
            "base": session.sent,
            "append": session.ids[session.sent :],
            "draft": draft,
            "cache_salt": session.salt,
        }
        if sampling is None:
            body["top_k"] = top_k
        else:
            body["sampling"] = sampling  # type: ignore[typeddict-item]
        return body

    def _check_common(self, body: Any, session: WireSession, draft: list[int]) -> tuple[int, str | None, float | None]:
        if not isinstance(body, dict):
            raise ValueError("body is not an object")
        k, n = len(draft), len(session.ids)
        if body.get("protocol") != VERIFY_PROTOCOL_VERSION or body.get("session") != session.sid:
            raise ValueError("protocol or session mismatch")
        if body.get("context_len") != n or body.get("num_prompt_tokens") != n + k:
            raise ValueError(f"context length {body.get('context_len')} != {n}")
        cached = body.get("num_cached_tokens")
        if not _is_int(cached) or not 0 <= cached <= n + k:
            raise ValueError("num_cached_tokens invalid")
        if type(body.get("recomputed")) is not bool:
            raise ValueError("recomputed invalid")
        salt = body.get("cache_salt")
        if salt is not None and not isinstance(salt, str):
            raise ValueError("cache_salt invalid")
        engine_s = body.get("engine_s")
        return cached, salt, float(engine_s) if _is_num(engine_s) else None

    def parse_decided(self, body: Any, session: WireSession, draft: list[int], vocab_size: int) -> DecidedRound:
        cached, salt, engine_s = self._check_common(body, session, draft)
        k = len(draft)
        tokens, accepted, lps = body.get("tokens"), body.get("accepted"), body.get("draft_logprobs")
        if not _is_int(accepted) or not 0 <= accepted <= k:
            raise ValueError(f"accepted {accepted!r} not in [0, {k}]")
        if not isinstance(tokens, list) or len(tokens) != accepted + 1:
            raise ValueError("tokens is not the accepted drafts plus one token")
        if not all(_is_int(t) and 0 <= t < vocab_size for t in tokens) or tokens[:accepted] != draft[:accepted]:
            raise ValueError("tokens out of range or not the accepted draft prefix")
        if accepted < k and tokens[accepted] == draft[accepted]:
            raise ValueError("the correction token equals the rejected draft token")
        if not isinstance(lps, list) or len(lps) != k or not all(_is_num(x) and x <= LOGPROB_SLACK for x in lps):
            raise ValueError("draft_logprobs invalid")
        return DecidedRound(tokens, accepted, [min(float(x), 0.0) for x in lps], cached, body["recomputed"], engine_s, salt)

    def needs_resync(self, status: int, error_code: str | None) -> bool:
        return status == 409 and error_code == UNKNOWN_SESSION

    def committed(self, session: WireSession, request: dict, rows: ScoredRows) -> None:
        session.sent = request["base"] + len(request["append"])
        session.salt = rows.cache_salt

    def release_path(self, session: WireSession) -> str | None:
        return f"{SESSIONS_PATH}/{session.sid}" if session.sent else None

    def parse(self, body: Any, session: WireSession, draft: list[int], top_k: int, vocab_size: int) -> ScoredRows:
        cached, salt, engine_s = self._check_common(body, session, draft)
        k = len(draft)
        top_ids, top_lps = body.get("top_ids"), body.get("top_logprobs")
        draft_lps, draft_ranks = body.get("draft_logprobs"), body.get("draft_ranks")
        if not (isinstance(top_ids, list) and isinstance(top_lps, list) and len(top_ids) == len(top_lps) == k + 1):
            raise ValueError(f"expected {k + 1} rows")
        if not (isinstance(draft_lps, list) and isinstance(draft_ranks, list) and len(draft_lps) == len(draft_ranks) == k):
            raise ValueError(f"expected {k} draft logprobs")
        for i in range(k + 1):
            check_row(top_ids[i], top_lps[i], top_k, vocab_size, f"row {i}")
        for i in range(k):
            lp, rank = draft_lps[i], draft_ranks[i]
            if not (_is_num(lp) and lp <= LOGPROB_SLACK and _is_int(rank) and 1 <= rank <= vocab_size):
                raise ValueError(f"row {i}: invalid draft logprob/rank")
            if lp > top_lps[i][0] + LOGPROB_SLACK:
                raise ValueError(f"row {i}: draft logprob above the top-1")
            if draft[i] in top_ids[i]:
                j = top_ids[i].index(draft[i])
                if abs(top_lps[i][j] - lp) > 1e-4:
                    raise ValueError(f"row {i}: draft logprob disagrees with its top-K entry")
        return ScoredRows(
            top_ids, top_lps, draft_lps,
            num_cached_tokens=cached, recomputed=body["recomputed"], engine_s=engine_s, cache_salt=salt,
        )  # fmt: skip


class StockApi:
    """vLLM's own ``/v1/completions`` with ``prompt_logprobs``: the whole context every round."""

    name = "stock"
    round_path = "/v1/completions"

    def __init__(self, url: str, tokenizer: Any | None, vocab_size: int | None, model: str | None = None):
        self.url = url
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size or (len(tokenizer) if tokenizer is not None else 0)
        self.model = model

    async def handshake(self, http: JsonHttp, top_logprobs: int) -> ServerLimits:
        try:
            models = await http.get_json("/v1/models")
        except NotFoundError:
            raise VerifierIncompatibleError(f"{self.url} has no /v1/models: it is not a vLLM OpenAI server") from None
        data = models.get("data")
        if not isinstance(data, list) or not data or not isinstance(data[0], dict):
            raise VerifierUnavailableError(f"verifier {self.url}: /v1/models lists no model")
        entry = next((m for m in data if m.get("id") == self.model), data[0]) if self.model else data[0]
        max_len = entry.get("max_model_len")
        if not _is_int(max_len) or max_len <= 0:
            raise VerifierUnavailableError(f"verifier {self.url}: /v1/models gives no max_model_len (is it vLLM?)")
        model = entry.get("id")
        if self.tokenizer is not None:
            remote = (
                await http.post_json("/tokenize", {"model": model, "prompt": VOCAB_PROBE, "add_special_tokens": False})
            ).get("tokens")
            if remote != self.tokenizer.encode(VOCAB_PROBE, add_special_tokens=False):
                raise VerifierIncompatibleError(
                    f"verifier {self.url} serves {model!r}, which tokenises a probe text differently from the "
                    "drafter's tokenizer; drafter and verifier must share one tokenizer"
                )
        if not self.vocab_size:
            raise VerifierIncompatibleError("stock API: give vocab_size (the drafter's) or a tokenizer")
        self.model = model
        info = {"model": model, "max_model_len": max_len}
        return ServerLimits(model, self.vocab_size, max_len, min(top_logprobs, self.vocab_size), info)

    async def check_ready(self, http: JsonHttp, known: dict | None, top_logprobs: int) -> ServerLimits | None:
        status = await http.get_status("/health")
        if status != 200:
            raise VerifierUnavailableError(f"verifier {self.url}: /health answered {status}")
        return await self.handshake(http, top_logprobs) if known is None else None

    def request(self, session: WireSession, draft: list[int], top_k: int, sampling: dict | None = None) -> dict:
        if sampling is not None:
            raise ValueError("a stock vLLM endpoint cannot decide rounds")
        body: dict[str, Any] = {
            "model": self.model,
            "prompt": session.ids + draft,
            "max_tokens": 1,
            "temperature": 0.0,
            "logprobs": top_k,
            "return_tokens_as_token_ids": True,
        }
        if draft:
            body["prompt_logprobs"] = top_k
        return body

    def needs_resync(self, status: int, error_code: str | None) -> bool:
        return False  # every round sends the whole context

    def committed(self, session: WireSession, request: dict, rows: ScoredRows) -> None:
        return None

    def release_path(self, session: WireSession) -> str | None:
        return None

    def parse_decided(self, body: Any, session: WireSession, draft: list[int], vocab_size: int) -> DecidedRound:
        raise ValueError("a stock vLLM endpoint cannot decide rounds")

    def parse(self, body: Any, session: WireSession, draft: list[int], top_k: int, vocab_size: int) -> ScoredRows:
        k, n = len(draft), len(session.ids)
        choice = body["choices"][0]
        plp = choice.get("prompt_logprobs")
        if k > 0 and (not isinstance(plp, list) or len(plp) != n + k):
            raise ValueError(f"prompt_logprobs has {len(plp) if isinstance(plp, list) else None} positions, expected {n + k}")
        top_ids, top_lps, draft_lps = [], [], []
        for i in range(k):
            entries = plp[n + i]
            if not isinstance(entries, dict):
                raise ValueError(f"row {i}: no logprobs")
            parsed = []
            actual = None
            for key, value in entries.items():
                tid = _token_id(key)
                lp, rank = value["logprob"], value.get("rank")
                if not (_is_num(lp) and _is_int(rank) and rank >= 1):
                    raise ValueError(f"row {i}: invalid entry")
                if tid == draft[i]:
                    actual = lp
                if rank <= top_k:
                    parsed.append((rank, tid, lp))
            parsed.sort()
            ids = [t for _, t, _ in parsed[:top_k]]
            lps = [min(lp, 0.0) if lp <= LOGPROB_SLACK else lp for _, _, lp in parsed[:top_k]]
            check_row(ids, lps, top_k, vocab_size, f"row {i}")
            if actual is None or not actual <= LOGPROB_SLACK or actual > lps[0] + LOGPROB_SLACK:
                raise ValueError(f"row {i}: draft token's logprob missing or invalid")
            top_ids.append(ids)
            top_lps.append(lps)
            draft_lps.append(min(actual, 0.0))
        last = choice["logprobs"]["top_logprobs"][0]
        if not isinstance(last, dict):
            raise ValueError("bonus row missing")
        pairs = sorted(((lp, _token_id(key)) for key, lp in last.items()), key=lambda p: -p[0] if _is_num(p[0]) else 0)
        pairs = pairs[:top_k]
        ids = [t for _, t in pairs]
        lps = [lp for lp, _ in pairs]
        if not all(_is_num(x) for x in lps):
            raise ValueError("bonus row: invalid logprobs")
        lps = [min(x, 0.0) if x <= LOGPROB_SLACK else x for x in lps]
        check_row(ids, lps, top_k, vocab_size, f"row {k}")
        top_ids.append(ids)
        top_lps.append(lps)
        return ScoredRows(top_ids, top_lps, draft_lps)


def _token_id(key: Any) -> int:
    """vLLM's ``return_tokens_as_token_ids`` keys are ``"token_id:123"``."""
    if isinstance(key, str) and key.startswith("token_id:"):
        return int(key[len("token_id:") :])
    return int(key)


def make_api(name: str, url: str, tokenizer: Any | None, vocab_size: int | None, model: str | None = None) -> VerifyApi:
    if name == "tandem":
        return TandemApi(url, tokenizer, vocab_size)
    if name == "stock":
        return StockApi(url, tokenizer, vocab_size, model)
    raise ValueError(f"api must be 'tandem' or 'stock', got {name!r}")


__all__ = ["DecidedRound", "ScoredRows", "ServerLimits", "StockApi", "TandemApi", "VerifierIncompatibleError", "VerifyApi", "make_api"]
