"""Reference verification maths for speculative decoding, in plain torch.

This is the contract: the Triton kernels in this package are tested against
:func:`verify_drafts`, and the decoding core only ever calls the public entry
point :func:`kernels.verify_drafts`, which dispatches here on CPU.

Rows are independent requests. Row ``b`` proposed ``draft_lens[b]`` tokens
(0 <= draft_lens[b] <= K); the verifier scored K+1 positions for it, where
position ``i`` is the target distribution for draft token ``i`` and position
``draft_lens[b]`` gives the bonus token when every draft is accepted.

Greedy (``greedy=True``): accept while the draft equals the target argmax,
then emit the target argmax at the first mismatch (or the bonus).

Sampling (speculative sampling, Leviathan et al. 2023 / Chen et al. 2023):
accept draft ``x_i`` with probability ``min(1, p_i(x_i) / q_i(x_i))``; at the
first rejection emit a token from ``normalize(max(0, p_i - q_i))``; when every
draft is accepted emit a bonus token from ``p_L``. The emitted sequence then
has exactly the target distribution, whatever the draft distribution was.

A deterministic drafter (greedy drafting, n-gram lookup) proposes from a point
mass: ``draft_probs=None`` with ``greedy=False``. Then q is one-hot at the draft
without ever being materialised: accept with probability ``p_i(x_i)``, and
after a rejection sample from p with ``x_i`` removed (vLLM's rejection sampler
does the same for ``draft_probs=None``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

PAD = -1


@dataclass(frozen=True)
class VerificationResult:
    """Outcome of verifying a batch of drafts.

    tokens: [B, K+1] int64. Row b holds the ``num_accepted[b]`` accepted draft
        tokens, then exactly one correction or bonus token, then ``PAD`` (-1).
    num_accepted: [B] int64, drafts accepted per row, in [0, draft_lens[b]].
    """

    tokens: torch.Tensor
    num_accepted: torch.Tensor


def check_inputs(
    draft_tokens: torch.Tensor,
    draft_lens: torch.Tensor,
    target_probs: torch.Tensor,
    draft_probs: torch.Tensor | None,
    greedy: bool = False,
) -> None:
    """Raise ``ValueError`` naming the first problem with the inputs.

    Shared by every backend so that they all reject the same inputs the same way.
    """
    if greedy and draft_probs is not None:
        raise ValueError("greedy verification takes no draft_probs (pass draft_probs=None)")
    if draft_tokens.dim() != 2:
        raise ValueError(f"draft_tokens must be [B, K], got shape {tuple(draft_tokens.shape)}")
    B, K = draft_tokens.shape
    if draft_tokens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"draft_tokens must be int32 or int64, got {draft_tokens.dtype}")
    if draft_lens.shape != (B,):
        raise ValueError(f"draft_lens must be [B]=[{B}], got shape {tuple(draft_lens.shape)}")
    if draft_lens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"draft_lens must be int32 or int64, got {draft_lens.dtype}")
    if target_probs.dim() != 3 or target_probs.shape[:2] != (B, K + 1):
        raise ValueError(
            f"target_probs must be [B, K+1, V]=[{B}, {K + 1}, V], got shape {tuple(target_probs.shape)}"
        )
    if not target_probs.is_floating_point():
        raise ValueError(f"target_probs must be floating point, got {target_probs.dtype}")
    V = target_probs.shape[2]
    if V < 1:
        raise ValueError("target_probs has an empty vocabulary (V=0)")
    devices = {draft_tokens.device, draft_lens.device, target_probs.device}
    if draft_probs is not None:
        if draft_probs.shape != (B, K, V):
            raise ValueError(
                f"draft_probs must be [B, K, V]=[{B}, {K}, {V}], got shape {tuple(draft_probs.shape)}"
            )
        if draft_probs.dtype != target_probs.dtype:
            raise ValueError(
                f"draft_probs dtype {draft_probs.dtype} differs from target_probs dtype {target_probs.dtype}"
            )
        devices.add(draft_probs.device)
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")
    if B == 0:
        return
    if int(draft_lens.min()) < 0:
        raise ValueError("draft_lens contains a negative length")
    if int(draft_lens.max()) > K:
        raise ValueError(f"draft_lens contains a length greater than K={K}")
    if K > 0 and (int(draft_tokens.min()) < 0 or int(draft_tokens.max()) >= V):
        # Padding beyond a row's length must still be a valid id; callers pad with 0.
        raise ValueError(f"draft_tokens must lie in [0, V={V})")
    if torch.isnan(target_probs).any():
        raise ValueError("target_probs contains NaN")
    if draft_probs is not None and torch.isnan(draft_probs).any():
        raise ValueError("draft_probs contains NaN")


def _sample(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Sample one index per row of ``probs`` [N, V] (unnormalised, >= 0) -> [N] int64.

    Uses the exponential race ``argmax(p / E), E ~ Exp(1)``: the same trick the
    Triton kernel uses, because it needs no normalisation and no cumulative sum.
    """
    noise = torch.empty_like(probs, dtype=torch.float32).exponential_(generator=generator)
    return (probs.float() / noise).argmax(dim=-1)


def verify_drafts(
    draft_tokens: torch.Tensor,
    draft_lens: torch.Tensor,
    target_probs: torch.Tensor,
    draft_probs: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    *,
    greedy: bool = False,
) -> VerificationResult:
    """Accept or reject a batch of drafts; emit one correction or bonus token per row.

    Args:
        draft_tokens: [B, K] int32/int64 proposed ids; entries past a row's length
            are ignored but must be valid ids (pad with 0).
        draft_lens: [B] int32/int64, number of real drafts per row, 0 <= len <= K.
        target_probs: [B, K+1, V] float, the verifier's (processed) distributions.
            For greedy decoding only the argmax matters, so logits work too.
        draft_probs: [B, K, V] float, the drafter's distributions the drafts were
            sampled from; None when the drafts are deterministic (a point mass at
            each draft), and always None for greedy verification.
        generator: source of all random numbers (sampling only); a per-request
            generator makes a seeded request reproducible.
        greedy: argmax verification (temperature 0) instead of speculative sampling.

    Returns:
        VerificationResult with tokens [B, K+1] int64 (padded with -1) and
        num_accepted [B] int64.
    """
    check_inputs(draft_tokens, draft_lens, target_probs, draft_probs, greedy)
    B, K = draft_tokens.shape
    device = target_probs.device
    draft_tokens = draft_tokens.long()
    lens = draft_lens.long()
    positions = torch.arange(K, device=device)
    in_draft = positions[None, :] < lens[:, None]  # [B, K]

    if greedy:
        target_ids = target_probs.argmax(dim=-1)  # [B, K+1]
        accepted = (draft_tokens == target_ids[:, :K]) & in_draft
    else:
        p = target_probs[:, :K].gather(-1, draft_tokens[..., None]).squeeze(-1).float()
        if draft_probs is None:  # point mass: q(x) = 1
            q = torch.ones_like(p)
        else:
            q = draft_probs.gather(-1, draft_tokens[..., None]).squeeze(-1).float()
        u = torch.rand(B, K, device=device, generator=generator)
        # u * q < p  <=>  u < p / q, without dividing by a zero q.
        accepted = (u * q < p) & in_draft

    # Length of the leading run of accepted drafts.
    num_accepted = accepted.long().cumprod(dim=1).sum(dim=1)  # [B]
    rows = torch.arange(B, device=device)
    p_next = target_probs[rows, num_accepted]  # [B, V] target at the first non-accepted slot

    if greedy:
        next_token = p_next.argmax(dim=-1)
    else:
        rejected = num_accepted < lens
        if draft_probs is None:
            # max(0, p - onehot(x)) is p with x removed.
            x = draft_tokens[rows, num_accepted.clamp(max=K - 1)] if K > 0 else torch.zeros_like(rows)
            residual = torch.where(rejected[:, None], p_next.scatter(-1, x[:, None], 0.0), p_next)
        else:
            q_next = draft_probs[rows, num_accepted.clamp(max=K - 1)] if K > 0 else torch.zeros_like(p_next)
            residual = torch.where(rejected[:, None], (p_next - q_next).clamp(min=0), p_next)
        # p == q makes a rejection a probability-zero event, but a draft token
        # with p = q = 0 can still be rejected; the residual is then all zero and
        # p itself is the right distribution to fall back on.
        empty = residual.sum(dim=-1, keepdim=True) <= 0
        residual = torch.where(empty, p_next, residual)
        next_token = _sample(residual, generator)

    tokens = torch.full((B, K + 1), PAD, dtype=torch.int64, device=device)
    keep = positions[None, :] < num_accepted[:, None]
    tokens[:, :K] = torch.where(keep, draft_tokens, PAD)
    tokens[rows, num_accepted] = next_token
    return VerificationResult(tokens=tokens, num_accepted=num_accepted)
