"""Sampling parameters and the logits processing shared by drafter and verifier.

Speculative sampling is lossless with respect to the distribution the verifier
samples from, so temperature, top-k and top-p are applied to *both* models with
the same function: the output then follows the verifier's processed
distribution exactly, which is what ``verifier-only`` sampling produces.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

#: The smallest normal float32: a smaller temperature behaves as this one (the one-hot limit).
_TINY_FLOAT32 = torch.finfo(torch.float32).tiny
#: Most alternatives a request may ask for per token (OpenAI's top_logprobs limit).
MAX_LOGPROBS = 20


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

    top_k == 0 and top_p == 1 disable those filters (vLLM's conventions). The
    fields after ``ignore_eos`` are vLLM's logits processing and output options,
    with vLLM's definitions (decoding/logits_processors.py applies them); each
    is off at its default, and a request that sets none pays nothing for them.
    """

    max_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    ignore_eos: bool = False
    #: > 1 discourages tokens of the prompt and the output so far (logits divided when > 0, multiplied otherwise).
    repetition_penalty: float = 1.0
    #: Subtracted once from every token the output already contains (OpenAI's definition, output tokens only).
    presence_penalty: float = 0.0
    #: Subtracted per occurrence in the output so far.
    frequency_penalty: float = 0.0
    #: Drop tokens whose probability (after temperature) is below min_p times the most likely token's.
    min_p: float = 0.0
    #: Stop tokens (EOS and stop_token_ids) are masked, and stop strings ignored, before this many tokens.
    min_tokens: int = 0
    #: Token ids that end the generation (besides EOS); the one that did is the choice's stop_reason.
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)
    #: Keep the stop string (or a non-EOS stop token's text) at the end of the text.
    include_stop_str_in_output: bool = False
    #: (token id, bias) pairs added to the logits.
    logit_bias: tuple[tuple[int, float], ...] = field(default_factory=tuple)
    #: Only these token ids may be generated (None: all).
    allowed_token_ids: tuple[int, ...] | None = None
    skip_special_tokens: bool = True
    #: A compiled grammar (decoding.structured.Grammar) every output must follow; None: unconstrained.
    grammar: Any = None
    #: Report each generated token's logprob and this many alternatives (None: no logprobs).
    logprobs: int | None = None
    #: Report each prompt token's logprob (the first has none) and this many alternatives.
    prompt_logprobs: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        else:
            object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        if isinstance(self.logit_bias, dict):
            object.__setattr__(self, "logit_bias", tuple((int(k), float(v)) for k, v in self.logit_bias.items()))
        if self.allowed_token_ids is not None:
            object.__setattr__(self, "allowed_token_ids", tuple(self.allowed_token_ids))
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
        if not (self.repetition_penalty > 0) or not math.isfinite(self.repetition_penalty):
            raise InvalidRequestError(f"repetition_penalty must be a finite number > 0, got {self.repetition_penalty!r}",
                                      "repetition_penalty")  # fmt: skip
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not -2 <= value <= 2:
                raise InvalidRequestError(f"{name} must be in [-2, 2], got {value!r}", name)
        if not 0 <= self.min_p <= 1:
            raise InvalidRequestError(f"min_p must be in [0, 1], got {self.min_p!r}", "min_p")
        if not isinstance(self.min_tokens, int) or not 0 <= self.min_tokens <= self.max_tokens:
            raise InvalidRequestError(
                f"min_tokens must be an integer in [0, max_tokens={self.max_tokens}], got {self.min_tokens!r}", "min_tokens"
            )
        if any(not -100 <= b <= 100 or not math.isfinite(b) for _, b in self.logit_bias):
            raise InvalidRequestError("logit_bias values must be in [-100, 100]", "logit_bias")
        if self.allowed_token_ids is not None and not self.allowed_token_ids:
            raise InvalidRequestError("allowed_token_ids must not be empty", "allowed_token_ids")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= MAX_LOGPROBS:
                raise InvalidRequestError(f"{name} must be in [0, {MAX_LOGPROBS}], got {value!r}", name)

    def check_vocabulary(self, vocab_size: int) -> None:
        """Raise InvalidRequestError naming the first token-id parameter outside [0, vocab_size)."""
        for name, ids in (
            ("stop_token_ids", self.stop_token_ids),
            ("logit_bias", [t for t, _ in self.logit_bias]),
            ("allowed_token_ids", self.allowed_token_ids or ()),
        ):
            bad = next((t for t in ids if not 0 <= t < vocab_size), None)
            if bad is not None:
                raise InvalidRequestError(f"{name} has token id {bad}, outside the vocabulary [0, {vocab_size})", name)

    @property
    def processed(self) -> bool:
        """Whether any logits processing beyond temperature/top-k/top-p applies (min_p included)."""
        return (
            self.repetition_penalty != 1.0
            or self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
            or (self.min_p > 0.0 and not self.greedy)
            or self.min_tokens > 0
            or bool(self.logit_bias)
            or self.allowed_token_ids is not None
            or self.grammar is not None
        )

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
