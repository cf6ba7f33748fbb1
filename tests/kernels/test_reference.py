"""The torch reference for draft verification, checked against exact analytic results."""

from __future__ import annotations

import pytest
import torch
from kernels import PAD, verify_drafts
from tests.support.stats import chi2_pvalue


def _probs(rows: list[list[float]]) -> torch.Tensor:
    t = torch.tensor(rows, dtype=torch.float32)
    return t / t.sum(-1, keepdim=True)


def test_greedy_accepts_matching_prefix_then_corrects():
    V = 6
    target = torch.zeros(2, 4, V)
    # Target argmaxes: row 0 -> 1, 2, 3, 4 ; row 1 -> 5, 0, 0, 2
    for b, ids in enumerate([[1, 2, 3, 4], [5, 0, 0, 2]]):
        for i, t in enumerate(ids):
            target[b, i, t] = 1.0
    drafts = torch.tensor([[1, 2, 0], [5, 0, 0]])
    out = verify_drafts(drafts, torch.tensor([3, 3]), target, greedy=True)
    assert out.num_accepted.tolist() == [2, 3]
    assert out.tokens.tolist() == [[1, 2, 3, PAD], [5, 0, 0, 2]]  # correction 3; bonus 2


def test_greedy_respects_draft_lengths_including_zero():
    V = 4
    target = torch.zeros(3, 3, V)
    target[..., 1] = 1.0  # argmax 1 everywhere
    drafts = torch.tensor([[1, 1], [1, 1], [1, 1]])
    out = verify_drafts(drafts, torch.tensor([0, 1, 2]), target, greedy=True)
    assert out.num_accepted.tolist() == [0, 1, 2]
    assert out.tokens.tolist() == [[1, PAD, PAD], [1, 1, PAD], [1, 1, 1]]


def test_acceptance_count_matches_analytic_law():
    """P(draft i accepted | all before accepted) = sum_x min(p_i(x), q_i(x)) = 1 - TV(p_i, q_i)."""
    g = torch.Generator().manual_seed(0)
    V, K, B = 5, 3, 40_000
    p = _probs([[5, 1, 1, 2, 1], [1, 1, 6, 1, 1], [2, 2, 2, 2, 2], [1, 3, 1, 3, 2]])  # [K+1, V]
    q = _probs([[1, 1, 5, 2, 1], [1, 2, 4, 2, 1], [4, 1, 1, 1, 3]])  # [K, V]
    drafts = torch.stack([torch.multinomial(q[i], B, replacement=True, generator=g) for i in range(K)], dim=1)
    out = verify_drafts(
        drafts, torch.full((B,), K), p.expand(B, K + 1, V), q.expand(B, K, V).contiguous(), generator=g
    )
    beta = torch.minimum(p[:K], q).sum(-1)  # per-position acceptance probability
    expected = [1 - beta[0]]
    for n in range(1, K):
        expected.append(beta[:n].prod() * (1 - beta[n]))
    expected.append(beta.prod())
    counts = torch.bincount(out.num_accepted, minlength=K + 1).numpy()
    assert chi2_pvalue(counts, torch.stack(expected)) > 1e-3, (counts, expected)


def test_emitted_tokens_follow_target_distribution_exactly():
    """Speculative sampling is lossless: with position-independent targets the
    emitted tokens are independent draws from p_0, p_1, ... whatever q is.
    Includes zeros in p at draft tokens and in q (top-k style masking)."""
    g = torch.Generator().manual_seed(1)
    V, K, B = 4, 2, 60_000
    p = _probs([[6, 0, 3, 1], [0, 2, 2, 6], [3, 3, 0, 4]])
    q = _probs([[1, 5, 4, 0], [5, 0, 1, 4]])
    drafts = torch.stack([torch.multinomial(q[i], B, replacement=True, generator=g) for i in range(K)], dim=1)
    out = verify_drafts(drafts, torch.full((B,), K), p.expand(B, K + 1, V), q.expand(B, K, V).contiguous(), g)
    first = out.tokens[:, 0]
    assert chi2_pvalue(torch.bincount(first, minlength=V), p[0]) > 1e-3
    has_second = out.tokens[:, 1] != PAD
    second = out.tokens[has_second, 1]
    n2 = int(has_second.sum())
    assert chi2_pvalue(torch.bincount(second, minlength=V), p[1]) > 1e-3
    # Given that draft 0 was accepted (so a second token exists), the first token
    # is distributed as min(p0, q0) (normalised) and the second, independently, as p1.
    joint = torch.zeros(V, V)
    joint.index_put_((first[has_second], second), torch.ones(n2), accumulate=True)
    assert chi2_pvalue(joint, torch.outer(torch.minimum(p[0], q[0]), p[1])) > 1e-3


def test_identical_p_and_q_accept_everything():
    g = torch.Generator().manual_seed(2)
    V, K, B = 7, 4, 2000
    p = torch.softmax(torch.randn(B, K + 1, V, generator=g), -1)
    drafts = torch.multinomial(p[:, :K].reshape(-1, V), 1, generator=g).reshape(B, K)
    out = verify_drafts(drafts, torch.full((B,), K), p, p[:, :K].contiguous(), g)
    assert out.num_accepted.eq(K).all()


def test_same_generator_state_reproduces_samples():
    V, K, B = 9, 3, 64
    p = torch.softmax(torch.randn(B, K + 1, V), -1)
    q = torch.softmax(torch.randn(B, K, V), -1)
    drafts = torch.randint(0, V, (B, K))
    a = verify_drafts(drafts, torch.full((B,), K), p, q, torch.Generator().manual_seed(7))
    b = verify_drafts(drafts, torch.full((B,), K), p, q, torch.Generator().manual_seed(7))
    assert torch.equal(a.tokens, b.tokens)


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda a: a.update(draft_lens=torch.tensor([-1, 1])), "negative"),
        (lambda a: a.update(draft_lens=torch.tensor([3, 1])), "greater than K"),
        (lambda a: a.update(target_probs=torch.rand(2, 2, 5)), r"target_probs must be \[B, K\+1, V\]"),
        (lambda a: a.update(draft_probs=torch.rand(2, 2, 4)), r"draft_probs must be \[B, K, V\]"),
        (lambda a: a.update(draft_probs=torch.rand(2, 2, 5, dtype=torch.float64)), "dtype"),
        (lambda a: a.update(draft_tokens=torch.zeros(2, 2)), "int32 or int64"),
        (lambda a: a["target_probs"].__setitem__((0, 0, 0), float("nan")), "NaN"),
        (lambda a: a.update(draft_tokens=torch.tensor([[0, 9], [0, 0]])), r"\[0, V=5\)"),
    ],
)
def test_bad_inputs_raise_clear_errors(mutate, match):
    args = dict(
        draft_tokens=torch.zeros(2, 2, dtype=torch.long),
        draft_lens=torch.tensor([2, 1]),
        target_probs=torch.rand(2, 3, 5),
        draft_probs=torch.rand(2, 2, 5),
    )
    mutate(args)
    with pytest.raises(ValueError, match=match):
        verify_drafts(**args, backend="torch")


def test_point_mass_drafts_emit_the_target_distribution_exactly():
    """A deterministic draft (q one-hot, never materialised): the first emitted token
    follows p_0 exactly, whichever token was drafted, and the draft is accepted with
    probability p_0(draft)."""
    g = torch.Generator().manual_seed(3)
    V, K, B = 5, 2, 40_000
    p = _probs([[5, 1, 1, 2, 1], [1, 1, 6, 1, 1], [2, 2, 2, 2, 2]])  # [K+1, V]
    drafts = torch.tensor([[3, 2]]).expand(B, K).contiguous()  # always propose 3, then 2
    out = verify_drafts(drafts, torch.full((B,), K), p.expand(B, K + 1, V), None, g)
    first = torch.bincount(out.tokens[:, 0], minlength=V).numpy()
    assert chi2_pvalue(first, p[0]) > 1e-3, first
    accept_rate = (out.num_accepted > 0).float().mean().item()
    assert abs(accept_rate - p[0, 3].item()) < 0.01
