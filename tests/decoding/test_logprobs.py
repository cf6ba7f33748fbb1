"""Logprobs are the verifier's raw distribution (vLLM's default logprobs_mode), whatever drafted the tokens."""

from __future__ import annotations

import asyncio

import pytest
import torch

from decoding.drafters import HFDrafter, NgramDrafter
from decoding.sampling import SamplingParams
from decoding.speculative import SpecOptions, SpeculativeRouter
from decoding.verifiers import HFVerifier

PROMPT = "for i in range(10):\n    print("


def run(router, ids, params, options=None):
    return asyncio.run(router.generate(ids, params, options))


@pytest.fixture(scope="module")
def routers(tiny_verifier_lm, tiny_drafter_lm, tiny_tokenizer):
    verifier = HFVerifier(tiny_verifier_lm)
    return [
        SpeculativeRouter(verifier, HFDrafter(tiny_drafter_lm), tiny_tokenizer, SpecOptions(num_draft_tokens=4)),
        SpeculativeRouter(verifier, HFDrafter(tiny_verifier_lm), tiny_tokenizer, SpecOptions(num_draft_tokens=6)),
        SpeculativeRouter(verifier, NgramDrafter(tiny_verifier_lm.vocab_size), tiny_tokenizer),
    ]


def full_forward_logprobs(lm, ids: list[int], generated: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        logits = lm.model(torch.tensor([ids + generated])).logits[0, len(ids) - 1 : -1]
    return torch.log_softmax(logits.float(), dim=-1)  # [len(generated), V]


@pytest.mark.parametrize("params", [
    SamplingParams(max_tokens=24, ignore_eos=True, logprobs=3),
    SamplingParams(max_tokens=24, ignore_eos=True, logprobs=2, temperature=0.8, seed=5, repetition_penalty=1.4),
], ids=["greedy", "sampled+penalty"])  # fmt: skip
def test_logprobs_are_the_verifiers_raw_distribution_for_every_drafter(params, routers, tiny_verifier_lm, tiny_tokenizer):
    ids = tiny_tokenizer.encode(PROMPT)
    for router in routers:
        out = run(router, ids, params)
        assert [e.token_id for e in out.logprobs] == out.token_ids
        expected = full_forward_logprobs(tiny_verifier_lm, ids, out.token_ids)
        for i, e in enumerate(out.logprobs):
            row = expected[i]
            assert e.logprob == pytest.approx(float(row[e.token_id]), abs=1e-4)
            # rank: 1 + tokens more likely (the full forward may order near-ties differently)
            assert int((row > row[e.token_id] + 1e-4).sum()) + 1 <= e.rank <= int((row > row[e.token_id] - 1e-4).sum()) + 1
            top = torch.topk(row, params.logprobs)
            assert [lp for _, lp in e.top] == pytest.approx(top.values.tolist(), abs=1e-4)
            assert [float(row[t]) for t, _ in e.top] == pytest.approx(top.values.tolist(), abs=1e-4)
        if params.greedy:
            assert all(e.rank == 1 for e in out.logprobs)


def test_prompt_logprobs(routers, tiny_verifier_lm, tiny_tokenizer):
    ids = tiny_tokenizer.encode(PROMPT)
    out = run(routers[0], ids, SamplingParams(max_tokens=2, prompt_logprobs=1, logprobs=0))
    expected = full_forward_logprobs(tiny_verifier_lm, ids[:1], ids[1:])
    assert [e.token_id for e in out.prompt_logprobs] == ids[1:]
    assert [e.logprob for e in out.prompt_logprobs] == pytest.approx(
        [float(expected[i, t]) for i, t in enumerate(ids[1:])], abs=1e-4)  # fmt: skip
    assert all(len(e.top) == 1 for e in out.prompt_logprobs) and all(e.top == () for e in out.logprobs)
