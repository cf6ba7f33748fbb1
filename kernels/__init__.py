"""Token-verification kernels for speculative decoding.

``verify_drafts`` is the one public entry point; the decoding core calls it and
never a backend directly. ``backend="auto"`` runs the fused Triton kernels on
CUDA tensors and the torch reference (``kernels/reference.py``) elsewhere.
"""

from __future__ import annotations

from typing import Literal

import torch

from kernels.reference import PAD, VerificationResult, check_inputs
from kernels.reference import verify_drafts as _verify_torch

Backend = Literal["auto", "triton", "torch"]

__all__ = ["PAD", "VerificationResult", "check_inputs", "verify_drafts"]


def verify_drafts(
    draft_tokens: torch.Tensor,
    draft_lens: torch.Tensor,
    target_probs: torch.Tensor,
    draft_probs: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    *,
    greedy: bool = False,
    backend: Backend = "auto",
    nan_check: Literal["full", "touched"] = "full",
    seeds: torch.Tensor | None = None,
) -> VerificationResult:
    """Verify a batch of drafts; same contract as :func:`kernels.reference.verify_drafts`.

    ``greedy`` selects argmax verification; otherwise drafts are verified by
    speculative sampling against ``draft_probs``, or, when it is None, against a
    point mass at each draft (deterministic drafters), which is never materialised.

    ``nan_check`` (Triton only): ``"full"`` reads every element of p and q to reject NaN, like
    the reference; ``"touched"`` checks only the elements the maths reads, which saves a full
    pass over [B, K+1, V] at large V. The torch reference always checks fully.

    ``seeds`` ([B] int64, sampling only) gives each row its own random numbers: a row's
    result then depends on its seed and inputs alone, whatever else shares the batch, which
    is what lets concurrent requests share one call and stay reproducible. Without it every
    random number comes from ``generator``.
    """
    if nan_check not in ("full", "touched"):
        raise ValueError(f"nan_check must be 'full' or 'touched', got {nan_check!r}")
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}")
    use_triton = backend == "triton" or (backend == "auto" and target_probs.is_cuda)
    if use_triton:
        from kernels.triton_verify import verify_drafts_triton

        return verify_drafts_triton(
            draft_tokens, draft_lens, target_probs, draft_probs, generator, greedy=greedy, nan_check=nan_check,
            seeds=seeds,
        )  # fmt: skip
    if seeds is None or greedy:
        return _verify_torch(draft_tokens, draft_lens, target_probs, draft_probs, generator, greedy=greedy)
    return _verify_torch_seeded(draft_tokens, draft_lens, target_probs, draft_probs, seeds)


def _verify_torch_seeded(
    draft_tokens: torch.Tensor,
    draft_lens: torch.Tensor,
    target_probs: torch.Tensor,
    draft_probs: torch.Tensor | None,
    seeds: torch.Tensor,
) -> VerificationResult:
    """The reference, one row at a time at the row's own draft length, each row drawing from a
    generator seeded with its seed: what a row draws never depends on the batch's K or B."""
    check_inputs(draft_tokens, draft_lens, target_probs, draft_probs)
    B, K = draft_tokens.shape
    if seeds.shape != (B,):
        raise ValueError(f"seeds must be [B]=[{B}], got shape {tuple(seeds.shape)}")
    device = target_probs.device
    tokens = torch.full((B, K + 1), PAD, dtype=torch.int64, device=device)
    num_accepted = torch.zeros((B,), dtype=torch.int64, device=device)
    for b, (k, seed) in enumerate(zip(draft_lens.tolist(), seeds.tolist())):
        row = _verify_torch(
            draft_tokens[b : b + 1, :k], draft_lens[b : b + 1], target_probs[b : b + 1, : k + 1],
            None if draft_probs is None else draft_probs[b : b + 1, :k],
            torch.Generator(device).manual_seed(seed),
        )  # fmt: skip
        tokens[b, : k + 1] = row.tokens[0]
        num_accepted[b] = row.num_accepted[0]
    return VerificationResult(tokens=tokens, num_accepted=num_accepted)
