"""Continuous batching for the in-process models: concurrent requests' passes as one forward.

Each request keeps its own KV cache (a :class:`~decoding.causal_lm.CachedSequence`,
which rolls back). A batch packs the requests' new tokens (a verify pass: the
uncached context tail plus the draft; a drafter step: one token) into one row
``[1, sum(n_i)]`` with per-token positions, so every linear layer (reading the
weights: the bulk of a decode-sized pass on CPU and GPU alike) runs once for the
batch, and attention runs per request against that request's own cache: ragged,
with no padding and no copy of any context into a batch tensor. Each request's
attention is the same SDPA call on the same keys as in an unbatched pass, so
batched logits differ from unbatched ones only by the rounding of the packed
matrix products (see tests/decoding/test_batching.py).

Batches form the way vLLM's scheduler forms them, one pass at a time: while a
pass runs on the model's worker thread, the passes requested meanwhile queue up,
and the next pass takes all of them (up to ``max_batch``). A lone request never
waits for company.

:class:`AcceptBatcher` does the same for the verification maths: the rounds that
resume together after a batched verify pass share one kernel call.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from transformers import AttentionInterface, AttentionMaskInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

import kernels
from decoding.causal_lm import CachedSequence, CausalLM

log = logging.getLogger(__name__)

#: The attention implementation a batching model runs: SDPA, per request when a ragged batch is passed.
RAGGED_ATTENTION = "tandem_ragged"

#: Decoder families whose attention layers call the attention interface with RoPE already applied and
#: ``module.layer_idx`` set, and that attend to the whole context (no sliding window).
RAGGED_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3"})


def ragged_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    *,
    ragged: Sequence[tuple[CachedSequence, int, torch.Tensor | None]] | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """SDPA over packed requests, each against its own KV cache.

    query [1, Hq, N, D], key/value [1, Hkv, N, D]: the new tokens of every request in the
    batch, packed (N = sum of ``n``), RoPE applied. ``ragged`` lists (sequence, n, mask) in
    packing order, mask [1, 1, n, past + n] bool or None for n = 1 (see :func:`causal_tail_mask`);
    each request's keys and values are appended to its own cache. Returns the attention output
    [1, N, Hq, D], as transformers' attention functions do. Without ``ragged`` this is plain
    SDPA (an unbatched pass with the mask transformers built).
    """
    if ragged is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    outputs = []
    start = 0
    for seq, n, mask in ragged:
        end = start + n
        k, v = seq.cache.update(key[:, :, start:end], value[:, :, start:end], module.layer_idx)
        out, _ = sdpa_attention_forward(module, query[:, :, start:end], k, v, mask, **kwargs)
        outputs.append(out)
        start = end
    return torch.cat(outputs, dim=1), None


def causal_tail_mask(past: int, n: int, device: torch.device) -> torch.Tensor | None:
    """Mask [1, 1, n, past + n] bool for n new tokens after ``past`` cached ones: token j sees keys
    0 .. past + j. None for one token, which sees every key."""
    if n == 1:
        return None
    return torch.ones(n, past + n, dtype=torch.bool, device=device).tril(past)[None, None]


def supports_ragged(model: PreTrainedModel) -> bool:
    config = model.config
    return config.model_type in RAGGED_MODEL_TYPES and not getattr(config, "sliding_window", None)


def enable_ragged(model: PreTrainedModel) -> None:
    """Switch ``model`` to :func:`ragged_attention` (identical to SDPA until a batch is passed)."""
    AttentionInterface.register(RAGGED_ATTENTION, ragged_attention)
    AttentionMaskInterface.register(RAGGED_ATTENTION, sdpa_mask)  # unbatched passes keep SDPA's masks
    model.set_attn_implementation(RAGGED_ATTENTION)


def batcher_for(lm: CausalLM, max_batch: int) -> ForwardBatcher | None:
    """A batcher for ``lm`` when ``max_batch > 1`` and its family supports batching, else None (one pass each)."""
    if max_batch <= 1:
        return None
    if not supports_ragged(lm.model):
        log.warning("%s (%s) runs one request per pass: batching supports %s without a sliding window",
                    lm.name, lm.model.config.model_type, ", ".join(sorted(RAGGED_MODEL_TYPES)))  # fmt: skip
        return None
    enable_ragged(lm.model)
    return ForwardBatcher(lm, max_batch)


@dataclass
class ForwardPass:
    """One request's part of a batched pass: feed ``tokens`` after ``seq``'s cached ones and
    return the logits of the last ``keep`` of them."""

    seq: CachedSequence
    tokens: list[int]
    keep: int
    future: asyncio.Future | None = field(default=None, repr=False)


@torch.inference_mode()
def forward_ragged(lm: CausalLM, passes: Sequence[ForwardPass]) -> list[torch.Tensor]:
    """One forward pass over every request in ``passes``; runs on the model's worker thread.

    Returns, per request, logits [keep, V] float32 for its last ``keep`` fed tokens, as
    :meth:`CachedSequence.feed` does: row i is the distribution of the token after
    ``tokens[len - keep + i]``.
    """
    tokens: list[int] = []
    positions: list[int] = []
    rows: list[int] = []  # packed indices of the logits each request needs
    for p in passes:
        past = len(p.seq.cached)
        tokens += p.tokens
        positions += range(past, past + len(p.tokens))
        rows += range(len(tokens) - p.keep, len(tokens))
    device = lm.device
    try:
        out = lm.model(
            input_ids=torch.tensor([tokens], device=device),
            position_ids=torch.tensor([positions], device=device),
            use_cache=False,  # each request's cache is updated inside ragged_attention
            logits_to_keep=torch.tensor(rows, device=device),
            ragged=[
                (p.seq, len(p.tokens), causal_tail_mask(len(p.seq.cached), len(p.tokens), device)) for p in passes
            ],
        )
    except BaseException:
        # Some layers may have appended to some caches: those caches start again from the prompt.
        for p in passes:
            p.seq.reset_cache()
        raise
    logits = lm.full_logits(out.logits[0].float())
    results = []
    start = 0
    for p in passes:
        p.seq.fed(p.tokens)
        p.seq.forward_passes += 1
        results.append(logits[start : start + p.keep])
        start += p.keep
    return results


class ForwardBatcher:
    """Runs the passes that concurrent requests ask of one model as batched forwards.

    ``feed`` is awaited by each request's session; a background task takes every
    pass queued at the moment the worker is free (up to ``max_batch``) and runs them
    as one :func:`forward_ragged`. A request cancelled while queued leaves the queue;
    one cancelled during its pass only loses its result: the others get theirs.
    """

    def __init__(self, lm: CausalLM, max_batch: int):
        if max_batch < 2:
            raise ValueError(f"a batcher needs max_batch >= 2, got {max_batch}")
        self.lm = lm
        self.max_batch = max_batch
        self._queue: list[ForwardPass] = []
        self._runner: asyncio.Task | None = None
        #: Sizes of the latest batches (bounded: a server runs for days), for tests and the benchmark.
        self.batch_sizes: deque[int] = deque(maxlen=4096)
        #: Called with each batch's size (the gateway's metrics).
        self.on_batch: Callable[[int], None] | None = None

    async def feed(self, seq: CachedSequence, tokens: Sequence[int], keep: int = 1) -> torch.Tensor:
        """Feed ``tokens`` after ``seq``'s cached ones (see :meth:`CachedSequence.pending`).

        Returns logits [keep, V] float32 on the model's device for the last ``keep`` tokens.
        """
        future = asyncio.get_running_loop().create_future()
        self._queue.append(ForwardPass(seq, list(tokens), keep, future))
        if self._runner is None or self._runner.done():
            self._runner = asyncio.create_task(self._run(), name=f"batcher-{self.lm.name}")
        return await future

    async def _run(self) -> None:
        while self._queue:
            live = [p for p in self._queue if not p.future.done()]  # a cancelled request left
            batch, self._queue = live[: self.max_batch], live[self.max_batch :]
            if not batch:
                continue
            self.batch_sizes.append(len(batch))
            if self.on_batch is not None:
                self.on_batch(len(batch))
            try:
                logits = await self.lm.run(forward_ragged, self.lm, batch)
            except Exception as exc:
                for p in batch:
                    if not p.future.done():
                        p.future.set_exception(exc)
                continue
            for p, rows in zip(batch, logits):
                if not p.future.done():
                    p.future.set_result(rows)


@dataclass
class _Round:
    draft: list[int]
    target: torch.Tensor  # [k+1, V]: probabilities, or logits when greedy
    q: torch.Tensor | None  # [k, V] draft probabilities; None: a point mass at each draft
    seed: torch.Tensor | None  # [1] int64 on the target's device; None: greedy
    future: asyncio.Future = field(repr=False)

    def kind(self) -> tuple:
        t = self.target
        return self.seed is None, self.q is None, t.device, t.shape[-1], t.dtype


class AcceptBatcher:
    """The verification maths of concurrent rounds as one kernel call per kind of round.

    The rounds whose logits came out of one batched forward resume in the same turn of
    the event loop; each queues its acceptance here, and a callback scheduled behind
    them runs one ``kernels.verify_drafts`` for each kind (greedy / sampled against
    draft probabilities / sampled against a point mass, per device and vocabulary).
    A lone round is a batch of one. Sampled rows carry their own seed, drawn from the
    request's generator, so a row's result never depends on the batch it ran in.
    """

    def __init__(self, backend: str = "auto"):
        self.backend = backend
        self._pending: list[_Round] = []
        #: Sizes of the latest kernel calls (bounded), for tests and the benchmark.
        self.call_sizes: deque[int] = deque(maxlen=4096)

    async def accept(
        self,
        draft: Sequence[int],
        target: torch.Tensor,
        q: torch.Tensor | None,
        generator: torch.Generator | None,
    ) -> tuple[list[int], int]:
        """Verify one round: ``target`` [k+1, V] (processed probabilities; logits when ``generator``
        is None, which means greedy), ``q`` [k, V] or None, all on one device. Returns (the accepted
        drafts plus one correction or bonus token, the number accepted)."""
        # Drawn where the generator lives (the logits' device): no host sync.
        seed = None
        if generator is not None:
            seed = torch.randint(0, 2**63 - 1, (1,), generator=generator, device=target.device)
        future = asyncio.get_running_loop().create_future()
        self._pending.append(_Round(list(draft), target, q, seed, future))
        if len(self._pending) == 1:
            asyncio.get_running_loop().call_soon(self._flush)
        return await future

    def _flush(self) -> None:
        pending, self._pending = self._pending, []
        groups: dict[tuple, list[_Round]] = {}
        for r in pending:
            if not r.future.done():  # a cancelled request left
                groups.setdefault(r.kind(), []).append(r)
        for rounds in groups.values():
            self._settle(rounds)

    def _settle(self, rounds: list[_Round]) -> None:
        try:
            results = self._verify(rounds)
        except Exception as exc:
            if len(rounds) == 1:
                rounds[0].future.set_exception(exc)
            else:  # one bad row must not fail its neighbours: verify each alone
                for r in rounds:
                    self._settle([r])
            return
        for r, result in zip(rounds, results):
            r.future.set_result(result)

    def _verify(self, rounds: list[_Round]) -> list[tuple[list[int], int]]:
        first = rounds[0]
        device, V = first.target.device, first.target.shape[-1]
        B, K = len(rounds), max(len(r.draft) for r in rounds)
        draft_tokens = torch.zeros((B, K), dtype=torch.long)  # padding must be a valid id: 0
        for b, r in enumerate(rounds):
            draft_tokens[b, : len(r.draft)] = torch.tensor(r.draft, dtype=torch.long)
        draft_tokens = draft_tokens.to(device, non_blocking=True)
        lens = torch.tensor([len(r.draft) for r in rounds], dtype=torch.long, device=device)
        if B == 1:
            target, q = first.target[None], None if first.q is None else first.q[None]
        else:
            # Rows past a round's k + 1 are never read by the maths; zeros pass the NaN check.
            target = first.target.new_zeros((B, K + 1, V))
            for b, r in enumerate(rounds):
                target[b, : r.target.shape[0]] = r.target
            q = None
            if first.q is not None:
                q = first.q.new_zeros((B, K, V))
                for b, r in enumerate(rounds):
                    q[b, : r.q.shape[0]] = r.q
        self.call_sizes.append(B)
        if first.seed is None:
            result = kernels.verify_drafts(draft_tokens, lens, target, greedy=True, backend=self.backend)
        else:
            seeds = torch.cat([r.seed for r in rounds])
            result = kernels.verify_drafts(draft_tokens, lens, target, q, backend=self.backend, seeds=seeds)
        tokens, accepted = result.tokens.tolist(), result.num_accepted.tolist()
        return [(tokens[b][: n + 1], n) for b, n in enumerate(accepted)]

