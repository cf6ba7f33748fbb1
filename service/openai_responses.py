"""OpenAI's response schema for /v1/completions and /v1/chat/completions, and its builders.

These models are what the gateway serialises (and what /openapi.json
documents): the field order is OpenAI's key order, and None is sent as null
(``"logprobs": null``, ``"finish_reason": null``). Responses carry ``usage``
and, as an extra field that OpenAI clients ignore, ``tandem``: the speculative
statistics (draft/accepted tokens, acceptance rate, rounds).
:class:`ResponseBuilder` builds one request's response or stream chunks;
:func:`to_json` puts them on the wire.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, Field
from pydantic_core import PydanticSerializationError
from typing_extensions import TypedDict  # pydantic needs typing_extensions' on Python < 3.12

from decoding.logprobs import TokenLogprob
from decoding.speculative import GenerationStats
from service.http import dumps


def _absent(value: Any) -> bool:
    return value is None


class PromptTokensDetails(BaseModel):
    cached_tokens: int


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    #: Sent only where the verifier reports its prefix-cache hits.
    prompt_tokens_details: PromptTokensDetails | None = Field(None, exclude_if=_absent)

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int, cached_tokens: int | None = None) -> Usage:
        total = prompt_tokens + completion_tokens
        details = None if cached_tokens is None else PromptTokensDetails(cached_tokens=cached_tokens)
        return cls(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, total_tokens=total,
                   prompt_tokens_details=details)  # fmt: skip


class TandemStats(BaseModel):
    """The speculative statistics of a choice, or of a request (summed over its choices)."""

    mode: str
    rounds: int
    draft_tokens: int
    accepted_tokens: int
    acceptance_rate: float | None = Field(description="accepted / draft tokens; null without drafts")
    mean_accepted_per_round: float | None
    verifier_forward_passes: int
    drafter_forward_passes: int
    fallback: str | None = Field(
        None, description="'drafter-only' when the verifier failed mid-request and the configured fallback finished it"
    )

    @classmethod
    def of(cls, mode: str, stats: Iterable[GenerationStats]) -> TandemStats:
        total = GenerationStats(mode=mode)
        for s in stats:
            total.rounds += s.rounds
            total.draft_tokens += s.draft_tokens
            total.accepted_tokens += s.accepted_tokens
            total.verifier_forward_passes += s.verifier_forward_passes
            total.drafter_forward_passes += s.drafter_forward_passes
            total.fallback = total.fallback or s.fallback
        return cls(
            mode=mode,
            rounds=total.rounds,
            draft_tokens=total.draft_tokens,
            accepted_tokens=total.accepted_tokens,
            acceptance_rate=total.acceptance_rate,
            mean_accepted_per_round=total.mean_accepted_per_round,
            verifier_forward_passes=total.verifier_forward_passes,
            drafter_forward_passes=total.drafter_forward_passes,
            fallback=total.fallback,
        )


FinishReason = Literal["stop", "length", "tool_calls"]
#: vLLM's ``stop_reason``: the stop string or stop token id that ended a choice; null for EOS and length.
StopReason = int | str | None


class _Reply(BaseModel):
    """What every response and chunk of a request repeats."""

    id: str
    object: str
    created: int
    model: str
    system_fingerprint: str


# -- logprobs: OpenAI's two shapes ------------------------------------------------------------------


class CompletionLogprobs(BaseModel):
    """Completions' logprobs: parallel lists, one entry per token (``top_logprobs`` maps token text to logprob)."""

    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None


#: JSON has no -inf: a token the processing forbade is reported at vLLM's floor.
LOGPROB_FLOOR = -9999.0


class LogprobsFormatter:
    """Turns decoding.logprobs.TokenLogprob entries into OpenAI's completions or chat shape.

    Token strings are the token's own text (``tokenizer.decode([id])``), or ``token_id:<id>``
    with vLLM's ``return_tokens_as_token_ids``.
    """

    def __init__(self, tokenizer: Any, chat: bool, as_ids: bool = False):
        self.tokenizer = tokenizer
        self.chat = chat
        self.as_ids = as_ids
        self._text: dict[int, str] = {}

    def token(self, token_id: int) -> str:
        if self.as_ids:
            return f"token_id:{token_id}"
        text = self._text.get(token_id)
        if text is None:
            text = self._text[token_id] = self.tokenizer.decode([token_id])
        return text

    def completion(
        self, entries: Sequence[TokenLogprob], offset: int = 0, prompt: Sequence[int] | None = None,
        prompt_entries: Sequence[TokenLogprob] | None = None,
    ) -> tuple[CompletionLogprobs, int]:  # fmt: skip
        """Completions' logprobs for ``entries`` (after the echoed ``prompt``, whose first token has none);
        text offsets count from ``offset``. Returns them and the offset after the last token."""
        out = CompletionLogprobs()
        rows: list[tuple[int, TokenLogprob | None]] = []
        if prompt is not None:
            rows.append((prompt[0], None))
            rows += [(e.token_id, e) for e in prompt_entries or ()]
        rows += [(e.token_id, e) for e in entries]
        for token_id, e in rows:
            text = self.token(token_id)
            out.tokens.append(text)
            out.text_offset.append(offset)
            offset += len(text)
            if e is None:
                out.token_logprobs.append(None)
                out.top_logprobs.append(None)
                continue
            out.token_logprobs.append(max(e.logprob, LOGPROB_FLOOR))
            top: dict[str, float] = {}
            for t, lp in e.top:  # two ids may share a text (byte tokens): the likelier one keeps it
                top.setdefault(self.token(t), max(lp, LOGPROB_FLOOR))
            top.setdefault(text, max(e.logprob, LOGPROB_FLOOR))  # vLLM adds the chosen token
            out.top_logprobs.append(top)
        return out, offset

    def chat_logprobs(self, entries: Sequence[TokenLogprob]) -> ChatLogprobs:
        content = []
        for e in entries:
            text = self.token(e.token_id)
            top = [TopLogprob(token=(t := self.token(i)), logprob=max(lp, LOGPROB_FLOOR), bytes=list(t.encode("utf-8")))
                   for i, lp in e.top]  # fmt: skip
            content.append(ChatTokenLogprob(token=text, logprob=max(e.logprob, LOGPROB_FLOOR),
                                            bytes=list(text.encode("utf-8")), top_logprobs=top))  # fmt: skip
        return ChatLogprobs(content=content)


# -- choices --------------------------------------------------------------------------------------------


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReason | None
    stop_reason: StopReason = None


class CompletionResponse(_Reply):
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]
    usage: Usage
    tandem: TandemStats


class FunctionCall(BaseModel):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(BaseModel):
    id: str = Field(default_factory=lambda: "chatcmpl-tool-" + uuid.uuid4().hex)
    type: Literal["function"] = "function"
    function: FunctionCall


def _empty(value: Any) -> bool:
    return not value


class ChatMessageOut(BaseModel):
    role: str = "assistant"
    content: str | None
    tool_calls: list[ToolCall] = Field(default_factory=list, exclude_if=_empty)


class ChatChoice(BaseModel):
    index: int
    message: ChatMessageOut
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason | None
    stop_reason: StopReason = None


class ChatCompletionResponse(_Reply):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]
    usage: Usage
    tandem: TandemStats


# A streamed chunk's "usage" is null on every chunk but the last (sent with
# stream_options.include_usage only: serialise with exclude={"usage"} otherwise);
# "tandem" appears on the chunk that finishes a choice, and on the last.


class CompletionChunk(_Reply):
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]
    usage: Usage | None = None
    tandem: TandemStats | None = Field(None, exclude_if=_absent)


class ToolCallDelta(TypedDict, total=False):
    index: int
    id: str
    type: Literal["function"]
    function: dict[str, str]


class ChatDelta(TypedDict, total=False):
    role: str
    content: str
    tool_calls: list[ToolCallDelta]


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason | None = None
    stop_reason: StopReason = Field(None, exclude_if=_absent)


class ChatCompletionChunk(_Reply):
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    tandem: TandemStats | None = Field(None, exclude_if=_absent)


@dataclass
class ChoiceOutput:
    """One finished choice, as the response reports it."""

    text: str
    finish_reason: str | None
    stop_reason: StopReason = None
    logprobs: CompletionLogprobs | ChatLogprobs | None = None
    tool_calls: list[ToolCall] | None = None


@dataclass(frozen=True)
class ResponseBuilder:
    """Builds one request's response, or its stream's chunks, which share an id and a timestamp."""

    chat: bool
    model: str
    system_fingerprint: str
    id: str
    created: int
    role: str = "assistant"

    @classmethod
    def for_request(
        cls, chat: bool, model: str, system_fingerprint: str, request_id: str | None = None, role: str = "assistant"
    ) -> ResponseBuilder:
        """``request_id`` (vLLM's request field) names the response: ``cmpl-<request_id>``."""
        response_id = ("chatcmpl-" if chat else "cmpl-") + (request_id or uuid.uuid4().hex)
        return cls(chat, model, system_fingerprint, response_id, int(time.time()), role)

    def response(self, outputs: Sequence[ChoiceOutput], usage: Usage, tandem: TandemStats
                 ) -> CompletionResponse | ChatCompletionResponse:  # fmt: skip
        """The non-streamed response; choice ``i`` is ``outputs[i]``."""
        head = self._head()
        if self.chat:
            choices = []
            for i, o in enumerate(outputs):
                calls = o.tool_calls or []
                message = ChatMessageOut(role=self.role, content=None if calls and not o.text else o.text, tool_calls=calls)
                choices.append(ChatChoice(index=i, message=message, logprobs=o.logprobs, finish_reason=o.finish_reason,  # type: ignore[arg-type]
                                          stop_reason=o.stop_reason))  # fmt: skip
            return ChatCompletionResponse(**head, choices=choices, usage=usage, tandem=tandem)
        return CompletionResponse(
            **head,
            choices=[
                CompletionChoice(index=i, text=o.text, logprobs=o.logprobs, finish_reason=o.finish_reason,  # type: ignore[arg-type]
                                 stop_reason=o.stop_reason)
                for i, o in enumerate(outputs)
            ],
            usage=usage,
            tandem=tandem,
        )  # fmt: skip

    def chunk(
        self,
        index: int,
        text: str,
        finish_reason: str | None = None,
        tandem: TandemStats | None = None,
        *,
        stop_reason: StopReason = None,
        logprobs: CompletionLogprobs | ChatLogprobs | None = None,
        tool_calls: list[ToolCall] | None = None,
    ) -> CompletionChunk | ChatCompletionChunk:
        """A streamed chunk of choice ``index``: its new text (and tokens' logprobs), and its finish
        reason and statistics once it ends."""
        if self.chat:
            delta: ChatDelta = {"content": text} if text else {}
            if tool_calls:
                delta["tool_calls"] = [
                    {"index": i, "id": c.id, "type": "function",
                     "function": {"name": c.function.name, "arguments": c.function.arguments}}
                    for i, c in enumerate(tool_calls)
                ]  # fmt: skip
            choice = ChatChunkChoice(index=index, delta=delta, logprobs=logprobs, finish_reason=finish_reason,  # type: ignore[arg-type]
                                     stop_reason=stop_reason)  # fmt: skip
            return ChatCompletionChunk(**self._head(), choices=[choice], tandem=tandem)
        choice = CompletionChoice(index=index, text=text, logprobs=logprobs, finish_reason=finish_reason,  # type: ignore[arg-type]
                                  stop_reason=stop_reason)  # fmt: skip
        return CompletionChunk(**self._head(), choices=[choice], tandem=tandem)

    def role_chunk(self, index: int, content: str = "") -> ChatCompletionChunk:
        """The chunk that opens chat choice ``index``, as OpenAI's do: the role, and empty content
        (or the echoed final message, with ``echo``)."""
        choice = ChatChunkChoice(index=index, delta={"role": self.role, "content": content})
        return ChatCompletionChunk(**self._head(), choices=[choice])

    def usage_chunk(self, usage: Usage, tandem: TandemStats) -> CompletionChunk | ChatCompletionChunk:
        """The last chunk with ``stream_options.include_usage``: no choices, the request's totals."""
        cls = ChatCompletionChunk if self.chat else CompletionChunk
        return cls(**self._head(), choices=[], usage=usage, tandem=tandem)

    def _head(self) -> dict[str, Any]:
        fp = self.system_fingerprint
        return {"id": self.id, "created": self.created, "model": self.model, "system_fingerprint": fp}


def to_json(model: BaseModel, exclude: set[str] | None = None) -> bytes:
    """A response model as wire JSON (compact, UTF-8). Text that UTF-8 cannot carry (a lone
    surrogate) falls back to ASCII escapes, as :func:`service.http.dumps` does."""
    try:
        # The model's serializer writes bytes directly (model_dump_json would decode them to str).
        return model.__pydantic_serializer__.to_json(model, exclude=exclude)
    except PydanticSerializationError:
        return dumps(model.model_dump(exclude=exclude))


class ModelPermission(BaseModel):
    """vLLM's model permission object (what vLLM tooling reads; OpenAI's clients ignore it)."""

    id: str = Field(default_factory=lambda: "modelperm-" + uuid.uuid4().hex)
    object: Literal["model_permission"] = "model_permission"
    created: int = Field(default_factory=lambda: int(time.time()))
    allow_create_engine: bool = False
    allow_sampling: bool = True
    allow_logprobs: bool = True
    allow_search_indices: bool = False
    allow_view: bool = True
    allow_fine_tuning: bool = False
    organization: str = "*"
    group: str | None = None
    is_blocking: bool = False


class ModelCard(BaseModel):
    """OpenAI's model object with vLLM's fields: ``root`` is the verifier it serves, ``parent`` null."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    root: str | None = None
    parent: str | None = None
    max_model_len: int | None = None
    permission: list[ModelPermission] = Field(default_factory=list)


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeResponse(BaseModel):
    """vLLM's ``/tokenize`` answer."""

    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeResponse(BaseModel):
    """vLLM's ``/detokenize`` answer."""

    prompt: str


# The error envelope is built by service.http.error_body (shared by every tandem server);
# these models document it in /openapi.json.


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    error: ErrorDetail
