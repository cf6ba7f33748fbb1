"""Logprobs of generated tokens, as vLLM reports them by default.

vLLM 0.32's default ``logprobs_mode`` is ``raw_logprobs``: the log-softmax of
the model's logits *before* penalties, temperature, top-k/top-p and the other
sampling processors, but after the structured-output grammar mask (vLLM's
model runner applies the bitmask before its sampler). tandem matches that: the
numbers come from the verifier's row that decided each token (the drafter's
only in ``drafter-only`` mode, where no verifier runs), with the grammar mask
and nothing else applied. They do not depend on what the drafter proposed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token: its logprob and rank (1 = most likely), and the ``top`` most likely
    (token id, logprob) pairs, best first."""

    token_id: int
    logprob: float
    rank: int
    top: tuple[tuple[int, float], ...]


def token_logprobs(logits: torch.Tensor, tokens: Sequence[int], top: int) -> list[TokenLogprob]:
    """logits: [n, V] float32, row i the distribution ``tokens[i]`` was drawn from (n >= len(tokens)).

    Returns one :class:`TokenLogprob` per token, with ``top`` (0-20) alternatives each.
    """
    n = len(tokens)
    if n == 0:
        return []
    logprobs = torch.log_softmax(logits[:n].float(), dim=-1)
    ids = torch.tensor(list(tokens), device=logprobs.device)
    chosen = logprobs.gather(-1, ids[:, None])  # [n, 1]
    ranks = (logprobs > chosen).sum(dim=-1) + 1
    if top > 0:
        values, indices = torch.topk(logprobs, min(top, logprobs.shape[-1]), dim=-1)
        pairs = [tuple(zip(i, v)) for i, v in zip(indices.tolist(), values.tolist())]
    else:
        pairs = [() for _ in range(n)]
    return [
        TokenLogprob(token_id=t, logprob=lp, rank=r, top=p)
        for t, lp, r, p in zip(tokens, chosen[:, 0].tolist(), ranks.tolist(), pairs)
    ]
