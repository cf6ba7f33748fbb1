"""vLLM's logits processors, exact under speculation.

A reference written from vLLM's definitions (one row, one history at a time)
checks the pipeline row by row, with the draft prefix each row follows; the
router then must give greedy output token-identical to the verifier alone with
the same processors, and sampled output the verifier's exact processed
distribution (chi-square on the 5-word vocabulary).
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
from collections import Counter

import pytest
import torch

from decoding.causal_lm import CausalLM, load_tokenizer
from decoding.drafters import HFDrafter, NgramDrafter
from decoding.logits_processors import LogitsPipeline
from decoding.sampling import InvalidRequestError, SamplingParams, logits_to_probs
from decoding.speculative import SpecOptions, SpeculativeRouter
from decoding.verifiers import HFVerifier
from tests.support.stats import chi2_pvalue

VERIFIER_ONLY = SpecOptions(mode="verifier-only")
NEG_INF = float("-inf")


def reference(logits: torch.Tensor, prompt: list[int], output: list[int], params: SamplingParams,
              eos: int | None) -> torch.Tensor:  # fmt: skip
    """vLLM's processing of one row [V] whose history is prompt + output, up to (not incl.) temperature."""
    row = logits.clone().float()
    V = row.shape[0]
    if params.allowed_token_ids is not None:
        for t in range(V):
            if t not in params.allowed_token_ids:
                row[t] = NEG_INF
    if len(output) < params.min_tokens:
        for t in {*([eos] if eos is not None and not params.ignore_eos else []), *params.stop_token_ids}:
            row[t] = NEG_INF
    for t, b in dict(params.logit_bias).items():
        row[t] += b
    if params.repetition_penalty != 1.0:
        for t in set(prompt) | set(output):
            row[t] = row[t] / params.repetition_penalty if row[t] > 0 else row[t] * params.repetition_penalty
    for t, c in Counter(output).items():
        row[t] -= params.frequency_penalty * c + params.presence_penalty
    return row


def reference_probs(row: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, min_p (vLLM: on probabilities after temperature), then top-k/top-p."""
    scaled = row / params.temperature
    if params.min_p > 0:
        probs = torch.softmax(scaled, dim=-1)
        scaled = scaled.masked_fill(probs < params.min_p * probs.max(), NEG_INF)
    return logits_to_probs(scaled[None], dataclasses.replace(params, temperature=1.0, min_p=0.0))[0]


PROCESSED = [
    SamplingParams(max_tokens=40, repetition_penalty=1.6),
    SamplingParams(max_tokens=40, presence_penalty=1.5, frequency_penalty=0.9),
    SamplingParams(max_tokens=40, repetition_penalty=0.7, frequency_penalty=-0.5, logit_bias={7: 3.0, 11: -2.5}),
    SamplingParams(max_tokens=40, temperature=0.8, min_p=0.2, repetition_penalty=1.3, top_k=40),
    SamplingParams(max_tokens=40, min_tokens=5, stop_token_ids=(3, 4), presence_penalty=0.4),
    SamplingParams(max_tokens=40, allowed_token_ids=tuple(range(0, 200, 3)), frequency_penalty=1.0),
]
IDS = ["repetition", "presence+frequency", "bias+negative", "min_p+sampled", "min_tokens", "allowed"]


@pytest.mark.parametrize("params", PROCESSED, ids=IDS)
def test_each_row_is_processed_with_its_own_draft_prefix(params):
    g = torch.Generator().manual_seed(0)
    V = 256
    prompt = torch.randint(0, V, (12,), generator=g).tolist()
    pipeline = LogitsPipeline.build(params, prompt, V, eos_token_id=2)
    assert pipeline is not None
    output: list[int] = []
    for _ in range(4):  # a few rounds: commit, then a fresh draft
        draft = torch.randint(0, V, (5,), generator=g).tolist()
        draft[1] = draft[0]  # a repeat inside the draft: counts must grow row by row
        logits = torch.randn(len(draft) + 1, V, generator=g) * 3
        processed = pipeline(logits.clone(), draft)
        for i in range(len(draft) + 1):
            expected = reference(logits[i], prompt, output + draft[:i], params, eos=2)
            if params.min_p and not params.greedy:
                # min_p works in logit space here: compare where it matters, the distributions.
                torch.testing.assert_close(logits_to_probs(processed[i : i + 1], params)[0],
                                           reference_probs(expected, params), rtol=1e-5, atol=1e-6)  # fmt: skip
            else:
                torch.testing.assert_close(processed[i], expected, rtol=1e-5, atol=1e-5)
        # the drafter's view: one row after each prefix of what it drafted so far
        for j in range(len(draft) + 1):
            row = pipeline(logits[j : j + 1].clone(), draft[:j])
            torch.testing.assert_close(row, processed[j : j + 1], rtol=1e-6, atol=1e-6)
        accepted = draft[: int(torch.randint(0, 6, (1,), generator=g))] + [int(torch.randint(0, V, (1,), generator=g))]
        pipeline.commit(accepted)
        output += accepted


def test_a_request_without_processing_builds_no_pipeline():
    assert LogitsPipeline.build(SamplingParams(temperature=0.7, top_k=5, top_p=0.9), [1, 2], 64, 0) is None
    assert LogitsPipeline.build(SamplingParams(min_p=0.3), [1, 2], 64, 0) is None  # greedy: min_p cannot matter


@pytest.fixture(scope="module")
def routers(tiny_verifier_lm, tiny_drafter_lm, tiny_tokenizer):
    verifier = HFVerifier(tiny_verifier_lm)
    return {
        "bad": SpeculativeRouter(verifier, HFDrafter(tiny_drafter_lm), tiny_tokenizer, SpecOptions(num_draft_tokens=4)),
        "perfect": SpeculativeRouter(verifier, HFDrafter(tiny_verifier_lm, cost_ratio=0.05), tiny_tokenizer,
                                     SpecOptions(num_draft_tokens=5, adaptive=False)),  # fmt: skip
        "ngram": SpeculativeRouter(verifier, NgramDrafter(tiny_verifier_lm.vocab_size), tiny_tokenizer),
    }


def run(router, ids, params, options=None):
    return asyncio.run(router.generate(ids, params, options))


GREEDY = [p for p in PROCESSED if p.greedy]


@pytest.mark.parametrize("params", GREEDY, ids=[i for i, p in zip(IDS, PROCESSED) if p.greedy])
def test_greedy_with_processors_is_token_identical_to_the_verifier_alone(params, routers, tiny_verifier_lm,
                                                                         tiny_tokenizer):  # fmt: skip
    params = dataclasses.replace(params, ignore_eos=True)
    ids = tiny_tokenizer.encode("for i in range(10):\n    for j in range(")
    plain = run(routers["bad"], ids, params, VERIFIER_ONLY)
    # The verifier alone, by hand: full forward passes, the reference processing, argmax.
    expected: list[int] = []
    with torch.inference_mode():
        for _ in range(params.max_tokens):
            logits = tiny_verifier_lm.model(torch.tensor([ids + expected])).logits[0, -1]
            expected.append(int(reference(logits, ids, expected, params, tiny_tokenizer.eos_token_id).argmax()))
    assert plain.token_ids == expected
    for name, router in routers.items():
        spec = run(router, ids, params)
        assert spec.token_ids == expected, name
        if name == "perfect":  # the drafter sees the same processing: everything is accepted
            assert spec.stats.accepted_tokens == spec.stats.draft_tokens > 0


def test_penalties_change_the_output(routers, tiny_tokenizer):
    ids = tiny_tokenizer.encode("x = x + x + x + x + x")
    plain = run(routers["bad"], ids, SamplingParams(max_tokens=30, ignore_eos=True))
    penalised = run(routers["bad"], ids, SamplingParams(max_tokens=30, ignore_eos=True, repetition_penalty=3.0))
    assert plain.token_ids != penalised.token_ids
    assert len(set(penalised.token_ids)) > len(set(plain.token_ids))


# -- stopping -------------------------------------------------------------------------------------------


def test_stop_token_ids_min_tokens_and_include_stop_str(routers, tiny_tokenizer):
    router = routers["bad"]
    ids = tiny_tokenizer.encode("def main():\n    ")
    free = run(router, ids, SamplingParams(max_tokens=40, ignore_eos=True))
    stop = free.token_ids[6]
    first = free.token_ids.index(stop)
    out = run(router, ids, SamplingParams(max_tokens=40, ignore_eos=True, stop_token_ids=(stop,)))
    assert out.token_ids == free.token_ids[: first + 1]  # the stop token is generated...
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == tiny_tokenizer.decode(free.token_ids[:first], skip_special_tokens=True)  # ...but not shown
    shown = run(router, ids, SamplingParams(max_tokens=40, ignore_eos=True, stop_token_ids=(stop,),
                                            include_stop_str_in_output=True))  # fmt: skip
    assert shown.text == tiny_tokenizer.decode(free.token_ids[: first + 1], skip_special_tokens=True)
    # min_tokens masks the stop token until then: the output is the masked verifier's
    late = run(router, ids, SamplingParams(max_tokens=40, ignore_eos=True, stop_token_ids=(stop,), min_tokens=first + 3))
    assert len(late.token_ids) >= first + 3 and stop not in late.token_ids[: first + 3]
    verifier_only = run(router, ids, SamplingParams(max_tokens=40, ignore_eos=True, stop_token_ids=(stop,),
                                                    min_tokens=first + 3), VERIFIER_ONLY)  # fmt: skip
    assert late.token_ids == verifier_only.token_ids

    # stop strings: the string is the stop_reason; include_stop_str_in_output keeps it; min_tokens defers it
    text = free.text
    s = next(text[i : i + 2] for i in range(3, len(text) - 2) if text[i : i + 2].strip())
    cut = run(router, ids, SamplingParams(max_tokens=40, ignore_eos=True, stop=(s,)))
    assert cut.text == text[: text.index(s)] and cut.stop_reason == s
    kept = run(router, ids, SamplingParams(max_tokens=40, ignore_eos=True, stop=(s,), include_stop_str_in_output=True))
    assert kept.text == text[: text.index(s) + len(s)]
    deferred = run(router, ids, SamplingParams(max_tokens=40, ignore_eos=True, stop=(s,), min_tokens=len(free.token_ids)))
    assert deferred.finish_reason == "length" and deferred.token_ids == free.token_ids


@pytest.mark.parametrize(
    "kwargs, param",
    [(dict(repetition_penalty=0.0), "repetition_penalty"), (dict(presence_penalty=2.5), "presence_penalty"),
     (dict(frequency_penalty=-3), "frequency_penalty"), (dict(min_p=1.5), "min_p"),
     (dict(min_tokens=100, max_tokens=10), "min_tokens"), (dict(logit_bias={1: 101}), "logit_bias"),
     (dict(allowed_token_ids=()), "allowed_token_ids")],
)  # fmt: skip
def test_invalid_processing_parameters_name_the_parameter(kwargs, param):
    with pytest.raises(InvalidRequestError) as err:
        SamplingParams(**kwargs)
    assert err.value.param == param


def test_token_ids_outside_the_vocabulary_are_refused(routers, tiny_tokenizer):
    for params, param in [(SamplingParams(stop_token_ids=(10**6,)), "stop_token_ids"),
                          (SamplingParams(logit_bias={10**6: 1.0}), "logit_bias"),
                          (SamplingParams(allowed_token_ids=(1, -1)), "allowed_token_ids")]:  # fmt: skip
        with pytest.raises(InvalidRequestError) as err:
            run(routers["bad"], [1, 2, 3], params)
        assert err.value.param == param


# -- the exact distribution -----------------------------------------------------------------------------


def exact_processed_distribution(lm: CausalLM, prompt: list[int], length: int, params: SamplingParams):
    """The verifier's processed distribution over every continuation of ``length`` tokens, from the reference."""
    V = lm.vocab_size
    dist = {}
    with torch.inference_mode():
        for seq in itertools.product(range(V), repeat=length):
            logits = lm.model(torch.tensor([prompt + list(seq)])).logits[0, len(prompt) - 1 : -1]
            p = 1.0
            for i in range(length):
                row = reference(logits[i], prompt, list(seq[:i]), params, eos=None)
                p *= float(reference_probs(row, params)[seq[i]])
            dist[seq] = p
    return dist


@pytest.mark.parametrize(
    "params",
    [SamplingParams(max_tokens=3, temperature=1.0, repetition_penalty=2.0, presence_penalty=0.8, frequency_penalty=0.6),
     SamplingParams(max_tokens=3, temperature=0.9, min_p=0.15, frequency_penalty=1.2, logit_bias={2: 1.5})],
    ids=["penalties", "min_p+frequency+bias"],
)  # fmt: skip
def test_sampling_with_penalties_matches_the_exact_processed_distribution(params, small_vocab_pair):
    """Chi-square over all 125 three-token continuations: the penalties of position i depend on the
    tokens before it, so a router that processed rows without their draft prefix fails by far."""
    vlm, dlm = CausalLM(small_vocab_pair[0]), CausalLM(small_vocab_pair[1])
    tokenizer = load_tokenizer(small_vocab_pair[0])
    prompt = tokenizer.encode("w1 w3")
    exact = exact_processed_distribution(vlm, prompt, 3, params)
    cells = sorted(exact)
    router = SpeculativeRouter(HFVerifier(vlm), HFDrafter(dlm), tokenizer, SpecOptions(num_draft_tokens=2, adaptive=False))

    async def sample_all():
        counts = dict.fromkeys(cells, 0)
        accepted = drafted = 0
        for seed in range(3000):
            gen = await router.generate(prompt, dataclasses.replace(params, seed=seed, ignore_eos=True))
            counts[tuple(gen.token_ids)] += 1
            accepted += gen.stats.accepted_tokens
            drafted += gen.stats.draft_tokens
        return counts, accepted, drafted

    counts, accepted, drafted = asyncio.run(sample_all())
    assert chi2_pvalue([counts[c] for c in cells], [exact[c] for c in cells]) > 1e-3
    assert 0.05 < accepted / drafted < 0.97  # rejections and acceptances both happened
