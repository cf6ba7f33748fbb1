"""The vLLM-hosted verifier, against a real vLLM served by ``tandem verifier``.

One server per session (``vllm_server`` in tests/conftest.py). The only stand-in server
in this module is ``FakeGarbageServer``, named as such: it produces the broken
answers (NaN, out-of-range ids, hangs) that a real vLLM cannot be made to give.
The server-kill test runs last because it restarts the shared server.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch

from decoding.causal_lm import CausalLM, load_tokenizer
from decoding.drafters import HFDrafter
from decoding.sampling import SamplingParams, logits_to_probs
from decoding.speculative import SpecOptions, SpeculativeRouter
from decoding.offline.tiny_models import train_bpe_tokenizer
from decoding.verifiers import HFVerifier, VerifierUnavailableError
from decoding.backends.vllm_client import VerifierIncompatibleError, VLLMVerifier
from loadtests.delay_proxy import DelayProxy
from loadtests.procs import free_port
from loadtests.vllm_pair import sample_text
from service.backends import build_backends
from service.config import TandemSettings
from tests.support.vllm import vllm_greedy

REPO = Path(__file__).resolve().parents[3]
BLOCK = 32  # the test server's --block-size (tests/support/vllm.py, TEST_SERVER_ARGS)
MAX_TOKENS = 40


@pytest.fixture(scope="module")
def tokenizer(vllm_pair):
    return load_tokenizer(vllm_pair[1])


@pytest.fixture(scope="module")
def corpus(tokenizer) -> list[int]:
    return tokenizer.encode(sample_text())


@pytest.fixture(scope="module")
def verifier_lm(vllm_pair):
    lm = CausalLM(vllm_pair[0])
    yield lm
    lm.close()


@pytest.fixture(scope="module")
def drafter(vllm_pair):
    d = HFDrafter(CausalLM(vllm_pair[1]), cost_ratio=0.25)
    yield d
    d.lm.close()


def remote(server, tokenizer, **kw) -> VLLMVerifier:
    """The client, rounds only: these tests are about rounds (streaming: tests/service/vllm/test_streaming.py)."""
    return VLLMVerifier(server.url, tokenizer, **{"stream": False, **kw})


def log_softmax_rows(lm: CausalLM, context: list[int], draft: list[int]) -> torch.Tensor:
    """The in-process verifier's exact log-probabilities at the k+1 positions."""
    with torch.inference_mode():
        logits = lm.model(torch.tensor([context + draft])).logits[0, len(context) - 1 :].float()
    return torch.log_softmax(logits, dim=-1)


def assert_rows_match(remote_logits: torch.Tensor, exact: torch.Tensor, top_k: int) -> None:
    """Every finite entry the server returned is the exact logprob, and it returned the true top-K."""
    assert remote_logits.shape == exact.shape
    finite = torch.isfinite(remote_logits)
    assert (finite.sum(-1) >= top_k).all()
    torch.testing.assert_close(remote_logits[finite], exact[finite], atol=2e-4, rtol=0)
    true_top = exact.topk(top_k, dim=-1).indices
    assert torch.gather(finite, 1, true_top).all(), "a true top-K token is missing"
    assert torch.equal(remote_logits.argmax(-1), exact.argmax(-1))


def greedy_accept(draft: list[int], logits: torch.Tensor) -> list[int]:
    """The round's committed tokens under greedy verification: the agreeing prefix, then the target's token."""
    target = logits.argmax(-1).tolist()
    n = next((i for i, (d, t) in enumerate(zip(draft, target)) if d != t), len(draft))
    return draft[:n] + [target[n]]


# -- layering (no server needed) ---------------------------------------------------------------


def test_client_imports_no_server_code():
    """The client runs on the edge: the wire format comes from decoding.protocol, never from service/ or vLLM."""
    code = (
        "import sys, decoding.backends.vllm_client\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'service', 'vllm', 'fastapi', 'starlette', 'uvicorn'}))"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


# -- handshake -----------------------------------------------------------------------------


def test_handshake_reads_limits_and_checks_vocabulary(vllm_server, tokenizer, vllm_pair, other_vocab_drafter_dir):
    v = remote(vllm_server, tokenizer)
    asyncio.run(v.connect())
    assert (v.vocab_size, v.max_context, v.top_logprobs) == (512, 2048, 20)
    assert v.server_info["prefix_caching"] and v.server_info["block_size"] == BLOCK
    asyncio.run(v.check_ready())

    other = train_bpe_tokenizer(["completely different text " * 50, "zebra quartz " * 40], vocab_size=300)
    with pytest.raises(VerifierIncompatibleError, match="vocabulary differs"):
        asyncio.run(remote(vllm_server, other).connect())
    # The same check at the gateway's start: it fails there, naming the problem.
    with pytest.raises(VerifierIncompatibleError, match="vocabulary differs"):
        remote(vllm_server, other, timeout_s=5.0, retries=1).connect_at_start()
    assert remote(vllm_server, tokenizer).connect_at_start().max_context == 2048
    with pytest.raises(VerifierIncompatibleError, match="vocabulary differs"):
        build_backends(TandemSettings.load(verifier=vllm_server.url, drafter=str(other_vocab_drafter_dir)))
    backends = build_backends(TandemSettings.load(verifier=vllm_server.url, drafter=str(vllm_pair[1])))
    assert isinstance(backends.verifier, VLLMVerifier) and backends.verifier.max_context == 2048
    asyncio.run(backends.aclose())
    # K beyond the server's --max-logprobs is clamped, and the exactness rule follows the K in effect.
    big = remote(vllm_server, tokenizer, top_logprobs=500)
    asyncio.run(big.connect())
    assert big.top_logprobs == 64
    # A stock endpoint (no tandem route) is named as such.
    with pytest.raises(VerifierIncompatibleError, match="not a `tandem verifier`"):
        asyncio.run(VLLMVerifier(vllm_server.url + "/nothing-here", tokenizer).connect())


def test_ngram_drafter_against_the_remote_verifier(vllm_server, tokenizer):
    """``tandem generate --verifier URL --drafter ngram``: no model on the edge at all. The tokenizer comes from
    the verifier (``GET /tandem/v1/tokenizer``), and greedy output is vLLM's own greedy completion."""
    prompt = "def main():\n    return main()\n\ndef main():\n    return main()\n\ndef main():\n"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run(
        [str(REPO / ".venv" / "bin" / "tandem"), "generate", "--verifier", vllm_server.url, "--drafter", "ngram",
         "--prompt", prompt, "--max-tokens", str(MAX_TOKENS), "--ignore-eos", "--json"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=True)  # the fetched tokenizer is the drafter's
    assert result["token_ids"] == vllm_greedy(vllm_server, prompt_ids, MAX_TOKENS)
    # The n-gram drafter did propose (the router may then stream from vLLM, faster than rounds for this tiny model).
    assert result["stats"]["draft_tokens"] > 0
    # Without a verifier that shares its tokenizer, the error names the way out.
    backends_error = subprocess.run(
        [str(REPO / ".venv" / "bin" / "tandem"), "generate", "--verifier", vllm_server.url + "/nothing-here",
         "--drafter", "ngram", "--prompt", "x"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert backends_error.returncode != 0 and "--tokenizer DIR" in backends_error.stderr
    assert "Traceback" not in backends_error.stderr


# -- exactness -------------------------------------------------------------------------------


def greedy_prompts(corpus: list[int], tokenizer) -> dict[str, list[int]]:
    return {
        "short": tokenizer.encode("def main():"),
        "one-block": corpus[100:125],
        "8-blocks": corpus[2000:2250],
        "30-blocks": corpus[4000:4950],
    }


def test_greedy_equals_inprocess_verifier_and_vllm(vllm_server, tokenizer, corpus, verifier_lm, drafter):
    params = SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True)
    v = remote(vllm_server, tokenizer)
    drafted = accepted = 0
    for name, prompt in greedy_prompts(corpus, tokenizer).items():
        spec = asyncio.run(SpeculativeRouter(v, drafter, tokenizer).generate(prompt, params))
        only = asyncio.run(SpeculativeRouter(v, drafter, tokenizer, SpecOptions(mode="verifier-only")).generate(prompt, params))
        local = asyncio.run(SpeculativeRouter(HFVerifier(verifier_lm), drafter, tokenizer).generate(prompt, params))
        expected = vllm_greedy(vllm_server, prompt, MAX_TOKENS)
        assert len(expected) == MAX_TOKENS, name
        assert spec.token_ids == expected, name
        assert only.token_ids == expected, name
        assert local.token_ids == expected, name
        drafted += spec.stats.draft_tokens
        accepted += spec.stats.accepted_tokens
    # Speculation happened, with both acceptances and rejections (the drafter is good, not perfect).
    assert 0 < accepted < drafted
    assert v.stats.failures == 0 and v.stats.invalid_responses == 0


def test_rows_are_exact_and_prefix_cache_hits_from_second_round(vllm_server, tokenizer, corpus, verifier_lm, drafter):
    prompt = corpus[7000:7300]  # used by no other test: round 1 cannot hit
    hits_before = vllm_server.metrics()["vllm:prefix_cache_hits_total"]
    v = remote(vllm_server, tokenizer)
    reports = []
    v.on_round.append(reports.append)
    params = SamplingParams(max_tokens=64)

    async def run() -> None:
        session = await v.start(prompt)
        draft_session = drafter.start(prompt, params, torch.Generator().manual_seed(0))
        context = list(prompt)
        for _ in range(8):
            draft = (await draft_session.propose(4)).tokens
            logits = await session.score(draft)
            assert session.last_transport is reports[-1].transport  # the event the router attaches to the round
            assert_rows_match(logits, log_softmax_rows(verifier_lm, context, draft), 20)
            accepted = greedy_accept(draft, logits)
            session.extend(accepted)
            draft_session.extend(accepted)
            context += accepted
        await session.close()

    asyncio.run(run())
    assert reports[0].num_cached_tokens == 0
    for r in reports:
        t = r.transport
        assert (t.backend, t.round_trips, t.retries, t.resync_reason) == ("vllm", 1, 0, None)
        assert t.bytes_up > 0 and t.bytes_down > 0 and 0 <= t.tail_mass <= 1 and t.round_s > 0
    for r in reports[1:]:
        # Only the last block(s) and the draft are recomputed, however long the context.
        assert r.num_prompt_tokens - r.num_cached_tokens <= BLOCK + 4 + 1
        assert not r.recomputed
    grown = vllm_server.metrics()["vllm:prefix_cache_hits_total"] - hits_before
    assert grown >= sum(r.num_cached_tokens for r in reports) > 0


def test_sampling_exact_when_top_k_within_K_and_tail_mass_is_the_true_mass(vllm_server, tokenizer, corpus, verifier_lm):
    """The client deciding on top-K rows (decide=False, or a server whose engine does not decide);
    rounds the server decides are exact at any sampling (tests/service/vllm/test_engine_verify.py)."""
    v = remote(vllm_server, tokenizer, top_logprobs=8, decide=False)
    reports = []
    v.on_round.append(reports.append)
    context, draft = corpus[9000:9150], corpus[9150:9153]

    async def run() -> torch.Tensor:
        session = await v.start(context)
        out = await session.score(draft)
        await session.close()
        return out

    logits = asyncio.run(run())
    exact = log_softmax_rows(verifier_lm, context, draft)
    assert_rows_match(logits, exact, 8)
    # Exact for top_k <= K: the processed distributions are identical.
    for params in (SamplingParams(temperature=0.7, top_k=8), SamplingParams(temperature=1.3, top_k=3, top_p=0.9)):
        assert v.is_exact(params.temperature, params.top_k)
        torch.testing.assert_close(logits_to_probs(logits, params), logits_to_probs(exact, params), atol=1e-5, rtol=0)
    # Otherwise an approximation: its error is bounded by the mass outside the returned set, reported per round.
    params = SamplingParams(temperature=1.0)
    assert not v.is_exact(1.0, 0) and not v.is_exact(1.0, 9)
    p_true = torch.softmax(exact, -1)
    outside = torch.where(torch.isfinite(logits), 0.0, p_true).sum(-1)
    assert reports[0].tail_mass == pytest.approx(outside.max().item(), abs=1e-4)
    assert 0 < reports[0].tail_mass < 1
    tv = 0.5 * (logits_to_probs(logits, params) - p_true).abs().sum(-1)
    assert (tv <= outside + 1e-5).all()


def test_shared_cache_hit_over_needed_rows_is_recomputed(vllm_server, tokenizer, corpus, verifier_lm):
    """Two sessions with the same context and draft: the second one's first round would
    be served entirely from the cache, whose prompt-logprob rows vLLM leaves uninitialised."""
    context, draft = corpus[11000:11062], corpus[11062:11066]  # 66 tokens: blocks [0, 32) and [32, 64) full
    v = remote(vllm_server, tokenizer)
    reports = []
    v.on_round.append(reports.append)
    exact = log_softmax_rows(verifier_lm, context, draft)

    async def one_session() -> list[torch.Tensor]:
        session = await v.start(context)
        first = await session.score(draft)
        session.extend(greedy_accept(draft, first))
        second = await session.score(draft)
        await session.close()
        return [first, second]

    a = asyncio.run(one_session())
    b = asyncio.run(one_session())
    assert_rows_match(a[0], exact, 20)
    assert_rows_match(b[0], exact, 20)
    assert [r.recomputed for r in reports] == [False, False, True, False]
    assert reports[3].num_cached_tokens >= BLOCK  # the session's own salted blocks hit afterwards
    torch.testing.assert_close(a[1], b[1])


def test_bytes_per_round_flat_in_context_and_stock_fallback_agrees(vllm_server, tokenizer, corpus, verifier_lm):
    contexts = {100: corpus[13000:13100], 1500: corpus[14000:15500]}
    draft = corpus[16000:16004]
    stats = {}

    async def rounds(api: str, context: list[int]) -> tuple[list, list[torch.Tensor]]:
        v = remote(vllm_server, tokenizer, api=api)
        reports = []
        v.on_round.append(reports.append)
        session = await v.start(context)
        outs = []
        for _ in range(3):
            outs.append(await session.score(draft))
            session.extend([int(outs[-1][0].argmax())])
        await session.close()
        await v.aclose()
        return reports, outs

    for n, context in contexts.items():
        for api in ("tandem", "stock"):
            stats[api, n] = asyncio.run(rounds(api, context))
        for a, b in zip(stats["tandem", n][1], stats["stock", n][1]):
            torch.testing.assert_close(a, b, atol=2e-4, rtol=0)  # the fallback gives the same numbers
    warm = {key: value[0][-1] for key, value in stats.items()}
    short, long = warm["tandem", 100], warm["tandem", 1500]
    assert abs(long.bytes_sent - short.bytes_sent) <= 8  # only the digits of `base` differ
    assert abs(long.bytes_received - short.bytes_received) <= 0.1 * short.bytes_received
    assert long.bytes_sent + long.bytes_received < 4000
    # The stock fallback's documented cost: both directions grow with the context.
    assert warm["stock", 1500].bytes_sent > 4 * warm["stock", 100].bytes_sent
    assert warm["stock", 1500].bytes_received > 8 * warm["stock", 100].bytes_received


def test_through_delay_proxy_adds_rtt_and_stays_exact(vllm_server, tokenizer, corpus, verifier_lm):
    context, draft = corpus[17000:17200], corpus[17200:17204]
    exact = log_softmax_rows(verifier_lm, context, draft)

    async def run(rtt_ms: float, loss: float = 0.0) -> tuple[float, torch.Tensor]:
        async with DelayProxy(("127.0.0.1", vllm_server.port), rtt_ms, loss=loss, rto_ms=30, seed=1) as proxy:
            v = VLLMVerifier(proxy.url, tokenizer)
            await v.connect()
            session = await v.start(context)
            await session.score(draft)  # warm: connection open, context cached
            times = []
            for _ in range(3):
                t0 = time.perf_counter()
                out = await session.score(draft)
                times.append(time.perf_counter() - t0)
            await session.close()
            await v.aclose()
            return min(times), out

    base, out0 = asyncio.run(run(0))
    slow, out1 = asyncio.run(run(120))
    assert slow >= 0.119 and slow > base  # one RTT per warm round (keep-alive: no new handshake)
    _, out2 = asyncio.run(run(20, loss=0.3))
    for out in (out0, out1, out2):
        assert_rows_match(out, exact, 20)


# -- faults ----------------------------------------------------------------------------------


class FakeGarbageServer:
    """A FAKE verifier server (not vLLM): a valid /info, then broken verify answers.

    vLLM cannot be made to produce these, so this is the one stand-in here.
    """

    def __init__(self, info: dict, mode: str):
        import uvicorn
        from fastapi import FastAPI
        from fastapi.responses import Response

        app = FastAPI()
        self.calls = 0

        @app.get("/tandem/v1/info")
        async def info_route():
            return info

        @app.post("/tandem/v1/verify")
        async def verify_route(body: dict):
            self.calls += 1
            k = len(body["draft"])
            good = {
                "protocol": 1, "server_id": info["server_id"], "session": body["session"],
                "context_len": body["base"] + len(body["append"]), "num_prompt_tokens": body["base"] + len(body["append"]) + k,
                "num_cached_tokens": 0, "recomputed": False, "cache_salt": None,
                "top_ids": [list(range(body["top_k"])) for _ in range(k + 1)],
                "top_logprobs": [[-1.0 - 0.1 * j for j in range(body["top_k"])] for _ in range(k + 1)],
                "draft_logprobs": [-20.0] * k, "draft_ranks": [400] * k,
            }
            if mode == "nan":
                good["top_logprobs"][0][0] = float("nan")
            elif mode == "out_of_range":
                good["top_ids"][-1][0] = 10**9
            elif mode == "positive":
                good["top_logprobs"][1] = [5.0] * body["top_k"]
            elif mode == "rows":
                good["top_ids"].pop()
                good["top_logprobs"].pop()
            elif mode == "not_json":
                return Response(b"<html>bad gateway</html>", media_type="text/html")
            elif mode == "http500":
                return Response(b'{"error": {"message": "boom"}}', status_code=500)
            elif mode == "hang":
                await asyncio.sleep(3600)
            return Response(json.dumps(good), media_type="application/json")  # json.dumps writes NaN as NaN

        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="error",
                                                    timeout_graceful_shutdown=1))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.mark.parametrize("mode", ["nan", "out_of_range", "positive", "rows", "not_json", "http500", "hang"])
def test_garbage_or_hanging_server_fails_cleanly_and_accepts_nothing(mode, vllm_server, tokenizer):
    info = httpx.get(vllm_server.url + "/tandem/v1/info", timeout=10).json()
    with FakeGarbageServer(info, mode) as fake:
        v = VLLMVerifier(f"http://127.0.0.1:{fake.port}", tokenizer, timeout_s=0.5, retries=2, backoff_s=0.01)

        async def run():
            try:
                session = await v.start([1, 2, 3])
                return await session.score([4, 5])
            finally:
                await v.aclose()

        t0 = time.perf_counter()
        with pytest.raises(VerifierUnavailableError, match="failed a verify round after 3 attempt"):
            asyncio.run(run())
        assert time.perf_counter() - t0 < 3 * 0.5 + 3.0  # bounded (3 timeouts + backoff + slack): it never hangs
        assert fake.calls == 3 and v.stats.retries == 2 and v.stats.failures == 1 and v.stats.rounds == 0
        assert v.stats.invalid_responses == (3 if mode in ("nan", "out_of_range", "positive", "rows", "not_json") else 0)


def test_unreachable_verifier_is_a_clean_unavailable_error(tokenizer, vllm_pair):
    port = free_port()  # nothing listens here
    v = VLLMVerifier(f"http://127.0.0.1:{port}", tokenizer, timeout_s=1.0, retries=1, backoff_s=0.01)
    with pytest.raises(VerifierUnavailableError, match="not ready: ConnectError"):
        asyncio.run(v.check_ready())
    with pytest.raises(VerifierUnavailableError, match="unreachable"):
        asyncio.run(v.start([1, 2, 3]))
    # The gateway can start (its readiness says no until the verifier answers).
    backends = build_backends(TandemSettings.load(verifier=v.url, drafter=str(vllm_pair[1]), verifier_retries=0))
    assert backends.verifier.url == v.url
    asyncio.run(backends.aclose())


def test_server_killed_mid_stream_then_restarted(vllm_server, tokenizer, corpus, verifier_lm, drafter):
    """Runs last: it kills the shared vLLM (SIGKILL of its process group) and starts it again."""
    v = remote(vllm_server, tokenizer, timeout_s=2.0, retries=2, backoff_s=0.05)
    router = SpeculativeRouter(v, drafter, tokenizer)
    prompt = corpus[20000:20200]
    params = SamplingParams(max_tokens=300, ignore_eos=True)
    other_context, other_draft = corpus[21000:21100], corpus[21100:21104]

    async def before_kill():
        survivor = await v.start(other_context)
        await survivor.score(other_draft)  # the server now holds this session's context
        got, t_fail = [], None
        with pytest.raises(VerifierUnavailableError) as info:
            async for chunk in router.stream(prompt, params):
                got += chunk.token_ids
                if len(got) and t_fail is None:
                    await asyncio.to_thread(vllm_server.kill)
                    t_fail = time.perf_counter()
        return survivor, got, time.perf_counter() - t_fail, str(info.value)

    survivor, partial, fail_after_s, message = asyncio.run(before_kill())
    assert 0 < len(partial) < 300
    assert fail_after_s < 3 * 2.0 + 2.0  # retries are bounded
    assert "verifier" in message
    with pytest.raises(VerifierUnavailableError):
        asyncio.run(v.check_ready())

    vllm_server.start()  # the same URL comes back (with an empty cache and no sessions)
    asyncio.run(v.check_ready())
    # The same verifier object serves again: no gateway restart.
    again = asyncio.run(router.generate(prompt, SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True)))
    assert again.token_ids == vllm_greedy(vllm_server, prompt, MAX_TOKENS)
    assert again.token_ids[: min(len(partial), MAX_TOKENS)] == partial[:MAX_TOKENS]
    # A session opened before the crash resends its context once and goes on.
    resyncs = v.stats.resyncs
    logits = asyncio.run(survivor.score(other_draft))
    assert v.stats.resyncs == resyncs + 1
    event = survivor.last_transport  # the 409 and the resend: both exchanges, and what was resent
    assert (event.resync_reason, event.resync_tokens, event.round_trips) == ("unknown_session", len(other_context), 2)
    assert_rows_match(logits, log_softmax_rows(verifier_lm, other_context, other_draft), 20)
