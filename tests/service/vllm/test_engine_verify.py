"""Rounds decided inside vLLM's engine (service/vllm/engine_verify.py), against the session's real vLLM.

The engine verifies each draft on the target's full distribution, under the
request's sampling, and answers only the accepted tokens plus one correction or
bonus token. Here: greedy output is token-identical to vLLM's own greedy
completion whatever the drafter proposes; a fresh no-cache scoring of the final
sequence agrees with what the session decided (no stale KV); seeded sampling has
the verifier's exact distribution at any temperature / top_p (chi-square with a
stated power); two identical sessions at once do not disturb each other.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter

import httpx
import numpy as np
import pytest
import torch
from scipy import stats

from decoding.backends.vllm_client import VLLMVerifier
from decoding.causal_lm import CausalLM, load_tokenizer
from decoding.drafters import Draft, HFDrafter
from decoding.protocol import INFO_PATH, VERIFY_PATH
from decoding.sampling import SamplingParams, logits_to_probs
from decoding.speculative import SpecOptions, SpeculativeRouter
from tests.support.stats import chi2_pvalue
from tests.support.vllm import vllm_completion

MAX_TOKENS = 40


@pytest.fixture(scope="module")
def tokenizer(vllm_pair):
    return load_tokenizer(vllm_pair[1])


@pytest.fixture(scope="module")
def verifier(vllm_server, tokenizer):
    # Rounds only: these tests are about rounds (streaming instead of rounds: test_streaming.py).
    v = VLLMVerifier(vllm_server.url, tokenizer, timeout_s=60.0, stream=False)
    asyncio.run(v.connect())
    assert v.decides, "the engine plugin did not load: /tandem/v1/info says server_decides false"
    return v


class ScriptedDrafter:
    """A drafter whose proposals are a function of the committed context (the tests' adversaries)."""

    name, device, cost_ratio = "scripted", torch.device("cpu"), 0.01

    def __init__(self, vocab_size: int, propose):
        self.vocab_size = vocab_size
        self.propose = propose

    def start(self, prompt_ids, params, generator, processing=None):
        return _ScriptedSession(list(prompt_ids), self.propose, generator)

    async def aclose(self) -> None:
        return None


class _ScriptedSession:
    forward_passes = 0

    def __init__(self, ids, propose, generator):
        self.ids, self._propose, self.generator = ids, propose, generator

    async def propose(self, k: int) -> Draft:
        return Draft(tokens=[int(t) for t in self._propose(self.ids, k, self.generator)][:k])

    def extend(self, tokens) -> None:
        self.ids += list(tokens)

    async def close(self) -> None:
        return None


def oracle(prompt: list[int], truth: list[int], edit=None):
    """Proposes vLLM's own greedy continuation (every draft right), optionally edited by ``edit(draft)``."""

    def propose(ids, k, generator):
        done = len(ids) - len(prompt)
        draft = list(truth[done : done + k])
        return edit(draft) if edit and draft else draft

    return propose


def test_info_and_a_raw_decided_round(vllm_server):
    with httpx.Client(base_url=vllm_server.url, timeout=60) as http:
        assert http.get(INFO_PATH).json()["server_decides"] is True
        body = {"session": uuid.uuid4().hex, "base": 0, "append": [5, 6, 7, 8], "draft": [9, 10, 11],
                "cache_salt": None, "sampling": {"temperature": 0.0, "top_k": 0, "top_p": 1.0, "seed": 1}}  # fmt: skip
        r = http.post(VERIFY_PATH, json=body)
        assert r.status_code == 200, r.text
        out = r.json()
        assert 0 <= out["accepted"] <= 3 and len(out["tokens"]) == out["accepted"] + 1
        assert len(out["draft_logprobs"]) == 3 and "top_ids" not in out
        assert len(r.content) < 600  # O(k) bytes down, no rows
        bad = http.post(VERIFY_PATH, json={**body, "sampling": {**body["sampling"], "top_p": 0}})
        assert bad.status_code == 400 and "sampling.top_p" in bad.json()["error"]["message"]


ADVERSARIES = ["random", "every-draft-right", "first-draft-wrong", "k=1", "k=max"]


@pytest.mark.parametrize("adversary", ADVERSARIES)
def test_greedy_is_vllms_own_greedy_whatever_the_drafter(adversary, vllm_server, verifier, tokenizer):
    prompt = tokenizer.encode("import os\nimport sys\n\n\ndef main(argv):\n")
    truth = vllm_completion(vllm_server, prompt, MAX_TOKENS, ignore_eos=True)["token_ids"]
    V = verifier.vocab_size
    options = SpecOptions(num_draft_tokens=4)
    if adversary == "random":
        propose = lambda ids, k, g: torch.randint(0, V, (k,), generator=g).tolist()  # noqa: E731
    elif adversary == "every-draft-right":
        propose = oracle(prompt, truth)
    elif adversary == "first-draft-wrong":
        propose = oracle(prompt, truth, edit=lambda d: [(d[0] + 1) % V] + d[1:])
    elif adversary == "k=1":  # right and wrong in turn
        right = oracle(prompt, truth)
        propose = lambda ids, k, g: [t if len(ids) % 2 else (t + 7) % V for t in right(ids, k, g)]  # noqa: E731
        options = SpecOptions(num_draft_tokens=1, min_draft_tokens=1, max_draft_tokens=1, adaptive=False)
    else:  # the router's largest k, right and then wrong at the end
        propose = oracle(prompt, truth, edit=lambda d: d[:-1] + [(d[-1] + 1) % V])
        options = SpecOptions(num_draft_tokens=32, min_draft_tokens=32, max_draft_tokens=32, adaptive=False)
    router = SpeculativeRouter(verifier, ScriptedDrafter(V, propose), tokenizer, options)
    gen = asyncio.run(router.generate(prompt, SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True)))
    assert gen.token_ids == truth
    s = gen.stats
    if adversary == "every-draft-right":
        assert s.accepted_tokens == s.draft_tokens > 0
    if adversary == "first-draft-wrong":
        assert s.accepted_tokens == 0 and s.rounds == MAX_TOKENS  # one correction per round
    if adversary == "k=max":
        assert len(s.drafted_per_position) == 32 and s.accepted_tokens >= 31


def test_eos_and_stop_string_inside_drafts_are_judged_like_any_token(vllm_server, verifier, tokenizer):
    prompt = tokenizer.encode("class Foo(Bar):\n    def __init__(self")
    eos = tokenizer.eos_token_id
    V = verifier.vocab_size
    # EOS in the middle of every draft: rejected where the verifier would not end, so the output
    # (EOS honoured) is vLLM's own greedy completion.
    plain = vllm_completion(vllm_server, prompt, MAX_TOKENS)
    truth = vllm_completion(vllm_server, prompt, MAX_TOKENS, ignore_eos=True)["token_ids"]
    router = SpeculativeRouter(verifier, ScriptedDrafter(V, oracle(prompt, truth, edit=lambda d: d[:1] + [eos] + d[1:])),
                               tokenizer)  # fmt: skip
    gen = asyncio.run(router.generate(prompt, SamplingParams(max_tokens=MAX_TOKENS)))
    assert gen.token_ids == plain["token_ids"]
    # A stop string the verifier does produce later, proposed by the drafter from the first round on.
    text = tokenizer.decode(truth)
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    assert stop.strip() and text.index(stop) > 0
    stop_ids = tokenizer.encode(stop)
    router = SpeculativeRouter(verifier, ScriptedDrafter(V, lambda ids, k, g: (stop_ids * k)[:k]), tokenizer)
    gen = asyncio.run(router.generate(prompt, SamplingParams(max_tokens=MAX_TOKENS, stop=(stop,), ignore_eos=True)))
    expected = vllm_completion(vllm_server, prompt, MAX_TOKENS, stop=[stop], ignore_eos=True)
    assert gen.text == expected["text"] and gen.finish_reason == "stop"


def test_a_fresh_no_cache_scoring_agrees_with_the_session(vllm_server, verifier, tokenizer, vllm_pair):
    """Many rejections (each round's draft tokens enter vLLM's KV and are dropped) and then one
    scoring of the final sequence that reads no cache: every generated token is its argmax."""
    prompt = tokenizer.encode("def parse(self, text):\n    for line in text.splitlines():\n")
    V = verifier.vocab_size
    drafter = HFDrafter(CausalLM(vllm_pair[1]), cost_ratio=0.2)
    router = SpeculativeRouter(verifier, drafter, tokenizer, SpecOptions(num_draft_tokens=6))
    gen = asyncio.run(router.generate(prompt, SamplingParams(max_tokens=60, ignore_eos=True)))
    assert 0 < gen.stats.accepted_tokens < gen.stats.draft_tokens  # acceptances and rejections
    full = prompt + gen.token_ids
    # Stock vLLM skips reading the prefix cache for a request with prompt logprobs: all recomputed.
    fresh = vllm_completion(vllm_server, full, 1, prompt_logprobs=1)["prompt_logprobs"]
    for i, token in enumerate(gen.token_ids):
        row = fresh[len(prompt) + i]
        best = min(row.items(), key=lambda kv: kv[1]["rank"])
        assert int(best[0]) == token and V > token, f"position {i}"


def test_two_identical_sessions_at_once_do_not_disturb_each_other(vllm_server, verifier, tokenizer, vllm_pair):
    prompt = tokenizer.encode("for i in range(10):\n    for j in range(")
    truth = vllm_completion(vllm_server, prompt, MAX_TOKENS, ignore_eos=True)["token_ids"]
    drafter = HFDrafter(CausalLM(vllm_pair[1]), cost_ratio=0.2)
    router = SpeculativeRouter(verifier, drafter, tokenizer)

    async def both():
        params = SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True)
        return await asyncio.gather(router.generate(prompt, params), router.generate(prompt, params))

    a, b = asyncio.run(both())
    assert a.token_ids == b.token_ids == truth


def _cells(p: np.ndarray, samples: int) -> list[list[int]]:
    """Chi-square cells: each token expected >= 5 times on its own, the rest pooled."""
    big = [int(t) for t in np.nonzero(p * samples >= 5)[0]]
    rest = [int(t) for t in np.nonzero((p * samples < 5) & (p > 0))[0]]
    return [[t] for t in big] + ([rest] if rest else [])


def _power(p: np.ndarray, alt: np.ndarray, cells: list[list[int]], samples: int, alpha: float) -> float:
    """Power of the chi-square test at level alpha against the alternative distribution ``alt``."""
    pc = np.array([p[c].sum() for c in cells])
    ac = np.array([alt[c].sum() for c in cells])
    lam = samples * float(((ac - pc) ** 2 / pc).sum())
    df = len(cells) - 1
    return float(stats.ncx2.sf(stats.chi2.isf(alpha, df), df, lam))


def _joint_law(lm: CausalLM, prompt: list[int], params: SamplingParams) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The exact law of the first two generated tokens under ``params``, from the verifier alone.

    Returns (p1 [V], p2 [V, V] with p2[a] the law of token 2 after token a (zero rows outside p1's support),
    joint [V, V] = p1[a] * p2[a, b]), float64.
    """
    with torch.inference_mode():
        first = lm.model(torch.tensor([prompt])).logits[0, -1:].float()
        p1 = logits_to_probs(first, params)[0].double().numpy()
        support = np.nonzero(p1 > 0)[0]
        second = lm.model(torch.tensor([prompt + [int(a)] for a in support])).logits[:, -1].float()
        p2 = np.zeros((p1.size, p1.size))
        p2[support] = logits_to_probs(second, params).double().numpy()
    return p1, p2, p1[:, None] * p2


@pytest.mark.parametrize("top_p", [1.0, 0.9], ids=["top_k0_top_p1", "top_p0.9"])
def test_seeded_sampling_has_the_verifiers_exact_distribution(top_p, vllm_server, verifier, tokenizer, vllm_pair):
    """The first two generated tokens, decided with sampled one-token drafts (k = 1): token 1 by the first
    round (acceptance or resampling), token 2 either as that round's bonus (draft accepted) or by a second
    round on the extended session (draft rejected). Tested against the verifier's exact processed law, at
    top_k 0 and temperature 1.5: the first token's law, and the joint law of the pair (which holds the
    conditional law of token 2 given token 1), each with a chi-square test at level 1e-3.

    Power, stated and computed here. First token: for top_p 1, against what a top-K transport without
    server-side decisions gives (the target renormalised over its top K = 20), power >= 0.99; for top_p
    0.9, against a sampler that ignores top_p, a sample outside the nucleus (a hard failure: p = 0 there)
    happens with probability >= 0.99. Pair: power >= 0.99 against token 2 drawn after the wrong context
    (the most likely first token whatever was drawn: a stale session) and >= 0.9 against token 2 drawn at
    temperature 1 (a bonus token that skips the request's sampling); for top_p 0.9, a token 2 that ignores
    top_p lands outside the pair's support with probability >= 0.99.
    """
    samples, alpha, temperature = 400, 1e-3, 1.5
    params = SamplingParams(max_tokens=2, temperature=temperature, top_p=top_p, ignore_eos=True)
    prompt = tokenizer.encode("import os\n")
    lm = CausalLM(vllm_pair[0])
    p, p2, joint = _joint_law(lm, prompt, params)
    tempered, tempered2, _ = _joint_law(lm, prompt, SamplingParams(temperature=temperature))
    cells = _cells(p, samples)
    if top_p == 1.0:
        alt = np.where(tempered >= np.sort(tempered)[-20], tempered, 0.0)
        assert _power(p, alt / alt.sum(), cells, samples, alpha) >= 0.99
    else:
        assert 1 - (1 - tempered[p == 0].sum()) ** samples >= 0.99
    joint_flat = joint.ravel()
    joint_cells = _cells(joint_flat, samples)
    stale = p[:, None] * p2[int(np.argmax(p))][None, :]
    cold = p[:, None] * _joint_law(lm, prompt, SamplingParams(temperature=1.0, top_p=top_p))[1]
    assert _power(joint_flat, stale.ravel(), joint_cells, samples, alpha) >= 0.99
    assert _power(joint_flat, cold.ravel(), joint_cells, samples, alpha) >= 0.9
    if top_p < 1.0:
        outside = float((p[:, None] * np.where(p2 == 0, tempered2, 0.0)).sum())
        assert 1 - (1 - outside) ** samples >= 0.99

    drafter = HFDrafter(CausalLM(vllm_pair[1]), cost_ratio=0.2)
    router = SpeculativeRouter(verifier, drafter, tokenizer, SpecOptions(num_draft_tokens=1))

    async def sample_all():
        pairs, drafted, accepted = Counter(), 0, 0
        for start in range(0, samples, 8):
            gens = await asyncio.gather(*(
                router.generate(prompt, SamplingParams(max_tokens=2, temperature=temperature, top_p=top_p,
                                                       seed=seed, ignore_eos=True))
                for seed in range(start, min(start + 8, samples))
            ))  # fmt: skip
            for g in gens:
                assert len(g.token_ids) == 2, g.token_ids
                pairs[tuple(g.token_ids)] += 1
                drafted += g.stats.draft_tokens
                accepted += g.stats.accepted_tokens
        return pairs, drafted, accepted

    pairs, drafted, accepted = asyncio.run(sample_all())
    firsts = Counter()
    for (a, _), n in pairs.items():
        firsts[a] += n
    observed = [sum(firsts[t] for t in c) for c in cells]
    assert sum(observed) == samples  # nothing outside the support (p = 0 cells would be empty)
    assert chi2_pvalue(observed, [p[c].sum() for c in cells]) > alpha
    size = p.size
    flat = Counter({a * size + b: n for (a, b), n in pairs.items()})
    observed_pairs = [sum(flat[i] for i in c) for c in joint_cells]
    assert sum(observed_pairs) == samples  # no pair outside the joint support
    assert chi2_pvalue(observed_pairs, [joint_flat[c].sum() for c in joint_cells]) > alpha
    # Both ways to token 2 happened: a bonus after an accepted draft, and a second round after a rejection.
    assert 0 < accepted < drafted
