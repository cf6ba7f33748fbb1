"""A request's logits processing, exact under speculative decoding.

vLLM's processors, with vLLM's definitions and order (vllm/v1/sample/sampler.py):

1. the grammar mask of structured outputs (vLLM applies it before its sampler);
2. ``allowed_token_ids``;
3. ``min_tokens``: EOS and ``stop_token_ids`` masked while the output is shorter;
4. ``logit_bias``;
5. penalties: ``repetition_penalty`` over prompt + output tokens, then
   ``frequency_penalty`` and ``presence_penalty`` over output tokens only;
   (greedy decoding takes the argmax here)
6. ``min_p``, relative to the most likely token's probability after temperature;
7. temperature, top-k, top-p: :func:`decoding.sampling.logits_to_probs`.

Speculation makes one call score several positions: the verifier's k+1 rows,
row i after the context plus ``draft[:i]``. Every history-dependent processor
(the penalties, min_tokens, the grammar) sees that prefix, position by
position, and the drafter runs the very same pipeline on its own logits while
it drafts. Both models are thus processed identically at every position, which
is what keeps greedy output token-identical to the verifier alone and sampled
output distributed exactly as the verifier's processed distribution.

:meth:`LogitsPipeline.build` returns None when a request sets none of them, so
such a request pays nothing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from decoding.sampling import SamplingParams


class History:
    """What the processors know of one request: its prompt and committed output.

    ``pending`` tokens (a draft, or the tokens drafted so far this round) come
    per call; :meth:`commit` appends a round's accepted tokens.
    """

    def __init__(self, prompt_ids: Sequence[int], vocab_size: int):
        self.prompt_ids = list(prompt_ids)
        self.vocab_size = vocab_size
        self.output: list[int] = []
        self._counts: dict[torch.device, torch.Tensor] = {}  # output token counts [V] float32, per device

    def counts(self, device: torch.device) -> torch.Tensor:
        counts = self._counts.get(device)
        if counts is None:
            counts = torch.zeros(self.vocab_size, dtype=torch.float32, device=device)
            if self.output:
                counts.index_add_(0, torch.tensor(self.output, device=device), torch.ones(len(self.output), device=device))
            self._counts[device] = counts
        return counts

    def commit(self, tokens: Sequence[int]) -> None:
        self.output.extend(tokens)
        if tokens:
            for device, counts in self._counts.items():
                counts.index_add_(0, torch.tensor(list(tokens), device=device), torch.ones(len(tokens), device=device))


@dataclass
class Rows:
    """The positions one call scores: row i continues ``output + pending[:start + i]``.

    The verifier's call has ``start = 0`` and ``n = len(pending) + 1``; a drafting
    step has one row after every pending token (``start = len(pending)``).
    """

    history: History
    pending: Sequence[int]
    n: int
    device: torch.device

    @property
    def start(self) -> int:
        return len(self.pending) - self.n + 1

    def output_length(self, i: int) -> int:
        """Tokens generated before row i's position."""
        return len(self.history.output) + self.start + i

    def prefix(self, i: int) -> Sequence[int]:
        """The pending tokens row i comes after."""
        return self.pending[: self.start + i]

    def counts(self) -> torch.Tensor:
        """[n, V] float32: per row, how often each token occurs in the output before it."""
        counts = self.history.counts(self.device).expand(self.n, -1).clone()
        if self.start:
            ids = torch.tensor(list(self.pending[: self.start]), device=self.device)
            counts.index_add_(1, ids, torch.ones(self.n, len(ids), device=self.device))
        for j in range(self.n - 1):  # row i also counts pending[start : start + i]
            counts[j + 1 :, self.pending[self.start + j]] += 1
        return counts


class LogitsProcessor(Protocol):
    """One stage: modifies ``logits`` [n, V] float32 in place for ``rows``."""

    def __call__(self, logits: torch.Tensor, rows: Rows) -> None: ...


class AllowedTokens:
    def __init__(self, allowed: Sequence[int], vocab_size: int):
        self.blocked = torch.ones(vocab_size, dtype=torch.bool)
        self.blocked[list(allowed)] = False

    def __call__(self, logits: torch.Tensor, rows: Rows) -> None:
        logits.masked_fill_(self.blocked.to(logits.device, non_blocking=True), -math.inf)


class MinTokens:
    """Masks the stop tokens at the rows whose position is below ``min_tokens``. A row the mask
    would leave without any token (a grammar that can only end) keeps its stop tokens, as vLLM does."""

    def __init__(self, min_tokens: int, stop_ids: Sequence[int]):
        self.min_tokens = min_tokens
        self.stop_ids = sorted(set(stop_ids))

    def __call__(self, logits: torch.Tensor, rows: Rows) -> None:
        early = [i for i in range(rows.n) if rows.output_length(i) < self.min_tokens]
        if not early or not self.stop_ids:
            return
        stop = torch.tensor(self.stop_ids, device=logits.device)
        for i in early:
            kept = logits[i, stop].clone()
            logits[i, stop] = -math.inf
            if torch.isneginf(logits[i]).all():
                logits[i, stop] = kept


class LogitBias:
    def __init__(self, bias: Sequence[tuple[int, float]]):
        merged: dict[int, float] = {}
        for token, value in bias:
            merged[token] = value  # the last entry for a token wins, as in a JSON object
        self.ids = torch.tensor(list(merged), dtype=torch.long)
        self.values = torch.tensor(list(merged.values()), dtype=torch.float32)

    def __call__(self, logits: torch.Tensor, rows: Rows) -> None:
        logits[:, self.ids.to(logits.device)] += self.values.to(logits.device)


class Penalties:
    """vLLM's repetition, frequency and presence penalties, in that order, from each row's own history."""

    def __init__(self, params: SamplingParams, prompt_ids: Sequence[int], vocab_size: int):
        self.repetition = params.repetition_penalty
        self.frequency = params.frequency_penalty
        self.presence = params.presence_penalty
        self.prompt_mask = torch.zeros(vocab_size, dtype=torch.bool)
        if self.repetition != 1.0:
            self.prompt_mask[[t for t in prompt_ids if 0 <= t < vocab_size]] = True

    def __call__(self, logits: torch.Tensor, rows: Rows) -> None:
        counts = rows.counts()
        seen = counts > 0
        if self.repetition != 1.0:
            mask = seen | self.prompt_mask.to(logits.device)[None]
            scale = torch.where(logits > 0, 1.0 / self.repetition, self.repetition)
            logits.copy_(torch.where(mask, logits * scale, logits))
        if self.frequency:
            logits -= self.frequency * counts
        if self.presence:
            logits -= self.presence * seen.float()


class MinP:
    """vLLM's min_p: drop p_i < min_p * max_j p_j, p = softmax(logits / T). In logit space this is
    l_i < max_j l_j + T ln(min_p), applied here, before temperature, with the same result."""

    def __init__(self, min_p: float, temperature: float):
        self.offset = temperature * math.log(min_p)

    def __call__(self, logits: torch.Tensor, rows: Rows) -> None:
        threshold = logits.amax(dim=-1, keepdim=True) + self.offset
        logits.masked_fill_(logits < threshold, -math.inf)


class GrammarConstraint(Protocol):
    """Structured outputs' side of the pipeline (decoding.structured.GrammarState)."""

    def mask(self, logits: torch.Tensor, rows: Rows) -> None:
        """Set to -inf, in place, the tokens the grammar forbids at each row."""
        ...

    def admissible(self, draft: Sequence[int]) -> int:
        """Length of the longest prefix of ``draft`` the grammar accepts after the committed output."""
        ...

    def commit(self, tokens: Sequence[int]) -> None: ...


class LogitsPipeline:
    """One request's processors, built once from its SamplingParams (see the module docstring)."""

    def __init__(
        self,
        history: History,
        processors: Sequence[LogitsProcessor],
        grammar: GrammarConstraint | None = None,
    ):
        self.history = history
        self.processors = list(processors)
        self.grammar = grammar

    @classmethod
    def build(
        cls,
        params: SamplingParams,
        prompt_ids: Sequence[int],
        vocab_size: int,
        eos_token_id: int | None,
        grammar: GrammarConstraint | None = None,
    ) -> LogitsPipeline | None:
        """The pipeline ``params`` asks for, or None when it asks for no processing at all."""
        if not params.processed:
            return None
        processors: list[LogitsProcessor] = []
        if params.allowed_token_ids is not None:
            processors.append(AllowedTokens(params.allowed_token_ids, vocab_size))
        if params.min_tokens > 0:
            eos = [] if eos_token_id is None or params.ignore_eos else [eos_token_id]
            processors.append(MinTokens(params.min_tokens, [*eos, *params.stop_token_ids]))
        if params.logit_bias:
            processors.append(LogitBias(params.logit_bias))
        if params.repetition_penalty != 1.0 or params.frequency_penalty or params.presence_penalty:
            processors.append(Penalties(params, prompt_ids, vocab_size))
        if params.min_p > 0 and not params.greedy:  # argmax-invariant: greedy skips it, as vLLM does
            processors.append(MinP(params.min_p, params.temperature))
        return cls(History(prompt_ids, vocab_size), processors, grammar)

    # The models' logits are inference tensors: in-place edits must run in inference mode too.
    @torch.inference_mode()
    def constrain(self, logits: torch.Tensor, pending: Sequence[int]) -> torch.Tensor:
        """The grammar mask alone, in place (what vLLM's raw logprobs see). logits: [n, V] float32."""
        if self.grammar is not None:
            self.grammar.mask(logits, self._rows(logits, pending))
        return logits

    # The models' logits are inference tensors: in-place edits must run in inference mode too.
    @torch.inference_mode()
    def process(self, logits: torch.Tensor, pending: Sequence[int]) -> torch.Tensor:
        """Every stage after the grammar's, in place, on logits [n, V] float32 (rows: see :class:`Rows`)."""
        rows = self._rows(logits, pending)
        for processor in self.processors:
            processor(logits, rows)
        return logits

    def __call__(self, logits: torch.Tensor, pending: Sequence[int]) -> torch.Tensor:
        """The whole pipeline: grammar mask, then :meth:`process`."""
        return self.process(self.constrain(logits, pending), pending)

    def admissible(self, draft: Sequence[int]) -> int:
        """How much of ``draft`` can be verified: a draft token the grammar forbids is never accepted,
        and no row after it has a defined mask."""
        return len(draft) if self.grammar is None else self.grammar.admissible(draft)

    # The models' logits are inference tensors: in-place edits must run in inference mode too.
    @torch.inference_mode()
    def commit(self, tokens: Sequence[int]) -> None:
        """The round's tokens joined the output."""
        self.history.commit(tokens)
        if self.grammar is not None:
            self.grammar.commit(tokens)

    def _rows(self, logits: torch.Tensor, pending: Sequence[int]) -> Rows:
        n = logits.shape[0]
        if n > len(pending) + 1:
            raise ValueError(f"{n} rows of logits but only {len(pending)} pending tokens: at most {len(pending) + 1}")
        return Rows(self.history, pending, n, logits.device)
