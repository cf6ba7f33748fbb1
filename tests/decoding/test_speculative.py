"""The speculative router is lossless: identical greedy tokens, exact sampling distribution."""

from __future__ import annotations

import asyncio
import itertools

import pytest
import torch
from transformers import AutoModelForCausalLM

from decoding.causal_lm import CausalLM, load_tokenizer
from decoding.drafters import HFDrafter, NgramDrafter
from decoding.sampling import InvalidRequestError, SamplingParams, logits_to_probs
from decoding.speculative import Generators, SpecOptions, SpeculativeRouter
from decoding.verifiers import HFVerifier
from tests.support.prompts import CODE_PROMPTS
from tests.support.stats import chi2_pvalue

PROMPTS = CODE_PROMPTS
VERIFIER_ONLY = SpecOptions(mode="verifier-only")


def generate(router, prompt_ids, params, options=None):
    return asyncio.run(router.generate(prompt_ids, params, options))


@pytest.fixture(scope="module")
def hf_verifier(tiny_verifier_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_verifier_dir).eval()


@pytest.fixture(scope="module")
def drafters(tiny_verifier_lm, tiny_drafter_lm):
    return {
        # Random weights unrelated to the verifier's: acceptance near 0.
        "bad": HFDrafter(tiny_drafter_lm, cost_ratio=0.1),
        # The verifier drafting for itself: acceptance exactly 1.
        "perfect": HFDrafter(tiny_verifier_lm, cost_ratio=0.05),
        "ngram": NgramDrafter(tiny_verifier_lm.vocab_size),
    }


@pytest.mark.parametrize("drafter_name", ["bad", "perfect", "ngram"])
@pytest.mark.parametrize("options", [SpecOptions(), SpecOptions(num_draft_tokens=1, adaptive=False),
                                     SpecOptions(num_draft_tokens=7, max_draft_tokens=7, adaptive=False)],
                         ids=["adaptive", "k1", "k7"])
def test_greedy_speculative_is_token_identical(drafter_name, options, drafters, tiny_verifier_lm, tiny_tokenizer, hf_verifier):
    router = SpeculativeRouter(HFVerifier(tiny_verifier_lm), drafters[drafter_name], tiny_tokenizer, options)
    params = SamplingParams(max_tokens=40)
    accepted = drafted = 0
    for prompt in PROMPTS:
        ids = tiny_tokenizer.encode(prompt)
        expected = hf_verifier.generate(torch.tensor([ids]), max_new_tokens=40, do_sample=False)[0, len(ids):].tolist()
        plain = generate(router, ids, params, VERIFIER_ONLY)
        spec = generate(router, ids, params)
        assert plain.token_ids == expected
        assert spec.token_ids == expected, prompt
        assert spec.text == plain.text
        accepted += spec.stats.accepted_tokens
        drafted += spec.stats.draft_tokens
        # One verifier pass per round, however many tokens a round emits.
        assert spec.stats.verifier_forward_passes == spec.stats.rounds
    rate = accepted / drafted
    if drafter_name == "perfect":
        assert rate == 1.0
    elif drafter_name == "bad":
        assert rate < 0.2
    else:
        assert 0 < rate < 1  # the repetitive prompts give prompt lookup something to copy


def test_drafter_only_is_the_drafters_own_greedy_output(tiny_verifier_lm, tiny_drafter_lm, tiny_drafter_dir, tiny_tokenizer):
    router = SpeculativeRouter(HFVerifier(tiny_verifier_lm), HFDrafter(tiny_drafter_lm), tiny_tokenizer)
    hf = AutoModelForCausalLM.from_pretrained(tiny_drafter_dir).eval()
    ids = tiny_tokenizer.encode(PROMPTS[0])
    out = generate(router, ids, SamplingParams(max_tokens=20), SpecOptions(mode="drafter-only"))
    assert out.token_ids == hf.generate(torch.tensor([ids]), max_new_tokens=20, do_sample=False)[0, len(ids):].tolist()
    assert out.stats.verifier_forward_passes == 0


# -- sampling ------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_vocab(small_vocab_pair):
    verifier_dir, drafter_dir = small_vocab_pair
    vlm, dlm = CausalLM(verifier_dir), CausalLM(drafter_dir)
    return vlm, dlm, load_tokenizer(verifier_dir)


def exact_distribution(lm: CausalLM, prompt: list[int], length: int, params: SamplingParams) -> dict[tuple, float]:
    """The verifier's exact distribution over all continuations of ``length`` tokens."""
    V = lm.vocab_size
    dist = {}
    with torch.inference_mode():
        for seq in itertools.product(range(V), repeat=length):
            ids = torch.tensor([prompt + list(seq)])
            logits = lm.model(ids).logits[0, len(prompt) - 1 : -1]  # [length, V]
            probs = logits_to_probs(logits, params)
            dist[seq] = float(torch.prod(probs[torch.arange(length), torch.tensor(seq)]))
    return dist


@pytest.mark.parametrize(
    "params, samples",
    [
        (SamplingParams(max_tokens=3, temperature=1.0), 3000),
        (SamplingParams(max_tokens=3, temperature=0.7, top_k=3), 1500),
        (SamplingParams(max_tokens=3, temperature=1.3, top_p=0.8), 1500),
    ],
    ids=["plain", "top_k", "top_p"],
)
def test_sampling_matches_the_verifiers_exact_sequence_distribution(params, samples, small_vocab):
    """Chi-square goodness of fit of sampled 3-token continuations against the
    verifier's enumerated distribution (125 sequences). Fixed seeds make the
    test deterministic; it fails at p < 1e-3 (a biased router fails by far)."""
    vlm, dlm, tokenizer = small_vocab
    prompt = tokenizer.encode("w1 w3")
    exact = exact_distribution(vlm, prompt, 3, params)
    cells = sorted(exact)
    router = SpeculativeRouter(HFVerifier(vlm), HFDrafter(dlm), tokenizer, SpecOptions(num_draft_tokens=2))

    async def sample_all(options):
        counts = dict.fromkeys(cells, 0)
        rounds = accepted = drafted = 0
        for seed in range(samples):
            p = SamplingParams(max_tokens=3, temperature=params.temperature, top_k=params.top_k,
                               top_p=params.top_p, seed=seed, ignore_eos=True)
            gen = await router.generate(prompt, p, options)
            counts[tuple(gen.token_ids)] += 1
            rounds += gen.stats.rounds
            accepted += gen.stats.accepted_tokens
            drafted += gen.stats.draft_tokens
        return counts, accepted, drafted

    counts, accepted, drafted = asyncio.run(sample_all(None))
    expected = [exact[c] for c in cells]
    assert chi2_pvalue([counts[c] for c in cells], expected) > 1e-3
    # The pair disagrees: there were rejections (and so resampling) as well as acceptances.
    assert 0.1 < accepted / drafted < 0.95


def test_seeded_sampling_is_reproducible(tiny_verifier_lm, tiny_drafter_lm, tiny_tokenizer):
    router = SpeculativeRouter(HFVerifier(tiny_verifier_lm), HFDrafter(tiny_drafter_lm), tiny_tokenizer)
    ids = tiny_tokenizer.encode(PROMPTS[1])
    a = generate(router, ids, SamplingParams(max_tokens=30, temperature=0.9, seed=1234))
    b = generate(router, ids, SamplingParams(max_tokens=30, temperature=0.9, seed=1234))
    c = generate(router, ids, SamplingParams(max_tokens=30, temperature=0.9, seed=4321))
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids


# -- caches ----------------------------------------------------------------------


def test_cache_after_rollbacks_equals_a_fresh_forward(tiny_verifier_lm):
    """Feed drafts, roll back to random accepted prefixes, and compare the KV
    cache with one built by a single forward pass over the accepted prefix."""
    lm = tiny_verifier_lm
    g = torch.Generator().manual_seed(0)
    seq = lm.sequence(torch.randint(0, lm.vocab_size, (17,), generator=g).tolist())
    for _ in range(12):
        draft = torch.randint(0, lm.vocab_size, (5,), generator=g).tolist()
        seq.feed(seq.pending() + draft, keep=6)
        accepted = int(torch.randint(0, 6, (1,), generator=g))
        correction = int(torch.randint(0, lm.vocab_size, (1,), generator=g))
        seq.extend(draft[:accepted] + [correction])
        assert seq.cached == seq.ids[: len(seq.cached)]
        assert len(seq.cached) >= len(seq.ids) - 1 - 1  # only the last round's tail is missing

    fresh = lm.sequence(seq.ids)
    fresh.feed(seq.cached, keep=1)
    for mine, ref in zip(seq.cache.layers, fresh.cache.layers):
        torch.testing.assert_close(mine.keys, ref.keys, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(mine.values, ref.values, rtol=1e-5, atol=1e-5)
    with torch.inference_mode():
        full = lm.model(torch.tensor([seq.ids])).logits[0, -1]
    torch.testing.assert_close(seq.feed(seq.pending(), keep=1)[0], full, rtol=1e-4, atol=1e-4)


def test_drafter_does_not_recompute_the_context(tiny_verifier_lm, tiny_drafter_lm, tiny_tokenizer):
    """Each round feeds the drafter only the tokens its cache lacks."""
    fed = []
    original = tiny_drafter_lm.model.forward

    def spy(*args, **kwargs):
        fed.append(kwargs["input_ids"].shape[1])
        return original(*args, **kwargs)

    tiny_drafter_lm.model.forward = spy
    try:
        router = SpeculativeRouter(HFVerifier(tiny_verifier_lm), HFDrafter(tiny_drafter_lm), tiny_tokenizer,
                                   SpecOptions(num_draft_tokens=4, adaptive=False))
        ids = tiny_tokenizer.encode(PROMPTS[2])
        generate(router, ids, SamplingParams(max_tokens=30))
    finally:
        tiny_drafter_lm.model.forward = original
    assert fed[0] == len(ids)  # the prefill
    assert max(fed[1:]) <= 2  # then at most [last accepted draft, correction/bonus]


# -- stopping --------------------------------------------------------------------


def test_stop_string_cuts_text_and_streaming_matches(tiny_verifier_lm, tiny_drafter_lm, tiny_tokenizer):
    router = SpeculativeRouter(HFVerifier(tiny_verifier_lm), HFDrafter(tiny_drafter_lm), tiny_tokenizer)
    ids = tiny_tokenizer.encode(PROMPTS[0])
    full = generate(router, ids, SamplingParams(max_tokens=60)).text
    # A printable 3-character stop string from the middle of the output.
    start = next(i for i in range(10, len(full) - 3) if full[i : i + 3].isascii() and full[i : i + 3].isprintable())
    stop = full[start : start + 3]
    cut = full.index(stop)

    async def stream():
        return [c async for c in router.stream(ids, SamplingParams(max_tokens=60, stop=(stop, "never-seen")))]

    chunks = asyncio.run(stream())
    assert "".join(c.text for c in chunks) == full[:cut]
    assert chunks[-1].finish_reason == "stop"
    assert all(c.finish_reason is None for c in chunks[:-1])


def test_eos_stops_generation_and_is_kept_in_token_ids(tiny_verifier_lm, tiny_drafter_lm, tiny_tokenizer):
    router = SpeculativeRouter(HFVerifier(tiny_verifier_lm), HFDrafter(tiny_drafter_lm), tiny_tokenizer)
    ids = tiny_tokenizer.encode(PROMPTS[3])
    free = generate(router, ids, SamplingParams(max_tokens=30))
    router.eos_token_id = free.token_ids[7]  # pretend this token is the end of text
    first = free.token_ids.index(router.eos_token_id)
    out = generate(router, ids, SamplingParams(max_tokens=30))
    assert out.token_ids == free.token_ids[: first + 1]
    assert out.finish_reason == "stop"
    ignored = generate(router, ids, SamplingParams(max_tokens=30, ignore_eos=True))
    assert ignored.token_ids == free.token_ids


@pytest.mark.parametrize("max_tokens", [1, 2, 5, 13])
def test_max_tokens_is_exact_even_mid_round(max_tokens, tiny_verifier_lm, tiny_tokenizer):
    router = SpeculativeRouter(HFVerifier(tiny_verifier_lm), HFDrafter(tiny_verifier_lm, cost_ratio=0.01),
                               tiny_tokenizer, SpecOptions(num_draft_tokens=8, max_draft_tokens=8))
    out = generate(router, tiny_tokenizer.encode(PROMPTS[0]), SamplingParams(max_tokens=max_tokens, ignore_eos=True))
    assert len(out.token_ids) == max_tokens
    assert out.finish_reason == "length"


# -- adaptive draft length ----------------------------------------------------------


def test_adaptive_draft_length_follows_acceptance(drafters, tiny_verifier_lm, tiny_tokenizer):
    options = SpecOptions(num_draft_tokens=3, min_draft_tokens=1, max_draft_tokens=8)
    ids = tiny_tokenizer.encode(PROMPTS[0])
    params = SamplingParams(max_tokens=60, ignore_eos=True)
    good = generate(SpeculativeRouter(HFVerifier(tiny_verifier_lm), drafters["perfect"], tiny_tokenizer, options), ids, params)
    bad = generate(SpeculativeRouter(HFVerifier(tiny_verifier_lm), drafters["bad"], tiny_tokenizer, options), ids, params)
    assert len(good.stats.drafted_per_position) == 8  # grew to the upper bound
    assert bad.stats.draft_length == 1  # shrank to the lower bound


# -- bad input ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, param",
    [
        (dict(max_tokens=0), "max_tokens"),
        (dict(max_tokens=-3), "max_tokens"),
        (dict(temperature=-0.1), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_k=-1), "top_k"),
        (dict(stop=("",)), "stop"),
    ],
)
def test_invalid_sampling_params_name_the_parameter(kwargs, param):
    with pytest.raises(InvalidRequestError) as err:
        SamplingParams(**kwargs)
    assert err.value.param == param
    assert param in str(err.value)


@pytest.mark.parametrize(
    "kwargs, param", [(dict(mode="fast"), "tandem.mode"), (dict(num_draft_tokens=0), "tandem.num_draft_tokens"),
                      (dict(min_draft_tokens=5, max_draft_tokens=2), "tandem.min_draft_tokens")],
)
def test_invalid_spec_options_name_the_parameter(kwargs, param):
    with pytest.raises(InvalidRequestError) as err:
        SpecOptions(**kwargs)
    assert err.value.param == param


def test_bad_prompts_fail_clearly_and_the_router_keeps_working(tiny_verifier_lm, tiny_drafter_lm, tiny_tokenizer):
    router = SpeculativeRouter(HFVerifier(tiny_verifier_lm), HFDrafter(tiny_drafter_lm), tiny_tokenizer)
    limit = tiny_verifier_lm.max_context
    cases = [
        ([], SamplingParams(), "prompt", "empty"),
        ([1] * limit, SamplingParams(), "prompt", "maximum context length"),
        ([1] * (limit - 10), SamplingParams(max_tokens=20), "max_tokens", "maximum context length"),
        ([1, tiny_verifier_lm.vocab_size], SamplingParams(), "prompt", "outside the vocabulary"),
        ([1, -2], SamplingParams(), "prompt", "outside the vocabulary"),
    ]
    for ids, params, param, words in cases:
        with pytest.raises(InvalidRequestError, match=words) as err:
            generate(router, ids, params)
        assert err.value.param == param
    assert len(generate(router, [1, 2, 3], SamplingParams(max_tokens=5, ignore_eos=True)).token_ids) == 5


# -- verifier faults ---------------------------------------------------------------


class FailingVerifier:
    """Fault injection (a fake by necessity: an in-process model cannot go down):
    the real HFVerifier, whose sessions raise VerifierUnavailableError from the
    ``fail_at``-th score call on (0 = already at start)."""

    def __init__(self, lm, fail_at: int):
        self.inner = HFVerifier(lm)
        self.name, self.vocab_size, self.max_context = "failing", lm.vocab_size, lm.max_context
        self.fail_at = fail_at

    async def start(self, prompt_ids):
        from decoding.verifiers import VerifierUnavailableError

        if self.fail_at == 0:
            raise VerifierUnavailableError("verifier unreachable (injected)")
        session, calls, fail_at = await self.inner.start(prompt_ids), [0], self.fail_at

        async def score(draft):
            calls[0] += 1
            if calls[0] >= fail_at:
                raise VerifierUnavailableError("verifier unreachable (injected)")
            return await original(draft)

        original = session.score
        session.score = score
        return session


@pytest.mark.parametrize("fail_at", [0, 3])
def test_verifier_failure_falls_back_to_drafter_only_when_configured(fail_at, tiny_verifier_lm, tiny_drafter_lm,
                                                                     tiny_drafter_dir, tiny_tokenizer):
    from decoding.verifiers import VerifierUnavailableError

    ids = tiny_tokenizer.encode(PROMPTS[0])
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    strict = SpeculativeRouter(FailingVerifier(tiny_verifier_lm, fail_at), HFDrafter(tiny_drafter_lm), tiny_tokenizer)
    with pytest.raises(VerifierUnavailableError):
        generate(strict, ids, params)

    lenient = SpeculativeRouter(FailingVerifier(tiny_verifier_lm, fail_at), HFDrafter(tiny_drafter_lm), tiny_tokenizer,
                                fallback="drafter-only")
    out = generate(lenient, ids, params)
    assert out.stats.fallback == "drafter-only" and len(out.token_ids) == 24
    # Rounds verified before the failure emitted (rounds + accepted) tokens: the
    # verifier's own greedy output. The rest is the drafter's greedy continuation.
    m = out.stats.rounds + out.stats.accepted_tokens
    assert out.stats.rounds == max(fail_at - 1, 0)
    verified = generate(SpeculativeRouter(HFVerifier(tiny_verifier_lm), None, tiny_tokenizer), ids, params,
                        VERIFIER_ONLY)
    assert out.token_ids[:m] == verified.token_ids[:m]
    hf = AutoModelForCausalLM.from_pretrained(tiny_drafter_dir).eval()
    prefix = ids + out.token_ids[:m]
    rest = hf.generate(torch.tensor([prefix]), max_new_tokens=24 - m, do_sample=False)[0, len(prefix):].tolist()
    assert out.token_ids[m:] == rest


# -- kernel backends and device placement -----------------------------------------------


def test_triton_backend_greedy_is_token_identical_to_torch(drafters, tiny_verifier_lm, tiny_tokenizer):
    """The router with the Triton kernels (run by Triton's interpreter on CPU) emits the
    torch backend's tokens, for sampled-free drafts of every kind."""
    params = SamplingParams(max_tokens=24)
    for name in ("bad", "ngram"):
        routers = {
            backend: SpeculativeRouter(HFVerifier(tiny_verifier_lm), drafters[name], tiny_tokenizer, kernel_backend=backend)
            for backend in ("torch", "triton")
        }
        for prompt in PROMPTS[:3]:
            ids = tiny_tokenizer.encode(prompt)
            outs = {b: generate(r, ids, params).token_ids for b, r in routers.items()}
            assert outs["triton"] == outs["torch"]


@pytest.mark.parametrize(
    "backend, drafter_kind, length, samples",
    # Triton's interpreter is slow, so its runs check 2-token continuations (25 cells).
    [("triton", "model", 2, 800), ("triton", "ngram", 2, 800), ("torch", "ngram", 3, 3000)],
)
def test_sampling_is_exact_for_every_kernel_backend_and_proposal(backend, drafter_kind, length, samples, small_vocab):
    """Sampled drafts (the drafter's q) and deterministic ones (n-gram: a point mass, never a
    dense one-hot), through the torch reference and the Triton kernels: the sequences follow
    the verifier's exact distribution (chi-square over every continuation of ``length`` tokens)."""
    vlm, dlm, tokenizer = small_vocab
    params = SamplingParams(max_tokens=length, temperature=1.0)
    prompt = tokenizer.encode("w1 w3 w1 w3 w1")  # repeats, so the n-gram drafter proposes
    exact = exact_distribution(vlm, prompt, length, params)
    cells = sorted(exact)
    drafter = HFDrafter(dlm) if drafter_kind == "model" else NgramDrafter(vlm.vocab_size)
    router = SpeculativeRouter(HFVerifier(vlm), drafter, tokenizer, SpecOptions(num_draft_tokens=2), kernel_backend=backend)

    async def sample_all():
        counts = dict.fromkeys(cells, 0)
        drafted = 0
        for seed in range(samples):
            p = SamplingParams(max_tokens=length, temperature=1.0, seed=seed, ignore_eos=True)
            gen = await router.generate(prompt, p)
            counts[tuple(gen.token_ids)] += 1
            drafted += gen.stats.draft_tokens
        return counts, drafted

    counts, drafted = asyncio.run(sample_all())
    assert drafted >= samples / 2  # the drafter did propose, so verification was exercised
    assert chi2_pvalue([counts[c] for c in cells], [exact[c] for c in cells]) > 1e-3


class MetaVerifier:
    """A fake by necessity (no second device here): a verifier whose logits live on the
    ``meta`` device, to check that the router builds every tensor of a round where the
    logits are, and samples with a generator of that device."""

    name, max_context, forward_passes, last_transport = "meta", 512, 0, None

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    async def start(self, prompt_ids):
        return self

    async def score(self, draft):
        return torch.empty(len(draft) + 1, self.vocab_size, device="meta")

    def extend(self, tokens):
        pass

    async def close(self):
        pass


@pytest.mark.parametrize("temperature", [0.0, 0.8])
@pytest.mark.parametrize("drafter_name", ["bad", "ngram"])
def test_every_tensor_of_a_round_lives_on_the_logits_device(temperature, drafter_name, drafters, tiny_tokenizer,
                                                            monkeypatch):
    import kernels
    from kernels.reference import VerificationResult

    seen = []

    def recording_verify(draft_tokens, draft_lens, target_probs, draft_probs=None, generator=None, **kw):
        seen.append((draft_tokens, draft_lens, target_probs, draft_probs, generator, kw))
        k = draft_tokens.shape[1]  # meta tensors hold no values: accept k placeholder tokens
        return VerificationResult(tokens=torch.full((1, k + 1), 7), num_accepted=torch.tensor([k]))

    asked = []  # the devices the router asked for a generator on
    real_on = Generators.on

    def on(self, device):
        if torch.device(device).type == "meta":  # torch has no meta generator; meta tensors take a CPU one
            asked.append(torch.device(device))
            return torch.Generator()
        return real_on(self, device)

    monkeypatch.setattr(Generators, "on", on)
    monkeypatch.setattr(kernels, "verify_drafts", recording_verify)
    drafter = drafters[drafter_name]
    router = SpeculativeRouter(MetaVerifier(drafter.vocab_size), drafter, tiny_tokenizer)
    ids = tiny_tokenizer.encode(PROMPTS[5])
    generate(router, ids, SamplingParams(max_tokens=12, temperature=temperature, seed=0, ignore_eos=True))
    assert seen
    for draft_tokens, draft_lens, target, q, generator, kw in seen:
        assert {t.device.type for t in (draft_tokens, draft_lens, target) if t is not None} == {"meta"}
        assert kw.get("greedy", False) == (temperature == 0.0)
        if temperature == 0.0:
            assert q is None and "seeds" not in kw
        else:
            # Each sampled row draws its seed from the request's generator for the logits' device.
            assert kw["seeds"].device.type == "meta" and {d.type for d in asked} == {"meta"}
            if drafter_name == "ngram":  # deterministic proposal: no dense one-hot q
                assert q is None
            elif draft_tokens.shape[1] > 0:
                assert q.device.type == "meta" and q.shape == (1, draft_tokens.shape[1], drafter.vocab_size)
