"""Sampling parameters and the logits processing shared by drafter and verifier.

Speculative sampling is lossless with respect to the distribution the verifier
samples from, so temperature, top-k and top-p are applied to *both* models with
the same function: the output then follows the verifier's processed
distribution exactly, which is what ``verifier-only`` sampling produces.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

#: The smallest normal float32: a smaller temperature behaves as this one (the one-hot limit).
_TINY_FLOAT32 = torch.finfo(torch.float32).tiny


class InvalidRequestError(ValueError):
    """A request parameter is invalid. ``param`` names it (OpenAI's error ``param``);
    ``code`` is OpenAI's error code where one applies (``context_length_exceeded``)."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param = param
        self.code = code


@dataclass(frozen=True)
class SamplingParams:
    """What to generate. ``temperature == 0`` means greedy.

    top_k == 0 and top_p == 1 disable those filters (vLLM's conventions).
    """

    max_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        else:
            object.__setattr__(self, "stop", tuple(self.stop))
        self.validate()

    def validate(self) -> None:
        if not isinstance(self.max_tokens, int) or self.max_tokens <= 0:
            raise InvalidRequestError(f"max_tokens must be a positive integer, got {self.max_tokens!r}", "max_tokens")
        if not (self.temperature >= 0) or self.temperature != self.temperature or self.temperature == float("inf"):
            raise InvalidRequestError(f"temperature must be a finite number >= 0, got {self.temperature!r}", "temperature")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise InvalidRequestError(f"top_k must be an integer >= 0 (0 disables it), got {self.top_k!r}", "top_k")
        if not (0 < self.top_p <= 1):
            raise InvalidRequestError(f"top_p must be in (0, 1], got {self.top_p!r}", "top_p")
        if self.seed is not None and not isinstance(self.seed, int):
            raise InvalidRequestError(f"seed must be an integer, got {self.seed!r}", "seed")
        if any(not isinstance(s, str) or s == "" for s in self.stop):
            raise InvalidRequestError("stop must be non-empty strings", "stop")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def logits_to_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Apply temperature, top-k and top-p; return probabilities.

    Args:
        logits: [N, V] float, raw next-token logits.
    Returns:
        [N, V] float32 probabilities with filtered entries exactly 0.
        For greedy params the argmax is what matters; this returns softmax(logits).
    """
    logits = logits.float()
    if params.greedy:
        return torch.softmax(logits, dim=-1)
    # Shift the maximum to 0 before scaling, and keep the divisor a normal float32: a tiny positive
    # temperature (1e-45, 5e-324) then sends every other logit to -inf instead of the maximum to inf
    # (or 0/0), and the result is its limit, one-hot on the argmax (uniform over exact ties).
    logits = logits - logits.amax(dim=-1, keepdim=True)
    logits = logits / max(params.temperature, _TINY_FLOAT32)
    V = logits.shape[-1]
    if 0 < params.top_k < V:
        kth = torch.topk(logits, params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        sorted_probs = torch.softmax(sorted_logits, dim=-1)
        # Keep the smallest prefix whose mass reaches top_p: drop a token when
        # the mass strictly before it already reaches top_p. Always keeps the top token.
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        drop_sorted = mass_before >= params.top_p
        drop_sorted[..., 0] = False  # even when top_p rounds to 0 in float32 (top_p < 1e-45): top-1
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return torch.softmax(logits, dim=-1)


def sample(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Draw one token per row of ``probs`` [N, V] -> [N] int64."""
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
