"""The Triton verification kernels against the torch reference.

Without a GPU the kernels run in Triton's interpreter on CPU tensors, so the kernel
source itself is exercised, not only the reference. The interpreter is chosen when
``triton`` is first imported, hence the environment variable is set before any
import that could pull triton in. With a GPU the same tests run the compiled
kernels on CUDA tensors.

What is compared, and how:
* greedy: tokens and counts equal the reference exactly (ties included);
* sampling, fed the reference's own random numbers (the ``_noise`` hook): equal
  exactly, because both then make the same decisions with the same float32 maths;
* sampling with the kernel's own Philox numbers: invariants that hold for every
  draw (support, structure), determinism given a seed, independence from the
  launch configuration, the Philox Exp(1) noise itself (KS test), and a
  chi-square test of the sampled (num_accepted, token) pairs against the exact
  output distribution, which is computed analytically for small vocabularies.
"""

from __future__ import annotations

import os
import sys

import torch


# Without CUDA the kernels run in Triton's interpreter on CPU tensors: the root
# conftest sets TRITON_INTERPRET=1 before anything imports triton (Triton reads it
# when each @triton.jit function is defined, its own library functions included).
assert torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1", "tests/conftest.py sets TRITON_INTERPRET"

from dataclasses import dataclass  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from scipy import stats  # noqa: E402

import kernels  # noqa: E402
from kernels import reference  # noqa: E402
from kernels import triton_verify as tv  # noqa: E402
from kernels.triton_verify import _exponential_noise  # noqa: E402
from tests.support.stats import chi2_pvalue  # noqa: E402

if tv.INTERPRETED:
    DEVICE = "cpu"
elif torch.cuda.is_available():
    DEVICE = "cuda"
else:  # pragma: no cover - a configuration error, reported loudly rather than skipped
    raise RuntimeError(
        "triton was imported before this module could set TRITON_INTERPRET=1; "
        "run the kernel tests with TRITON_INTERPRET=1 in the environment"
    )

SETTINGS = settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


# ----------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------


@dataclass
class Batch:
    draft_tokens: torch.Tensor  # [B, K]
    draft_lens: torch.Tensor  # [B]
    p: torch.Tensor  # [B, K+1, V]
    q: torch.Tensor  # [B, K, V]

    def args(self, greedy: bool = False):
        return self.draft_tokens, self.draft_lens, self.p, None if greedy else self.q


def _probs(rng: np.random.Generator, shape, zero_frac: float, mode: str) -> np.ndarray:
    """Rows of probabilities: dense, top-k-like masked (exact zeros), one-hot, or tied."""
    if mode == "one_hot":
        out = np.zeros(shape)
        idx = rng.integers(0, shape[-1], size=shape[:-1])
        np.put_along_axis(out, idx[..., None], 1.0, axis=-1)
        return out
    if mode == "ties":
        # Few distinct values, so that argmax ties are common.
        w = rng.integers(0, 3, size=shape).astype(np.float64) + 1.0
    else:
        w = rng.random(shape) ** 3
    if zero_frac > 0:
        w[rng.random(shape) < zero_frac] = 0.0
        # Keep at least one non-zero entry per row, as a real distribution has.
        keep = rng.integers(0, shape[-1], size=shape[:-1])
        np.put_along_axis(w, keep[..., None], np.take_along_axis(w, keep[..., None], -1) + 0.5, axis=-1)
    return w / w.sum(-1, keepdims=True)


def make_batch(
    seed: int,
    B: int,
    K: int,
    V: int,
    lens,
    dtype=torch.float32,
    p_mode: str = "random",
    q_mode: str = "random",
    draft_mode: str = "from_q",
    p_zero: float = 0.0,
    q_zero: float = 0.0,
) -> Batch:
    rng = np.random.default_rng(seed)
    p = _probs(rng, (B, K + 1, V), p_zero, p_mode)
    if q_mode == "equal_p":
        q = p[:, :K].copy()
    else:
        q = _probs(rng, (B, K, V), q_zero, q_mode)
    if draft_mode == "from_q":
        drafts = np.array([[rng.choice(V, p=q[b, i]) for i in range(K)] for b in range(B)], dtype=np.int64)
    elif draft_mode == "target_argmax":
        drafts = p[:, :K].argmax(-1)
        # Corrupt one position in some rows so that greedy runs end at varied places.
        for b in range(B):
            if K and rng.random() < 0.5:
                drafts[b, rng.integers(0, K)] = rng.integers(0, V)
    else:
        drafts = rng.integers(0, V, size=(B, K))
    drafts = drafts.reshape(B, K)
    return Batch(
        draft_tokens=torch.as_tensor(drafts, dtype=torch.int64, device=DEVICE),
        draft_lens=torch.as_tensor(np.asarray(lens, dtype=np.int64).reshape(B), device=DEVICE),
        p=torch.as_tensor(p, device=DEVICE).to(dtype),
        q=torch.as_tensor(q, device=DEVICE).to(dtype),
    )


@st.composite
def batches(draw, max_b: int = 4, max_k: int = 4):
    B = draw(st.integers(1, max_b))
    K = draw(st.integers(0, max_k))
    V = draw(st.sampled_from([1, 2, 3, 5, 16, 17, 37]))
    lens = draw(st.lists(st.integers(0, K), min_size=B, max_size=B))
    return make_batch(
        seed=draw(st.integers(0, 2**32 - 1)),
        B=B,
        K=K,
        V=V,
        lens=lens,
        dtype=draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64])),
        p_mode=draw(st.sampled_from(["random", "one_hot", "ties"])),
        q_mode=draw(st.sampled_from(["random", "equal_p", "one_hot"])),
        draft_mode=draw(st.sampled_from(["from_q", "uniform", "target_argmax"])),
        p_zero=draw(st.sampled_from([0.0, 0.5, 0.9])),
        q_zero=draw(st.sampled_from([0.0, 0.5, 0.9])),
    )


launch_configs = st.sampled_from([(None, None), (16, None), (16, 2), (16, 3)])  # (block_v, num_splits)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator(device=DEVICE).manual_seed(seed)


def _same_noise(batch: Batch, seed: int):
    """The random numbers the reference draws from ``_gen(seed)``, in its order."""
    g = _gen(seed)
    B, K = batch.draft_tokens.shape
    u = torch.rand(B, K, device=DEVICE, generator=g)
    e = torch.empty(B, batch.p.shape[2], dtype=torch.float32, device=DEVICE).exponential_(generator=g)
    return u, e


def assert_same(got: reference.VerificationResult, want: reference.VerificationResult) -> None:
    assert got.tokens.dtype == torch.int64 and got.num_accepted.dtype == torch.int64
    assert torch.equal(got.num_accepted.cpu(), want.num_accepted.cpu()), (got, want)
    assert torch.equal(got.tokens.cpu(), want.tokens.cpu()), (got, want)


def assert_valid_sample(batch: Batch, res: reference.VerificationResult) -> None:
    """Invariants every sampled result satisfies, whatever the random numbers."""
    tokens, n = res.tokens.cpu(), res.num_accepted.cpu()
    drafts, lens = batch.draft_tokens.cpu(), batch.draft_lens.cpu()
    p, q = batch.p.double().cpu(), batch.q.double().cpu()
    for b in range(len(lens)):
        nb, lb = int(n[b]), int(lens[b])
        assert 0 <= nb <= lb
        assert torch.equal(tokens[b, :nb], drafts[b, :nb])
        assert (tokens[b, nb + 1 :] == reference.PAD).all()
        for i in range(nb):  # an accepted draft had a positive acceptance probability
            assert p[b, i, drafts[b, i]] > 0
        tok = int(tokens[b, nb])
        if nb < lb:  # rejected: the draft must have been rejectable, the token in the residual's support
            assert p[b, nb, drafts[b, nb]] < q[b, nb, drafts[b, nb]] or p[b, nb, drafts[b, nb]] == 0
            residual = (batch.p[b, nb] - batch.q[b, nb]).double().cpu().clamp(min=0)
            support = residual if residual.sum() > 0 else p[b, nb]
            assert support[tok] > 0, (b, nb, tok, support)
        else:
            assert p[b, nb, tok] > 0


# ----------------------------------------------------------------------------
# Exact agreement
# ----------------------------------------------------------------------------


@SETTINGS
@given(batch=batches(), config=launch_configs, mode=st.sampled_from(["full", "touched"]))
def test_greedy_matches_reference_exactly(batch, config, mode):
    block_v, splits = config
    want = reference.verify_drafts(*batch.args(greedy=True), greedy=True)
    got = tv.verify_drafts_triton(*batch.args(greedy=True), greedy=True, nan_check=mode, block_v=block_v, num_splits=splits)
    assert_same(got, want)


@SETTINGS
@given(batch=batches(), config=launch_configs, seed=st.integers(0, 2**31), mode=st.sampled_from(["full", "touched"]))
def test_sampling_matches_reference_given_the_same_random_numbers(batch, config, seed, mode):
    block_v, splits = config
    want = reference.verify_drafts(*batch.args(), generator=_gen(seed))
    got = tv.verify_drafts_triton(
        *batch.args(), _noise=_same_noise(batch, seed), nan_check=mode, block_v=block_v, num_splits=splits
    )
    assert_same(got, want)


@settings(SETTINGS, max_examples=15)
@given(batch=batches(max_b=3, max_k=3), seed=st.integers(0, 2**31))
def test_sampling_with_philox_is_valid_deterministic_and_layout_independent(batch, seed):
    first = tv.verify_drafts_triton(*batch.args(), generator=_gen(seed))
    assert_valid_sample(batch, first)
    # Same generator state, same result; and the noise of a column depends only on
    # (row seed, column), so block size and vocabulary splits cannot change it.
    again = tv.verify_drafts_triton(*batch.args(), generator=_gen(seed), block_v=16, num_splits=3)
    assert_same(again, first)


# Named edge cases from the issue: (batch builder, expected num_accepted for the
# sampler when the outcome is certain, else None).
EDGE_CASES = {
    "k1": (lambda: make_batch(1, B=3, K=1, V=7, lens=[1, 1, 0]), None),
    "all_accepted_p_equals_q": (
        lambda: make_batch(2, B=3, K=4, V=11, lens=[4, 2, 3], q_mode="equal_p", q_zero=0.5),
        [4, 2, 3],
    ),
    "first_draft_rejected_p_zero_at_draft": (lambda: _p_zero_at_draft(3), [0, 0, 0]),
    "q_with_zeros_drafts_at_q_zero": (lambda: _drafts_where_q_zero(4), [3, 3]),
    "empty_residual_falls_back_to_p": (lambda: _empty_residual(5), [1, 0]),
    "one_hot_p": (
        lambda: make_batch(6, B=4, K=3, V=9, lens=[3, 2, 1, 0], p_mode="one_hot", draft_mode="uniform"),
        None,
    ),
    "vocab_1": (lambda: make_batch(7, B=2, K=3, V=1, lens=[3, 1]), [3, 1]),
    "vocab_2": (lambda: make_batch(8, B=3, K=2, V=2, lens=[2, 1, 0], p_zero=0.5, q_zero=0.5), None),
    "vocab_not_power_of_two": (lambda: make_batch(9, B=2, K=2, V=37, lens=[2, 2], draft_mode="uniform"), None),
    "mixed_lengths_with_zero": (lambda: make_batch(10, B=5, K=3, V=13, lens=[0, 3, 1, 0, 2]), None),
    "k0": (lambda: make_batch(11, B=2, K=0, V=13, lens=[0, 0]), [0, 0]),
}


def _p_zero_at_draft(seed):
    batch = make_batch(seed, B=3, K=2, V=8, lens=[2, 1, 2])
    rows = torch.arange(3, device=DEVICE)
    batch.p[rows, 0, batch.draft_tokens[:, 0]] = 0.0  # p(x_0) = 0 < q(x_0): always rejected
    return batch


def _drafts_where_q_zero(seed):
    batch = make_batch(seed, B=2, K=3, V=10, lens=[3, 3], p_zero=0.0)
    for b in range(2):
        for i in range(3):
            x = int(batch.draft_tokens[b, i])
            batch.q[b, i, x] = 0.0  # q = 0 < p: u * 0 < p always accepts
    return batch


def _empty_residual(seed):
    # p == q and the draft token has p = q = 0: the draft is rejected (0 < 0 is false)
    # and max(0, p - q) is all zero, so the token comes from p itself.
    batch = make_batch(seed, B=2, K=2, V=6, lens=[2, 1], q_mode="equal_p")
    batch.p[0, 0, :] = torch.tensor([0.5, 0.5, 0, 0, 0, 0], dtype=batch.p.dtype)
    batch.p[0, 1, :] = torch.tensor([0, 0, 0.25, 0.75, 0, 0], dtype=batch.p.dtype)
    batch.p[1, 0, :] = torch.tensor([0, 0, 0, 0, 0.1, 0.9], dtype=batch.p.dtype)
    batch.q[:] = batch.p[:, :2]
    batch.draft_tokens[0] = torch.tensor([0, 5])  # accepted (p = q > 0), then p = q = 0: rejected
    batch.draft_tokens[1] = torch.tensor([0, 0])  # p = q = 0: rejected at once
    return batch


@pytest.mark.parametrize("name", sorted(EDGE_CASES))
def test_edge_cases(name):
    build, certain = EDGE_CASES[name]
    batch = build()
    assert_same(
        tv.verify_drafts_triton(*batch.args(greedy=True), greedy=True, block_v=16, num_splits=2),
        reference.verify_drafts(*batch.args(greedy=True), greedy=True),
    )
    for seed in range(3):
        assert_same(
            tv.verify_drafts_triton(*batch.args(), _noise=_same_noise(batch, seed), block_v=16, num_splits=2),
            reference.verify_drafts(*batch.args(), generator=_gen(seed)),
        )
        got = tv.verify_drafts_triton(*batch.args(), generator=_gen(seed))
        assert_valid_sample(batch, got)
        if certain is not None:
            assert got.num_accepted.tolist() == certain
    if name == "one_hot_p":
        # A one-hot target leaves nothing to chance: the sampler emits the greedy result.
        greedy = reference.verify_drafts(*batch.args(greedy=True), greedy=True)
        assert_same(tv.verify_drafts_triton(*batch.args(), generator=_gen(0)), greedy)
    if name == "empty_residual_falls_back_to_p":
        got = tv.verify_drafts_triton(*batch.args(), generator=_gen(0))
        assert int(got.tokens[0, 1]) in (2, 3) and int(got.tokens[1, 0]) in (4, 5)


def test_greedy_ties_and_infinities_pick_the_first_maximum():
    V = 40
    p = torch.full((2, 3, V), float("-inf"), device=DEVICE)  # logits work for greedy
    p[0, 0, [3, 17, 33]] = 2.0  # tie across blocks and splits: first wins
    p[0, 1, [20, 21]] = float("inf")
    p[0, 2, 39] = 1.0  # max in the tail of the last block
    # row 1: all -inf everywhere -> index 0, like torch.argmax
    drafts = torch.tensor([[3, 20], [0, 5]], device=DEVICE)
    lens = torch.tensor([2, 2], device=DEVICE)
    want = reference.verify_drafts(drafts, lens, p, greedy=True)
    assert want.tokens.tolist() == [[3, 20, 39], [0, 0, -1]]
    for block_v, splits in [(None, None), (16, 1), (16, 3)]:
        assert_same(tv.verify_drafts_triton(drafts, lens, p, greedy=True, block_v=block_v, num_splits=splits), want)


def test_large_vocabulary():
    """V = 2**18 + 3 (>= 256k, not a power of two): loops over many blocks per row."""
    batch = make_batch(12, B=1, K=1, V=2**18 + 3, lens=[1], draft_mode="uniform")
    assert_same(
        tv.verify_drafts_triton(*batch.args(greedy=True), greedy=True, nan_check="touched"),
        reference.verify_drafts(*batch.args(greedy=True), greedy=True),
    )
    assert_same(
        tv.verify_drafts_triton(*batch.args(), _noise=_same_noise(batch, 0), nan_check="touched", num_splits=2),
        reference.verify_drafts(*batch.args(), generator=_gen(0)),
    )


def test_strided_inputs_and_int32_ids():
    batch = make_batch(13, B=3, K=2, V=20, lens=[2, 0, 1], draft_mode="target_argmax")
    # Non-contiguous views: every other vocabulary entry of a wider tensor, batch-major swapped.
    p = torch.zeros(3, 3, 40, device=DEVICE)
    p[:, :, ::2] = batch.p
    p = p[:, :, ::2]
    q = batch.q.transpose(0, 1).contiguous().transpose(0, 1)
    drafts = batch.draft_tokens.to(torch.int32).t().contiguous().t()
    lens = batch.draft_lens.to(torch.int32)
    assert not p.is_contiguous() and not q.is_contiguous() and not drafts.is_contiguous()
    assert_same(tv.verify_drafts_triton(drafts, lens, p, greedy=True), reference.verify_drafts(drafts, lens, p, greedy=True))
    assert_same(
        tv.verify_drafts_triton(drafts, lens, p, q, _noise=_same_noise(batch, 1)),
        reference.verify_drafts(drafts, lens, p, q, _gen(1)),
    )


def test_empty_batch():
    batch = make_batch(14, B=1, K=2, V=5, lens=[2])
    empty = Batch(batch.draft_tokens[:0], batch.draft_lens[:0], batch.p[:0], batch.q[:0])
    for greedy in (True, False):
        got = tv.verify_drafts_triton(*empty.args(greedy), greedy=greedy)
        assert got.tokens.shape == (0, 3) and got.num_accepted.shape == (0,)


# ----------------------------------------------------------------------------
# Randomness: seeds, noise, distribution
# ----------------------------------------------------------------------------


def test_a_row_depends_only_on_its_own_seed():
    a = make_batch(15, B=2, K=3, V=12, lens=[3, 2], q_zero=0.3)
    seeds = torch.tensor([123, 456])
    ab = tv.verify_drafts_triton(*a.args(), seeds=seeds)
    # The same request at another batch position, next to a different neighbour.
    b = make_batch(16, B=2, K=3, V=12, lens=[1, 3])
    swapped = Batch(
        torch.stack([b.draft_tokens[0], a.draft_tokens[1]]),
        torch.stack([b.draft_lens[0], a.draft_lens[1]]),
        torch.stack([b.p[0], a.p[1]]),
        torch.stack([b.q[0], a.q[1]]),
    )
    other = tv.verify_drafts_triton(*swapped.args(), seeds=torch.tensor([999, 456]))
    assert torch.equal(other.tokens[1], ab.tokens[1]) and other.num_accepted[1] == ab.num_accepted[1]


def test_generator_controls_the_draws():
    batch = make_batch(17, B=8, K=2, V=16, lens=[2] * 8)
    run = lambda gen: tv.verify_drafts_triton(*batch.args(), generator=gen, nan_check="touched")  # noqa: E731
    a = run(_gen(1))
    assert_same(run(_gen(1)), a)
    b = run(_gen(2))
    assert not torch.equal(a.tokens, b.tokens)  # 8 rows alike under two seeds: a broken seed path
    # With no generator, torch's default RNG supplies the seeds.
    torch.manual_seed(5)
    c = run(None)
    torch.manual_seed(5)
    assert_same(run(None), c)


@triton.jit
def _noise_kernel(out_ptr, seed, BLOCK: tl.constexpr):
    start = tl.program_id(0) * BLOCK
    tl.store(out_ptr + start + tl.arange(0, BLOCK), _exponential_noise(seed, start, BLOCK))


def test_philox_exponential_noise():
    """The race's noise is Exp(1): KS test at alpha 1e-3 on 2**18 draws, the small-value
    tail that decides races (P(E < 1e-3) = 1 - e**-1e-3) within 5 sigma, no zeros,
    and no correlation between the four words of one Philox call (|r| < 5/sqrt(N))."""
    n, block = 2**18, 2**14
    out = torch.empty(n, dtype=torch.float32, device=DEVICE)
    _noise_kernel[(n // block,)](out, 20240607, BLOCK=block)
    e = out.double().cpu().numpy()
    assert np.isfinite(e).all() and (e > 0).all()
    assert stats.kstest(e, "expon").pvalue > 1e-3
    expected = n * -np.expm1(-1e-3)
    assert abs((e < 1e-3).sum() - expected) < 5 * np.sqrt(expected)
    assert abs(np.corrcoef(e[:-1], e[1:])[0, 1]) < 5 / np.sqrt(n)
    other = torch.empty_like(out)
    _noise_kernel[(n // block,)](other, 20240608, BLOCK=block)
    assert abs(np.corrcoef(e, other.double().cpu().numpy())[0, 1]) < 5 / np.sqrt(n)


def exact_distribution(p: torch.Tensor, q: torch.Tensor, drafts: torch.Tensor, length: int) -> np.ndarray:
    """P(num_accepted = n, emitted token = v) for one row of speculative sampling -> [K+1, V].

    Draft i is accepted with probability min(1, p_i(x_i) / q_i(x_i)) (1 if q = 0 < p,
    0 if p = q = 0); the first rejection at i emits from normalize(max(0, p_i - q_i))
    (p_i if that is all zero); surviving every draft emits the bonus from p_len.
    """
    p, q = p.double().cpu().numpy(), q.double().cpu().numpy()
    out = np.zeros(p.shape)
    reach = 1.0
    for i in range(length):
        x = int(drafts[i])
        pi, qi = p[i, x], q[i, x]
        accept = (1.0 if pi > 0 else 0.0) if qi == 0 else min(1.0, pi / qi)
        residual = np.clip(p[i] - q[i], 0.0, None)
        if residual.sum() <= 0:
            residual = p[i]
        out[i] = reach * (1.0 - accept) * residual / residual.sum()
        reach *= accept
    out[length] = reach * p[length] / p[length].sum()
    return out


def _pooled_pvalue(observed: np.ndarray, probs: np.ndarray) -> float:
    """chi2_pvalue after pooling cells of expected count < 5 (the chi-square
    approximation needs it); a sample in a probability-zero cell still gives 0."""
    observed, probs = observed.ravel().astype(np.float64), probs.ravel()
    if observed[probs <= 0].sum() > 0:
        return 0.0
    live = probs > 0
    observed, probs = observed[live], probs[live]
    small = probs * observed.sum() < 5
    if small.any():
        observed = np.append(observed[~small], observed[small].sum())
        probs = np.append(probs[~small], probs[small].sum())
    return chi2_pvalue(observed, probs)


def _row(drafts, length, p, q, dtype) -> Batch:
    """One request from explicit lists: drafts [K], p [K+1][V], q [K][V]."""
    return Batch(
        draft_tokens=torch.tensor([drafts], dtype=torch.int64, device=DEVICE),
        draft_lens=torch.tensor([length], device=DEVICE),
        p=torch.tensor([p], dtype=torch.float64, device=DEVICE).to(dtype),
        q=torch.tensor([q], dtype=torch.float64, device=DEVICE).to(dtype),
    )


# (request, rows sampled from the Triton kernels). Drafts are chosen so that both
# acceptance and rejection are likely at every position.
DIST_CONFIGS = {
    # K=2, dense, float32: reject at 0 (2/3), reject at 1 (1/9), bonus (2/9).
    "dense_k2": (
        lambda: _row(
            [4, 3], 2,
            [[0.30, 0.25, 0.20, 0.15, 0.10], [0.1, 0.4, 0.1, 0.2, 0.2], [0.05, 0.15, 0.3, 0.2, 0.3]],
            [[0.10, 0.15, 0.20, 0.25, 0.30], [0.3, 0.2, 0.05, 0.3, 0.15]],
            torch.float32,
        ),
        240,
    ),
    # Top-k/top-p style exact zeros in p and q, V = 6, bfloat16.
    "masked_bf16": (
        lambda: _row(
            [4], 1,
            [[0.4, 0, 0.3, 0, 0.2, 0.1], [0, 0.5, 0, 0.25, 0, 0.25]],
            [[0.2, 0.3, 0, 0, 0.5, 0]],
            torch.bfloat16,
        ),
        160,
    ),
    # A row of length 1 in a K=3 batch, float16: the bonus comes from position 1.
    "short_row_fp16": (
        lambda: _row(
            [2, 0, 0], 1,
            [[0.4, 0.3, 0.2, 0.1], [0.1, 0.2, 0.3, 0.4], [0.25] * 4, [0.25] * 4],
            [[0.1, 0.2, 0.3, 0.4], [0.25] * 4, [0.25] * 4],
            torch.float16,
        ),
        120,
    ),
}  # fmt: skip


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("name", sorted(DIST_CONFIGS))
def test_sampled_distribution_is_exact(name, backend):
    """Chi-square goodness of fit of (num_accepted, token) against the exact output
    distribution, at significance 1e-3 (fixed seeds: deterministic), with no sample
    allowed in a probability-zero cell. The rows of a launch are copies of one request.
    The torch backend runs with 50x the rows, which checks the analytic distribution
    itself; the Triton sample sizes are bounded by the interpreter's speed (~30-100 ms
    a row) and detect gross errors (a total-variation error of ~0.15 in the
    (num_accepted, token) law); the bit-exact comparisons with injected random numbers
    and the Philox noise test carry the fine-grained checks."""
    build, rows = DIST_CONFIGS[name]
    base = build()
    K, V, length = base.draft_tokens.shape[1], base.p.shape[2], int(base.draft_lens[0])
    probs = exact_distribution(base.p[0], base.q[0], base.draft_tokens[0], length)
    assert 0.05 < probs[:length].sum() < 0.95  # both rejections and acceptances are common
    rows *= 50 if backend == "torch" else 1
    batch = Batch(
        base.draft_tokens.expand(rows, -1),
        base.draft_lens.expand(rows),
        base.p.expand(rows, -1, -1),  # stride 0 over rows: exercises strided loads too
        base.q.expand(rows, -1, -1),
    )
    if backend == "triton":  # 'touched': the interpreter's time goes to the sampling itself
        res = tv.verify_drafts_triton(*batch.args(), generator=_gen(sum(map(ord, name))), nan_check="touched")
    else:
        res = reference.verify_drafts(*batch.args(), generator=_gen(sum(map(ord, name))))
    n = res.num_accepted.cpu().numpy()
    tok = res.tokens.cpu().numpy()[np.arange(rows), n]
    observed = np.zeros((K + 1, V))
    np.add.at(observed, (n, tok), 1)
    assert _pooled_pvalue(observed, probs) > 1e-3, (observed, probs * rows)


# ----------------------------------------------------------------------------
# Bad input and dispatch
# ----------------------------------------------------------------------------


def _base():
    return make_batch(30, B=2, K=3, V=8, lens=[3, 1])


def _with(**changes):
    b = _base()
    args = dict(draft_tokens=b.draft_tokens, draft_lens=b.draft_lens, target_probs=b.p, draft_probs=b.q)
    args.update(changes)
    return args


def _nan_at(t: torch.Tensor, index) -> torch.Tensor:
    t = t.clone()
    t[index] = float("nan")
    return t


BAD_INPUTS = {
    "tokens_not_2d": lambda: _with(draft_tokens=_base().draft_tokens[0]),
    "tokens_float": lambda: _with(draft_tokens=_base().draft_tokens.float()),
    "lens_wrong_shape": lambda: _with(draft_lens=torch.tensor([3, 1, 0], device=DEVICE)),
    "lens_float": lambda: _with(draft_lens=_base().draft_lens.float()),
    "target_wrong_k": lambda: _with(target_probs=_base().p[:, :3]),
    "target_not_float": lambda: _with(target_probs=(_base().p * 100).long(), draft_probs=None, greedy=True),
    "draft_probs_wrong_v": lambda: _with(draft_probs=_base().q[:, :, :7]),
    "dtype_mismatch": lambda: _with(draft_probs=_base().q.double()),
    "empty_vocab": lambda: _with(target_probs=_base().p[:, :, :0], draft_probs=_base().q[:, :, :0]),
    "negative_length": lambda: _with(draft_lens=torch.tensor([3, -1], device=DEVICE)),
    "length_above_k": lambda: _with(draft_lens=torch.tensor([4, 1], device=DEVICE)),
    "token_negative": lambda: _with(draft_tokens=_base().draft_tokens * 0 - 1),
    "token_out_of_vocab_in_padding": lambda: _with(
        draft_tokens=torch.tensor([[1, 2, 3], [1, 8, 0]], device=DEVICE)  # row 1 has length 1
    ),
    # NaNs where no result depends on them: the reference still rejects them.
    "target_nan_past_length": lambda: _with(target_probs=_nan_at(_base().p, (1, 3, 2))),
    "draft_probs_nan": lambda: _with(draft_probs=_nan_at(_base().q, (0, 2, 5))),
    "greedy_target_nan": lambda: _with(target_probs=_nan_at(_base().p, (0, 1, 0)), draft_probs=None, greedy=True),
    "point_mass_target_nan": lambda: _with(target_probs=_nan_at(_base().p, (1, 3, 2)), draft_probs=None),
    "greedy_with_draft_probs": lambda: _with(greedy=True),
}


@pytest.mark.parametrize("name", sorted(BAD_INPUTS))
def test_bad_input_is_rejected_identically(name):
    args = BAD_INPUTS[name]()
    messages = {}
    for backend in ("torch", "triton"):
        with pytest.raises(ValueError) as info:
            kernels.verify_drafts(**args, generator=_gen(0), backend=backend)
        messages[backend] = str(info.value)
    assert messages["torch"] == messages["triton"]
    assert messages["torch"]  # a message that says what is wrong


def test_touched_nan_check_reports_nan_it_reads():
    """nan_check='touched' reads only what the result needs, so it reports NaN there
    (and, by design, not elsewhere); 'full' (the default) reports it anywhere."""
    b = _base()
    b.draft_lens[:] = torch.tensor([0, 0])  # bonus from position 0; nothing else is read
    nan_read = _nan_at(b.p, (0, 0, 3))
    with pytest.raises(ValueError, match="target_probs contains NaN"):
        tv.verify_drafts_triton(b.draft_tokens, b.draft_lens, nan_read, b.q, nan_check="touched")
    nan_unread = _nan_at(b.p, (0, 2, 3))
    tv.verify_drafts_triton(b.draft_tokens, b.draft_lens, nan_unread, b.q, nan_check="touched")
    with pytest.raises(ValueError, match="target_probs contains NaN"):
        tv.verify_drafts_triton(b.draft_tokens, b.draft_lens, nan_unread, b.q)
    with pytest.raises(ValueError, match="nan_check"):
        tv.verify_drafts_triton(*b.args(), nan_check="some")
    # The public entry point passes the choice through to the kernels.
    kernels.verify_drafts(b.draft_tokens, b.draft_lens, nan_unread, b.q, backend="triton", nan_check="touched")
    with pytest.raises(ValueError, match="target_probs contains NaN"):
        kernels.verify_drafts(b.draft_tokens, b.draft_lens, nan_unread, b.q, backend="triton")
    with pytest.raises(ValueError, match="nan_check"):
        kernels.verify_drafts(*b.args(), nan_check="some")


def test_public_entry_point_dispatch(monkeypatch):
    batch = make_batch(31, B=3, K=2, V=9, lens=[2, 1, 0])
    calls = []
    real = tv.verify_drafts_triton

    def spy(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(tv, "verify_drafts_triton", spy)
    want = reference.verify_drafts(*batch.args(), generator=_gen(3))
    auto = kernels.verify_drafts(*batch.args(), generator=_gen(3))
    if DEVICE == "cpu":  # auto: the reference on CPU tensors, the kernels on CUDA tensors
        assert not calls
        assert_same(auto, want)
    else:
        assert len(calls) == 1
    calls.clear()
    assert_same(
        kernels.verify_drafts(*batch.args(True), greedy=True, backend="triton"),
        reference.verify_drafts(*batch.args(True), greedy=True),
    )
    assert len(calls) == 1
    assert_same(kernels.verify_drafts(*batch.args(), generator=_gen(3), backend="torch"), want)
    with pytest.raises(ValueError, match="backend"):
        kernels.verify_drafts(*batch.args(), backend="cuda")


_COMPILE_SCRIPT = r"""
import inspect, sys
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import kernels.triton_verify as tv

assert not tv.INTERPRETED
PTRS = {
    "tokens_ptr": "*i64", "num_acc_ptr": "*i64", "err_ptr": "*i32", "lens_ptr": "*i64", "draft_tok_ptr": "*i64",
    "part_val_ptr": "*fp32", "part_idx_ptr": "*i32", "part_r_val_ptr": "*fp32", "part_r_idx_ptr": "*i32",
    "part_p_val_ptr": "*fp32", "part_p_idx_ptr": "*i32", "part_r_any_ptr": "*i32", "seed_ptr": "*i64",
    "u_ptr": "*fp32", "e_ptr": "*fp32", "p_ptr": "*bf16", "q_ptr": "*bf16",
}

def build(fn, **constexprs):
    names = inspect.signature(fn.fn).parameters
    sig = {n: "constexpr" if n in constexprs else PTRS.get(n, "i32") for n in names}
    triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs), target=GPUTarget("cuda", 90, 32))

build(tv._greedy_argmax_kernel, NUM_SPLITS=2, BLOCK_V=1024, ACC_DTYPE=tl.float32, FULL_NAN_CHECK=True)
build(tv._greedy_finalize_kernel, NUM_SPLITS=2, BLOCK_K1=16, BLOCK_S=2)
for full, ext, point in [(True, False, False), (False, True, False), (True, False, True), (False, False, True)]:
    build(tv._sample_kernel, NUM_SPLITS=2, BLOCK_K=8, BLOCK_K1=16, BLOCK_V=1024, WIDE_DTYPE=tl.float32,
          FULL_NAN_CHECK=full, EXTERNAL_NOISE=ext, POINT_MASS=point)
build(tv._sample_kernel, NUM_SPLITS=1, BLOCK_K=8, BLOCK_K1=16, BLOCK_V=1024, WIDE_DTYPE=tl.float32,
      FULL_NAN_CHECK=False, EXTERNAL_NOISE=False, POINT_MASS=False)
build(tv._sample_finalize_kernel, NUM_SPLITS=2, BLOCK_K1=16, BLOCK_S=2)
print("compiled")
"""


def test_kernels_compile_for_a_gpu():
    """The interpreter accepts code the GPU compiler rejects (e.g. non-constexpr
    globals), so compile every kernel for sm_90 ahead of time, through ptxas, in a
    process without TRITON_INTERPRET. No GPU is needed for that."""
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = subprocess.run(
        [sys.executable, "-c", _COMPILE_SCRIPT], cwd=root, env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0 and "compiled" in out.stdout, out.stderr[-3000:]


# ----------------------------------------------------------------------------
# Deterministic drafts: a point mass at each draft, q never materialised
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(4))
def test_point_mass_matches_reference_bit_for_bit(seed):
    """draft_probs=None with greedy=False: the kernels and the reference agree exactly
    when fed the same random numbers, and equal the dense one-hot q they stand for."""
    batch = make_batch(40 + seed, B=6, K=4, V=37, lens=[4, 3, 0, 1, 4, 2])
    point = Batch(batch.draft_tokens, batch.draft_lens, batch.p, None)
    one_hot = torch.nn.functional.one_hot(batch.draft_tokens.long(), 37).to(batch.p.dtype)
    noise = _same_noise(batch, seed)
    want = reference.verify_drafts(batch.draft_tokens, batch.draft_lens, batch.p, None, _gen(seed))
    assert_same(tv.verify_drafts_triton(*point.args(), _noise=noise, block_v=16, num_splits=2), want)
    assert_same(reference.verify_drafts(batch.draft_tokens, batch.draft_lens, batch.p, one_hot, _gen(seed)), want)
    got = tv.verify_drafts_triton(*point.args(), generator=_gen(seed))
    assert_valid_sample(Batch(batch.draft_tokens, batch.draft_lens, batch.p, one_hot), got)
