"""Tools, and the clients apps use (the official openai client, LangChain's ChatOpenAI, the LiteLLM SDK), against
a real `tandem serve` (``tools_server``: the tiny pair with a tool-capable chat template).

The tiny models produce gibberish; structured outputs and forced tool choices make their answers valid anyway,
which is the point: the schema holds whatever the model would have said."""

from __future__ import annotations

import json
import os
from typing import Literal

import jsonschema
import pytest
from pydantic import BaseModel, Field

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # LiteLLM must not fetch its price list

MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather of a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "pattern": "^[A-Za-z]{1,12}$"},
                           "unit": {"enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}  # fmt: skip
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"]}}}  # fmt: skip


class Pet(BaseModel):
    """A pet."""

    name: str = Field(pattern=r"^[a-z]{1,8}$")
    kind: Literal["cat", "dog", "owl"]
    legs: int = Field(ge=0, le=8)


def check_call(call, tools=(WEATHER, TIME)) -> None:
    fn = next(t["function"] for t in tools if t["function"]["name"] == call.function.name)
    jsonschema.validate(json.loads(call.function.arguments), fn["parameters"])


# -- tools through the openai client ----------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [0, 1.0])
def test_forced_tool_choices_always_give_valid_calls(tools_server, temperature):
    client = tools_server.client()
    named = client.chat.completions.create(
        model="tandem", messages=MESSAGES, tools=[WEATHER, TIME], max_tokens=200, temperature=temperature, seed=1,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
    )  # fmt: skip
    msg = named.choices[0].message
    assert named.choices[0].finish_reason == "stop" and len(msg.tool_calls) == 1
    assert msg.tool_calls[0].function.name == "get_weather" and msg.tool_calls[0].id
    check_call(msg.tool_calls[0])

    required = client.chat.completions.create(model="tandem", messages=MESSAGES, tools=[WEATHER, TIME], max_tokens=300,
                                              temperature=temperature, seed=2, tool_choice="required",
                                              parallel_tool_calls=False)  # fmt: skip
    assert required.choices[0].finish_reason == "tool_calls"
    calls = required.choices[0].message.tool_calls
    assert len(calls) == 1
    check_call(calls[0])


def test_auto_tool_choice_and_a_tool_conversation(tools_server):
    client = tools_server.client()
    r = client.chat.completions.create(model="tandem", messages=MESSAGES, tools=[WEATHER], max_tokens=20)
    msg = r.choices[0].message
    assert msg.content is not None or msg.tool_calls  # gibberish stays content; a tagged call would be parsed
    # the assistant's call and the tool's answer go back through the template
    history = [*MESSAGES,
               {"role": "assistant", "content": None, "tool_calls": [
                   {"id": "call_1", "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}}]},
               {"role": "tool", "tool_call_id": "call_1", "content": "21 degrees"}]  # fmt: skip
    prompt = tools_server.http.post("/tokenize", json={"messages": history, "tools": [WEATHER],
                                                       "return_token_strs": False}).json()  # fmt: skip
    text = tools_server.http.post("/detokenize", json={"tokens": prompt["tokens"]}).json()["prompt"]
    assert '"name": "get_weather"' in text and "<tool_response>\n21 degrees" in text and "<tools>" in text
    r = client.chat.completions.create(model="tandem", messages=history, tools=[WEATHER], max_tokens=5)
    assert r.choices[0].message.role == "assistant"


def test_tool_calls_are_parsed_from_hermes_tags():
    from service.tools import Tool, parse_tool_calls

    tools = [Tool.model_validate(WEATHER)]
    text = 'Let me check. <tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>'
    content, calls = parse_tool_calls(text, tools, "auto")
    assert content == "Let me check." and calls[0].function.name == "get_weather"
    assert json.loads(calls[0].function.arguments) == {"city": "Paris", "unit": "celsius"}
    assert parse_tool_calls("<tool_call>{not json}</tool_call>", tools, "auto")[1] == []
    assert parse_tool_calls('<tool_call>{"name": "nope", "arguments": {}}</tool_call>', tools, "auto")[1] == []


def test_streamed_tool_call(tools_server):
    chunks = list(tools_server.client().chat.completions.create(
        model="tandem", messages=MESSAGES, tools=[WEATHER], max_tokens=300, stream=True, tool_choice="required",
        temperature=0, parallel_tool_calls=False,  # a greedy random model repeats array items until max_tokens
    ))  # fmt: skip
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    calls = [tc for d in deltas for tc in (d.tool_calls or [])]
    assert len(calls) >= 1 and calls[0].function.name == "get_weather"
    check_call(calls[0])
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_a_template_without_tool_support_is_a_400_that_says_so(server, tools_server):
    r = server.http.post("/v1/chat/completions", json={"model": "tandem", "messages": MESSAGES, "tools": [WEATHER]})
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["param"] == "tools" and "no tool support" in err["message"]
    # tool_choice none asks for no call: the tools are simply not rendered
    r = server.http.post("/v1/chat/completions", json={"model": "tandem", "messages": MESSAGES, "tools": [WEATHER],
                                                       "tool_choice": "none", "max_tokens": 2})  # fmt: skip
    assert r.status_code == 200
    for body, param in [({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
                        ({"tool_choice": "required", "tools": None}, "tool_choice"),
                        ({"tool_choice": "required", "response_format": {"type": "json_object"}}, "response_format")]:  # fmt: skip
        r = tools_server.http.post("/v1/chat/completions", json={"model": "tandem", "messages": MESSAGES,
                                                                 "tools": [WEATHER], **body})  # fmt: skip
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (body, r.text)


# -- LangChain ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chat_model(tools_server):
    from langchain_openai import ChatOpenAI

    return ChatOpenAI(base_url=f"{tools_server.base_url}/v1", api_key="unused", model="tandem", max_tokens=200,
                      temperature=0, max_retries=0, timeout=60)  # fmt: skip


@pytest.mark.parametrize("method", ["json_schema", "function_calling"])
def test_langchain_with_structured_output(chat_model, method):
    pet = chat_model.with_structured_output(Pet, method=method).invoke("Describe a pet.")
    assert isinstance(pet, Pet)
    raw = chat_model.with_structured_output(Pet, method=method, include_raw=True).invoke("Another pet.")
    assert raw["parsing_error"] is None and isinstance(raw["parsed"], Pet)


def test_langchain_json_mode(chat_model, tools_server):
    # Any JSON object is unbounded for a random model; a bias towards "}" closes it at once, and the grammar
    # keeps the biased model valid (without it: "}}}}").
    brace = tools_server.http.post("/tokenize", json={"prompt": "}", "add_special_tokens": False}).json()["tokens"][0]
    model = chat_model.bind(logit_bias={str(brace): 100})
    assert isinstance(model.with_structured_output(method="json_mode").invoke("Reply in JSON."), dict)


def test_langchain_bind_tools(chat_model):
    from langchain_core.tools import tool

    @tool
    def get_weather(city: Literal["Paris", "Rome", "Oslo"], unit: Literal["celsius", "fahrenheit"]) -> str:
        """Current weather of a city."""  # bounded arguments: a random model never ends a free string
        return f"21 {unit} in {city}"

    forced = chat_model.bind_tools([get_weather], tool_choice="any", parallel_tool_calls=False).invoke("Weather?")
    assert forced.tool_calls and forced.tool_calls[0]["name"] == "get_weather"
    assert set(forced.tool_calls[0]["args"]) == {"city", "unit"}
    free = chat_model.bind_tools([get_weather]).invoke("Weather in Paris?")  # auto: content or calls
    assert isinstance(free.content, str)
    streamed = list(chat_model.bind_tools([get_weather], tool_choice="get_weather").stream("Weather?"))
    merged = streamed[0]
    for part in streamed[1:]:
        merged += part
    assert merged.tool_calls and merged.tool_calls[0]["name"] == "get_weather"


# -- LiteLLM -------------------------------------------------------------------------------------------------


def test_litellm_sdk(tools_server):
    import litellm

    common = dict(model="openai/tandem", api_base=f"{tools_server.base_url}/v1", api_key="unused", max_tokens=200,
                  temperature=0, num_retries=0)  # fmt: skip
    r = litellm.completion(messages=[{"role": "user", "content": "hi"}], **{**common, "max_tokens": 8})
    assert r.choices[0].message.content is not None and r.usage.completion_tokens <= 8
    r = litellm.completion(messages=[{"role": "user", "content": "A pet?"}], response_format=Pet, **common)
    assert isinstance(Pet.model_validate_json(r.choices[0].message.content), Pet)
    r = litellm.completion(messages=MESSAGES, tools=[WEATHER], tool_choice="required", parallel_tool_calls=False, **common)
    check_call(r.choices[0].message.tool_calls[0])
    chunks = list(litellm.completion(messages=[{"role": "user", "content": "hi"}], stream=True,
                                     **{**common, "max_tokens": 6}))  # fmt: skip
    assert "".join(c.choices[0].delta.content or "" for c in chunks)
