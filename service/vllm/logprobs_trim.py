"""A patch of vLLM's output processor: keep only the last N prompt-logprob rows of tandem's requests.

Without it, vLLM's API process turns every prompt row (garbage rows of cache
hits included) into Python objects: O(context x K) work per verify round. With
it, that work is O(k x K). A request opts in through
``SamplingParams.extra_args[EXTRA_ARGS_ROWS_KEY] = N``; others are untouched.

A request the engine decides (``service.vllm.engine_verify``) gets no rows at
all: its "prompt logprobs" are the engine's encoded decision, which this patch
decodes into a :class:`~service.vllm.engine_verify.Decision`, handed to the route
as the request output's ``prompt_logprobs[0]``.

It patches ``vllm.v1.engine.logprobs.LogprobsProcessor`` (checked against vLLM
0.32). If those internals differ, nothing is patched and the route still
works, only slower (``/tandem/v1/info`` reports ``fast_prompt_logprobs``).
``TANDEM_VERIFY_NO_TRIM=1`` disables it, to measure what it saves.
"""

from __future__ import annotations

import logging
import os

from service.vllm.engine_verify import EXTRA_ARGS_DECIDE_KEY, decode_decision

logger = logging.getLogger("tandem.vllm_route")

#: SamplingParams.extra_args key: how many trailing prompt-logprob rows the request needs.
EXTRA_ARGS_ROWS_KEY = "tandem_prompt_logprob_rows"

_installed: bool | None = None


def install_prompt_logprobs_trim() -> bool:
    """Install the patch once per process; returns whether it is active."""
    global _installed
    if _installed is not None:
        return _installed
    trim = os.environ.get("TANDEM_VERIFY_NO_TRIM") != "1"  # the decisions are decoded either way
    try:
        from vllm.v1.engine import logprobs as lp_mod

        proc_cls = lp_mod.LogprobsProcessor
        orig_from = proc_cls.__dict__["from_new_request"].__func__
        orig_update = proc_cls._update_prompt_logprobs
    except Exception as exc:  # pragma: no cover - depends on the vLLM version
        logger.warning("tandem: prompt-logprob trim not installed (%s); verify rounds cost O(context) in the API process", exc)
        _installed = False
        return False

    def from_new_request(cls, tokenizer, request):
        proc = orig_from(cls, tokenizer, request)
        sp = getattr(request, "sampling_params", None)
        extra = getattr(sp, "extra_args", None) or {}
        rows = extra.get(EXTRA_ARGS_ROWS_KEY)
        if isinstance(rows, int) and rows > 0:
            proc._tandem_rows = rows
        if EXTRA_ARGS_DECIDE_KEY in extra:
            proc._tandem_decide = True
        return proc

    def _update_prompt_logprobs(self, prompt_logprobs_tensors):
        if getattr(self, "_tandem_decide", False):
            # The engine decided the round: a [2, k+1] decision, not logprob rows (None if the
            # engine did not decide, e.g. its plugin is missing; the route then says so).
            self.prompt_logprobs = [decode_decision(prompt_logprobs_tensors)]
            return None
        rows = getattr(self, "_tandem_rows", None) if trim else None
        if rows is not None:
            # The model runner hands the whole prompt's tensor over once, when
            # prefill completes; keep its last `rows` rows, once.
            self._tandem_rows = None
            t = prompt_logprobs_tensors
            prompt_logprobs_tensors = t._replace(
                logprob_token_ids=t.logprob_token_ids[-rows:],
                logprobs=t.logprobs[-rows:],
                selected_token_ranks=t.selected_token_ranks[-rows:],
            )
        return orig_update(self, prompt_logprobs_tensors)

    proc_cls.from_new_request = classmethod(from_new_request)
    proc_cls._update_prompt_logprobs = _update_prompt_logprobs
    _installed = trim
    return trim
