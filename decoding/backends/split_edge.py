"""The edge side of split inference, as a :class:`~decoding.verifiers.Verifier`.

The edge runs the head (embeddings, layers [0, a)) and the tail (layers
[b, L), norm, LM head); the split worker runs the body. Only hidden states
cross the network: the prompt's and the generated tokens never leave the edge.

One ``score(draft)`` is one round trip: the edge runs the head over the
tokens the caches lack plus the k drafts, posts their layer-a hidden states
(optionally with Gaussian noise) to the worker, gets layer-b states back and
runs the tail, which yields the k+1 logits rows. So with the speculative
router (edge drafter) a round costs one round trip for up to k+1 tokens, and
with ``verifier-only`` it is plain split decoding, one round trip per token.

Rollback (the rule is :class:`~decoding.causal_lm.RollbackContext`'s, shared
with the in-process backends): ``extend`` crops the edge's head and tail caches
to the accepted prefix; the worker's body cache is cropped by the next step's
``start``, in the same round trip.

Faults: when the worker answers that it does not hold the session (it
restarted, or evicted the session for its TTL or memory bound), the edge
replays the session's context, sending the exact uplink rows it sent before
(noise included, so a replay shows an observer nothing new), and continues;
the round's :class:`~decoding.events.TransportEvent` reports it (the gateway
exports it as ``tandem_split_replays_total``). Connection failures are retried for
``reconnect_s`` seconds; after that, and on any refusal, the session raises
:class:`~decoding.verifiers.VerifierUnavailableError` (HTTP 503 at the gateway).
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import secrets
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import torch

from decoding import protocol as wire
from decoding.causal_lm import RollbackContext, crop_cache
from decoding.events import TransportEvent
from decoding.partition import EdgeModel, SplitConfigError, parse_layers
from decoding.verifiers import VerifierUnavailableError


class SplitVerifier:
    """Split inference as a verifier backend: edge head and tail here, body on a split worker."""

    def __init__(
        self,
        edge: EdgeModel,
        url: str,
        *,
        token: str | None = None,
        noise_scale: float = 0.0,
        wire_dtype: torch.dtype | None = None,
        timeout_s: float = 10.0,
        reconnect_s: float = 10.0,
        noise_seed: int | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ):
        wire_dtype = wire_dtype or edge.dtype  # lossless by default
        if noise_scale < 0 or not math.isfinite(noise_scale):
            raise SplitConfigError(f"noise scale must be a finite number >= 0, got {noise_scale}")
        if wire_dtype not in wire.DTYPE_NAMES:
            raise SplitConfigError(f"wire dtype must be one of {', '.join(wire.DTYPES)}, got {wire_dtype}")
        self.edge = edge
        self.url = url.rstrip("/")
        self.name = f"split:{edge.path.name}[{edge.a}:{edge.b}]"
        self.vocab_size = edge.vocab_size
        self.max_context = edge.max_context
        self.noise_scale = float(noise_scale)
        self.wire_dtype = wire_dtype
        self.reconnect_s = reconnect_s
        self.open_sessions = 0  # exported by the gateway as tandem_split_sessions_active
        # The noise key: secret per edge process (or derived from noise_seed, for reproducible runs).
        self._noise_key = (
            hashlib.sha256(f"tandem-split-noise-{noise_seed}".encode()).digest()
            if noise_seed is not None
            else secrets.token_bytes(32)
        )
        headers = {"content-type": wire.CONTENT_TYPE, "accept": wire.CONTENT_TYPE}
        if token:
            headers["authorization"] = f"Bearer {token}"
        # One persistent (keep-alive) connection pool to the worker for the verifier's lifetime.
        self.client = httpx.AsyncClient(
            base_url=self.url,
            headers=headers,
            timeout=httpx.Timeout(timeout_s, connect=min(timeout_s, 5.0)),
            limits=httpx.Limits(max_connections=16, max_keepalive_connections=16, keepalive_expiry=60.0),
            transport=transport,
        )
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tandem-split-edge")

    @classmethod
    def from_pretrained(
        cls, path: str | Path, url: str, layers: str | tuple[int, int], *, dtype: torch.dtype = torch.float32,
        device: str = "cpu", **kwargs: Any,
    ) -> SplitVerifier:
        a, b = parse_layers(layers)
        return cls(EdgeModel(path, a, b, dtype=dtype, device=device), url, **kwargs)

    # -- Verifier protocol --------------------------------------------------------

    async def start(self, prompt_ids: Sequence[int]) -> SplitVerifySession:
        return SplitVerifySession(self, prompt_ids)

    async def check_ready(self) -> None:
        """The worker answers /health and serves the same model slice as this edge."""
        try:
            resp = await self.client.get("/health", timeout=min(self.client.timeout.read or 5.0, 5.0))
            resp.raise_for_status()
            info = resp.json()
        except (httpx.HTTPError, ValueError) as exc:
            raise VerifierUnavailableError(f"split worker at {self.url} is not reachable: {exc}") from exc
        self._check_identity(info)

    def _check_identity(self, info: dict) -> None:
        edge = self.edge
        if info.get("fingerprint") != edge.fingerprint or list(info.get("layers", [])) != [edge.a, edge.b]:
            raise VerifierUnavailableError(
                f"split worker at {self.url} serves layers {info.get('layers')} of model fingerprint "
                f"{info.get('fingerprint')}, but this edge needs layers [{edge.a}, {edge.b}] of {edge.fingerprint}"
            )

    async def aclose(self) -> None:
        await self.client.aclose()
        self._executor.shutdown(wait=False, cancel_futures=True)

    # -- helpers for sessions -------------------------------------------------------

    async def run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def prefix_digests(self, previous: bytes, tokens: Sequence[int]) -> list[bytes]:
        """Keyed hash chain over the context: digest i identifies the prefix ending at that token."""
        out = []
        for t in tokens:
            previous = hashlib.blake2b(previous + int(t).to_bytes(4, "little"), key=self._noise_key, digest_size=16).digest()
            out.append(previous)
        return out

    def perturb(self, hidden: torch.Tensor, digests: Sequence[bytes]) -> torch.Tensor:
        """Add N(0, (s·rms(h))²) per row: the noise's norm is about s times the row's norm.

        Each row's noise is drawn from a generator seeded by its prefix digest
        (keyed with this edge's secret), so one context position always gets
        the same noise: a re-send, a replay or the same prompt in another
        request shows an observer the same noisy vector again, never a fresh
        draw to average away.
        """
        if self.noise_scale == 0:
            return hidden
        noise = torch.stack([
            torch.randn(hidden.shape[-1], generator=torch.Generator().manual_seed(int.from_bytes(d[:8], "little") >> 1))
            for d in digests
        ])
        return add_noise(hidden, self.noise_scale, noise)


def add_noise(hidden: torch.Tensor, scale: float, noise: torch.Tensor) -> torch.Tensor:
    """The uplink's noise: hidden [..., H] + scale · rms(row) · noise [..., H], float32.

    With standard normal ``noise`` each row gets N(0, (scale·rms(h))² I), a noise
    norm of about ``scale·‖h‖``. The split audit measures this same function.
    """
    h = hidden.float()
    return h + scale * h.pow(2).mean(dim=-1, keepdim=True).sqrt() * noise


class SplitVerifySession(RollbackContext):
    """One request's split context: edge head/tail caches, the worker's session, the sent uplink.

    The rollback bookkeeping is :class:`~decoding.causal_lm.RollbackContext`'s; the
    caches it crops are the edge's head and tail caches, the sent uplink rows and
    their noise digests here, and the worker's body cache with the next step's ``start``.
    """

    def __init__(self, verifier: SplitVerifier, prompt_ids: Sequence[int]):
        super().__init__(prompt_ids)
        self.v = verifier
        self.edge = verifier.edge
        self.sid = secrets.token_urlsafe(18)
        self.head_cache = self.edge.head.new_cache()
        self.tail_cache = self.edge.tail.new_cache()
        # The uplink rows sent for the cached tokens, exactly as sent: what a replay re-sends.
        # A buffer that doubles when full, so a round appends its rows without copying the context.
        self._uplink = torch.empty(64, self.edge.hidden_size, dtype=verifier.wire_dtype, device=self.edge.device)
        self.digests: list[bytes] = []  # the keyed prefix digest of each cached position (noise seeds)
        self.forward_passes = 0
        self.rounds = 0
        self.replays = 0
        self._opened = False
        verifier.open_sessions += 1
        self._closed = False
        self.last_transport: TransportEvent | None = None

    @property
    def uplink(self) -> torch.Tensor:
        """[len(cached), H] in the wire dtype: the rows sent for the cached tokens."""
        return self._uplink[: len(self.cached)]

    def _keep_uplink(self, start: int, up: torch.Tensor) -> None:
        end = start + up.shape[0]
        if end > self._uplink.shape[0]:
            grown = self._uplink.new_empty(max(end, 2 * self._uplink.shape[0]), self._uplink.shape[1])
            grown[:start] = self._uplink[:start]
            self._uplink = grown
        self._uplink[start:end] = up

    def _crop_cache(self, length: int) -> None:
        crop_cache(self.head_cache, length)
        crop_cache(self.tail_cache, length)
        del self.digests[length:]

    def _head(self, tokens: list[int], start: int, digests: list[bytes]) -> torch.Tensor:
        h = self.edge.run_head(tokens, self.head_cache, start)[0]
        return self.v.perturb(h, digests).to(self.v.wire_dtype)

    def _tail(self, hidden: torch.Tensor, start: int, keep: int) -> torch.Tensor:
        return self.edge.run_tail(hidden.unsqueeze(0), self.tail_cache, start, keep)

    async def score(self, draft: Sequence[int]) -> torch.Tensor:
        if self._closed:
            raise VerifierUnavailableError("split session is closed")
        feed = self.pending() + list(draft)
        start = len(self.cached)
        digests = self.v.prefix_digests(self.digests[start - 1] if start else b"", feed) if self.v.noise_scale else []
        up = await self.v.run(self._head, feed, start, digests)
        try:
            down = await self._step(up, start)
            logits = await self.v.run(self._tail, down, start, len(draft) + 1)
        except BaseException:
            # Leave the caches as they were before this round, so the session stays consistent.
            crop_cache(self.head_cache, start)
            crop_cache(self.tail_cache, start)
            raise
        self._keep_uplink(start, up)
        self.fed(feed)
        self.digests.extend(digests)
        self.forward_passes += 1
        return logits

    async def _step(self, up: torch.Tensor, start: int) -> torch.Tensor:
        """One round trip (plus a replay when the worker lost the session) -> layer-b rows [n, H].

        Sets ``last_transport`` to what the round cost on the wire."""
        v = self.v
        n = up.shape[0]
        base = {"session": self.sid, "layers": [self.edge.a, self.edge.b], "fingerprint": self.edge.fingerprint}
        frame = wire.encode({**base, "start": start}, up)
        deadline = time.monotonic() + v.reconnect_s
        delay = 0.05
        replays_here = 0
        bytes_up = bytes_down = retries = 0
        replay_reason: str | None = None
        last_error = ""
        t_start = time.perf_counter()
        while True:
            try:
                resp = await v.client.post("/v1/split/step", content=frame)
            except httpx.TransportError as exc:  # refused, reset, timed out: the worker may be restarting
                last_error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
                if time.monotonic() + delay > deadline:
                    raise VerifierUnavailableError(
                        f"split worker at {v.url} is unreachable (retried for {v.reconnect_s:g} s): {last_error}",
                        reason="unreachable",
                    ) from exc
                retries += 1
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)
                continue
            bytes_up += len(frame)
            bytes_down += len(resp.content)
            if resp.status_code == 200:
                self.rounds += 1
                self._opened = True
                self.last_transport = TransportEvent(
                    backend="split", round_s=time.perf_counter() - t_start, round_trips=1 + replays_here,
                    bytes_up=bytes_up, bytes_down=bytes_down, retries=retries,
                    resync_reason=replay_reason, resync_tokens=start if replay_reason else 0,
                )  # fmt: skip
                return self._decode(resp, n)
            code, message = _error_of(resp)
            if resp.status_code == 409 and replays_here < 2:
                # The worker lost this session (restart, TTL, memory bound) or its cache
                # disagrees: resend the whole context, exactly as sent before, in one step.
                replays_here += 1
                self.replays += 1
                replay_reason = code or "conflict"
                frame = wire.encode({**base, "start": 0, "return_from": start}, torch.cat([self.uplink, up]))
                continue
            if resp.status_code >= 500 and time.monotonic() + delay <= deadline:
                last_error = f"HTTP {resp.status_code}: {message}"
                retries += 1
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)
                continue
            raise VerifierUnavailableError(
                f"split worker at {v.url} refused the step (HTTP {resp.status_code}, {code}): {message}",
                reason=code or f"http_{resp.status_code}",
            )

    def _decode(self, resp: httpx.Response, n: int) -> torch.Tensor:
        try:
            _, down = wire.decode(resp.content)
        except wire.WireError as exc:
            raise VerifierUnavailableError(f"split worker sent a malformed frame: {exc}") from exc
        if down is None or list(down.shape) != [n, self.edge.hidden_size]:
            shape = None if down is None else list(down.shape)
            raise VerifierUnavailableError(f"split worker returned shape {shape}, expected {[n, self.edge.hidden_size]}")
        return down

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.v.open_sessions -= 1
        if self._opened:
            try:  # free the worker's cache now rather than at its TTL; best effort
                await self.v.client.delete(f"/v1/split/sessions/{self.sid}", timeout=2.0)
            except (httpx.HTTPError, RuntimeError):
                pass
        self.head_cache = self.tail_cache = None  # type: ignore[assignment]


def _error_of(resp: httpx.Response) -> tuple[str, str]:
    try:
        err = resp.json()["error"]
        return str(err.get("code") or ""), str(err.get("message") or "")
    except (ValueError, KeyError, TypeError):
        return "", resp.text[:200]
