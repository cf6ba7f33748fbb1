"""Batched verification: concurrent requests' verify passes as one ragged forward, token-identical to unbatched."""

from __future__ import annotations

import asyncio
import gc
import threading
import weakref

import pytest
import torch

from decoding.batching import AcceptBatcher, ForwardBatcher, ForwardPass, enable_ragged, forward_ragged
from decoding.causal_lm import CausalLM
from decoding.drafters import HFDrafter, NgramDrafter
from decoding.sampling import SamplingParams
from decoding.speculative import SpecOptions, SpeculativeRouter
from decoding.verifiers import HFVerifier
from tests.support.prompts import CODE_PROMPTS

PROMPTS = CODE_PROMPTS


@pytest.fixture(scope="module")
def batching_lm(tiny_verifier_dir):
    """A verifier model of its own: batching switches the model's attention implementation."""
    lm = CausalLM(tiny_verifier_dir)
    enable_ragged(lm.model)
    yield lm
    lm.close()


@pytest.fixture(scope="module")
def batching_drafter_lm(tiny_drafter_dir):
    lm = CausalLM(tiny_drafter_dir)
    yield lm
    lm.close()


def test_ragged_forward_matches_one_pass_per_request(batching_lm, tiny_verifier_lm):
    """Mixed context lengths, cached prefixes and draft lengths (0 included): each request's
    logits equal its own unbatched pass, and its cache ends in the same state."""
    g = torch.Generator().manual_seed(0)
    V = tiny_verifier_lm.vocab_size
    shapes = [(30, 0, 5), (7, 7, 1), (55, 40, 3), (12, 11, 0), (3, 0, 8)]  # (context, of it cached, draft)
    passes, expected = [], []
    for context, cached, k in shapes:
        ids = torch.randint(0, V, (context,), generator=g).tolist()
        draft = torch.randint(0, V, (k,), generator=g).tolist()
        alone, batched = tiny_verifier_lm.sequence(ids), batching_lm.sequence(ids)
        if cached:
            alone.feed(ids[:cached])
            batched.feed(ids[:cached])
        expected.append((alone.feed(alone.pending() + draft, keep=k + 1), alone))
        passes.append(ForwardPass(batched, batched.pending() + draft, keep=k + 1))
    got = forward_ragged(batching_lm, passes)
    for (want, alone), rows, p in zip(expected, got, passes):
        assert rows.shape == want.shape
        torch.testing.assert_close(rows, want, rtol=1e-4, atol=1e-4)
        assert torch.equal(rows.argmax(-1), want.argmax(-1))
        assert p.seq.cached == alone.cached and p.seq.forward_passes == alone.forward_passes
        assert p.seq.cache.get_seq_length() == alone.cache.get_seq_length() == len(alone.cached)


async def _generate_all(router, prompts, params, options):
    async def one(prompt):
        return (await router.generate(router.encode(prompt), params, options)).token_ids

    return await asyncio.gather(*(one(p) for p in prompts))


@pytest.mark.parametrize("drafter_kind", ["model", "ngram"])
def test_batched_router_is_token_identical_to_unbatched(drafter_kind, batching_lm, batching_drafter_lm,
                                                        tiny_verifier_lm, tiny_drafter_lm, tiny_tokenizer):  # fmt: skip
    """Six concurrent greedy requests with mixed, adaptive draft lengths: identical tokens, and
    the verifier (and the model drafter) really ran passes of several requests at once."""
    def drafter(max_batch):
        if drafter_kind == "ngram":
            return NgramDrafter(tiny_verifier_lm.vocab_size)
        return HFDrafter(batching_drafter_lm if max_batch > 1 else tiny_drafter_lm, cost_ratio=0.1, max_batch=max_batch)

    options = SpecOptions(num_draft_tokens=3, min_draft_tokens=1, max_draft_tokens=8)
    params = SamplingParams(max_tokens=32)
    alone = SpeculativeRouter(HFVerifier(tiny_verifier_lm), drafter(1), tiny_tokenizer, options)
    batched = SpeculativeRouter(HFVerifier(batching_lm, max_batch=4), drafter(4), tiny_tokenizer, options)
    want = asyncio.run(_generate_all(alone, PROMPTS, params, options))
    got = asyncio.run(_generate_all(batched, PROMPTS, params, options))
    assert got == want
    sizes = batched.verifier.batcher.batch_sizes
    assert max(sizes) > 1 and max(sizes) <= 4, sizes
    if drafter_kind == "model":  # the drafter's steps shared passes too
        sizes = batched.drafter.batcher.batch_sizes
        assert max(sizes) > 1 and max(sizes) <= 4, sizes


def test_concurrent_sampled_rounds_share_one_kernel_call_and_keep_their_seeds(batching_lm, tiny_verifier_lm,
                                                                              tiny_tokenizer):
    """Seeded sampled requests run concurrently through the batched verifier emit what each emits
    alone (every row draws from its own seed), and their acceptances shared kernel calls. The
    n-gram drafter proposes at once, so the rounds stay in step and their verify passes meet."""
    options = SpecOptions(num_draft_tokens=3, max_draft_tokens=6)
    params = [SamplingParams(max_tokens=16, temperature=0.9, top_p=0.95, seed=100 + i) for i in range(len(PROMPTS))]

    async def run(router, concurrent):
        async def one(prompt, p):
            return (await router.generate(router.encode(prompt), p, options)).token_ids

        if concurrent:
            return await asyncio.gather(*(one(prompt, p) for prompt, p in zip(PROMPTS, params)))
        return [await one(prompt, p) for prompt, p in zip(PROMPTS, params)]

    ngram = NgramDrafter(tiny_verifier_lm.vocab_size)
    alone = SpeculativeRouter(HFVerifier(tiny_verifier_lm), ngram, tiny_tokenizer)
    batched = SpeculativeRouter(HFVerifier(batching_lm, max_batch=8), ngram, tiny_tokenizer)
    want = asyncio.run(run(alone, concurrent=False))
    got = asyncio.run(run(batched, concurrent=True))
    assert got == want
    assert max(alone.acceptor.call_sizes) == 1 and max(batched.acceptor.call_sizes) > 1


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_a_rows_acceptance_does_not_depend_on_its_batch(backend):
    """Greedy, dense-q and point-mass rounds of mixed k, with padding between them: one call per
    kind gives each row what it gets alone (Triton runs in its interpreter here)."""
    V = 50
    g = torch.Generator().manual_seed(3)

    def rounds():
        out = []
        for i, k in enumerate([0, 3, 1, 5, 2, 4, 6, 1, 0, 2, 7, 3]):
            draft = torch.randint(0, V, (k,), generator=g).tolist()
            logits = torch.randn(k + 1, V, generator=g) * 3
            kind = i % 3
            if kind == 0:
                out.append((draft, logits, None, None))
            else:
                q = torch.softmax(torch.randn(k, V, generator=g), -1) if kind == 1 else None
                out.append((draft, torch.softmax(logits, -1), q, torch.Generator().manual_seed(i)))
        return out

    cases = rounds()

    async def together(acceptor):
        return await asyncio.gather(*(acceptor.accept(d, t, q, None if gen is None else gen.clone_state())
                                      for d, t, q, gen in cases))  # fmt: skip

    async def one_by_one(acceptor):
        return [await acceptor.accept(d, t, q, None if gen is None else gen.clone_state()) for d, t, q, gen in cases]

    batched, single = AcceptBatcher(backend), AcceptBatcher(backend)
    got, want = asyncio.run(together(batched)), asyncio.run(one_by_one(single))
    assert got == want
    assert sorted(batched.call_sizes) == [4, 4, 4] and list(single.call_sizes) == [1] * len(cases)
    for (draft, *_), (tokens, n) in zip(cases, got):
        assert tokens[:n] == draft[:n] and len(tokens) == n + 1


def test_a_bad_row_fails_alone():
    """A NaN in one request's probabilities fails that request only; its batch-mates are verified."""
    good = torch.softmax(torch.randn(3, 20), -1)
    bad = good.clone()
    bad[1, 4] = float("nan")

    async def scenario():
        acceptor = AcceptBatcher("torch")
        return await asyncio.gather(
            acceptor.accept([1, 2], good, None, torch.Generator().manual_seed(0)),
            acceptor.accept([1, 2], bad, None, torch.Generator().manual_seed(0)),
            return_exceptions=True,
        )

    ok, failed = asyncio.run(scenario())
    assert isinstance(failed, ValueError) and "NaN" in str(failed)
    assert isinstance(ok, tuple) and len(ok[0]) == ok[1] + 1


def test_cancelling_one_request_mid_batch_frees_only_its_own(batching_lm, tiny_verifier_lm):
    """Three requests in one pass; the second is cancelled while the pass is queued on the worker:
    the other two get their rows, the cancelled session's cache is freed, nothing stays queued."""
    V = tiny_verifier_lm.vocab_size
    g = torch.Generator().manual_seed(1)
    contexts = [torch.randint(0, V, (n,), generator=g).tolist() for n in (9, 14, 21)]
    drafts = [torch.randint(0, V, (k,), generator=g).tolist() for k in (2, 5, 0)]
    expected = [tiny_verifier_lm.sequence(c).feed(c + d, keep=len(d) + 1) for c, d in zip(contexts, drafts)]

    async def scenario():
        verifier = HFVerifier(batching_lm, max_batch=8)
        sessions = [await verifier.start(c) for c in contexts]
        hold = threading.Event()
        blocker = asyncio.ensure_future(batching_lm.run(hold.wait))  # the worker is busy: passes queue up
        tasks = [asyncio.create_task(s.score(d)) for s, d in zip(sessions, drafts)]
        await asyncio.sleep(0.05)  # the batcher has taken all three and waits for the worker
        assert list(verifier.batcher.batch_sizes) == [3]
        tasks[1].cancel()
        hold.set()
        await blocker
        results = await asyncio.gather(*tasks, return_exceptions=True)
        freed = weakref.ref(sessions[1].seq)
        await sessions[1].close()
        await asyncio.sleep(0.01)
        return verifier, sessions, results, freed

    verifier, sessions, results, freed = asyncio.run(scenario())
    assert isinstance(results[1], asyncio.CancelledError)
    for i in (0, 2):
        torch.testing.assert_close(results[i], expected[i], rtol=1e-4, atol=1e-4)
        assert sessions[i].seq.cached == contexts[i] + drafts[i]
    gc.collect()
    assert freed() is None
    assert verifier.batcher._queue == [] and list(verifier.batcher.batch_sizes) == [3]


def test_a_request_cancelled_while_queued_never_runs(batching_lm, tiny_verifier_lm):
    V = tiny_verifier_lm.vocab_size

    async def scenario():
        verifier = HFVerifier(batching_lm, max_batch=2)
        sessions = [await verifier.start(list(range(1, 6 + i))) for i in range(4)]
        hold = threading.Event()
        blocker = asyncio.ensure_future(batching_lm.run(hold.wait))
        tasks = [asyncio.create_task(s.score([7, 8])) for s in sessions]
        await asyncio.sleep(0.05)  # two taken into the first batch, two queued
        tasks[3].cancel()
        hold.set()
        await blocker
        results = await asyncio.gather(*tasks, return_exceptions=True)
        return verifier, sessions, results

    verifier, sessions, results, = asyncio.run(scenario())
    assert list(verifier.batcher.batch_sizes) == [2, 1]
    assert isinstance(results[3], asyncio.CancelledError) and sessions[3].seq.cached == []
    assert all(r.shape == (3, V) for r in results[:3])


def test_a_failed_pass_fails_its_batch_and_the_next_round_recomputes(batching_lm, tiny_verifier_lm):
    """A pass that raises (an out-of-range id stands in for any failure inside the forward) fails
    each request of its batch with that error and resets their caches; a later pass recomputes
    the context and matches the unbatched logits."""
    V = tiny_verifier_lm.vocab_size
    context = list(range(3, 15))

    async def scenario():
        verifier = HFVerifier(batching_lm, max_batch=4)
        good, bad = await verifier.start(context), await verifier.start(context)
        results = await asyncio.gather(good.score([1, 2]), bad.score([V + 5]), return_exceptions=True)
        retry = await good.score([1, 2])
        return good, results, retry

    good, results, retry = asyncio.run(scenario())
    assert all(isinstance(r, IndexError) for r in results), results
    assert good.seq.cached == context + [1, 2]
    want = tiny_verifier_lm.sequence(context).feed(context + [1, 2], keep=3)
    torch.testing.assert_close(retry, want, rtol=1e-4, atol=1e-4)


def test_max_batch_must_be_at_least_two(batching_lm):
    with pytest.raises(ValueError, match="max_batch >= 2"):
        ForwardBatcher(batching_lm, 1)
