"""One request's plan: which router runs it, with which options, and each choice's sampling parameters.

:func:`plan_request` decides all of it once, before admission, so that every
refusal (unknown model, unsupported parameter, bad ``tandem`` options, a split
request without a worker, a prompt beyond the context) is a 4xx before the
request takes a slot. The split privacy policy (:func:`route`, see
docs/split-inference.md) is part of that decision: a private request runs on
the same decoding core over the split verifier.
"""

from __future__ import annotations

import asyncio
import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from decoding.sampling import SamplingParams
from decoding.speculative import SpecOptions, SpeculativeRouter
from service.backends import Backends, spec_options
from service.errors import APIError, bad_request
from service.openai_api import MAX_CHOICES, ChatCompletionRequest, CompletionRequest, TandemOptions, render_chat

if TYPE_CHECKING:
    from service.config import TandemSettings
    from service.logs import RequestRecord

#: Prompts longer than this (characters) are tokenized on a worker thread.
_TOKENIZE_INLINE_CHARS = 8192


@dataclass(frozen=True)
class ChoiceSpec:
    """One generation of a request: choice ``index`` continues ``prompt_ids`` with ``params``."""

    index: int  # prompt_index * n + j, OpenAI's order
    prompt_ids: list[int]
    params: SamplingParams


@dataclass(frozen=True)
class Plan:
    """How a request runs: everything the job needs, decided once."""

    router: SpeculativeRouter  # the local core, or the same core over the split verifier
    options: SpecOptions
    mode: str  # the label in responses, logs and metrics: options.mode, or "split"
    choices: list[ChoiceSpec]
    prompt_tokens: int  # each prompt counted once, not once per choice


async def plan_request(
    body: CompletionRequest | ChatCompletionRequest,
    settings: TandemSettings,
    backends: Backends,
    record: RequestRecord | None = None,
) -> Plan:
    """Validate ``body`` against the served model and decide how it runs; raises the 4xx to send.

    ``record`` (the request's log record) gets the mode, the prompt (only with
    ``log_prompts``) and the prompt tokens as soon as each is known, so that a
    request refused half-way is still logged and counted under its mode.
    """
    if body.model != settings.model_name:
        raise APIError(
            404, f"the model {body.model!r} does not exist; this server serves {settings.model_name!r}",
            param="model", code="model_not_found", reason="not_found",
        )  # fmt: skip
    body.check_supported()
    options = merge_options(spec_options(settings), body.tandem)
    requested_mode = body.tandem.mode if body.tandem is not None else None
    use_split, split_mode = route(settings, requested_mode, has_drafter=backends.drafter is not None)
    if not use_split:
        router, mode = backends.router, options.mode
    elif backends.split_router is None:
        raise bad_request("mode 'split' needs a split worker: set split_worker_url on the server", "tandem.mode")
    else:
        router, options, mode = backends.split_router, dataclasses.replace(options, mode=split_mode), "split"
    if record is not None:
        record.mode = mode

    n = body.n or 1
    prompts: list[list[int]] = []
    logged: Any
    if isinstance(body, ChatCompletionRequest):
        text, special = render_chat(backends.tokenizer, body)
        prompts.append(await _encode(backends.tokenizer, text, special))
        logged = text
    else:
        raw = body.prompts()
        if len(raw) * n > MAX_CHOICES:  # before tokenizing them all
            raise bad_request(f"{len(raw)} prompts x n={n} exceeds {MAX_CHOICES} choices per request", "n")
        for p in raw:
            prompts.append(await _encode(backends.tokenizer, p) if isinstance(p, str) else p)
        logged = raw
    if record is not None and settings.log_prompts:
        record.prompt = logged

    spec = body.grammar_spec(any_whitespace=not settings.structured_outputs_disable_any_whitespace)
    grammar = await router.compile_grammar(spec) if spec is not None else None
    requested = body.requested_max_tokens()
    limit = settings.max_prompt_tokens
    max_context = router.verifier.max_context
    choices: list[ChoiceSpec] = []
    for ids in prompts:
        if limit is not None and len(ids) > limit:
            raise APIError(
                400, f"prompt is {len(ids)} tokens; this server accepts at most {limit} prompt tokens",
                param="prompt", code="context_length_exceeded", reason="context_length",
            )  # fmt: skip
        if requested is not None:
            max_tokens = requested
        else:
            default = settings.default_max_tokens or (max_context if isinstance(body, ChatCompletionRequest) else 16)
            max_tokens = max(1, min(default, max_context - len(ids)))
        params = SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if body.temperature is None else body.temperature,
            top_k=0 if body.top_k in (None, -1) else body.top_k,
            top_p=1.0 if body.top_p is None else body.top_p,
            seed=body.seed,
            stop=body.stop_list(),
            ignore_eos=bool(body.ignore_eos),
            **body.processing(),
            grammar=grammar,
        )
        router.check_request(ids, params, options)  # the context check: prompt + max_tokens
        for j in range(n):
            p = params if j == 0 or body.seed is None else dataclasses.replace(params, seed=body.seed + j)
            choices.append(ChoiceSpec(index=len(choices), prompt_ids=ids, params=p))
    prompt_tokens = sum(len(ids) for ids in prompts)
    if record is not None:
        record.prompt_tokens = prompt_tokens
    return Plan(router=router, options=options, mode=mode, choices=choices, prompt_tokens=prompt_tokens)


def merge_options(base: SpecOptions, t: TandemOptions | None) -> SpecOptions:
    """The server's options ``base`` with the request's ``tandem`` object over them.

    Unset draft bounds follow the set ones (a request's ``max_draft_tokens``
    below the server's minimum lowers the minimum too); an explicit
    ``num_draft_tokens`` outside the bounds is a 400. ``mode: split`` keeps the
    server's mode here: :func:`route` decides what a split request runs.
    """
    if t is None:
        return base
    lo = t.min_draft_tokens
    hi = t.max_draft_tokens
    if lo is None:
        lo = base.min_draft_tokens if hi is None else min(base.min_draft_tokens, hi)
    if hi is None:
        hi = max(base.max_draft_tokens, lo)
    if t.num_draft_tokens is not None:
        num = t.num_draft_tokens
        if not lo <= num <= hi:
            raise bad_request(
                f"num_draft_tokens ({num}) must lie within [min_draft_tokens, max_draft_tokens] = [{lo}, {hi}]",
                "tandem.num_draft_tokens",
            )
    else:
        num = min(max(base.num_draft_tokens, lo), hi)
    return SpecOptions(
        mode=base.mode if t.mode in (None, "split") else t.mode,
        num_draft_tokens=num,
        min_draft_tokens=lo,
        max_draft_tokens=hi,
        adaptive=base.adaptive if t.adaptive is None else t.adaptive,
    )


def route(settings: Any, requested_mode: str | None, *, has_drafter: bool = True) -> tuple[bool, str]:
    """The split privacy policy: (use_split, router_mode) for one request.

    ``requested_mode`` is the request's ``tandem.mode`` (None when absent).
    ``"split"`` asks for split inference: speculative over the split verifier
    when a drafter exists and ``split_speculative`` is on, else plain split
    decoding (``verifier-only`` over the split verifier). With
    ``split_policy == "always"`` every request is split, keeping its own mode
    (``drafter-only`` never touches a verifier, so it stays local).
    """
    spec = "speculative" if has_drafter and settings.split_speculative else "verifier-only"
    if requested_mode == "split":
        return True, spec
    if settings.split_policy == "always":
        if requested_mode in (None, ""):
            return True, spec
        if requested_mode == "drafter-only":
            return False, "drafter-only"
        return True, requested_mode if has_drafter or requested_mode == "verifier-only" else "verifier-only"
    return False, requested_mode or settings.mode


async def _encode(tokenizer: Any, text: str, add_special_tokens: bool = True) -> list[int]:
    def run() -> list[int]:
        return tokenizer.encode(text, add_special_tokens=add_special_tokens)

    if len(text) > _TOKENIZE_INLINE_CHARS:  # long prompts would stall the event loop
        return await asyncio.to_thread(run)
    return run()
