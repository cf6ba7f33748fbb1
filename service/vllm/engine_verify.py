"""Draft verification inside vLLM's engine process, where the verifier's full distribution lives.

A verify round of the route (``service.vllm.route``) is a vLLM request for
``context + draft`` (n + k tokens) with prompt logprobs. This module patches the
model runner so that for tandem's requests it does not build vLLM's
prompt-logprob rows at all. Instead, in the step that finishes the request's
prefill, it:

1. computes the logits of the k+1 verification positions only (positions
   n-1 .. n+k-1 of the prompt: row i judges ``draft[i]``, row k gives the bonus
   token) from the step's hidden states: ``[k+1, V]``, the full vocabulary;
2. applies the request's temperature / top-k / top-p with tandem's own
   :func:`decoding.sampling.logits_to_probs` and decides with tandem's own
   :func:`kernels.verify_drafts` (the Triton kernels on a GPU, the torch
   reference on a CPU), seeded per round by the client. The draft is treated as
   a point mass (no drafter probabilities travel): a draft token d is accepted
   with probability p(d) and a rejection resamples from p with d removed, which
   gives exactly p for drafts from any proposal distribution;
3. hands back a tiny tensor (:func:`encode_decision`) in place of the prompt
   logprobs: the accepted tokens, the correction or bonus token, and the target
   logprob of each draft token. O(k) bytes leave the engine, whatever the context.

Nothing else changes: the context is served from vLLM's prefix cache, the draft
tokens of a round are prompt tokens of that request only (their blocks are
never full and shared before they are committed; see the route), and requests
without the marker take vLLM's own code path untouched.

Loaded in the engine process as a ``vllm.general_plugins`` entry point
(``tandem_engine_verify = service.vllm.engine_verify:register``); the launcher
makes it discoverable when the installed tandem predates it. If vLLM's
internals differ from what this was written against (0.32), nothing is patched
and the route falls back to returning top-K logprob rows for the client to
decide (``/tandem/v1/info`` reports ``"server_decides": false``).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch

logger = logging.getLogger("tandem.vllm_engine")

#: SamplingParams.extra_args key marking a request whose draft the engine decides; its value is a
#: :class:`DecideSpec` as a dict.
EXTRA_ARGS_DECIDE_KEY = "tandem_decide"
#: ``selected_token_ranks`` of the decision tensor's second row: identifies the encoding.
DECISION_MAGIC = -7_202_501
#: ``selected_token_ranks[0]`` when the verification rows were not computed in this request
#: (a prefix-cache hit covered them); the route then recomputes the round under a cache salt.
NOT_COMPUTED = -1

#: The entry point's name in ``vllm.general_plugins`` (what ``VLLM_PLUGINS`` must name when it is set).
PLUGIN_NAME = "tandem_engine_verify"
PLUGIN_TARGET = "service.vllm.engine_verify:register"
#: ``=1`` leaves vLLM unpatched: the route then returns top-K rows (to measure what deciding saves).
DISABLE_ENV = "TANDEM_VERIFY_NO_ENGINE_DECIDE"

_patched: bool | None = None


@dataclass(frozen=True)
class DecideSpec:
    """What the engine needs to decide one round (carried in ``extra_args``)."""

    k: int  # draft tokens at the end of the prompt
    temperature: float
    top_k: int
    top_p: float
    seed: int

    @classmethod
    def from_extra_args(cls, extra: dict | None) -> DecideSpec | None:
        raw = (extra or {}).get(EXTRA_ARGS_DECIDE_KEY)
        if not isinstance(raw, dict):
            return None
        return cls(int(raw["k"]), float(raw["temperature"]), int(raw["top_k"]), float(raw["top_p"]), int(raw["seed"]))

    def to_extra_args(self) -> dict:
        return {EXTRA_ARGS_DECIDE_KEY: {"k": self.k, "temperature": self.temperature, "top_k": self.top_k,
                                        "top_p": self.top_p, "seed": self.seed}}  # fmt: skip


@dataclass(frozen=True)
class Decision:
    """A decided round: ``tokens`` = the accepted draft prefix plus one correction or bonus token."""

    tokens: list[int]
    accepted: int
    draft_logprobs: list[float]  # [k] raw target logprob of each draft token (T = 1, no filters)
    computed: bool = True  # False: the rows came from the prefix cache; nothing was decided


def decide(logits: torch.Tensor, draft: list[int], spec: DecideSpec) -> Decision:
    """Verify ``draft`` against the target logits of its k+1 positions.

    Args:
        logits: [k+1, V] raw logits (any float dtype, any device); row i judges draft[i], row k is the bonus row.
        draft: the k draft token ids.
    Returns:
        the accepted prefix plus one token, and the raw logprob of each draft token.
    """
    import kernels
    from decoding.sampling import SamplingParams, logits_to_probs

    k = len(draft)
    logits = logits.float()
    draft_t = torch.tensor([draft], dtype=torch.long, device=logits.device)
    lens = torch.tensor([k], dtype=torch.long, device=logits.device)
    raw = torch.log_softmax(logits, dim=-1)
    draft_lps = raw[torch.arange(k, device=logits.device), draft_t[0]].tolist() if k else []
    if spec.temperature == 0:
        result = kernels.verify_drafts(draft_t, lens, logits[None], greedy=True)
    else:
        params = SamplingParams(temperature=spec.temperature, top_k=spec.top_k, top_p=spec.top_p)
        probs = logits_to_probs(logits, params)[None]
        generator = torch.Generator(logits.device).manual_seed(spec.seed)
        result = kernels.verify_drafts(draft_t, lens, probs, None, generator)
    n = int(result.num_accepted[0])
    return Decision(result.tokens[0, : n + 1].tolist(), n, draft_lps)


def encode_decision(decision: Decision, k: int):
    """The decision as vLLM's ``LogprobsTensors`` (what carries prompt logprobs to the API process).

    Shape [2, k+1]: row 0 holds the emitted tokens (padded with -1) and
    ``selected_token_ranks[0]`` the accepted count (NOT_COMPUTED when nothing was
    decided); row 1 the draft tokens' raw logprobs and ``DECISION_MAGIC``.
    """
    from vllm.v1.outputs import LogprobsTensors

    ids = torch.full((2, k + 1), -1, dtype=torch.int64)
    lps = torch.zeros((2, k + 1), dtype=torch.float32)
    if decision.computed:
        ids[0, : len(decision.tokens)] = torch.tensor(decision.tokens, dtype=torch.int64)
        lps[1, :k] = torch.tensor(decision.draft_logprobs, dtype=torch.float32)
    ranks = torch.tensor([decision.accepted if decision.computed else NOT_COMPUTED, DECISION_MAGIC], dtype=torch.int64)
    return LogprobsTensors(ids, lps, ranks)


def decode_decision(tensors) -> Decision | None:
    """The inverse of :func:`encode_decision`; None if ``tensors`` is not a decision."""
    token_ids, logprobs, ranks, *_ = tensors
    if tuple(token_ids.shape[:1]) != (2,) or ranks.shape != (2,) or int(ranks[1]) != DECISION_MAGIC:
        return None
    accepted = int(ranks[0])
    k = token_ids.shape[1] - 1
    if accepted == NOT_COMPUTED:
        return Decision([], 0, [], computed=False)
    if not 0 <= accepted <= k:
        return None
    tokens = token_ids[0, : accepted + 1].tolist()
    return Decision(tokens, accepted, logprobs[1, :k].tolist())


def _rows_of_step(runner, hidden_states: torch.Tensor, req_id: str, num_tokens: int, spec: DecideSpec,
                  partial: dict) -> torch.Tensor | None:
    """The logits of the k+1 verification rows once the prefill is complete, else None (accumulated in ``partial``).

    Rows computed in an earlier prefill chunk are kept in ``partial``; rows that
    no chunk computed (a prefix-cache hit covered them) are missing, and the
    result then has fewer than k+1 rows.
    """
    request = runner.requests[req_id]
    prompt_len = len(request.prompt_token_ids)
    first_row = prompt_len - spec.k - 1  # position n-1
    start = request.num_computed_tokens  # before this step
    end = start + num_tokens
    lo = max(start, first_row)
    if start <= first_row:  # the rows' range starts in this step (again, after a preemption): nothing kept counts
        partial.pop(req_id, None)
    if lo < end:
        offset = int(runner.query_start_loc.np[runner.input_batch.req_id_to_index[req_id]])
        rows = runner.model.compute_logits(hidden_states[offset + lo - start : offset + end - start])
        partial.setdefault(req_id, []).append(rows.float())
    if end < prompt_len:
        return None  # a later chunk finishes the prefill
    chunks = partial.pop(req_id, [])
    return torch.cat(chunks) if chunks else hidden_states.new_zeros((0, 1))


def register() -> None:
    """The ``vllm.general_plugins`` entry point: patch the model runner once per process (idempotent)."""
    global _patched
    if _patched is not None:
        return
    if os.environ.get(DISABLE_ENV) == "1":
        _patched = False
        return
    try:
        from vllm.v1.worker.gpu_model_runner import GPUModelRunner

        original = GPUModelRunner._get_prompt_logprobs_dict
    except Exception as exc:  # pragma: no cover - depends on the vLLM version
        logger.warning("tandem: engine-side verification not installed (%s)", exc)
        _patched = False
        return

    def _get_prompt_logprobs_dict(self, hidden_states, num_scheduled_tokens):
        wanted = self.num_prompt_logprobs
        if not wanted:
            return original(self, hidden_states, num_scheduled_tokens)
        specs = {}
        for req_id in list(wanted):
            request = self.requests.get(req_id)
            spec = DecideSpec.from_extra_args(getattr(request.sampling_params, "extra_args", None)) if request else None
            if spec is not None:
                specs[req_id] = spec
        if not specs:
            return original(self, hidden_states, num_scheduled_tokens)
        held = {req_id: wanted.pop(req_id) for req_id in specs}  # vLLM's own rows for the others only
        try:
            out = original(self, hidden_states, num_scheduled_tokens)
        finally:
            wanted.update(held)
        partial = self.__dict__.setdefault("_tandem_partial_rows", {})
        for gone in [req_id for req_id in partial if req_id not in self.requests]:  # aborted mid-prefill
            del partial[gone]
        for req_id, spec in specs.items():
            num_tokens = num_scheduled_tokens.get(req_id)
            if num_tokens is None:
                continue  # preempted during prefill
            rows = _rows_of_step(self, hidden_states, req_id, num_tokens, spec, partial)
            if rows is None:
                continue
            del wanted[req_id]  # prefill complete: nothing more to produce for this request
            request = self.requests[req_id]
            if rows.shape[0] != spec.k + 1:
                decision = Decision([], 0, [], computed=False)
            else:
                draft = list(request.prompt_token_ids[len(request.prompt_token_ids) - spec.k :])
                decision = decide(rows, draft, spec)
            out[req_id] = encode_decision(decision, spec.k)
        return out

    GPUModelRunner._get_prompt_logprobs_dict = _get_prompt_logprobs_dict
    _patched = True
    logger.info("tandem: engine-side draft verification installed")


def installed() -> bool:
    return bool(_patched)
