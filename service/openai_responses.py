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

from decoding.speculative import GenerationStats
from service.http import dumps


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int) -> Usage:
        total = prompt_tokens + completion_tokens
        return cls(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, total_tokens=total)


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


FinishReason = Literal["stop", "length"]


class _Reply(BaseModel):
    """What every response and chunk of a request repeats."""

    id: str
    object: str
    created: int
    model: str
    system_fingerprint: str


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: None = None
    finish_reason: FinishReason | None


class CompletionResponse(_Reply):
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]
    usage: Usage
    tandem: TandemStats


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: ChatMessageOut
    logprobs: None = None
    finish_reason: FinishReason | None


class ChatCompletionResponse(_Reply):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]
    usage: Usage
    tandem: TandemStats


def _absent(value: Any) -> bool:
    return value is None


# A streamed chunk's "usage" is null on every chunk but the last (sent with
# stream_options.include_usage only: serialise with exclude={"usage"} otherwise);
# "tandem" appears on the chunk that finishes a choice, and on the last.


class CompletionChunk(_Reply):
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]
    usage: Usage | None = None
    tandem: TandemStats | None = Field(None, exclude_if=_absent)


class ChatDelta(TypedDict, total=False):
    role: Literal["assistant"]
    content: str


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: None = None
    finish_reason: FinishReason | None = None


class ChatCompletionChunk(_Reply):
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    tandem: TandemStats | None = Field(None, exclude_if=_absent)


@dataclass(frozen=True)
class ResponseBuilder:
    """Builds one request's response, or its stream's chunks, which share an id and a timestamp."""

    chat: bool
    model: str
    system_fingerprint: str
    id: str
    created: int

    @classmethod
    def for_request(cls, chat: bool, model: str, system_fingerprint: str) -> ResponseBuilder:
        response_id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        return cls(chat, model, system_fingerprint, response_id, int(time.time()))

    def response(
        self, texts: Sequence[str], finish_reasons: Sequence[str | None], usage: Usage, tandem: TandemStats
    ) -> CompletionResponse | ChatCompletionResponse:
        """The non-streamed response; choice ``i`` is ``texts[i]``."""
        head = self._head()
        if self.chat:
            return ChatCompletionResponse(
                **head,
                choices=[
                    ChatChoice(index=i, message=ChatMessageOut(content=t), finish_reason=f)  # type: ignore[arg-type]
                    for i, (t, f) in enumerate(zip(texts, finish_reasons, strict=True))
                ],
                usage=usage,
                tandem=tandem,
            )
        return CompletionResponse(
            **head,
            choices=[
                CompletionChoice(index=i, text=t, finish_reason=f)  # type: ignore[arg-type]
                for i, (t, f) in enumerate(zip(texts, finish_reasons, strict=True))
            ],
            usage=usage,
            tandem=tandem,
        )

    def chunk(
        self, index: int, text: str, finish_reason: str | None = None, tandem: TandemStats | None = None
    ) -> CompletionChunk | ChatCompletionChunk:
        """A streamed chunk of choice ``index``: its new text, and its finish reason and statistics once it ends."""
        if self.chat:
            delta: ChatDelta = {"content": text} if text else {}
            choice = ChatChunkChoice(index=index, delta=delta, finish_reason=finish_reason)  # type: ignore[arg-type]
            return ChatCompletionChunk(**self._head(), choices=[choice], tandem=tandem)
        choice = CompletionChoice(index=index, text=text, finish_reason=finish_reason)  # type: ignore[arg-type]
        return CompletionChunk(**self._head(), choices=[choice], tandem=tandem)

    def role_chunk(self, index: int) -> ChatCompletionChunk:
        """The chunk that opens chat choice ``index``, as OpenAI's do: the assistant role, empty content."""
        choice = ChatChunkChoice(index=index, delta={"role": "assistant", "content": ""})
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


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# The error envelope is built by service.http.error_body (shared by every tandem server);
# these models document it in /openapi.json.


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    error: ErrorDetail
