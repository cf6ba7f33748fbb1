"""OpenAI's request schema for /v1/completions and /v1/chat/completions (responses: service/openai_responses.py).

What is accepted (see docs/gateway.md for the full table):

* OpenAI parameters: ``model``, ``prompt`` (a string, a list of strings, a list
  of token ids or a list of such lists) / ``messages``, ``max_tokens`` (chat
  also ``max_completion_tokens``), ``temperature`` (default 1, as OpenAI),
  ``top_p``, ``n``, ``seed``, ``stop`` (a string or up to 4), ``stream``,
  ``stream_options.include_usage``, ``user``.
* vLLM-style extras: ``top_k`` (0 or -1 = off) and ``ignore_eos``.
* tandem's own ``tandem`` object: per-request decoding options ``mode``,
  ``num_draft_tokens``, ``min_draft_tokens``, ``max_draft_tokens``, ``adaptive``.
* OpenAI parameters that would change the output but are not implemented
  (``logprobs``, ``top_logprobs``, ``echo``, ``suffix``, ``best_of`` > 1,
  non-zero penalties, ``logit_bias``, ``tools``/``functions``, a non-text
  ``response_format``) are refused with a 400 naming the parameter, never
  silently ignored. Other unknown fields (``metadata``, ``store``, ...) are
  ignored, as vLLM does.

"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from decoding.speculative import MAX_DRAFT_TOKENS
from service.errors import APIError, bad_request

MAX_CHOICES = 128
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1

#: Used for chat when the verifier's tokenizer has no chat template of its own:
#: a plain transcript, which base (non-chat) models continue sensibly.
#:
#:     <system content>\n\n          (system / developer messages)
#:     User: <content>\n
#:     Assistant: <content>\n
#:     Assistant:                    (the generation prompt)
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] in ('system', 'developer') %}{{ message['content'] }}\n\n"
    "{% else %}{{ message['role'] | capitalize }}: {{ message['content'] }}\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


def _check_text(value: str, what: str) -> str:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{what} contains a lone surrogate, which is not valid Unicode text") from None
    return value


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: bool | None = Field(False, description="Send a final chunk with the usage (choices: []) before [DONE].")


class TandemOptions(BaseModel):
    """tandem's per-request decoding options; unset fields take the server's settings."""

    model_config = ConfigDict(extra="forbid")
    mode: Literal["speculative", "verifier-only", "drafter-only", "split"] | None = Field(
        None,
        description="speculative (default), verifier-only (the verifier alone), drafter-only, or split: the "
        "verifier runs split between the edge and the split worker, so no token leaves the edge",
    )
    num_draft_tokens: int | None = Field(None, ge=1, le=MAX_DRAFT_TOKENS, description="Draft length k of the first round.")
    min_draft_tokens: int | None = Field(None, ge=1, le=MAX_DRAFT_TOKENS, description="Lower bound of the adaptive k.")
    max_draft_tokens: int | None = Field(None, ge=1, le=MAX_DRAFT_TOKENS, description="Upper bound of the adaptive k.")
    adaptive: bool | None = Field(None, description="Adapt k to the acceptance (default: the server's setting).")


class _GenerationRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str = Field(..., description="The served model id (GET /v1/models).")
    max_tokens: int | None = Field(None, ge=1, description="Tokens to generate at most.")
    temperature: float | None = Field(1.0, ge=0, le=2, allow_inf_nan=False, description="0 = greedy. Default 1.")
    top_p: float | None = Field(1.0, gt=0, le=1, allow_inf_nan=False)
    top_k: int | None = Field(None, ge=-1, description="vLLM extra: keep the k most likely tokens; 0 or -1 = off.")
    n: int | None = Field(1, ge=1, le=MAX_CHOICES, description="Choices to generate.")
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX, description="Reproducible sampling; choice i uses seed + i.")
    stop: str | list[str] | None = Field(None, description="Up to 4 stop strings; the stop text is not returned.")
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, description="End-user id; accepted, never logged nor used in metrics.")
    ignore_eos: bool | None = Field(False, description="vLLM extra: keep generating after the end-of-text token.")
    tandem: TandemOptions | None = None
    # OpenAI parameters that are accepted only at their neutral value.
    frequency_penalty: float | None = Field(None, ge=-2, le=2, allow_inf_nan=False, description="Only 0 is supported.")
    presence_penalty: float | None = Field(None, ge=-2, le=2, allow_inf_nan=False, description="Only 0 is supported.")
    logit_bias: dict[str, float] | None = Field(None, description="Not supported: must be absent or empty.")

    @field_validator("stop")
    @classmethod
    def _stop(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and len(value) > 4:
            raise ValueError(f"at most 4 stop sequences are allowed, got {len(value)}")
        return value

    def stop_list(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    def check_supported(self) -> None:
        """Refuse output-changing OpenAI parameters that tandem does not implement."""
        for name in ("frequency_penalty", "presence_penalty"):
            if getattr(self, name):
                raise bad_request(f"{name} is not supported by tandem; omit it or set it to 0", name)
        if self.logit_bias:
            raise bad_request("logit_bias is not supported by tandem", "logit_bias")

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens


class CompletionRequest(_GenerationRequest):
    prompt: str | list[int] | list[str] | list[list[int]] = Field(
        ..., description="A string, a list of strings, a list of token ids, or a list of token-id lists."
    )
    logprobs: int | None = Field(None, ge=0, le=5, description="Not supported: must be absent or null.")
    echo: bool | None = Field(False, description="Not supported: must be false.")
    suffix: str | None = Field(None, description="Not supported: must be absent or null.")
    best_of: int | None = Field(None, ge=1, description="Only 1 (or n) is supported.")

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt_shape(cls, value: Any) -> Any:
        def ids(v: Any) -> bool:
            return isinstance(v, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in v)

        if isinstance(value, str) or ids(value):
            return value
        if isinstance(value, list) and (all(isinstance(v, str) for v in value) or all(ids(v) for v in value)):
            return value
        raise ValueError("prompt must be a string, a list of strings, a list of token ids, or a list of token-id lists")

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, value: Any) -> Any:
        if isinstance(value, str):
            return _check_text(value, "prompt")
        if isinstance(value, list) and value and isinstance(value[0], str):
            return [_check_text(v, "prompt") for v in value]
        return value

    def check_supported(self) -> None:
        super().check_supported()
        if self.logprobs is not None:
            raise bad_request("logprobs is not supported by tandem; omit it", "logprobs")
        if self.echo:
            raise bad_request("echo is not supported by tandem", "echo")
        if self.suffix is not None:
            raise bad_request("suffix is not supported by tandem", "suffix")
        if self.best_of is not None and self.best_of not in (1, self.n):
            raise bad_request("best_of is not supported by tandem; omit it or set it to 1", "best_of")

    def prompts(self) -> list[str | list[int]]:
        """One entry per prompt: a string to tokenize, or token ids."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            raise bad_request("prompt is empty", "prompt")
        if isinstance(p[0], int):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None
    name: str | None = None


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str


class ChatCompletionRequest(_GenerationRequest):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, description="Preferred over max_tokens when both are given.")
    logprobs: bool | None = Field(False, description="Not supported: must be false.")
    top_logprobs: int | None = Field(None, ge=0, le=20, description="Not supported: must be absent or 0.")
    tools: list[dict[str, Any]] | None = Field(None, description="Not supported: must be absent or empty.")
    tool_choice: str | dict[str, Any] | None = Field(None, description="Only 'none' or 'auto' without tools.")
    functions: list[dict[str, Any]] | None = Field(None, description="Not supported: must be absent or empty.")
    response_format: ResponseFormat | None = Field(None, description="Only {'type': 'text'}.")

    def check_supported(self) -> None:
        super().check_supported()
        if self.logprobs:
            raise bad_request("logprobs is not supported by tandem; omit it or set it to false", "logprobs")
        if self.top_logprobs:
            raise bad_request("top_logprobs is not supported by tandem", "top_logprobs")
        if self.tools:
            raise bad_request("tools (function calling) are not supported by tandem", "tools")
        if self.functions:
            raise bad_request("functions (function calling) are not supported by tandem", "functions")
        if self.tool_choice not in (None, "none", "auto"):
            raise bad_request("tool_choice is not supported by tandem", "tool_choice")
        if self.response_format is not None and self.response_format.type != "text":
            raise bad_request(
                f"response_format {self.response_format.type!r} is not supported by tandem; only 'text'",
                "response_format",
            )

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def conversation(self) -> list[dict[str, str]]:
        """Messages as {role, content[, name]} with text content; 400 for non-text parts."""
        out = []
        for i, m in enumerate(self.messages):
            content = m.content
            if content is None:
                text = ""
            elif isinstance(content, str):
                text = content
            else:
                pieces = []
                for j, part in enumerate(content):
                    if part.type != "text" or part.text is None:
                        raise bad_request(
                            f"content part of type {part.type!r} is not supported; only text parts",
                            f"messages[{i}].content[{j}]",
                        )
                    pieces.append(part.text)
                text = "".join(pieces)
            try:
                _check_text(text, "message content")
            except ValueError as exc:
                raise bad_request(str(exc), f"messages[{i}].content") from None
            msg = {"role": m.role, "content": text}
            if m.name is not None:
                msg["name"] = m.name
            out.append(msg)
        return out


def render_chat(tokenizer: Any, conversation: list[dict[str, str]]) -> tuple[str, bool]:
    """Render the conversation with the tokenizer's chat template (or the default).

    Returns (text, add_special_tokens): a model's own template places its
    special tokens itself; the default template relies on the tokenizer's.
    """
    own = getattr(tokenizer, "chat_template", None)
    template = own or DEFAULT_CHAT_TEMPLATE
    try:
        text = tokenizer.apply_chat_template(
            conversation, chat_template=template, add_generation_prompt=True, tokenize=False
        )
    except Exception as exc:  # jinja2 TemplateError and friends: the template refused these messages
        raise bad_request(f"messages could not be rendered with the chat template: {exc}", "messages") from None
    if not isinstance(text, str):  # pragma: no cover - tokenize=False returns text
        raise APIError(500, "the chat template did not render to text", "server_error")
    return text, not own
