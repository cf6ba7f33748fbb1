"""decoding/backends/vllm_replicas.py: sessions stick to a replica, and a replica lost mid-session is replaced by
another that replays the committed context, with vLLM's own greedy tokens.

First with two delay proxies in front of the session's one vLLM (stopping a proxy drops its connections and
refuses new ones, which is what the gateway sees of a lost replica; the replay itself is real: the moved
session's first round on the other URL carries the whole context, a new route session, base 0). Then with two
real vLLM servers (the session's own and the second one of tests/support/vllm.py, about a minute to start and
~1.5 GB): concurrent requests are spread over both, and SIGKILLing one mid-run loses no request.
"""

from __future__ import annotations

import asyncio

import httpx

import pytest

from decoding.backends.vllm_client import VLLMVerifier
from decoding.backends.vllm_replicas import REPLICA_LOST, ReplicatedVerifier
from decoding.causal_lm import CausalLM, load_tokenizer
from decoding.protocol import INFO_PATH
from decoding.drafters import HFDrafter
from decoding.sampling import SamplingParams
from decoding.speculative import SpeculativeRouter
from loadtests.delay_proxy import DelayProxy
from service.backends import build_backends
from service.config import TandemSettings

from tests.support.vllm import vllm_greedy

MAX_TOKENS = 48


@pytest.fixture(scope="module")
def tokenizer(vllm_pair):
    return load_tokenizer(vllm_pair[1])


def test_a_lost_replica_is_replayed_on_another_with_the_same_greedy_tokens(vllm_server, tokenizer, vllm_pair):
    prompt = tokenizer.encode("def parse(self, text):\n    for line in text.splitlines():\n")
    truth = vllm_greedy(vllm_server, prompt, MAX_TOKENS)
    drafter = HFDrafter(CausalLM(vllm_pair[1]), cost_ratio=0.2)

    async def run():
        upstream = ("127.0.0.1", vllm_server.port)
        async with DelayProxy(upstream) as a, DelayProxy(upstream) as b:
            # Rounds only (no streaming), so that every token goes through the session being moved.
            replicas = [VLLMVerifier(p.url, tokenizer, timeout_s=3.0, retries=1, backoff_s=0.01, stream=False)
                        for p in (a, b)]  # fmt: skip
            verifier = ReplicatedVerifier(replicas)
            # Sessions stick to a replica, spread by load.
            first, second = await verifier.start(prompt), await verifier.start(prompt)
            assert {first.replica, second.replica} == {0, 1}
            await first.close()
            await second.close()

            router = SpeculativeRouter(verifier, drafter, tokenizer)
            tokens, events = [], []
            async for chunk in router.stream(prompt, SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True)):
                tokens += chunk.token_ids
                events.append(chunk.event)
                if len(tokens) >= 8 and a._server.is_serving():
                    await a.stop()  # replica 0, where the session lives, is gone mid-session
            await verifier.aclose()
            return tokens, events, verifier

    tokens, events, verifier = asyncio.run(run())
    assert tokens == truth
    replays = [e.transport for e in events if e.transport and e.transport.resync_reason == REPLICA_LOST]
    assert len(replays) == 1 and verifier.replays == 1
    assert replays[0].resync_tokens >= len(prompt) + 8  # the whole committed context went to the other replica
    assert verifier.open_sessions == [0, 0]


def test_the_gateway_settings_take_several_urls(vllm_server, vllm_pair):
    url = vllm_server.url
    backends = build_backends(TandemSettings.load(verifier=f"{url}, {url}/", drafter=str(vllm_pair[1])))
    assert isinstance(backends.verifier, ReplicatedVerifier) and len(backends.verifier.replicas) == 2
    assert backends.verifier.max_context == 2048
    asyncio.run(backends.aclose())


def test_two_real_vllm_replicas_share_requests_and_a_killed_one_loses_none(vllm_server, vllm_replica, tokenizer, vllm_pair):
    """Four concurrent greedy requests over two real ``tandem verifier`` replicas: the sessions spread two and
    two (the second server holds at most two); the second server is SIGKILLed (API server and engine) while
    both its sessions are open and it has verified rounds; they replay their context on the first; every request gets
    vLLM's own greedy tokens. The killed server is started again by the next test that needs it."""
    texts = ["def parse(self, text):\n", "import os\nimport sys\n", "class Foo(Bar):\n    def", "for i in range(10):\n"]
    prompts = [tokenizer.encode(t) for t in texts]
    truths = [vllm_greedy(vllm_server, p, MAX_TOKENS) for p in prompts]
    vllm_greedy(vllm_replica, prompts[0], 4)  # warm: a freshly (re)started server's first steps are slow
    drafter = HFDrafter(CausalLM(vllm_pair[1]), cost_ratio=0.2)

    def rounds(server) -> int:
        return httpx.get(server.url + INFO_PATH, timeout=30).json()["counters"]["rounds"]

    rounds_before = [rounds(vllm_server), rounds(vllm_replica)]

    async def run():
        replicas = [VLLMVerifier(s.url, tokenizer, timeout_s=10.0, retries=1, backoff_s=0.01, stream=False)
                    for s in (vllm_server, vllm_replica)]  # fmt: skip
        for r in replicas:
            await r.connect()
        verifier = ReplicatedVerifier(replicas, cooldown_s=60.0)
        router = SpeculativeRouter(verifier, drafter, tokenizer)
        outputs: list[list[int]] = [[] for _ in prompts]
        events: list = []
        spread: list[int] = []
        peak = [0, 0]
        killed = asyncio.Event()

        async def one(i: int) -> None:
            async for chunk in router.stream(prompts[i], SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True)):
                outputs[i] += chunk.token_ids
                events.append(chunk.event)
                # The most sessions each replica held at once (a request that finishes early closes its own).
                peak[:] = [max(p, n) for p, n in zip(peak, verifier.open_sessions)]
                # Kill the second server while both its sessions are open and it has verified rounds (requests
                # on the other server may run ahead or even finish first: timing on 2 shared cores varies).
                if (not killed.is_set() and verifier.open_sessions[1] == 2 and sum(map(len, outputs)) >= 16
                        and rounds(vllm_replica) > rounds_before[1]):
                    killed.set()
                    spread.extend(peak)
                    spread.append(rounds(vllm_replica))
                    await asyncio.to_thread(vllm_replica.kill)

        await asyncio.gather(*(one(i) for i in range(len(prompts))))
        await verifier.aclose()
        return outputs, events, spread, verifier

    outputs, events, spread, verifier = asyncio.run(run())
    assert len(spread) == 3, "the replica was never killed"
    assert spread[:2] == [2, 2], f"the most open sessions per replica before the kill: {spread[:2]}"
    assert spread[2] > rounds_before[1]  # the second server verified rounds before it died
    assert not vllm_replica.alive
    assert outputs == truths  # no request lost, none changed
    replays = [e.transport for e in events if e.transport and e.transport.resync_reason == REPLICA_LOST]
    assert len(replays) == verifier.replays == 2  # each of the killed server's sessions moved once
    assert rounds(vllm_server) > rounds_before[0]
    assert verifier.open_sessions == [0, 0]
