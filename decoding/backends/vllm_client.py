"""The vLLM-hosted verifier: the large model behind a vLLM server, scoring edge drafts over HTTP.

:class:`VLLMVerifier` implements the :class:`~decoding.verifiers.Verifier`
protocol. Each verify round sends the committed context (or, with the tandem
API, only the tokens committed since the previous round) plus the k-token
draft, and reads back the top-K logprobs of the k+1 verification positions;
:meth:`VLLMVerifySession.score` turns them into a ``[k+1, V]`` logits block
with ``-inf`` outside what the server returned.

This module is the transport: the pooled HTTP client, the retry loop, the
resync of a session the server lost, the logits, and the round's
:class:`~decoding.events.TransportEvent`. What goes on the wire is the server
API's (:mod:`decoding.backends.vllm_apis`): ``api="tandem"`` (default; a
``tandem verifier``, O(k) bytes per round, prefix-cached) or ``api="stock"``
(any vLLM ``/v1/completions``, O(context) per round).

Exactness. A ``tandem verifier`` whose engine decides rounds (``/info``:
``server_decides``; :mod:`service.vllm.engine_verify`) verifies the draft where
the full distribution lives, under the request's temperature / top-k / top-p
and a per-round seed, and answers only the accepted tokens and the correction
or bonus token (:meth:`VLLMVerifySession.decide`): exact at any sampling
parameters. Otherwise (an older server, the stock API, ``decide=False``) the
client decides on top-K rows: greedy verification is exact, since the argmax
is always in the top-K.
With sampling the target distribution is known only on the returned set
(top-K, plus the draft token's own logprob, which vLLM always returns). The
router renormalises over that set. The result is exact when the request's
``top_k`` is between 1 and K (its filter keeps only tokens inside the top-K,
so the processed distribution is identical); otherwise it is an
approximation whose total-variation error is at most the target probability
mass outside the returned set, which each round reports as ``tail_mass``
(at temperature 1; for temperatures below 1 the true tail is smaller, above 1
larger). See :meth:`VLLMVerifier.is_exact`.

Faults. Every attempt runs under ``timeout_s`` (connect, send, server, read:
it cannot hang). A round has no side effects, so transport errors, 5xx/408/429
answers and invalid bodies are retried up to ``retries`` times with
exponential backoff and jitter; then :class:`~decoding.verifiers.VerifierUnavailableError`
(HTTP 503 at the gateway) is raised. A draft is never accepted on numbers that
fail validation. A restarted or replaced server answers ``409 unknown_session``;
the session resends its context once (after re-checking the server's
vocabulary) and goes on, so a verifier that comes back is used again without
a restart.

Metrics. Each successful round sets ``session.last_transport`` (bytes, round
trips, retries, resync, tail mass), which the router attaches to its
``RoundEvent`` and the gateway exports as ``tandem_verifier_*``. Benchmarks
can also register ``on_round`` callbacks receiving a :class:`RoundReport`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import logging
import math
import random
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import httpx
import torch

from decoding.backends.vllm_apis import (
    DecidedRound,
    NotFoundError,
    RetryableError,
    ScoredRows,
    ServerLimits,
    VerifierIncompatibleError,
    make_api,
)
from decoding.causal_lm import ModelLoadError
from decoding.events import TransportEvent
from decoding.protocol import MAX_DRAFT, TOKENIZER_FILES, TOKENIZER_PATH, vocab_fingerprint
from decoding.sampling import SamplingParams
from decoding.verifiers import VerifierUnavailableError

logger = logging.getLogger("tandem.vllm_verifier")

Api = Literal["tandem", "stock"]


@dataclass(frozen=True)
class RoundReport:
    """One verify round as the client saw it: its wire cost (the event the gateway exports) and the server's numbers."""

    transport: TransportEvent
    k: int
    num_prompt_tokens: int
    num_cached_tokens: int | None  # vLLM prefix-cache hits (tandem API only)
    recomputed: bool = False  # the server had to recompute the round (a shared cache hit covered it)
    engine_s: float | None = None

    # The wire numbers are the event's; these are the names benchmarks read.
    @property
    def latency_s(self) -> float:
        return self.transport.round_s

    @property
    def bytes_sent(self) -> int:
        """Request lines + headers + bodies of this round's attempts."""
        return self.transport.bytes_up

    @property
    def bytes_received(self) -> int:
        return self.transport.bytes_down

    @property
    def tail_mass(self) -> float:
        """Max over the k+1 rows of the target mass outside the returned set (T = 1)."""
        return self.transport.tail_mass or 0.0

    @property
    def resynced(self) -> bool:
        return self.transport.resync_reason is not None


@dataclass(frozen=True)
class StreamedTokens:
    """Tokens vLLM generated by itself on a stream, and what that chunk cost on the wire."""

    tokens: list[int]
    transport: TransportEvent


@dataclass
class VLLMVerifierStats:
    """Outcomes that never become a round event: failed rounds, and the retries and rejected bodies behind them.

    Per-round numbers (bytes, latency, cache hits, tail mass) are in each
    :class:`RoundReport` and in the ``TransportEvent`` the gateway exports.
    """

    rounds: int = 0  # successful rounds
    failures: int = 0  # rounds that failed after all retries
    retries: int = 0  # failed attempts that were retried (in all rounds)
    invalid_responses: int = 0  # bodies rejected by validation (each attempt)
    resyncs: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


class _Resync(Exception):
    """The server does not hold this session's context (restarted, evicted, another replica)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


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


@dataclass(frozen=True)
class _Exchange:
    response: httpx.Response
    data: bytes
    bytes_up: int
    bytes_down: int


class _Http:
    """The keep-alive HTTP client of the running event loop, bounded per attempt, counting bytes."""

    def __init__(self, url: str, api_key: str | None, timeout_s: float, connect_timeout_s: float, max_connections: int):
        self.url = url
        self.timeout_s = timeout_s
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._timeout = httpx.Timeout(timeout_s, connect=connect_timeout_s)
        self._limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
        self._client: httpx.AsyncClient | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def client(self) -> httpx.AsyncClient:
        loop = asyncio.get_running_loop()
        if self._client is None or self._loop is not loop or self._client.is_closed:
            # A client's connections belong to one loop; a new loop gets a new pool.
            self._client = httpx.AsyncClient(base_url=self.url, headers=self._headers, timeout=self._timeout, limits=self._limits)
            self._loop = loop
        return self._client

    async def exchange(self, method: str, path: str, body: dict | None) -> _Exchange:
        """One attempt. Raises RetryableError on transport errors and timeouts."""
        client = self.client()
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
            raise RetryableError(f"{type(exc).__name__}: {exc or 'timed out'}") from exc
        finally:
            if response is not None:
                await response.aclose()
        up, down = _http_bytes(request, response, len(data), len(content or b""))
        return _Exchange(response, data, up, down)

    async def get_json(self, path: str) -> dict:
        x = await self.exchange("GET", path, None)
        return _expect_json(x.response, x.data, path)

    async def post_json(self, path: str, body: dict) -> dict:
        x = await self.exchange("POST", path, body)
        return _expect_json(x.response, x.data, path)

    async def get_status(self, path: str) -> int:
        return (await self.exchange("GET", path, None)).response.status_code

    async def aclose(self) -> None:
        if self._client is not None and not self._client.is_closed:
            try:
                await self._client.aclose()
            except RuntimeError:  # the client's loop is gone
                pass
        self._client = None


class VLLMVerifier:
    """A verifier at a URL: a ``tandem verifier`` (api="tandem") or a stock vLLM (api="stock").

    Args:
        url: ``http://host:port`` of the server.
        tokenizer: the drafter's tokenizer; the server's vocabulary must match it
            (checked at connect). None skips the check (not recommended).
        api: the server's API (see :mod:`decoding.backends.vllm_apis`).
        top_logprobs: K, logprobs per position. Sampling is exact for request top_k <= K.
        timeout_s: bound on one attempt of one round (connect + server + read).
        connect_timeout_s: bound on connecting (default: min(timeout_s, 3)).
        retries: extra attempts of a failed round; backoff_s * 2^i (capped at
            backoff_max_s, with jitter) between them.
        api_key: the server's bearer key, if it has one.
        model: the served model to use (stock API; default the server's first).
        vocab_size: logits width the router expects (the drafter's); default the server's.
        max_context: provisional context limit until the server tells its ``max_model_len``.
        on_round: callbacks receiving a :class:`RoundReport` after each successful round.
        decide: let a server that can (``/info``: ``server_decides``) decide the rounds, from the
            target's full distribution; False always asks for top-K rows (the client decides).
        stream: offer :meth:`stream_tokens` (vLLM generating by itself, one request) to the router.
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
        decide: bool = True,
        stream: bool = True,
    ):
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"verifier URL must start with http:// or https://, got {url!r}")
        if not (isinstance(top_logprobs, int) and top_logprobs >= 1):
            raise ValueError(f"top_logprobs must be a positive integer, got {top_logprobs!r}")
        if timeout_s <= 0 or retries < 0:
            raise ValueError("timeout_s must be > 0 and retries >= 0")
        self.url = url.rstrip("/")
        self.api = make_api(api, self.url, tokenizer, vocab_size, model)
        self.tokenizer = tokenizer
        self.requested_top_logprobs = top_logprobs
        self.top_logprobs = top_logprobs  # K in effect (clamped to the server's --max-logprobs)
        self.timeout_s = float(timeout_s)
        self.retries = int(retries)
        self.backoff_s = float(backoff_s)
        self.backoff_max_s = float(backoff_max_s)
        self.model = model
        self.vocab_size: int = vocab_size or (len(tokenizer) if tokenizer is not None else 0)
        self.max_context: int = max_context or 2**31 - 1
        self.name = f"vllm@{self.url}"
        self.on_round: list[Callable[[RoundReport], None]] = list(on_round)
        self.allow_decide = decide
        self.allow_stream = stream
        self.stats = VLLMVerifierStats()
        self.server_info: dict | None = None
        self.http = _Http(
            self.url, api_key, self.timeout_s,
            float(connect_timeout_s if connect_timeout_s is not None else min(timeout_s, 3.0)), max_connections,
        )  # fmt: skip
        self._connected = False
        self._lock: asyncio.Lock | None = None
        self._lock_loop: asyncio.AbstractEventLoop | None = None
        self._background: set[asyncio.Task] = set()

    # -- handshake -----------------------------------------------------------------

    def _adopt(self, limits: ServerLimits) -> None:
        self.vocab_size = limits.vocab_size
        self.max_context = limits.max_context
        self.top_logprobs = limits.top_logprobs
        self.model = limits.model or self.model
        self.server_info = limits.info
        self.name = f"vllm:{self.model}@{self.url}"
        self._connected = True

    def _connect_lock(self) -> asyncio.Lock:
        loop = asyncio.get_running_loop()
        if self._lock is None or self._lock_loop is not loop:
            self._lock, self._lock_loop = asyncio.Lock(), loop
        return self._lock

    async def connect(self, force: bool = False) -> None:
        """Handshake: read the server's limits and check its vocabulary.

        Raises VerifierUnavailableError (unreachable, garbage) or
        VerifierIncompatibleError (answers, but another vocabulary/protocol).
        """
        async with self._connect_lock():
            if self._connected and not force:
                return
            try:
                limits = await self.api.handshake(self.http, self.requested_top_logprobs)
            except RetryableError as exc:
                self._connected = False
                raise VerifierUnavailableError(f"verifier {self.url} unreachable: {exc}") from None
            self._adopt(limits)

    def connect_sync(self) -> None:
        """:meth:`connect` for synchronous start-up code (no event loop needed)."""

        async def run() -> None:
            try:
                await self.connect(force=True)
            finally:
                await self.http.aclose()

        try:
            asyncio.get_running_loop()
        except RuntimeError:
            asyncio.run(run())
            return
        # Called from inside a running loop (e.g. an app's startup): do it on a helper thread.
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            pool.submit(asyncio.run, run()).result()

    def connect_at_start(self) -> VLLMVerifier:
        """The gateway's start-up check: a server with another vocabulary fails now
        (:class:`VerifierIncompatibleError`); one that does not answer yet is only
        logged, and checked again by :meth:`check_ready` and the first request."""
        try:
            self.connect_sync()
        except VerifierIncompatibleError:
            raise
        except VerifierUnavailableError as exc:
            logger.warning("verifier %s not reachable at start (%s); will retry on readiness checks", self.url, exc)
        return self

    # -- Verifier protocol -------------------------------------------------------------------

    async def check_ready(self) -> None:
        try:
            known = self.server_info if self._connected else None
            limits = await self.api.check_ready(self.http, known, self.requested_top_logprobs)
        except (RetryableError, NotFoundError) as exc:
            raise VerifierUnavailableError(f"verifier {self.url} not ready: {exc}") from None
        if limits is not None:
            self._adopt(limits)

    async def start(self, prompt_ids: Sequence[int]) -> VLLMVerifySession:
        if not self._connected:
            await self.connect()
        return VLLMVerifySession(self, prompt_ids)

    async def aclose(self) -> None:
        for task in list(self._background):
            task.cancel()
        await self.http.aclose()

    @property
    def decides(self) -> bool:
        """Whether the server decides the rounds (where the full distribution lives): exact at any sampling."""
        return self.allow_decide and bool((self.server_info or {}).get("server_decides"))

    def is_exact(self, temperature: float, top_k: int) -> bool:
        """Whether verification through this backend reproduces the target exactly
        for a request with these sampling parameters (see the module docstring)."""
        return self.decides or temperature == 0 or 1 <= top_k <= self.top_logprobs

    # -- plain streaming -------------------------------------------------------------

    @property
    def streams(self) -> bool:
        """Whether :meth:`stream_tokens` can be used (any vLLM serves ``/v1/completions``)."""
        return self.allow_stream and self._connected and self.model is not None

    async def stream_tokens(
        self, prompt_ids: Sequence[int], params: SamplingParams, max_tokens: int, seed: int
    ) -> AsyncIterator[StreamedTokens]:
        """vLLM generating the continuation of ``prompt_ids`` by itself, as one streaming request.

        The round trip is paid once, not per token: what ``verifier-only`` and a
        request for which rounds do not pay use (see :mod:`decoding.stream_policy`).
        vLLM samples with the request's temperature / top-k / top-p and ``seed``;
        the caller trims at EOS and stop strings and closes the generator early
        (vLLM aborts a request whose client goes away). A failure before the
        first token is retried like a round; one after raises
        VerifierUnavailableError.
        """
        body = {
            "model": self.model, "prompt": [int(t) for t in prompt_ids], "max_tokens": int(max_tokens),
            "temperature": float(params.temperature), "top_p": float(params.top_p), "top_k": int(params.top_k),
            "seed": int(seed) % 2**63, "ignore_eos": bool(params.ignore_eos), "stream": True,
            "return_token_ids": True, "skip_special_tokens": False,
        }  # fmt: skip
        content = json.dumps(body, separators=(",", ":")).encode()
        failed = retries = 0
        while True:
            t0 = time.perf_counter()
            client = self.http.client()
            request = client.build_request("POST", "/v1/completions", content=content,
                                           headers={"Content-Type": "application/json"})  # fmt: skip
            try:
                response = await asyncio.wait_for(client.send(request, stream=True), self.timeout_s)
            except (httpx.HTTPError, TimeoutError, OSError) as exc:
                failed, retries = await self._back_off(failed, retries)
                if failed > self.retries:
                    raise VerifierUnavailableError(f"verifier {self.url}: stream failed to start: {exc!r}") from None
                continue
            break
        first = True
        try:
            if response.status_code != 200:
                data = await response.aread()
                raise VerifierUnavailableError(
                    f"verifier {self.url} refused the stream: HTTP {response.status_code}: {_error_message(data)}"
                )
            lines = response.aiter_lines()
            while True:
                try:
                    async with asyncio.timeout(self.timeout_s):
                        line = await anext(lines)
                except StopAsyncIteration:
                    return
                except (httpx.HTTPError, TimeoutError, OSError) as exc:
                    raise VerifierUnavailableError(f"verifier {self.url}: stream broken: {exc!r}") from None
                if not line.startswith("data:"):
                    continue
                payload = line[5:].strip()
                if payload == "[DONE]":
                    return
                try:
                    choice = json.loads(payload)["choices"][0]
                    tokens = [int(t) for t in choice.get("token_ids") or []]
                except (ValueError, KeyError, IndexError, TypeError) as exc:
                    raise VerifierUnavailableError(f"verifier {self.url}: invalid stream chunk ({exc})") from None
                if choice.get("finish_reason") is not None:
                    # vLLM is done: read the end of the stream before handing the last tokens over, so the
                    # connection goes back to the pool (a caller that stops here would drop it: +1 RTT next time).
                    with contextlib.suppress(Exception):
                        async with asyncio.timeout(self.timeout_s):
                            async for _ in lines:
                                pass
                if not all(0 <= t < self.vocab_size for t in tokens):
                    raise VerifierUnavailableError(f"verifier {self.url}: stream token outside the vocabulary")
                up, down = _http_bytes(request if first else None, response if first else None, len(line) + 2,
                                       len(content) if first else 0)  # fmt: skip
                event = TransportEvent(backend="vllm", round_s=time.perf_counter() - t0, round_trips=int(first),
                                       bytes_up=up, bytes_down=down, retries=retries if first else 0)  # fmt: skip
                first = False
                t0 = time.perf_counter()
                if tokens:
                    yield StreamedTokens(tokens, event)
        finally:
            await response.aclose()

    # -- one round -------------------------------------------------------------------

    async def _round(self, session: VLLMVerifySession, draft: list[int], sampling: dict | None = None):
        """Score ``session.ids + draft``: logits [k+1, V] float32, or with ``sampling`` the server's
        :class:`DecidedRound`. Sets ``session.last_transport``."""
        t0 = time.perf_counter()
        attempts = failed = bytes_up = bytes_down = round_trips = retries = 0
        resync: _Resync | None = None
        resync_tokens = 0
        last_error = "no attempt"
        while failed <= self.retries:
            attempts += 1
            body = self.api.request(session, draft, self.top_logprobs, sampling)
            try:
                x = await self.http.exchange("POST", self.api.round_path, body)
                bytes_up += x.bytes_up
                bytes_down += x.bytes_down
                rows = self._check_answer(session, draft, x, decided=sampling is not None)
            except _Resync as exc:
                round_trips += 1
                if resync is not None:
                    last_error = "the server lost the session twice in one round"
                    break
                resync, resync_tokens = exc, session.sent
                self.stats.resyncs += 1
                session.sent = 0
                try:
                    await self.connect(force=True)  # maybe a new server: re-check its vocabulary first
                except VerifierIncompatibleError:
                    self.stats.failures += 1
                    raise
                except VerifierUnavailableError as exc2:
                    last_error = str(exc2)
                    failed, retries = await self._back_off(failed, retries)
                continue
            except RetryableError as exc:
                last_error = str(exc)
                failed, retries = await self._back_off(failed, retries)
                continue
            except VerifierUnavailableError:
                self.stats.failures += 1
                raise
            round_trips += 1
            self.api.committed(session, body, rows)
            if isinstance(rows, DecidedRound):
                result, tail = rows, None  # decided on the full distribution: nothing is cut off
            else:
                result, tail = self._to_logits(draft, rows)
            event = TransportEvent(
                backend="vllm", round_s=time.perf_counter() - t0, round_trips=round_trips,
                bytes_up=bytes_up, bytes_down=bytes_down, retries=retries,
                resync_reason=resync.reason if resync else None, resync_tokens=resync_tokens, tail_mass=tail,
                server_s=rows.engine_s, cached_tokens=rows.num_cached_tokens,
            )  # fmt: skip
            session.last_transport = event
            self._record(RoundReport(
                event, len(draft), len(session.ids) + len(draft), rows.num_cached_tokens, rows.recomputed, rows.engine_s,
            ))  # fmt: skip
            return result
        self.stats.failures += 1
        raise VerifierUnavailableError(f"verifier {self.url} failed a verify round after {attempts} attempt(s): {last_error}")

    def _check_answer(self, session: VLLMVerifySession, draft: list[int], x: _Exchange,
                      decided: bool = False) -> ScoredRows | DecidedRound:  # fmt: skip
        """The answer's rows; raises _Resync, RetryableError or VerifierUnavailableError."""
        status = x.response.status_code
        if status != 200 and self.api.needs_resync(status, _error_code(x.data)):
            raise _Resync(_error_code(x.data) or str(status))
        if status >= 500 or status in (408, 429):
            raise RetryableError(f"HTTP {status}: {_error_message(x.data)}")
        if status == 404:
            raise VerifierUnavailableError(f"verifier {self.url}: {x.response.request.url.path} not found (HTTP 404)")
        if status != 200:
            raise VerifierUnavailableError(f"verifier {self.url} rejected the round: HTTP {status}: {_error_message(x.data)}")
        try:
            if decided:
                return self.api.parse_decided(json.loads(x.data), session, draft, self.vocab_size)
            return self.api.parse(json.loads(x.data), session, draft, self.top_logprobs, self.vocab_size)
        except (ValueError, TypeError, KeyError, IndexError, AttributeError) as exc:
            self.stats.invalid_responses += 1
            logger.warning("verifier %s: invalid verify response (%s)", self.url, exc)
            raise RetryableError(f"invalid response: {exc}") from None

    def _to_logits(self, draft: list[int], rows: ScoredRows) -> tuple[torch.Tensor, float]:
        """[k+1, V] float32 logits, -inf outside the returned set; and the round's tail mass (T = 1)."""
        k = len(draft)
        logits = torch.full((k + 1, self.vocab_size), float("-inf"), dtype=torch.float32)
        tail = 0.0
        for i in range(k + 1):
            ids = torch.tensor(rows.top_ids[i], dtype=torch.long)
            logits[i, ids] = torch.tensor(rows.top_logprobs[i], dtype=torch.float32).clamp(max=0.0)
            mass = math.fsum(math.exp(min(x, 0.0)) for x in rows.top_logprobs[i])
            if i < k and draft[i] not in rows.top_ids[i]:
                logits[i, draft[i]] = min(rows.draft_logprobs[i], 0.0)
                mass += math.exp(min(rows.draft_logprobs[i], 0.0))
            tail = max(tail, min(1.0, max(0.0, 1.0 - mass)))
        return logits, tail

    def _record(self, report: RoundReport) -> None:
        self.stats.rounds += 1
        for callback in self.on_round:
            try:
                callback(report)
            except Exception:  # a benchmark hook must not fail a generation
                logger.exception("on_round callback failed")

    async def _back_off(self, failed: int, retries: int) -> tuple[int, int]:
        """Count a failed attempt; sleep before the next one if retries remain. Returns the new counts."""
        failed += 1
        if failed <= self.retries:
            self.stats.retries += 1
            retries += 1
            delay = min(self.backoff_max_s, self.backoff_s * (2 ** (failed - 1)))
            await asyncio.sleep(delay * (0.5 + random.random() / 2))
        return failed, retries


class VLLMVerifySession:
    """One request's context on the remote verifier.

    ``ids`` is the committed context. With the tandem API the server keeps a
    copy: ``sent`` is how much of ``ids`` it holds (a round sends only
    ``ids[sent:]`` and the draft) and ``salt`` the cache salt it gave.
    """

    def __init__(self, verifier: VLLMVerifier, prompt_ids: Sequence[int]):
        self.verifier = verifier
        self.ids: list[int] = list(prompt_ids)
        self.sid = uuid.uuid4().hex
        self.sent = 0
        self.salt: str | None = None
        self.forward_passes = 0
        #: What the latest successful ``score`` cost on the wire (read by the router after each round).
        self.last_transport: TransportEvent | None = None
        self.closed = False

    def _draft(self, draft: Sequence[int]) -> list[int]:
        if self.closed:
            raise RuntimeError("session is closed")
        draft = [int(t) for t in draft]
        if len(draft) > MAX_DRAFT:
            raise ValueError(f"draft of {len(draft)} tokens exceeds {MAX_DRAFT}")
        self.last_transport = None
        return draft

    async def score(self, draft: Sequence[int]) -> torch.Tensor:
        draft = self._draft(draft)
        logits = await self.verifier._round(self, draft)
        self.forward_passes += 1
        return logits

    @property
    def decides(self) -> bool:
        """Whether :meth:`decide` runs on the server (see :class:`decoding.verifiers.DecidingSession`)."""
        return self.verifier.decides

    async def decide(self, draft: Sequence[int], params: SamplingParams, seed: int) -> tuple[list[int], int]:
        """Verify ``draft`` on the server, against the target's full distribution under ``params``.

        The server treats the draft as a point mass (exact for any proposal) and
        draws with ``seed``. Returns (the accepted drafts plus one correction or
        bonus token, the number accepted).
        """
        draft = self._draft(draft)
        sampling = {"temperature": float(params.temperature), "top_k": int(params.top_k),
                    "top_p": float(params.top_p), "seed": int(seed) % 2**63}  # fmt: skip
        decided = await self.verifier._round(self, draft, sampling)
        self.forward_passes += 1
        return decided.tokens, decided.accepted

    def extend(self, tokens: Sequence[int]) -> None:
        self.ids.extend(int(t) for t in tokens)

    async def close(self) -> None:
        """Release the server's copy of the context, in the background (never blocks, never raises)."""
        if self.closed:
            return
        self.closed = True
        v = self.verifier
        path = v.api.release_path(self)
        if path is None:
            return

        async def drop() -> None:
            try:
                async with asyncio.timeout(min(2.0, v.timeout_s)):
                    await v.http.client().delete(path)
            except Exception:  # best effort: the server also expires idle sessions
                pass

        task = asyncio.get_running_loop().create_task(drop())
        v._background.add(task)
        task.add_done_callback(v._background.discard)


def fetch_tokenizer(url: str, api_key: str | None = None, timeout_s: float = 60.0):
    """The tokenizer of the model a ``tandem verifier`` serves (``GET /tandem/v1/tokenizer``).

    For an edge with no model directory of its own (the n-gram drafter): the files
    are data only (``decoding.protocol.TOKENIZER_FILES``), loaded offline without
    remote code, and the loaded vocabulary must have the fingerprint the server
    states. Raises ModelLoadError naming the problem.
    """
    import tempfile
    from pathlib import Path

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        response = httpx.get(url.rstrip("/") + TOKENIZER_PATH, headers=headers, timeout=timeout_s)
    except httpx.HTTPError as exc:
        raise ModelLoadError(
            f"the n-gram drafter takes its tokenizer from the verifier, and {url} did not answer ({type(exc).__name__}: "
            f"{exc}); start the verifier first, or give a tokenizer directory (--tokenizer DIR)"
        ) from None
    if response.status_code != 200:
        raise ModelLoadError(
            f"verifier {url} did not share its tokenizer (HTTP {response.status_code}: {_error_message(response.content)}); "
            "give a tokenizer directory (--tokenizer DIR)"
        )
    try:
        body = response.json()
        files, expected = body["files"], body["vocab_sha256"]
        if not isinstance(files, dict) or "tokenizer.json" not in files or not isinstance(expected, str):
            raise ValueError("no tokenizer.json")
        if not set(files) <= set(TOKENIZER_FILES) or not all(isinstance(v, str) for v in files.values()):
            raise ValueError(f"unexpected files {sorted(set(files) - set(TOKENIZER_FILES))}")
    except (ValueError, KeyError, TypeError) as exc:
        raise ModelLoadError(f"verifier {url} sent an invalid tokenizer answer ({exc})") from None
    with tempfile.TemporaryDirectory(prefix="tandem-tokenizer-") as tmp:
        for name, text in files.items():
            (Path(tmp) / name).write_text(text, encoding="utf-8")
        try:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(tmp, local_files_only=True)  # no trust_remote_code: data only
        except Exception as exc:  # transformers raises several unrelated types here
            raise ModelLoadError(f"the tokenizer verifier {url} sent does not load: {exc}") from None
    if vocab_fingerprint(tokenizer.get_vocab()) != expected:
        raise ModelLoadError(f"the tokenizer verifier {url} sent does not load to the vocabulary it states")
    return tokenizer


def _expect_json(response: httpx.Response, data: bytes, path: str) -> dict:
    if response.status_code == 404:
        raise NotFoundError(path)
    if response.status_code >= 500 or response.status_code in (408, 429):
        raise RetryableError(f"{path}: HTTP {response.status_code}")
    if response.status_code == 401:
        raise VerifierUnavailableError(f"{path}: HTTP 401 (set the verifier API key)")
    if response.status_code != 200:
        raise VerifierUnavailableError(f"{path}: HTTP {response.status_code}: {_error_message(data)}")
    try:
        body = json.loads(data)
    except ValueError:
        raise RetryableError(f"{path}: answer is not JSON") from None
    if not isinstance(body, dict):
        raise RetryableError(f"{path}: answer is not a JSON object")
    return body


def _error_field(data: bytes) -> Any:
    try:
        return json.loads(data).get("error")
    except Exception:
        return None


def _error_message(data: bytes) -> str:
    err = _error_field(data)
    if isinstance(err, dict):
        return str(err.get("message"))[:500]
    if err is not None:
        return str(err)[:500]
    return data[:200].decode("utf-8", "replace")


def _error_code(data: bytes) -> str | None:
    err = _error_field(data)
    return err.get("code") if isinstance(err, dict) else None


__all__ = [
    "RoundReport",
    "VLLMVerifier",
    "VLLMVerifierStats",
    "VLLMVerifySession",
    "VerifierIncompatibleError",
    "fetch_tokenizer",
]
