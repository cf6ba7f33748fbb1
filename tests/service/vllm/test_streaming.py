"""Never slower than vLLM alone: ``verifier-only`` is one streaming vLLM request, and a speculative request
switches between rounds and that stream (decoding/stream_policy.py) without changing a greedy token.
Against the session's real vLLM, through the delay proxy where the RTT matters."""

from __future__ import annotations

import asyncio
import time

import pytest

from decoding.backends.vllm_client import VLLMVerifier
from decoding.causal_lm import CausalLM, load_tokenizer
from decoding.drafters import HFDrafter
from decoding.sampling import SamplingParams
from decoding.speculative import SpecOptions, SpeculativeRouter
from decoding.stream_policy import StreamPolicy
from loadtests.delay_proxy import DelayProxy

from tests.support.vllm import vllm_greedy

MAX_TOKENS = 48


@pytest.fixture(scope="module")
def tokenizer(vllm_pair):
    return load_tokenizer(vllm_pair[1])


@pytest.fixture(scope="module")
def drafter(vllm_pair):
    d = HFDrafter(CausalLM(vllm_pair[1]), cost_ratio=0.2)
    yield d
    d.lm.close()


async def collect(router: SpeculativeRouter, prompt: list[int], params: SamplingParams, options=None):
    tokens, events = [], []
    async for chunk in router.stream(prompt, params, options):
        tokens += chunk.token_ids
        events.append(chunk.event)
    return tokens, events


def test_verifier_only_over_the_network_is_one_streaming_request(vllm_server, tokenizer):
    prompt = tokenizer.encode("import os\nimport sys\n")
    truth = vllm_greedy(vllm_server, prompt, MAX_TOKENS)
    rtt_ms = 100

    async def run():
        async with DelayProxy(("127.0.0.1", vllm_server.port), rtt_ms) as proxy:
            v = VLLMVerifier(proxy.url, tokenizer)
            await v.connect()
            router = SpeculativeRouter(v, None, tokenizer, SpecOptions(mode="verifier-only"))
            t0 = time.perf_counter()
            out = await collect(router, prompt, SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True))
            elapsed = time.perf_counter() - t0
            await v.aclose()
            return out, elapsed

    (tokens, events), elapsed = asyncio.run(run())
    assert tokens == truth
    assert all(e.streamed and e.k == 0 for e in events)
    assert sum(e.transport.round_trips for e in events) == 1  # one request, not one round trip per token
    assert elapsed < 0.25 * MAX_TOKENS * rtt_ms / 1000  # a round per token would take MAX_TOKENS RTTs


class ScriptedSwitches(StreamPolicy):
    """The router's real switching, with the decision scripted by position (the measured policy is tested
    in tests/decoding/test_stream_policy.py): rounds, then the stream, then rounds again."""

    def __init__(self, stream_from: int, stream_until: int):
        super().__init__()
        self.window = range(stream_from, stream_until)
        self.position = 0

    def observe_round(self, event) -> None:
        self.position += event.emitted

    def prefer_stream(self, alpha: float, k: int, streaming: bool) -> bool:
        return self.position in self.window


def test_speculative_switches_to_the_stream_and_back_without_changing_a_token(vllm_server, tokenizer, drafter):
    prompt = tokenizer.encode("class Foo(Bar):\n    def __init__(self")
    truth = vllm_greedy(vllm_server, prompt, MAX_TOKENS)
    v = VLLMVerifier(vllm_server.url, tokenizer)
    asyncio.run(v.connect())
    router = SpeculativeRouter(v, drafter, tokenizer)
    router.stream_policy = ScriptedSwitches(8, 24)
    tokens, events = asyncio.run(collect(router, prompt, SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True)))
    assert tokens == truth
    switches = [(i, e.switched) for i, e in enumerate(events) if e.switched]
    assert [s for _, s in switches] == ["stream", "rounds"]
    streamed = [e for e in events if e.streamed]
    assert streamed and any(e.k > 0 for e in events[switches[1][0] :])  # rounds again after the stream
    assert sum(e.transport.round_trips for e in streamed) == 1


def test_at_high_rtt_the_measured_policy_streams(vllm_server, tokenizer, drafter):
    """With 150 ms of RTT per round and a tiny verifier whose step takes milliseconds, rounds cannot pay:
    the router measures that and streams, still vLLM's own greedy output. A seeded sampled request
    never switches (its tokens must not depend on timing)."""
    prompt = tokenizer.encode("def main():\n    x = 1\n")
    truth = vllm_greedy(vllm_server, prompt, MAX_TOKENS)

    async def run():
        async with DelayProxy(("127.0.0.1", vllm_server.port), 150) as proxy:
            v = VLLMVerifier(proxy.url, tokenizer)
            await v.connect()
            router = SpeculativeRouter(v, drafter, tokenizer)
            greedy = await collect(router, prompt, SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True))
            seeded = await collect(router, prompt, SamplingParams(max_tokens=12, temperature=0.8, seed=7, ignore_eos=True))
            await v.aclose()
            return greedy, seeded, router.stream_policy

    (tokens, events), (_, seeded_events), policy = asyncio.run(run())
    assert tokens == truth
    assert any(e.switched == "stream" for e in events) and sum(e.emitted for e in events if e.streamed) > MAX_TOKENS / 2
    assert policy.rtt_s >= 0.14
    assert not any(e.streamed or e.switched for e in seeded_events)
