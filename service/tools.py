"""Tool calling: the request's tools, the grammar a forced tool choice imposes, and the calls in an output.

* ``tools`` are rendered by the model's own chat template (``apply_chat_template(tools=...)``); a template
  that never reads ``tools`` cannot show them to the model, so such a request is a 400 saying so.
* ``tool_choice: "required"`` and a named function are enforced with structured outputs, as vLLM does:
  the output must be a JSON array of ``{"name", "parameters"}`` (required) or the named function's
  arguments (named), so the calls always parse and match the functions' schemas.
* ``tool_choice: "auto"`` lets the model decide; calls are parsed from the Hermes / Qwen format that
  tool-capable templates teach (``<tool_call>{"name": ..., "arguments": ...}</tool_call>``, vLLM's
  ``hermes`` parser). Text outside the tags stays the message content.
"""

from __future__ import annotations

import json
import re
from typing import Any, Literal

from jinja2 import Environment, TemplateSyntaxError, meta
from pydantic import BaseModel, ConfigDict, Field

from decoding.structured import GrammarSpec
from service.openai_responses import FunctionCall, ToolCall

_TOOL_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)


class ToolFunction(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str = Field(..., min_length=1, max_length=64)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["function"] = "function"
    function: ToolFunction


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["function"] = "function"
    function: dict[str, Any]

    @property
    def name(self) -> str | None:
        name = self.function.get("name")
        return name if isinstance(name, str) else None


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


def template_reads_tools(template: str) -> bool:
    """Whether a chat template uses the ``tools`` variable (so rendering tools shows them to the model)."""
    try:
        return "tools" in meta.find_undeclared_variables(Environment().parse(template))
    except TemplateSyntaxError:
        return False


def forced_grammar(
    tools: list[Tool], choice: ToolChoice, parallel: bool | None, any_whitespace: bool = True
) -> GrammarSpec | None:
    """The grammar a tool choice imposes (None for auto and none), as vLLM builds it."""
    if isinstance(choice, NamedToolChoice):
        fn = next(t.function for t in tools if t.function.name == choice.name)
        schema = json.dumps(fn.parameters or {"type": "object"})
        return GrammarSpec("json_schema", schema, any_whitespace=any_whitespace, param="tool_choice")
    if choice != "required":
        return None
    items = [
        {"properties": {"name": {"type": "string", "enum": [t.function.name]},
                        "parameters": t.function.parameters or {"type": "object"}},
         "required": ["name", "parameters"]}
        for t in tools
    ]  # fmt: skip
    schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"type": "object", "anyOf": items}}
    if parallel is False:
        schema["maxItems"] = 1
    return GrammarSpec("json_schema", json.dumps(schema), any_whitespace=any_whitespace, param="tool_choice")


def parse_tool_calls(text: str, tools: list[Tool], choice: ToolChoice) -> tuple[str | None, list[ToolCall]]:
    """(content, calls) of an output. A forced choice's output is the calls; an auto one may hold tagged calls.

    Output that does not parse (cut by max_tokens) stays content, without calls.
    """
    if isinstance(choice, NamedToolChoice):
        try:
            json.loads(text)
        except ValueError:
            return text, []
        return None, [ToolCall(function=FunctionCall(name=choice.name or "", arguments=text))]
    if choice == "required":
        try:
            calls = json.loads(text)
        except ValueError:
            return text, []
        return None, [ToolCall(function=FunctionCall(name=c["name"], arguments=json.dumps(c["parameters"])))
                      for c in calls]  # fmt: skip
    names = {t.function.name for t in tools}
    calls = []
    for match in _TOOL_CALL.finditer(text):
        try:
            call = json.loads(match.group(1))
        except ValueError:
            continue
        if not isinstance(call, dict) or call.get("name") not in names:
            continue
        arguments = call.get("arguments", call.get("parameters", {}))
        arguments = arguments if isinstance(arguments, str) else json.dumps(arguments)
        calls.append(ToolCall(function=FunctionCall(name=call["name"], arguments=arguments)))
    if not calls:
        return text, []
    content = text[: text.index("<tool_call>")].strip()
    return content or None, calls
