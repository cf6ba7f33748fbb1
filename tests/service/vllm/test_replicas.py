"""decoding/backends/vllm_replicas.py: sessions stick to a replica, and a replica lost mid-session is replaced by
another that replays the committed context, with vLLM's own greedy tokens.

The two "replicas" are two delay proxies in front of the session's one vLLM (a second vLLM would cost another
minute and a gigabyte on the test machine): stopping a proxy drops its connections and refuses new ones,
which is what the gateway sees of a lost replica. The replay itself is real: the moved session's first
round on the other URL carries the whole context (a new route session, base 0).
"""

from __future__ import annotations

import asyncio

import pytest

from decoding.backends.vllm_client import VLLMVerifier
from decoding.backends.vllm_replicas import REPLICA_LOST, ReplicatedVerifier
from decoding.causal_lm import CausalLM, load_tokenizer
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
