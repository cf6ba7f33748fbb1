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
) -> VerificationResult:
    """Verify a batch of drafts; same contract as :func:`kernels.reference.verify_drafts`.

    ``greedy`` selects argmax verification; otherwise drafts are verified by
    speculative sampling against ``draft_probs``, or, when it is None, against a
    point mass at each draft (deterministic drafters), which is never materialised.

    ``nan_check`` (Triton only): ``"full"`` reads every element of p and q to reject NaN, like
    the reference; ``"touched"`` checks only the elements the maths reads, which saves a full
    pass over [B, K+1, V] at large V. The torch reference always checks fully.
    """
    if nan_check not in ("full", "touched"):
        raise ValueError(f"nan_check must be 'full' or 'touched', got {nan_check!r}")
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}")
    use_triton = backend == "triton" or (backend == "auto" and target_probs.is_cuda)
    if use_triton:
        from kernels.triton_verify import verify_drafts_triton

        return verify_drafts_triton(
            draft_tokens, draft_lens, target_probs, draft_probs, generator, greedy=greedy, nan_check=nan_check
        )
    return _verify_torch(draft_tokens, draft_lens, target_probs, draft_probs, generator, greedy=greedy)
