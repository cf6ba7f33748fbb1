"""Structured outputs through the API, against a real `tandem serve` on random tiny models: whatever the
model would say, the output follows the requested format (and the official client's .parse() works).

The server (``tools_server``) runs with structured_outputs_disable_any_whitespace: free JSON whitespace lets a
random model pad an object until max_tokens, which a trained model does not do."""

from __future__ import annotations

import json
import re
from typing import Literal

import jsonschema
import pytest
from pydantic import BaseModel, Field

MESSAGES = [{"role": "user", "content": "Describe a pet as JSON."}]
# Strings are bounded by a pattern, not maxLength: xgrammar 0.2.9 lets a maxLength string hold bytes that are
# not UTF-8 (a random model emits them; they decode to U+FFFD and overflow the length).
SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "pattern": "^[a-z]{1,8}$"}, "legs": {"type": "integer", "minimum": 0, "maximum": 8},
                   "kind": {"enum": ["cat", "dog"]}},
    "required": ["name", "legs", "kind"],
    "additionalProperties": False,
}  # fmt: skip


def post(server, path: str, **body):
    r = server.http.post(path, json={"model": "tandem", "max_tokens": 200, **body})
    assert r.status_code == 200, r.text
    return r.json()


def chat_text(server, **body) -> str:
    choice = post(server, "/v1/chat/completions", messages=MESSAGES, **body)["choices"][0]
    assert choice["finish_reason"] == "stop", choice
    return choice["message"]["content"]


def completion_text(server, **body) -> str:
    choice = post(server, "/v1/completions", prompt="pet = ", **body)["choices"][0]
    assert choice["finish_reason"] == "stop", choice
    return choice["text"]


def json_object(text: str):
    return json.loads(text)


@pytest.mark.parametrize("temperature", [0, 1.0])
def test_response_format_on_chat_and_completions(tools_server, temperature):
    rf_schema = {"type": "json_schema", "json_schema": {"name": "pet", "schema": SCHEMA, "strict": True}}
    for text in (chat_text(tools_server, response_format=rf_schema, temperature=temperature, seed=1),
                 completion_text(tools_server, response_format=rf_schema, temperature=temperature, seed=2)):  # fmt: skip
        jsonschema.validate(json_object(text), SCHEMA)
    # Any JSON object is unbounded: a random model never closes it. A bias towards "}" makes the unconstrained
    # model emit "}}}}...", the constrained one the shortest object.
    brace = tools_server.http.post("/tokenize", json={"prompt": "}", "add_special_tokens": False}).json()["tokens"]
    bias = {str(brace[0]): 100}
    for text in (chat_text(tools_server, response_format={"type": "json_object"}, temperature=temperature, seed=3,
                           logit_bias=bias),
                 completion_text(tools_server, response_format={"type": "json_object"}, temperature=temperature, seed=4,
                                 logit_bias=bias)):  # fmt: skip
        assert json_object(text) == {}


def test_vllm_structured_outputs_and_guided_fields(tools_server):
    choices = ["yes", "no", "it depends"]
    assert chat_text(tools_server, structured_outputs={"choice": choices}) in choices
    assert completion_text(tools_server, guided_choice=choices, temperature=1.0, seed=5) in choices
    assert re.fullmatch(r"[0-9]{3}-[a-z]{2}", completion_text(tools_server, guided_regex=r"[0-9]{3}-[a-z]{2}"))
    assert re.fullmatch(r"[0-9]{3}-[a-z]{2}", chat_text(tools_server, structured_outputs={"regex": r"[0-9]{3}-[a-z]{2}"}))
    jsonschema.validate(json_object(chat_text(tools_server, guided_json=SCHEMA, temperature=0.8, seed=6)), SCHEMA)
    compact = chat_text(tools_server, structured_outputs={"json": SCHEMA, "disable_any_whitespace": True})
    jsonschema.validate(json_object(compact), SCHEMA)
    assert ", " not in compact and ": " not in compact.replace('": "', "")  # compact separators
    text = completion_text(tools_server, guided_grammar='root ::= "(" [a-c] (", " [a-c]){0,2} ")"')
    assert re.fullmatch(r"\([a-c](, [a-c]){0,2}\)", text)
    # speculative and verifier-only agree under the grammar (greedy)
    alone = chat_text(tools_server, guided_json=SCHEMA, temperature=0, tandem={"mode": "verifier-only"})
    assert chat_text(tools_server, guided_json=SCHEMA, temperature=0) == alone


def test_streamed_structured_output(tools_server):
    with tools_server.http.stream("POST", "/v1/chat/completions", json={
        "model": "tandem", "messages": MESSAGES, "max_tokens": 200, "stream": True,
        "response_format": {"type": "json_schema", "json_schema": {"name": "pet", "schema": SCHEMA}},
    }) as r:  # fmt: skip
        data = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in data if c["choices"])
    jsonschema.validate(json_object(text), SCHEMA)


@pytest.mark.parametrize("body, param", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 5}}}},
     "response_format.json_schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format.json_schema"),
    ({"response_format": {"type": "yaml"}}, "response_format.type"),
    ({"guided_regex": "("}, "guided_regex"),
    ({"structured_outputs": {"grammar": "root ::= "}}, "structured_outputs.grammar"),
    ({"structured_outputs": {"choice": []}}, "structured_outputs.choice"),
    ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs.choice"),
    ({"structured_outputs": {"whitespace_pattern": " "}}, "structured_outputs.whitespace_pattern"),
    ({"structured_outputs": {"nope": 1}}, "structured_outputs.nope"),
    ({"guided_json": {"type": "object"}, "guided_regex": "a"}, "guided_regex"),
    ({"guided_decoding_backend": "outlines"}, "guided_decoding_backend"),
])  # fmt: skip
def test_bad_structured_requests_are_400_naming_the_field(tools_server, body, param):
    r = tools_server.http.post("/v1/chat/completions", json={"model": "tandem", "messages": MESSAGES, **body})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param, err
    assert "cc:" not in err["message"]


class Pet(BaseModel):
    name: str = Field(pattern=r"^[a-z]{1,8}$")
    kind: Literal["cat", "dog", "owl"]
    legs: int = Field(ge=0, le=8)


def test_openai_client_parse(tools_server):
    client = tools_server.client()
    for temperature in (0, 0.9):
        r = client.chat.completions.parse(model="tandem", messages=MESSAGES, response_format=Pet, max_tokens=200,
                                          temperature=temperature, seed=7)  # fmt: skip
        pet = r.choices[0].message.parsed
        assert isinstance(pet, Pet) and pet.kind in ("cat", "dog", "owl")
