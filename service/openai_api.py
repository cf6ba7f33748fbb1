"""OpenAI's request schema for /v1/completions and /v1/chat/completions (responses: service/openai_responses.py).

**The rule: nothing is silently ignored.** Every field OpenAI's API or vLLM's
server defines is declared here with a policy (docs/gateway.md has the table):

* ``honoured`` (the default): it does what it does in OpenAI's API or vLLM;
* ``refused(neutral)``: tandem does not implement it, so any value other than
  the neutral one is a 400 naming the field (:meth:`_GenerationRequest.check_supported`);
* ``no_effect(why)``: it never changes the output or how the request runs
  (``user``, ``metadata``, ``prompt_cache_key``, ...): accepted, and ``why``
  says why that is right.

A field no one defines is accepted as vLLM does, and logged once per name at
warning level (:func:`warn_unknown_fields`), so a typo or a new client feature
shows up in the log. tests/service/test_request_schema.py walks this schema.
"""

from __future__ import annotations

import json
import logging
import threading
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic.fields import FieldInfo

from decoding.sampling import MAX_LOGPROBS
from decoding.speculative import MAX_DRAFT_TOKENS
from decoding.structured import GrammarSpec
from service.tools import NamedToolChoice, Tool, ToolChoice, forced_grammar, template_reads_tools
from service.errors import APIError, bad_request

log = logging.getLogger("tandem.gateway")

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

# -- field policies ------------------------------------------------------------------------------

POLICY_KEY = "x-tandem-policy"
Policy = Literal["honoured", "refused", "no_effect"]


def refused(neutral: Any = None, *, also_neutral: tuple[Any, ...] = (), why: str = "", example: Any = True) -> Any:
    """A field tandem does not implement: only ``neutral`` (or ``also_neutral``) is accepted.

    ``example`` is a non-neutral value (the schema test sends it and expects a 400 naming the field).
    """
    extra = {POLICY_KEY: "refused", "x-tandem-neutral": [neutral, *also_neutral], "x-tandem-why": why}
    reason = f" ({why})" if why else ""
    description = f"Not supported by tandem{reason}: only {json.dumps(neutral)} is accepted."
    return Field(neutral, json_schema_extra=extra, examples=[example], description=description)


def no_effect(why: str, default: Any = None, example: Any = "x") -> Any:
    """A field that never changes the output or how the request runs: accepted; ``why`` says why."""
    return Field(default, json_schema_extra={POLICY_KEY: "no_effect", "x-tandem-why": why}, examples=[example],
                 description=f"Accepted, no effect: {why}.")  # fmt: skip


def policy_of(field: FieldInfo) -> Policy:
    extra = field.json_schema_extra
    return extra.get(POLICY_KEY, "honoured") if isinstance(extra, dict) else "honoured"  # type: ignore[return-value]


def _is_neutral(value: Any, field: FieldInfo) -> bool:
    extra = field.json_schema_extra
    assert isinstance(extra, dict)
    neutral = extra["x-tandem-neutral"]
    if isinstance(value, BaseModel):
        value = value.model_dump(exclude_none=True)
    return any(value == n and type(value) is type(n) or value is n for n in neutral) or value in ([], {})


_warned: set[str] = set()
_warned_lock = threading.Lock()
_MAX_WARNED = 1024  # a client inventing names cannot grow this set without bound


def warn_unknown_fields(names: Any) -> None:
    """Log each field name no API defines, once per process, at warning level; never the value."""
    for name in names:
        if name in _warned or len(_warned) >= _MAX_WARNED:
            continue
        with _warned_lock:
            if name in _warned:
                continue
            _warned.add(name)
        # ascii() escapes control characters and quotes: a name cannot forge a log line.
        log.warning("request field %s is not part of OpenAI's or vLLM's API and was ignored", ascii(str(name)[:100]))


def _check_text(value: str, what: str) -> str:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{what} contains a lone surrogate, which is not valid Unicode text") from None
    return value


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: bool | None = Field(False, description="Send a final chunk with the usage (choices: []) before [DONE].")
    continuous_usage_stats: bool | None = refused(False, also_neutral=(None,), why="usage comes with the last chunk")
    include_obfuscation: bool | None = no_effect("tandem adds no obfuscation padding to stream chunks", example=True)


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


class JSONSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)
    name: str | None = None
    description: str | None = None
    json_schema: dict[str, Any] | bool | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None


class StructuredOutputs(BaseModel):
    """vLLM's ``structured_outputs`` (StructuredOutputsParams)."""

    model_config = ConfigDict(extra="forbid")
    json_: str | dict[str, Any] | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    disable_any_whitespace: bool = Field(False, description="No whitespace between JSON tokens.")
    disable_additional_properties: bool = Field(False, description="Objects get only the schema's properties (always "
                                                "so here unless the schema allows more: xgrammar's strict mode).")
    whitespace_pattern: str | None = refused(None, example=" ")
    structural_tag: Any = refused(None, example={"a": 1})


class _GenerationRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    # -- OpenAI -----------------------------------------------------------------------------------
    model: str = Field(..., description="The served model id (GET /v1/models).")
    max_tokens: int | None = Field(None, ge=1, description="Tokens to generate at most.")
    max_completion_tokens: int | None = Field(None, ge=1, description="Preferred over max_tokens when both are given.")
    temperature: float | None = Field(1.0, ge=0, le=2, allow_inf_nan=False, description="0 = greedy. Default 1.")
    top_p: float | None = Field(1.0, gt=0, le=1, allow_inf_nan=False)
    n: int | None = Field(1, ge=1, le=MAX_CHOICES, description="Choices to generate.")
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX, description="Reproducible sampling; choice i uses seed + i.")
    stop: str | list[str] | None = Field(None, description="Up to 4 stop strings; the stop text is not returned.")
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = no_effect("an end-user id: never logged nor used as a label")
    frequency_penalty: float | None = Field(None, ge=-2, le=2, allow_inf_nan=False,
                                            description="Subtracted per occurrence of a token in the output so far.")
    presence_penalty: float | None = Field(None, ge=-2, le=2, allow_inf_nan=False,
                                           description="Subtracted once from every token the output contains.")
    logit_bias: dict[str, float] | None = Field(None, description="Token id (as a string) -> bias in [-100, 100], "
                                                "added to the logits.")
    echo: bool | None = Field(False, description="Completions: prepend the prompt. Chat: prepend the last message's "
                              "content when it has the response's role (vLLM).")  # fmt: skip
    metadata: dict[str, Any] | None = no_effect("tandem stores nothing", example={"a": "b"})
    store: bool | None = refused(False, also_neutral=(None,), why="tandem stores no completions")
    service_tier: str | None = no_effect("tandem has one tier", example="default")
    prompt_cache_key: str | None = no_effect("a cache-routing hint; tandem routes every request to one core")
    prompt_cache_retention: str | None = no_effect("a cache-routing hint", example="24h")
    prompt_cache_options: dict[str, Any] | None = no_effect("a cache-routing hint", example={})
    safety_identifier: str | None = no_effect("an end-user id: never logged nor used as a label")

    # -- vLLM's extras ----------------------------------------------------------------------------
    top_k: int | None = Field(None, ge=-1, description="vLLM extra: keep the k most likely tokens; 0 or -1 = off.")
    ignore_eos: bool | None = Field(False, description="vLLM extra: keep generating after the end-of-text token.")
    min_p: float | None = Field(None, ge=0, le=1, allow_inf_nan=False, description="vLLM extra: drop tokens less "
                                "likely than min_p times the most likely one (after temperature).")
    repetition_penalty: float | None = Field(None, gt=0, allow_inf_nan=False, description="vLLM extra: > 1 "
                                             "discourages tokens of the prompt and the output.")
    stop_token_ids: list[int] | None = Field(None, description="vLLM extra: token ids that end the generation.")
    include_stop_str_in_output: bool | None = Field(None, description="vLLM extra: keep the stop string in the text.")
    min_tokens: int | None = Field(None, ge=0, description="vLLM extra: no stop token or stop string before this many tokens.")
    skip_special_tokens: bool | None = Field(None, description="vLLM extra: leave special tokens out of the text "
                                             "(default true).")
    spaces_between_special_tokens: bool | None = refused(True, also_neutral=(None,), example=False,
                                                         why="Hugging Face fast tokenizers have no such switch")  # fmt: skip
    allowed_token_ids: list[int] | None = Field(None, min_length=1, description="vLLM extra: only these tokens.")
    bad_words: list[str] | None = refused(None, example=["x"])
    use_beam_search: bool | None = refused(False, also_neutral=(None,), why="beam search")
    length_penalty: float | None = refused(1.0, also_neutral=(None,), example=0.5, why="beam search only")
    watermarking: Any = refused(None, example={"enabled": True})
    truncate_prompt_tokens: int | None = refused(None, example=8)
    truncation_side: str | None = refused(None, example="left")
    prompt_logprobs: int | None = refused(None, example=1)
    logprob_token_ids: list[int] | None = refused(None, example=[1])
    add_special_tokens: bool | None = Field(None, description="vLLM extra: add the tokenizer's special tokens (BOS) "
                                            "when encoding the prompt. Default: yes for completions; for chat, "
                                            "only when the default template is used.")  # fmt: skip
    response_format: ResponseFormat | None = Field(None, description="{'type': 'text' | 'json_object' | "
                                                   "'json_schema', 'json_schema': {'name', 'schema', 'strict'}}: the "
                                                   "output follows it (xgrammar, applied to drafter and verifier).")
    structured_outputs: StructuredOutputs | None = Field(None, description="vLLM extra: exactly one of json, regex, "
                                                         "choice, grammar, json_object.")
    guided_json: str | dict[str, Any] | None = Field(None, description="vLLM's older name for structured_outputs.json.")
    guided_regex: str | None = Field(None, description="vLLM's older name for structured_outputs.regex.")
    guided_choice: list[str] | None = Field(None, description="vLLM's older name for structured_outputs.choice.")
    guided_grammar: str | None = Field(None, description="vLLM's older name for structured_outputs.grammar.")
    guided_decoding_backend: str | None = refused(None, also_neutral=("xgrammar", "auto"), example="outlines",
                                                  why="tandem's grammar engine is xgrammar")  # fmt: skip
    guided_whitespace_pattern: str | None = refused(None, example=" ")
    priority: int | None = refused(0, also_neutral=(None,), example=1, why="no priority scheduling")
    request_id: str | None = Field(None, max_length=128, description="vLLM extra: the response id becomes "
                                   "'cmpl-<request_id>' / 'chatcmpl-<request_id>'.")  # fmt: skip
    session_id: str | None = no_effect("a routing hint; one tandem server is one route")
    cache_salt: str | None = refused(None, example="salt", why="the remote verifier keys its own prefix cache")
    return_tokens_as_token_ids: bool | None = Field(None, description="vLLM extra: logprobs name tokens "
                                                    "'token_id:<id>' instead of by their text.")
    return_token_ids: bool | None = refused(False, also_neutral=(None,))
    return_token_offsets: bool | None = refused(False, also_neutral=(None,))
    routed_experts_prompt_start: int | None = refused(0, also_neutral=(None,), example=3, why="no mixture of experts")
    mm_payload: str | None = refused("tensors", also_neutral=(None,), example="urls", why="text only")
    return_mm_kwargs: Any = refused(None, also_neutral=(False,), why="text only")
    kv_transfer_params: dict[str, Any] | None = refused(None, example={"a": 1}, why="no disaggregated prefill")
    ec_transfer_params: dict[str, Any] | None = refused(None, example={"a": 1}, why="no disaggregated encoders")
    vllm_xargs: dict[str, Any] | None = refused(None, example={"a": 1})
    repetition_detection: Any = refused(None, example={"max_pattern_size": 4})
    thinking_token_budget: int | None = refused(None, example=16, why="no reasoning parser")
    stream_interval: int | None = no_effect("tandem streams one chunk per speculative round", example=2)

    # -- tandem ----------------------------------------------------------------------------------------
    tandem: TandemOptions | None = None

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
        """400 naming the first field set to a value tandem does not implement (see the module docstring)."""
        _check_refused(self)
        if self.stream_options is not None:
            _check_refused(self.stream_options, "stream_options.")
        if self.structured_outputs is not None:
            _check_refused(self.structured_outputs, "structured_outputs.")
        if self.model_extra:
            warn_unknown_fields(self.model_extra)

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def grammar_spec(self, any_whitespace: bool = True) -> GrammarSpec | None:
        """The grammar the output must follow, from whichever field asked for one (at most one may).
        ``any_whitespace``: the server's default for JSON (vLLM's disable_any_whitespace, negated)."""
        found: list[GrammarSpec] = []
        rf = self.response_format
        if rf is not None and rf.type == "json_object":
            found.append(GrammarSpec("json_object", any_whitespace=any_whitespace, param="response_format"))
        elif rf is not None and rf.type == "json_schema":
            schema = rf.json_schema.json_schema if rf.json_schema is not None else None
            if schema is None:
                raise bad_request("response_format json_schema needs json_schema.schema", "response_format.json_schema")
            found.append(GrammarSpec("json_schema", json.dumps(schema), any_whitespace=any_whitespace,
                                     param="response_format.json_schema"))  # fmt: skip
        so = self.structured_outputs
        if so is not None:
            whitespace = any_whitespace and not so.disable_any_whitespace
            for kind, value in (("json_schema", so.json_), ("regex", so.regex), ("choice", so.choice),
                                ("grammar", so.grammar), ("json_object", so.json_object or None)):  # fmt: skip
                if value is not None:
                    key = "json" if kind == "json_schema" else kind
                    found.append(_spec(kind, value, whitespace, f"structured_outputs.{key}"))
        for kind, name in (("json_schema", "guided_json"), ("regex", "guided_regex"), ("choice", "guided_choice"),
                           ("grammar", "guided_grammar")):  # fmt: skip
            value = getattr(self, name)
            if value is not None:
                found.append(_spec(kind, value, any_whitespace, name))
        if len(found) > 1:
            raise bad_request(f"only one kind of structured output may be set; got {', '.join(f.param for f in found)}",
                              found[1].param)  # fmt: skip
        return found[0] if found else None

    def processing(self) -> dict[str, Any]:
        """The SamplingParams fields of vLLM's logits processing and output options, as this request sets them."""
        bias: list[tuple[int, float]] = []
        for key, value in (self.logit_bias or {}).items():
            try:
                bias.append((int(key), float(value)))
            except ValueError:
                raise bad_request(f"logit_bias keys must be token ids, got {key!r}", "logit_bias") from None
        return {
            "repetition_penalty": 1.0 if self.repetition_penalty is None else self.repetition_penalty,
            "presence_penalty": self.presence_penalty or 0.0,
            "frequency_penalty": self.frequency_penalty or 0.0,
            "min_p": self.min_p or 0.0,
            "min_tokens": self.min_tokens or 0,
            "stop_token_ids": tuple(self.stop_token_ids or ()),
            "include_stop_str_in_output": bool(self.include_stop_str_in_output),
            "logit_bias": tuple(bias),
            "allowed_token_ids": None if self.allowed_token_ids is None else tuple(self.allowed_token_ids),
            "skip_special_tokens": self.skip_special_tokens is not False,
            **self.logprob_options(),
        }

    def logprob_options(self) -> dict[str, int | None]:
        return {}


def _spec(kind: str, value: Any, any_whitespace: bool, param: str) -> GrammarSpec:
    if kind == "json_schema" and not isinstance(value, str):
        value = json.dumps(value)
    if kind == "choice":
        value = tuple(value)
    return GrammarSpec(kind, value, any_whitespace=any_whitespace, param=param)  # type: ignore[arg-type]


def _check_refused(obj: BaseModel, prefix: str = "") -> None:
    for name, field in type(obj).model_fields.items():
        if policy_of(field) != "refused":
            continue
        value = getattr(obj, name)
        if _is_neutral(value, field):
            continue
        extra = field.json_schema_extra
        assert isinstance(extra, dict)
        why = f" ({extra['x-tandem-why']})" if extra["x-tandem-why"] else ""
        neutral = extra["x-tandem-neutral"][0]
        hint = "omit it" if neutral is None else f"omit it or set it to {json.dumps(neutral)}"
        raise bad_request(f"{prefix}{name} is not supported by tandem{why}; {hint}", prefix + name)


class CompletionRequest(_GenerationRequest):
    prompt: str | list[int] | list[str] | list[list[int]] = Field(
        ..., description="A string, a list of strings, a list of token ids, or a list of token-id lists."
    )
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS, description="Each token's logprob and this many "
                                 "alternatives (the verifier's raw distribution, as vLLM's default).")
    suffix: str | None = refused(None, example="x")
    best_of: int | None = Field(None, ge=1, description="Only 1 (or n) is supported.")
    prompt_embeds: Any = refused(None, example="AAAA", why="text and token-id prompts only")

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
        if self.best_of is not None and self.best_of not in (1, self.n):
            raise bad_request("best_of is not supported by tandem; omit it or set it to 1", "best_of")

    def logprob_options(self) -> dict[str, int | None]:
        # echo with logprobs reports the prompt's tokens too (evaluation harnesses score them).
        return {"logprobs": self.logprobs, "prompt_logprobs": self.logprobs if self.echo else None}

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
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None


#: Keys of chat_template_kwargs that the request sets through its own fields.
_RESERVED_TEMPLATE_KWARGS = frozenset(
    {"messages", "conversation", "tools", "documents", "add_generation_prompt", "continue_final_message",
     "chat_template", "tokenize", "return_dict", "return_assistant_tokens_mask", "tokenizer_kwargs"}
)  # fmt: skip


class ChatCompletionRequest(_GenerationRequest):
    messages: list[ChatMessage] = Field(..., min_length=1)
    logprobs: bool | None = Field(False, description="Each token's logprob (the verifier's raw distribution, as "
                                  "vLLM's default).")
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS, description="Alternatives per token, with logprobs.")
    tools: list[Tool] | None = Field(None, description="Functions the model may call, rendered by the model's chat "
                                     "template (400 when it has no tool support).")
    tool_choice: ToolChoice | None = Field(None, description="'none', 'auto' (default with tools: calls parsed from "
                                           "<tool_call> tags), 'required' or a named function (both enforced by a "
                                           "grammar, as vLLM does).")  # fmt: skip
    functions: list[dict[str, Any]] | None = refused(None, example=[{"name": "f"}], why="deprecated; use tools")
    function_call: str | dict[str, Any] | None = refused(None, also_neutral=("none", "auto"), example={"name": "f"},
                                                         why="deprecated; use tool_choice")  # fmt: skip
    parallel_tool_calls: bool | None = Field(None, description="Accepted: tool calls are parsed from the output "
                                             "whatever their number.")  # fmt: skip
    reasoning_effort: str | None = refused(None, example="low", why="no reasoning parser")
    include_reasoning: bool | None = no_effect("no reasoning parser: there is never reasoning content", example=False)
    verbosity: str | None = refused(None, example="low")
    modalities: list[str] | None = refused(None, also_neutral=(["text"],), example=["audio"], why="text only")
    audio: dict[str, Any] | None = refused(None, example={"voice": "x"}, why="text only")
    prediction: dict[str, Any] | None = refused(None, example={"type": "content", "content": "x"})
    web_search_options: dict[str, Any] | None = refused(None, example={"search_context_size": "low"})
    moderation: Any = refused(None, example={"a": 1})
    add_generation_prompt: bool = Field(True, description="vLLM extra: end the prompt with the template's "
                                        "generation prompt (the assistant turn's opening).")  # fmt: skip
    continue_final_message: bool = Field(False, description="vLLM extra: leave the final message open so the "
                                         "model continues it (a prefill); needs add_generation_prompt false.")  # fmt: skip
    documents: list[dict[str, Any]] | None = Field(None, description="vLLM extra: documents for RAG chat templates.")
    chat_template: str | None = refused(None, example="{{ messages }}", why="the model's own template is used")
    chat_template_kwargs: dict[str, Any] | None = Field(None, description="vLLM extra: more variables for the chat "
                                                        "template (e.g. enable_thinking).")  # fmt: skip
    media_io_kwargs: dict[str, Any] | None = refused(None, example={"a": {}}, why="text only")
    mm_processor_kwargs: dict[str, Any] | None = refused(None, example={"a": 1}, why="text only")
    return_prompt_text: bool | None = refused(None, also_neutral=(False,))

    def check_supported(self) -> None:
        super().check_supported()
        choice = self.tool_choice
        if choice not in (None, "none", "auto") and not self.tools:
            raise bad_request("tool_choice needs tools", "tool_choice")
        if isinstance(choice, NamedToolChoice) and choice.name not in {t.function.name for t in self.tools or ()}:
            raise bad_request(f"tool_choice names the function {choice.name!r}, which is not among the tools",
                              "tool_choice")  # fmt: skip
        if self.continue_final_message and self.add_generation_prompt:
            raise bad_request(
                "continue_final_message and add_generation_prompt cannot both be true: set add_generation_prompt "
                "to false to continue the final message", "continue_final_message",
            )  # fmt: skip
        if self.continue_final_message and self.messages[-1].role != "assistant":
            raise bad_request("continue_final_message needs an assistant message last", "continue_final_message")
        for key in self.chat_template_kwargs or {}:
            if key in _RESERVED_TEMPLATE_KWARGS:
                raise bad_request(f"chat_template_kwargs may not set {key!r}: use the request's own field",
                                  f"chat_template_kwargs.{key}")  # fmt: skip

    @property
    def effective_tool_choice(self) -> ToolChoice:
        """The tool choice in force: 'none' without tools, OpenAI's default 'auto' with them."""
        if not self.tools:
            return "none"
        return self.tool_choice if self.tool_choice is not None else "auto"

    def grammar_spec(self, any_whitespace: bool = True) -> GrammarSpec | None:
        spec = super().grammar_spec(any_whitespace)
        forced = forced_grammar(self.tools or [], self.effective_tool_choice, self.parallel_tool_calls, any_whitespace)
        if forced is not None and spec is not None:
            raise bad_request(f"tool_choice {self.tool_choice!r} and {spec.param} both constrain the output; "
                              "set one", spec.param)  # fmt: skip
        return forced or spec

    def logprob_options(self) -> dict[str, int | None]:
        if self.top_logprobs and not self.logprobs:
            raise bad_request("top_logprobs needs logprobs set to true", "top_logprobs")
        return {"logprobs": (self.top_logprobs or 0) if self.logprobs else None}

    @property
    def response_role(self) -> str:
        """The role of the generated message: the assistant's, unless the final message is continued
        or no generation prompt opens a new turn (then the final message's role, as vLLM does)."""
        return "assistant" if self.add_generation_prompt else self.messages[-1].role

    def echo_prefix(self) -> str:
        """With ``echo``: the final message's content when it has the response's role (vLLM), else ''."""
        if not self.echo:
            return ""
        last = self.conversation()[-1]
        return last["content"] if last["role"] == self.response_role else ""

    def conversation(self) -> list[dict[str, Any]]:
        """Messages as {role, content[, name, tool_calls, tool_call_id]} with text content; 400 for
        non-text parts. Text parts are joined with newlines, as vLLM joins them."""
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
                text = "\n".join(pieces)
            try:
                _check_text(text, "message content")
            except ValueError as exc:
                raise bad_request(str(exc), f"messages[{i}].content") from None
            msg: dict[str, Any] = {"role": m.role, "content": text}
            if m.name is not None:
                msg["name"] = m.name
            if m.tool_calls is not None:
                msg["tool_calls"] = m.tool_calls
            if m.tool_call_id is not None:
                msg["tool_call_id"] = m.tool_call_id
            out.append(msg)
        return out


def render_chat(tokenizer: Any, body: ChatCompletionRequest) -> tuple[str, bool]:
    """Render the request's conversation with the tokenizer's chat template (or the default).

    Returns (text, add_special_tokens): a model's own template places its
    special tokens itself; the default template relies on the tokenizer's,
    unless the request's ``add_special_tokens`` says otherwise.
    """
    own = getattr(tokenizer, "chat_template", None)
    template = own or DEFAULT_CHAT_TEMPLATE
    kwargs = dict(body.chat_template_kwargs or {})
    if body.documents is not None:
        kwargs["documents"] = body.documents
    if body.effective_tool_choice != "none":
        if not isinstance(template, str) or not template_reads_tools(template):
            raise bad_request(
                "this model's chat template has no tool support (it never renders 'tools'), so the model cannot "
                "see them; serve a model whose template supports tools, or send tool_choice 'none'", "tools",
            )  # fmt: skip
        kwargs["tools"] = [t.model_dump(exclude_none=True) for t in body.tools or ()]
    try:
        text = tokenizer.apply_chat_template(
            body.conversation(),
            chat_template=template,
            add_generation_prompt=body.add_generation_prompt,
            continue_final_message=body.continue_final_message,
            tokenize=False,
            **kwargs,
        )
    except APIError:
        raise
    except Exception as exc:  # jinja2 TemplateError and friends: the template refused these messages
        raise bad_request(f"messages could not be rendered with the chat template: {exc}", "messages") from None
    if not isinstance(text, str):  # pragma: no cover - tokenize=False returns text
        raise APIError(500, "the chat template did not render to text", "server_error")
    special = not own if body.add_special_tokens is None else body.add_special_tokens
    return text, special


# -- vLLM's tokenizer routes ---------------------------------------------------------------------


class TokenizeCompletionRequest(BaseModel):
    """``POST /tokenize`` with a prompt (vLLM's schema)."""

    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    prompt: str
    add_special_tokens: bool = Field(True, description="Add the tokenizer's special tokens (BOS).")
    return_token_strs: bool | None = Field(False, description="Also return each token's string.")

    @field_validator("prompt")
    @classmethod
    def _text(cls, value: str) -> str:
        return _check_text(value, "prompt")


class TokenizeChatRequest(BaseModel):
    """``POST /tokenize`` with chat messages, rendered by the chat template as a chat request would be."""

    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    messages: list[ChatMessage] = Field(..., min_length=1)
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool = False
    return_token_strs: bool | None = False
    chat_template_kwargs: dict[str, Any] | None = None
    documents: list[dict[str, Any]] | None = None
    tools: list[Tool] | None = None

    def as_chat_request(self) -> ChatCompletionRequest:
        body = ChatCompletionRequest.model_validate(
            {"model": self.model or "", **self.model_dump(exclude={"model", "return_token_strs"}, exclude_none=True)}
        )
        body.check_supported()  # the template checks (continue_final_message, reserved kwargs)
        return body


class DetokenizeRequest(BaseModel):
    """``POST /detokenize`` (vLLM's schema)."""

    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    tokens: list[int] = Field(..., description="Token ids, each in [0, vocabulary size).")

    @field_validator("tokens")
    @classmethod
    def _ids(cls, value: list[int]) -> list[int]:
        if any(t < 0 for t in value):
            raise ValueError("token ids must be >= 0")
        return value
