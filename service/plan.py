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
import functools
import json
import logging
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

log = logging.getLogger("tandem.gateway")

#: Prompts longer than this (characters) are tokenized on a worker thread; chat is always templated on one.
_TOKENIZE_INLINE_CHARS = 8192
#: Unknown fields (ignored, as vLLM does) of a request, serialised, at most: OpenAI's own ``metadata`` is ~10 KiB.
MAX_UNKNOWN_FIELD_BYTES = 64 << 10


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
    max_context = router.verifier.max_context
    limit = settings.max_prompt_tokens
    bound = PromptBound.of(backends.tokenizer, min(limit or max_context, max_context))
    check_unknown_fields(body)
    prompts: list[list[int]] = []
    logged: Any
    if isinstance(body, ChatCompletionRequest):
        check_chat_size(body, settings, bound)
        # Templating and tokenization are CPU work that grows with the request: never on the event loop.
        text, ids = await asyncio.to_thread(_prepare_chat, body, backends.tokenizer, bound)
        prompts.append(ids)
        logged = text
    else:
        raw = body.prompts()
        if len(raw) * n > MAX_CHOICES:  # before tokenizing them all
            raise bad_request(f"{len(raw)} prompts x n={n} exceeds {MAX_CHOICES} choices per request", "n")
        for p in raw:  # every prompt checked before any is tokenized
            bound.check(p)
        for p in raw:
            prompts.append(await _encode(backends.tokenizer, p) if isinstance(p, str) else p)
        logged = raw
    if record is not None and settings.log_prompts:
        record.prompt = logged

    spec = body.grammar_spec(any_whitespace=not settings.structured_outputs_disable_any_whitespace)
    grammar = await router.compile_grammar(spec) if spec is not None else None
    requested = body.requested_max_tokens()
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


@dataclass(frozen=True)
class PromptBound:
    """The longest prompt that can fit, known before tokenizing it: ``max_tokens`` tokens of a lossless tokenizer
    (decoding gives the text back: every causal LM's) cover at most ``max_tokens * longest_token_bytes`` bytes of
    text, where ``longest_token_bytes`` is the longest vocabulary entry, in UTF-8 bytes of its token string (an
    upper bound on the text bytes it stands for: byte-level BPE, SentencePiece ``▁`` and ``<0x..>`` included).
    A longer text is refused without being tokenized: tokenizing costs ~200 bytes of memory per text byte, so
    tokenizing first what cannot fit is how one 30 MiB prompt took 8 GiB. ``max_text_bytes`` is None for a lossy
    tokenizer (none is known): then only the body size bounds it."""

    max_tokens: int
    longest_token_bytes: int
    max_text_bytes: int | None

    @classmethod
    def of(cls, tokenizer: Any, max_tokens: int) -> PromptBound:
        longest, lossless = _vocabulary_bound(tokenizer)
        return cls(max_tokens, longest, max_tokens * longest if lossless else None)

    def check(self, prompt: str | list[int], param: str = "prompt") -> None:
        if isinstance(prompt, list):
            if len(prompt) > self.max_tokens:
                raise _too_long(f"prompt is {len(prompt)} tokens; at most {self.max_tokens} fit", param)
            return
        self.check_bytes(len(prompt.encode("utf-8", "surrogatepass")), "prompt", param)

    def check_bytes(self, size: int, what: str, param: str) -> None:
        if self.max_text_bytes is not None and size > self.max_text_bytes:
            raise _too_long(
                f"{what} is {size} bytes of text: more than {self.max_tokens} tokens can hold (at most "
                f"{self.max_text_bytes} bytes, {self.longest_token_bytes} per token), so it cannot fit", param,
            )  # fmt: skip


def _too_long(message: str, param: str) -> APIError:
    return APIError(400, message, param=param, code="context_length_exceeded", reason="context_length")


@functools.lru_cache(maxsize=8)
def _vocabulary_bound(tokenizer: Any) -> tuple[int, bool]:
    """(the longest vocabulary token in UTF-8 bytes, whether the tokenizer gives a probe text back)."""
    tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    longest = max((len(t.encode("utf-8", "surrogatepass")) for t in tokens if isinstance(t, str)), default=1)
    probe = "Hello,  world!\n\tdef f(x):\n    return x * 2  # caf\u00e9 \u4e2d\u6587 \u00a0~"
    try:
        lossless = tokenizer.decode(tokenizer.encode(probe, add_special_tokens=False)).strip() == probe.strip()
    except Exception:  # noqa: BLE001 - any failure means: do not rely on it
        lossless = False
    if not lossless:
        log.warning("the tokenizer does not give text back: prompts are not bounded by bytes before tokenization")
    return max(1, longest), lossless


def log_prompt_bound(backends: Backends, settings: TandemSettings) -> None:
    """At start: compute the vocabulary bound (once per tokenizer) and say what it allows."""
    max_context = backends.router.verifier.max_context
    bound = PromptBound.of(backends.tokenizer, min(settings.max_prompt_tokens or max_context, max_context))
    log.info(
        "requests: body <= %d bytes, %d prepared at once; prompt text <= %s bytes (%d tokens x %d bytes, the longest "
        "token); chat <= %d messages and parts", settings.max_request_bytes, settings.max_preparing,
        bound.max_text_bytes if bound.max_text_bytes is not None else "unbounded", bound.max_tokens,
        bound.longest_token_bytes, settings.max_messages,
    )  # fmt: skip


def check_unknown_fields(body: CompletionRequest | ChatCompletionRequest) -> None:
    """Unknown fields are ignored, but kept in the parsed request while it waits and runs: bound their size."""
    extras = [body.model_extra or {}]
    if isinstance(body, ChatCompletionRequest):
        for m in body.messages:
            extras.append(m.model_extra or {})
            if isinstance(m.content, list):
                extras.extend(part.model_extra or {} for part in m.content)
    size = sum(len(json.dumps(e, default=str)) for e in extras if e)
    if size > MAX_UNKNOWN_FIELD_BYTES:
        raise bad_request(
            f"the request's unknown fields (ignored) take {size} bytes; at most {MAX_UNKNOWN_FIELD_BYTES} are accepted"
        )


def check_chat_size(body: ChatCompletionRequest, settings: TandemSettings, bound: PromptBound) -> None:
    """Message count and content size, before the messages are templated."""
    items = len(body.messages) + sum(len(m.content) for m in body.messages if isinstance(m.content, list))
    if items > settings.max_messages:
        raise bad_request(
            f"the request has {items} messages and content parts; this server accepts at most {settings.max_messages}",
            "messages",
        )
    size = 0
    for m in body.messages:
        if isinstance(m.content, str):
            size += len(m.content.encode("utf-8", "surrogatepass"))
        elif m.content is not None:
            size += sum(len(part.text.encode("utf-8", "surrogatepass")) for part in m.content if part.text)
    if settings.max_content_bytes is not None and size > settings.max_content_bytes:
        raise bad_request(
            f"the messages' content is {size} bytes; this server accepts at most {settings.max_content_bytes}",
            "messages",
        )
    bound.check_bytes(size, "the messages' content", "messages")


def _prepare_chat(body: ChatCompletionRequest, tokenizer: Any, bound: PromptBound) -> tuple[str, list[int]]:
    """On a worker thread: the conversation templated, checked against the bound, tokenized."""
    text, special = render_chat(tokenizer, body)
    bound.check_bytes(len(text.encode("utf-8", "surrogatepass")), "the templated conversation", "messages")
    return text, tokenizer.encode(text, add_special_tokens=special)


async def _encode(tokenizer: Any, text: str, add_special_tokens: bool = True) -> list[int]:
    def run() -> list[int]:
        return tokenizer.encode(text, add_special_tokens=add_special_tokens)

    if len(text) > _TOKENIZE_INLINE_CHARS:  # long prompts would stall the event loop
        return await asyncio.to_thread(run)
    return run()
