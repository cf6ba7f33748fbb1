"""The vLLM-hosted verifier: the large model behind a vLLM server, scoring edge drafts over HTTP.

:class:`VLLMVerifier` implements the :class:`~decoding.verifiers.Verifier`
protocol. Each verify round sends the tokens committed since the previous
round plus the k-token draft, and reads back the top-K logprobs of the k+1
verification positions; :meth:`VLLMVerifySession.score` turns them into a
``[k+1, V]`` logits row block with ``-inf`` outside what the server returned.

Two server APIs (``api=``):

``"tandem"`` (default) -- a vLLM started with ``tandem verifier``
    (:mod:`service.vllm.route`): vLLM's OpenAI server plus ``/tandem/v1/*``
    next to the engine. Per round: O(k) bytes up (the server keeps the
    session's context), O(k·K) bytes down, and vLLM's prefix cache serves the
    context so only the last block(s) plus the draft are recomputed.

``"stock"`` -- any vLLM ``/v1/completions`` the user cannot change (a managed
    endpoint). Each round sends the whole context as token ids with
    ``prompt_logprobs=K, max_tokens=1``. Its cost, per round: vLLM skips the
    prefix cache for requests with ``prompt_logprobs`` (cached positions have
    no logprobs), so the whole context is recomputed every round; the request
    carries the whole context (O(n) bytes up) and the response carries top-K
    logprobs for every prompt position (O(n·K) bytes down, ~100 bytes per
    position per logprob in vLLM's JSON), and vLLM's API process turns all of
    them into Python objects. Latency and bytes therefore grow linearly with
    the context; on a 1.5k-token context a stock round measured ~4x slower
    than a cached one. Use it only when the server cannot be changed.

Exactness. Greedy verification is exact: the argmax is always in the top-K.
With sampling the target distribution is known only on the returned set
(top-K, plus the draft token's own logprob, which vLLM always returns). The
router renormalises over that set. The result is exact when the request's
``top_k`` is between 1 and K (its filter keeps only tokens inside the top-K,
so the processed distribution is identical); otherwise it is an
approximation whose total-variation error is at most the target probability
mass outside the returned set, which each round reports as ``tail_mass``
(at temperature 1; for temperatures below 1 the true tail is smaller, above 1
larger). See :meth:`VLLMVerifier.is_exact`.

Faults. Every round runs under ``timeout_s`` (connect, send, server, read:
it cannot hang). A round has no side effects, so transport errors, 5xx/408/429
answers and invalid bodies are retried up to ``retries`` times with
exponential backoff and jitter; then :class:`~decoding.verifiers.VerifierUnavailableError`
(HTTP 503 at the gateway) is raised. Numbers are validated strictly (types,
shapes, ids in range, finite logprobs <= 0, sorted, mass <= 1); a draft is
never accepted on numbers that fail. A restarted or replaced server answers
``409 unknown_session``; the session resends its context once (after
re-checking the server's vocabulary) and goes on, so a verifier that comes
back is used again without a restart.

Metrics are not exported here (the gateway owns Prometheus): read
:attr:`VLLMVerifier.stats` (cumulative counters) or register ``on_round``
callbacks receiving a :class:`RoundReport` per round.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import random
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import httpx
import torch

from decoding.causal_lm import ModelLoadError
from decoding.verifiers import VerifierUnavailableError
from service.vllm.route import LOGPROB_SLACK, MAX_DRAFT, PROTOCOL_VERSION, ROUTE_PREFIX, vocab_fingerprint

logger = logging.getLogger("tandem.vllm_verifier")

Api = Literal["tandem", "stock"]
#: Text whose tokenisation must agree between client and a stock server (vocabulary probe).
VOCAB_PROBE = (
    "def verify(draft, context):\n    return [t for t in draft if t in context]  # 0123456789 "
    "The quick brown fox jumps over the lazy dog. éàü ✓ 日本語 \t{}[]()<>=+-*/%!?@#$^&|~`'\""
)
MASS_SLACK = 1e-3


class VerifierIncompatibleError(VerifierUnavailableError, ModelLoadError):
    """The server answers but its model cannot verify these drafts (other vocabulary, protocol)."""


class _Retryable(Exception):
    """A round attempt failed in a way a retry may fix (transport, 5xx, invalid body)."""


class _Resync(Exception):
    """The server does not hold this session's context (restarted, evicted, another replica)."""


@dataclass(frozen=True)
class RoundReport:
    """One verify round, as seen by the client."""

    k: int
    latency_s: float
    bytes_sent: int  # request line + headers + body, this round (all attempts)
    bytes_received: int  # status line + headers + body
    attempts: int
    tail_mass: float  # max over the k+1 rows of the target mass outside the returned set (T = 1)
    num_prompt_tokens: int
    num_cached_tokens: int | None  # vLLM prefix-cache hits (tandem API only)
    recomputed: bool = False  # the server had to recompute the round (a shared cache hit covered it)
    resynced: bool = False  # the context was resent in full (new server or session evicted)
    engine_s: float | None = None


@dataclass
class VLLMVerifierStats:
    """Cumulative counters for the gateway to export (e.g. as ``tandem_verifier_*_total``)."""

    rounds: int = 0
    retries: int = 0
    failures: int = 0  # rounds that failed after all retries
    invalid_responses: int = 0  # bodies rejected by validation (each attempt)
    resyncs: int = 0
    recomputed_rounds: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    tail_mass_sum: float = 0.0
    tail_mass_max: float = 0.0
    latency_s_sum: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def _is_int(x: Any) -> bool:
    return type(x) is int


def _is_num(x: Any) -> bool:
    return (type(x) is float or type(x) is int) and math.isfinite(x)


def _http_bytes(request: httpx.Request | None, response: httpx.Response | None, body_in: int, body_out: int) -> tuple[int, int]:
    """Approximate HTTP/1.1 bytes on the wire: start line + headers + body."""
    sent = body_out
    if request is not None:
        sent += len(request.method) + len(request.url.raw_path) + 12
        sent += sum(len(k) + len(v) + 4 for k, v in request.headers.raw) + 2
    received = body_in
    if response is not None:
        received += 17 + len(response.reason_phrase or "")
        received += sum(len(k) + len(v) + 4 for k, v in response.headers.raw) + 2
    return sent, received


class VLLMVerifier:
    """A verifier at a URL: a ``tandem verifier`` (api="tandem") or a stock vLLM (api="stock").

    Args:
        url: ``http://host:port`` of the server.
        tokenizer: the drafter's tokenizer; the server's vocabulary must match it
            (checked at connect). None skips the check (not recommended).
        top_logprobs: K, logprobs per position. Sampling is exact for request top_k <= K.
        timeout_s: bound on one attempt of one round (connect + server + read).
        retries: extra attempts of a failed round; backoff_s * 2^i (capped at
            backoff_max_s, with jitter) between them.
        vocab_size: logits width the router expects (the drafter's); default the server's.
        max_context: provisional context limit until the server tells its ``max_model_len``.
        on_round: callbacks receiving a :class:`RoundReport` after each successful round.
    """

    def __init__(
        self,
        url: str,
        tokenizer: Any | None = None,
        *,
        api: Api = "tandem",
        top_logprobs: int = 20,
        timeout_s: float = 10.0,
        connect_timeout_s: float | None = None,
        retries: int = 2,
        backoff_s: float = 0.1,
        backoff_max_s: float = 2.0,
        api_key: str | None = None,
        model: str | None = None,
        vocab_size: int | None = None,
        max_context: int | None = None,
        max_connections: int = 64,
        on_round: Sequence[Callable[[RoundReport], None]] = (),
    ):
        if api not in ("tandem", "stock"):
            raise ValueError(f"api must be 'tandem' or 'stock', got {api!r}")
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"verifier URL must start with http:// or https://, got {url!r}")
        if not (isinstance(top_logprobs, int) and top_logprobs >= 1):
            raise ValueError(f"top_logprobs must be a positive integer, got {top_logprobs!r}")
        if timeout_s <= 0 or retries < 0:
            raise ValueError("timeout_s must be > 0 and retries >= 0")
        self.url = url.rstrip("/")
        self.api: Api = api
        self.tokenizer = tokenizer
        self.requested_top_logprobs = top_logprobs
        self.top_logprobs = top_logprobs  # K in effect (clamped to the server's --max-logprobs)
        self.timeout_s = float(timeout_s)
        self.connect_timeout_s = float(connect_timeout_s if connect_timeout_s is not None else min(timeout_s, 3.0))
        self.retries = int(retries)
        self.backoff_s = float(backoff_s)
        self.backoff_max_s = float(backoff_max_s)
        self.api_key = api_key
        self.model = model
        self.max_connections = max_connections
        self._declared_vocab_size = vocab_size
        self.vocab_size: int = vocab_size or (len(tokenizer) if tokenizer is not None else 0)
        self.max_context: int = max_context or 2**31 - 1
        self.name = f"vllm@{self.url}"
        self.on_round: list[Callable[[RoundReport], None]] = list(on_round)
        self.stats = VLLMVerifierStats()
        self.server_info: dict | None = None
        self._connected = False
        self._client: httpx.AsyncClient | None = None
        self._client_loop: asyncio.AbstractEventLoop | None = None
        self._connect_lock: asyncio.Lock | None = None
        self._background: set[asyncio.Task] = set()

    # -- construction from tandem's settings -----------------------------------

    @classmethod
    def from_settings(cls, settings: Any, tokenizer: Any) -> VLLMVerifier:
        """Build from :class:`service.config.TandemSettings` and check the server now.

        A server that answers with another vocabulary fails here
        (:class:`VerifierIncompatibleError`); one that does not answer yet is
        checked again by :meth:`check_ready` and the first request.
        """
        vocab_size = None
        drafter = getattr(settings, "drafter", None)
        if drafter and drafter != "ngram":
            config = Path(drafter).expanduser() / "config.json"
            if config.is_file():
                vocab_size = json.loads(config.read_text()).get("vocab_size")
        verifier = cls(
            settings.verifier,
            tokenizer,
            api=getattr(settings, "verifier_api", "tandem"),
            top_logprobs=getattr(settings, "verifier_top_logprobs", 20),
            timeout_s=getattr(settings, "verifier_timeout_s", 10.0),
            retries=getattr(settings, "verifier_retries", 2),
            backoff_s=getattr(settings, "verifier_backoff_s", 0.1),
            api_key=_secret(getattr(settings, "verifier_api_key", None)),
            vocab_size=vocab_size,
        )
        try:
            verifier.connect_sync()
        except VerifierIncompatibleError:
            raise
        except VerifierUnavailableError as exc:
            logger.warning("verifier %s not reachable at start (%s); will retry on readiness checks", verifier.url, exc)
        return verifier

    # -- HTTP plumbing -----------------------------------------------------------------

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def _timeout(self) -> httpx.Timeout:
        return httpx.Timeout(self.timeout_s, connect=self.connect_timeout_s)

    def _http(self) -> httpx.AsyncClient:
        """The pooled keep-alive client of the running event loop."""
        loop = asyncio.get_running_loop()
        if self._client is None or self._client_loop is not loop or self._client.is_closed:
            # A client's connections belong to one loop; a new loop gets a new pool.
            self._client = httpx.AsyncClient(
                base_url=self.url,
                headers=self._headers(),
                timeout=self._timeout(),
                limits=httpx.Limits(max_connections=self.max_connections, max_keepalive_connections=self.max_connections),
            )
            self._client_loop = loop
            self._connect_lock = asyncio.Lock()
        return self._client

    async def _attempt(self, method: str, path: str, body: dict | None) -> tuple[httpx.Response, bytes, int, int]:
        client = self._http()
        content = json.dumps(body, separators=(",", ":")).encode() if body is not None else None
        request = client.build_request(
            method, path, content=content, headers={"Content-Type": "application/json"} if content is not None else None
        )
        response = None
        try:
            async with asyncio.timeout(self.timeout_s):
                response = await client.send(request)
                data = await response.aread()
        except (httpx.HTTPError, TimeoutError, OSError) as exc:
            raise _Retryable(f"{type(exc).__name__}: {exc or 'timed out'}") from exc
        finally:
            if response is not None:
                await response.aclose()
        sent, received = _http_bytes(request, response, len(data), len(content or b""))
        return response, data, sent, received

    async def _get_json(self, path: str) -> dict:
        response, data, _, _ = await self._attempt("GET", path, None)
        return _expect_json(response, data, path)

    def _backoff(self, attempt: int) -> float:
        delay = min(self.backoff_max_s, self.backoff_s * (2**attempt))
        return delay * (0.5 + random.random() / 2)

    # -- handshake -----------------------------------------------------------------

    def _apply_info(self, info: dict) -> None:
        """Check a /tandem/v1/info (or a stock summary) and adopt its limits."""
        if self.api == "tandem":
            problems = []
            if info.get("protocol") != PROTOCOL_VERSION:
                problems.append(f"protocol {info.get('protocol')!r} (this client speaks {PROTOCOL_VERSION})")
            for key in ("vocab_size", "max_model_len", "max_logprobs"):
                if not _is_int(info.get(key)) or info[key] <= 0:
                    raise VerifierUnavailableError(f"verifier {self.url}: /info has no valid {key!r}")
            if problems:
                raise VerifierIncompatibleError(f"verifier {self.url} is incompatible: " + "; ".join(problems))
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
            if self._declared_vocab_size and server_vocab != self._declared_vocab_size:
                raise VerifierIncompatibleError(
                    f"verifier {self.url}: model has {server_vocab} output logits, the drafter {self._declared_vocab_size}; "
                    "they must share one vocabulary"
                )
            self.vocab_size = server_vocab
            self.max_context = info["max_model_len"]
            k_max = min(info["max_logprobs"], server_vocab)
            if self.requested_top_logprobs > k_max:
                logger.warning(
                    "verifier %s allows %d logprobs per position (vLLM --max-logprobs); using K=%d instead of %d",
                    self.url, k_max, k_max, self.requested_top_logprobs,
                )
            self.top_logprobs = min(self.requested_top_logprobs, k_max)
            self.model = info.get("model") or self.model
        else:
            self.max_context = info["max_model_len"]
            self.model = info["model"]
            if not self.vocab_size:
                raise VerifierIncompatibleError("stock API: give vocab_size (the drafter's) or a tokenizer")
            self.top_logprobs = min(self.requested_top_logprobs, self.vocab_size)
        self.server_info = info
        self.name = f"vllm:{self.model}@{self.url}"
        self._connected = True

    async def _stock_info(self) -> dict:
        models = await self._get_json("/v1/models")
        data = models.get("data")
        if not isinstance(data, list) or not data or not isinstance(data[0], dict):
            raise VerifierUnavailableError(f"verifier {self.url}: /v1/models lists no model")
        entry = next((m for m in data if m.get("id") == self.model), data[0]) if self.model else data[0]
        max_len = entry.get("max_model_len")
        if not _is_int(max_len) or max_len <= 0:
            raise VerifierUnavailableError(f"verifier {self.url}: /v1/models gives no max_model_len (is it vLLM?)")
        info = {"model": entry.get("id"), "max_model_len": max_len}
        if self.tokenizer is not None:
            response, data_bytes, _, _ = await self._attempt(
                "POST", "/tokenize", {"model": info["model"], "prompt": VOCAB_PROBE, "add_special_tokens": False}
            )
            remote = _expect_json(response, data_bytes, "/tokenize").get("tokens")
            local = self.tokenizer.encode(VOCAB_PROBE, add_special_tokens=False)
            if remote != local:
                raise VerifierIncompatibleError(
                    f"verifier {self.url} serves {info['model']!r}, which tokenises a probe text differently from the "
                    "drafter's tokenizer; drafter and verifier must share one tokenizer"
                )
        return info

    async def connect(self, force: bool = False) -> None:
        """Handshake: read the server's limits and check its vocabulary.

        Raises VerifierUnavailableError (unreachable, garbage) or
        VerifierIncompatibleError (answers, but another vocabulary/protocol).
        """
        self._http()
        assert self._connect_lock is not None
        async with self._connect_lock:
            if self._connected and not force:
                return
            try:
                if self.api == "tandem":
                    try:
                        info = await self._get_json(f"{ROUTE_PREFIX}/info")
                    except _NotFound:
                        raise VerifierIncompatibleError(
                            f"{self.url} has no {ROUTE_PREFIX}/info: it is not a `tandem verifier`. Start the server with "
                            "`tandem verifier --model DIR ...`, or set verifier_api: stock for a plain vLLM endpoint "
                            "(slower: see docs/vllm-verifier.md)"
                        ) from None
                else:
                    info = await self._stock_info()
            except _Retryable as exc:
                self._connected = False
                raise VerifierUnavailableError(f"verifier {self.url} unreachable: {exc}") from None
            self._apply_info(info)

    def connect_sync(self) -> None:
        """:meth:`connect` for synchronous start-up code (no event loop needed)."""

        async def run() -> None:
            try:
                await self.connect(force=True)
            finally:
                if self._client is not None:
                    await self._client.aclose()
                self._client = None

        try:
            asyncio.get_running_loop()
        except RuntimeError:
            asyncio.run(run())
            return
        # Called from inside a running loop (e.g. an app's startup): do it on a helper thread.
        import concurrent.futures

        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            pool.submit(asyncio.run, run()).result()

    # -- Verifier protocol -------------------------------------------------------------------

    async def check_ready(self) -> None:
        try:
            if self.api == "tandem":
                info = await self._get_json(f"{ROUTE_PREFIX}/info")
                if not self._connected or not self.server_info or info.get("server_id") != self.server_info.get("server_id"):
                    self._apply_info(info)  # a new server (restart, replica): re-check its vocabulary
            else:
                response, data, _, _ = await self._attempt("GET", "/health", None)
                if response.status_code != 200:
                    raise VerifierUnavailableError(f"verifier {self.url}: /health answered {response.status_code}")
                if not self._connected:
                    await self.connect()
        except (_Retryable, _NotFound) as exc:
            raise VerifierUnavailableError(f"verifier {self.url} not ready: {exc}") from None

    async def start(self, prompt_ids: Sequence[int]) -> VLLMVerifySession:
        if not self._connected:
            await self.connect()
        return VLLMVerifySession(self, prompt_ids)

    async def aclose(self) -> None:
        for task in list(self._background):
            task.cancel()
        if self._client is not None and not self._client.is_closed:
            try:
                await self._client.aclose()
            except RuntimeError:  # the client's loop is gone
                pass
        self._client = None

    def is_exact(self, temperature: float, top_k: int) -> bool:
        """Whether verification through this backend reproduces the target exactly
        for a request with these sampling parameters (see the module docstring)."""
        return temperature == 0 or 1 <= top_k <= self.top_logprobs

    # -- one round -------------------------------------------------------------------

    async def _round(self, session: VLLMVerifySession, draft: list[int]) -> torch.Tensor:
        t0 = time.perf_counter()
        attempts = sent_total = received_total = 0
        resynced = False
        last_error = "no attempt"
        attempt = 0
        while attempt <= self.retries:
            attempts += 1
            body = session._body(draft)
            try:
                path = f"{ROUTE_PREFIX}/verify" if self.api == "tandem" else "/v1/completions"
                response, data, sent, received = await self._attempt("POST", path, body)
                sent_total += sent
                received_total += received
                parsed = self._parse(session, draft, response, data)
            except _Resync:
                if resynced:
                    last_error = "the server lost the session twice in one round"
                    break
                resynced = True
                self.stats.resyncs += 1
                session._reset()
                try:
                    await self.connect(force=True)  # maybe a new server: re-check its vocabulary first
                except VerifierIncompatibleError:
                    self.stats.failures += 1
                    raise
                except VerifierUnavailableError as exc:
                    last_error = str(exc)
                    attempt = await self._back_off(attempt)
                continue
            except _Retryable as exc:
                last_error = str(exc)
                attempt = await self._back_off(attempt)
                continue
            except VerifierUnavailableError:
                self.stats.failures += 1
                raise
            logits, tail, cached, recomputed, engine_s, salt = parsed
            session._committed(body, salt)
            latency = time.perf_counter() - t0
            report = RoundReport(
                k=len(draft),
                latency_s=latency,
                bytes_sent=sent_total,
                bytes_received=received_total,
                attempts=attempts,
                tail_mass=tail,
                num_prompt_tokens=len(session.ids) + len(draft),
                num_cached_tokens=cached,
                recomputed=recomputed,
                resynced=resynced,
                engine_s=engine_s,
            )
            self._record(report)
            return logits
        self.stats.failures += 1
        raise VerifierUnavailableError(
            f"verifier {self.url} failed a verify round after {attempts} attempt(s): {last_error}"
        )

    def _record(self, r: RoundReport) -> None:
        s = self.stats
        s.rounds += 1
        s.bytes_sent += r.bytes_sent
        s.bytes_received += r.bytes_received
        s.prompt_tokens += r.num_prompt_tokens
        s.cached_tokens += r.num_cached_tokens or 0
        s.recomputed_rounds += int(r.recomputed)
        s.tail_mass_sum += r.tail_mass
        s.tail_mass_max = max(s.tail_mass_max, r.tail_mass)
        s.latency_s_sum += r.latency_s
        for callback in self.on_round:
            try:
                callback(r)
            except Exception:  # a metrics hook must not fail a generation
                logger.exception("on_round callback failed")

    async def _back_off(self, attempt: int) -> int:
        """Count a failed attempt; sleep before the next one if retries remain. Returns the new count."""
        attempt += 1
        if attempt <= self.retries:
            self.stats.retries += 1
            await asyncio.sleep(self._backoff(attempt - 1))
        return attempt

    def _parse(self, session: VLLMVerifySession, draft: list[int], response: httpx.Response, data: bytes):
        status = response.status_code
        if status == 409 and self.api == "tandem" and _error_code(data) == "unknown_session":
            raise _Resync()
        if status >= 500 or status in (408, 429):
            raise _Retryable(f"HTTP {status}: {_error_message(data)}")
        if status == 404:
            raise VerifierUnavailableError(f"verifier {self.url}: {response.request.url.path} not found (HTTP 404)")
        if status != 200:
            raise VerifierUnavailableError(f"verifier {self.url} rejected the round: HTTP {status}: {_error_message(data)}")
        try:
            body = json.loads(data)
            if self.api == "tandem":
                rows = self._rows_tandem(session, draft, body)
            else:
                rows = self._rows_stock(session, draft, body)
        except (ValueError, TypeError, KeyError, IndexError, AttributeError) as exc:
            self.stats.invalid_responses += 1
            logger.warning("verifier %s: invalid verify response (%s)", self.url, exc)
            raise _Retryable(f"invalid response: {exc}") from None
        top_ids, top_lps, draft_lps, cached, recomputed, engine_s, salt = rows
        return (*self._to_logits(draft, top_ids, top_lps, draft_lps), cached, recomputed, engine_s, salt)

    def _check_row(self, ids: Any, lps: Any, what: str) -> None:
        K, V = self.top_logprobs, self.vocab_size
        if not isinstance(ids, list) or not isinstance(lps, list) or len(ids) != len(lps):
            raise ValueError(f"{what}: ids/logprobs are not equal-length lists")
        if len(ids) != min(K, V):
            raise ValueError(f"{what}: {len(ids)} logprobs, expected {min(K, V)}")
        if not all(_is_int(t) and 0 <= t < V for t in ids) or len(set(ids)) != len(ids):
            raise ValueError(f"{what}: token ids out of range or repeated")
        if not all(_is_num(x) and x <= LOGPROB_SLACK for x in lps):
            raise ValueError(f"{what}: logprobs not finite numbers <= 0")
        if any(b > a + LOGPROB_SLACK for a, b in zip(lps, lps[1:])):
            raise ValueError(f"{what}: logprobs not sorted")
        if math.fsum(math.exp(min(x, 0.0)) for x in lps) > 1 + MASS_SLACK:
            raise ValueError(f"{what}: probabilities sum above 1")

    def _rows_tandem(self, session: VLLMVerifySession, draft: list[int], body: Any):
        if not isinstance(body, dict):
            raise ValueError("body is not an object")
        k, n = len(draft), len(session.ids)
        if body.get("protocol") != PROTOCOL_VERSION or body.get("session") != session.sid:
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
        top_ids, top_lps = body.get("top_ids"), body.get("top_logprobs")
        draft_lps, draft_ranks = body.get("draft_logprobs"), body.get("draft_ranks")
        if not (isinstance(top_ids, list) and isinstance(top_lps, list) and len(top_ids) == len(top_lps) == k + 1):
            raise ValueError(f"expected {k + 1} rows")
        if not (isinstance(draft_lps, list) and isinstance(draft_ranks, list) and len(draft_lps) == len(draft_ranks) == k):
            raise ValueError(f"expected {k} draft logprobs")
        for i in range(k + 1):
            self._check_row(top_ids[i], top_lps[i], f"row {i}")
        for i in range(k):
            lp, rank = draft_lps[i], draft_ranks[i]
            if not (_is_num(lp) and lp <= LOGPROB_SLACK and _is_int(rank) and 1 <= rank <= self.vocab_size):
                raise ValueError(f"row {i}: invalid draft logprob/rank")
            if lp > top_lps[i][0] + LOGPROB_SLACK:
                raise ValueError(f"row {i}: draft logprob above the top-1")
            if draft[i] in top_ids[i]:
                j = top_ids[i].index(draft[i])
                if abs(top_lps[i][j] - lp) > 1e-4:
                    raise ValueError(f"row {i}: draft logprob disagrees with its top-K entry")
        engine_s = body.get("engine_s")
        engine_s = float(engine_s) if _is_num(engine_s) else None
        return top_ids, top_lps, draft_lps, cached, body["recomputed"], engine_s, salt

    def _rows_stock(self, session: VLLMVerifySession, draft: list[int], body: Any):
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
                if rank <= self.top_logprobs:
                    parsed.append((rank, tid, lp))
            parsed.sort()
            ids = [t for _, t, _ in parsed[: self.top_logprobs]]
            lps = [min(lp, 0.0) if lp <= LOGPROB_SLACK else lp for _, _, lp in parsed[: self.top_logprobs]]
            self._check_row(ids, lps, f"row {i}")
            if actual is None or not actual <= LOGPROB_SLACK or actual > lps[0] + LOGPROB_SLACK:
                raise ValueError(f"row {i}: draft token's logprob missing or invalid")
            top_ids.append(ids)
            top_lps.append(lps)
            draft_lps.append(min(actual, 0.0))
        last = choice["logprobs"]["top_logprobs"][0]
        if not isinstance(last, dict):
            raise ValueError("bonus row missing")
        pairs = sorted(((lp, _token_id(key)) for key, lp in last.items()), key=lambda p: -p[0] if _is_num(p[0]) else 0)
        pairs = pairs[: self.top_logprobs]
        ids = [t for _, t in pairs]
        lps = [lp for lp, _ in pairs]
        if not all(_is_num(x) for x in lps):
            raise ValueError("bonus row: invalid logprobs")
        lps = [min(x, 0.0) if x <= LOGPROB_SLACK else x for x in lps]
        self._check_row(ids, lps, f"row {k}")
        top_ids.append(ids)
        top_lps.append(lps)
        return top_ids, top_lps, draft_lps, None, False, None, None

    def _to_logits(self, draft: list[int], top_ids, top_lps, draft_lps) -> tuple[torch.Tensor, float]:
        k = len(draft)
        logits = torch.full((k + 1, self.vocab_size), float("-inf"), dtype=torch.float32)
        tail = 0.0
        for i in range(k + 1):
            ids = torch.tensor(top_ids[i], dtype=torch.long)
            logits[i, ids] = torch.tensor(top_lps[i], dtype=torch.float32).clamp(max=0.0)
            mass = math.fsum(math.exp(min(x, 0.0)) for x in top_lps[i])
            if i < k and draft[i] not in top_ids[i]:
                logits[i, draft[i]] = min(draft_lps[i], 0.0)
                mass += math.exp(min(draft_lps[i], 0.0))
            tail = max(tail, min(1.0, max(0.0, 1.0 - mass)))
        return logits, tail


class VLLMVerifySession:
    """One request's context on the remote verifier.

    ``ids`` is the committed context. With the tandem API the server keeps a
    copy; ``_sent`` is how much of ``ids`` it holds, so a round sends only
    ``ids[_sent:]`` and the draft.
    """

    last_transport = None  # TODO(events): report each round as a TransportEvent

    def __init__(self, verifier: VLLMVerifier, prompt_ids: Sequence[int]):
        self.verifier = verifier
        self.ids: list[int] = list(prompt_ids)
        self.sid = uuid.uuid4().hex
        self._sent = 0
        self._salt: str | None = None
        self.forward_passes = 0
        self.closed = False

    def _body(self, draft: list[int]) -> dict:
        v = self.verifier
        if v.api == "tandem":
            return {
                "session": self.sid,
                "base": self._sent,
                "append": self.ids[self._sent :],
                "draft": draft,
                "top_k": v.top_logprobs,
                "cache_salt": self._salt,
            }
        body = {
            "model": v.model,
            "prompt": self.ids + draft,
            "max_tokens": 1,
            "temperature": 0.0,
            "logprobs": v.top_logprobs,
            "return_tokens_as_token_ids": True,
        }
        if draft:
            body["prompt_logprobs"] = v.top_logprobs
        return body

    def _committed(self, body: dict, salt: str | None) -> None:
        if self.verifier.api == "tandem":
            self._sent = body["base"] + len(body["append"])
            self._salt = salt

    def _reset(self) -> None:
        self._sent = 0

    async def score(self, draft: Sequence[int]) -> torch.Tensor:
        if self.closed:
            raise RuntimeError("session is closed")
        draft = [int(t) for t in draft]
        if len(draft) > MAX_DRAFT:
            raise ValueError(f"draft of {len(draft)} tokens exceeds {MAX_DRAFT}")
        logits = await self.verifier._round(self, draft)
        self.forward_passes += 1
        return logits

    def extend(self, tokens: Sequence[int]) -> None:
        self.ids.extend(int(t) for t in tokens)

    async def close(self) -> None:
        """Release the server's copy of the context, in the background (never blocks, never raises)."""
        if self.closed:
            return
        self.closed = True
        v = self.verifier
        if v.api != "tandem" or self._sent == 0:
            return

        async def drop() -> None:
            try:
                client = v._http()
                async with asyncio.timeout(min(2.0, v.timeout_s)):
                    await client.delete(f"{ROUTE_PREFIX}/sessions/{self.sid}")
            except Exception:  # best effort: the server also expires idle sessions
                pass

        task = asyncio.get_running_loop().create_task(drop())
        v._background.add(task)
        task.add_done_callback(v._background.discard)


class _NotFound(Exception):
    pass


def _expect_json(response: httpx.Response, data: bytes, path: str) -> dict:
    if response.status_code == 404:
        raise _NotFound(path)
    if response.status_code >= 500 or response.status_code in (408, 429):
        raise _Retryable(f"{path}: HTTP {response.status_code}")
    if response.status_code == 401:
        raise VerifierUnavailableError(f"{path}: HTTP 401 (set the verifier API key)")
    if response.status_code != 200:
        raise VerifierUnavailableError(f"{path}: HTTP {response.status_code}: {_error_message(data)}")
    try:
        body = json.loads(data)
    except ValueError:
        raise _Retryable(f"{path}: answer is not JSON") from None
    if not isinstance(body, dict):
        raise _Retryable(f"{path}: answer is not a JSON object")
    return body


def _error_message(data: bytes) -> str:
    try:
        err = json.loads(data).get("error")
        if isinstance(err, dict):
            return str(err.get("message"))[:500]
        return str(err)[:500]
    except Exception:
        return data[:200].decode("utf-8", "replace")


def _error_code(data: bytes) -> str | None:
    try:
        err = json.loads(data).get("error")
        return err.get("code") if isinstance(err, dict) else None
    except Exception:
        return None


def _token_id(key: Any) -> int:
    """vLLM's ``return_tokens_as_token_ids`` keys are ``"token_id:123"``."""
    if isinstance(key, str) and key.startswith("token_id:"):
        value = int(key[len("token_id:") :])
    else:
        value = int(key)
    return value


def _secret(value: Any) -> str | None:
    if value is None:
        return None
    get = getattr(value, "get_secret_value", None)
    return get() if get else str(value)


__all__ = [
    "RoundReport",
    "VLLMVerifier",
    "VLLMVerifierStats",
    "VLLMVerifySession",
    "VerifierIncompatibleError",
]
