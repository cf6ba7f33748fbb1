"""Drafters: cheap proposers of the next k tokens, running on the edge.

A drafter is a factory of per-request sessions. ``propose(k)`` returns up to k
tokens and, when they were sampled, the distributions they were sampled from
(speculative sampling needs q to stay lossless). ``extend`` commits the
round's accepted tokens so the session can roll its cache back to them.

Backends: :class:`HFDrafter` (a small local causal LM with a rolling KV cache)
and :class:`NgramDrafter` (model-free prompt lookup).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch

from decoding.batching import batcher_for
from decoding.causal_lm import CachedSequence, CausalLM
from decoding.logits_processors import LogitsPipeline
from decoding.sampling import SamplingParams, logits_to_probs, sample


@dataclass(frozen=True)
class Draft:
    """Proposed tokens for one round.

    tokens: up to k proposed ids (fewer, even none, when a drafter has nothing).
    probs: [len(tokens), V] float32 distributions the tokens were sampled from, on
        the drafter's device; None when the proposal is deterministic (greedy
        drafting or n-gram lookup), which verification treats as a point mass at
        each token without materialising it.
    """

    tokens: list[int]
    probs: torch.Tensor | None = None
    #: [len(tokens), V] float32 logits each token was drawn from, before any processing but the
    #: grammar's (what logprobs report); kept only when the request asks for logprobs.
    logits: torch.Tensor | None = None


EMPTY_DRAFT = Draft(tokens=[])


@runtime_checkable
class DraftSession(Protocol):
    forward_passes: int

    async def propose(self, k: int) -> Draft: ...

    def extend(self, tokens: Sequence[int]) -> None: ...

    async def close(self) -> None: ...


@runtime_checkable
class Drafter(Protocol):
    name: str
    vocab_size: int
    #: Where the drafter samples: ``start`` is given a generator on this device.
    device: torch.device
    #: Cost of one drafter step relative to one verifier pass (the classic c).
    cost_ratio: float

    def start(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        generator: torch.Generator,
        processing: LogitsPipeline | None = None,
    ) -> DraftSession:
        """A session for one request. ``processing`` is the request's logits pipeline, shared with the
        verification (the router commits each round to it): a sampling drafter must apply it to its own
        logits so that its proposals come from the processed distribution."""
        ...

    async def aclose(self) -> None: ...


class HFDrafter:
    """A small local Hugging Face causal LM as the drafter.

    With ``max_batch > 1`` the drafting steps of concurrent requests that are ready
    at the same moment run as one forward (:mod:`decoding.batching`).
    """

    def __init__(self, lm: CausalLM, cost_ratio: float = 0.1, *, max_batch: int = 1):
        self.lm = lm
        self.name = lm.name
        self.vocab_size = lm.vocab_size
        self.device = lm.device
        self.cost_ratio = cost_ratio
        self.batcher = batcher_for(lm, max_batch)
        #: Open sessions: a lone one drafts its k steps in one hand-off to the worker thread.
        self.sessions = 0

    @classmethod
    def from_pretrained(cls, path: str | Path, cost_ratio: float = 0.1, **kwargs) -> HFDrafter:
        return cls(CausalLM(path, **kwargs), cost_ratio=cost_ratio)

    def start(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        generator: torch.Generator,
        processing: LogitsPipeline | None = None,
    ) -> HFDraftSession:
        return HFDraftSession(self, self.lm.sequence(prompt_ids), params, generator, processing)

    async def aclose(self) -> None:
        self.lm.close()


class _DraftStep:
    """What a round's drafting steps accumulate: each step turns the row after the tokens drafted
    so far into the next draft token."""

    def __init__(self, session: HFDraftSession):
        self.session = session
        self.tokens: list[int] = []
        self.probs: list[torch.Tensor] = []
        self.kept: list[torch.Tensor] = []

    def take(self, logits: torch.Tensor) -> int:
        """logits [1, V] float32: the drafter's row after the context and ``self.tokens``; returns the next draft."""
        s = self.session
        if s.processing is not None:
            # The same processing the verifier's row at this position gets.
            s.processing.constrain(logits, self.tokens)
            if s.keep_logits:
                self.kept.append(logits[0].clone())
            s.processing.process(logits, self.tokens)
        elif s.keep_logits:
            self.kept.append(logits[0])
        if s.params.greedy:
            token = int(logits.argmax(dim=-1))
        else:
            q = logits_to_probs(logits, s.params)
            token = int(sample(q, s.generator))
            self.probs.append(q[0])
        self.tokens.append(token)
        return token

    def draft(self) -> Draft:
        # The last draft is never fed: if it is accepted, the next round feeds it
        # together with the bonus token in one pass.
        return Draft(tokens=self.tokens, probs=torch.stack(self.probs) if self.probs else None,
                     logits=torch.stack(self.kept) if self.kept else None)  # fmt: skip


class HFDraftSession:
    def __init__(
        self,
        drafter: HFDrafter,
        seq: CachedSequence,
        params: SamplingParams,
        generator: torch.Generator,
        processing: LogitsPipeline | None = None,
    ):
        self.drafter = drafter
        self.seq = seq
        self.params = params
        self.generator = generator
        self.processing = processing
        self.keep_logits = params.logprobs is not None
        drafter.sessions += 1

    @property
    def forward_passes(self) -> int:
        return self.seq.forward_passes

    async def propose(self, k: int) -> Draft:
        if k <= 0:
            return EMPTY_DRAFT
        batcher = self.drafter.batcher
        if batcher is None or self.drafter.sessions == 1:  # all k steps on the worker: one hand-off
            return await self.seq.lm.run(self._propose, k)
        # One step at a time, each in a pass shared with the other requests drafting now.
        step = _DraftStep(self)
        feed = self.seq.pending()
        for _ in range(k):
            feed = [step.take(await batcher.feed(self.seq, feed))]
        return step.draft()

    def _propose(self, k: int) -> Draft:
        step = _DraftStep(self)
        feed = self.seq.pending()
        for _ in range(k):
            feed = [step.take(self.seq.feed(feed, keep=1))]
        return step.draft()

    def extend(self, tokens: Sequence[int]) -> None:
        self.seq.extend(tokens)

    async def close(self) -> None:
        if self.seq is not None:
            self.drafter.sessions -= 1
        self.seq = None  # type: ignore[assignment]


class NgramDrafter:
    """Prompt-lookup drafting: find the latest earlier occurrence of the
    context's last n tokens and propose what followed it.

    It costs no model pass, so it shines on inputs that repeat themselves
    (code edits, quoting, extraction). It tries the longest n first.
    """

    cost_ratio = 0.0
    device = torch.device("cpu")  # it never samples

    def __init__(self, vocab_size: int, max_ngram: int = 4, min_ngram: int = 1):
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}")
        self.name = f"ngram-{min_ngram}-{max_ngram}"
        self.vocab_size = vocab_size
        self.max_ngram = max_ngram
        self.min_ngram = min_ngram

    def start(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        generator: torch.Generator,
        processing: LogitsPipeline | None = None,
    ) -> NgramDraftSession:
        # Deterministic proposals need no processing: the verification decides, and the router
        # cuts a draft at the first token the grammar forbids.
        return NgramDraftSession(self, prompt_ids)

    async def aclose(self) -> None:
        return None


class NgramDraftSession:
    forward_passes = 0

    def __init__(self, drafter: NgramDrafter, prompt_ids: Sequence[int]):
        self.drafter = drafter
        self.ids = list(prompt_ids)

    def lookup(self, k: int) -> list[int]:
        ids = self.ids
        for n in range(min(self.drafter.max_ngram, len(ids) - 1), self.drafter.min_ngram - 1, -1):
            suffix = ids[-n:]
            # Latest match first: recent context predicts the continuation best.
            for start in range(len(ids) - n - 1, -1, -1):
                if ids[start : start + n] == suffix:
                    return ids[start + n : start + n + k]
        return []

    async def propose(self, k: int) -> Draft:
        return Draft(tokens=self.lookup(k)) if k > 0 else EMPTY_DRAFT

    def extend(self, tokens: Sequence[int]) -> None:
        self.ids.extend(tokens)

    async def close(self) -> None:
        return None
