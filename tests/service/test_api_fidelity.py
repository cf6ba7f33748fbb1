"""What vLLM users rely on, against a real `tandem serve`: chat template controls, echo, request ids,
stop_reason, and vLLM's tooling routes (/tokenize, /detokenize, /version, /v1/models' fields)."""

from __future__ import annotations

import pytest

PROMPT = "def fibonacci(n):\n    "
NOEOS = {"ignore_eos": True}
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]


def complete(server, **body):
    r = server.http.post("/v1/completions", json={"model": "tandem", "temperature": 0, **body})
    assert r.status_code == 200, r.text
    return r.json()


def chat(server, **body):
    r = server.http.post("/v1/chat/completions", json={"model": "tandem", "temperature": 0, **body})
    assert r.status_code == 200, r.text
    return r.json()


def tokenize(server, **body):
    r = server.http.post("/tokenize", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def test_max_completion_tokens_on_both_endpoints(server):
    r = complete(server, prompt=PROMPT, max_completion_tokens=7, **NOEOS)
    assert r["usage"]["completion_tokens"] == 7  # not the default 16
    r = chat(server, messages=MESSAGES, max_completion_tokens=5, max_tokens=9, **NOEOS)
    assert r["usage"]["completion_tokens"] == 5  # preferred over max_tokens


def test_top_k_1_is_greedy(server):
    greedy = complete(server, prompt=PROMPT, max_tokens=16, **NOEOS)["choices"][0]["text"]
    for seed in (1, 2):
        sampled = complete(server, prompt=PROMPT, max_tokens=16, temperature=1.5, top_k=1, seed=seed, **NOEOS)
        assert sampled["choices"][0]["text"] == greedy


def test_echo_on_both_endpoints(server):
    plain = complete(server, prompt=PROMPT, max_tokens=6, **NOEOS)["choices"][0]["text"]
    echoed = complete(server, prompt=PROMPT, max_tokens=6, echo=True, **NOEOS)["choices"][0]["text"]
    assert echoed == PROMPT + plain
    ids = tokenize(server, prompt="x = 1", add_special_tokens=False)["tokens"]
    r = complete(server, prompt=[ids, ids], max_tokens=3, echo=True, **NOEOS)
    assert all(c["text"].startswith("x = 1") for c in r["choices"])
    # streamed: the prompt comes first
    lines = _sse(server, "/v1/completions", {"model": "tandem", "prompt": PROMPT, "max_tokens": 6, "temperature": 0,
                                             "echo": True, "stream": True, **NOEOS})  # fmt: skip
    assert "".join(c["choices"][0]["text"] for c in lines) == PROMPT + plain

    # chat: the final message is echoed when it has the response's role (a continued assistant message)
    prefill = [*MESSAGES, {"role": "assistant", "content": "The colour is"}]
    r = chat(server, messages=prefill, max_tokens=4, echo=True, add_generation_prompt=False,
             continue_final_message=True, **NOEOS)  # fmt: skip
    assert r["choices"][0]["message"]["content"].startswith("The colour is")
    r = chat(server, messages=MESSAGES, max_tokens=4, echo=True, **NOEOS)  # last message is the user's: nothing echoed
    assert not r["choices"][0]["message"]["content"].startswith("Name a colour")


def _sse(server, path, body):
    import json

    with server.http.stream("POST", path, json=body) as r:
        assert r.status_code == 200
        data = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    return [json.loads(d) for d in data[:-1]]


def test_best_of_equal_to_n_is_accepted(server):
    r = complete(server, prompt=PROMPT, max_tokens=3, n=2, best_of=2, **NOEOS)
    assert len(r["choices"]) == 2


def test_add_special_tokens_and_tokenize_agree(server, tiny_tokenizer):
    with_special = tokenize(server, prompt=PROMPT)
    without = tokenize(server, prompt=PROMPT, add_special_tokens=False, return_token_strs=True)
    assert with_special["tokens"] == tiny_tokenizer.encode(PROMPT, add_special_tokens=True)
    assert without["tokens"] == tiny_tokenizer.encode(PROMPT, add_special_tokens=False)
    assert without["token_strs"] == tiny_tokenizer.convert_ids_to_tokens(without["tokens"])
    assert without["count"] == len(without["tokens"]) and without["max_model_len"] > 0
    for special in (True, False):
        r = complete(server, prompt=PROMPT, max_tokens=2, add_special_tokens=special, **NOEOS)
        expected = with_special if special else without
        assert r["usage"]["prompt_tokens"] == expected["count"]


def test_request_id_names_the_response(server):
    assert complete(server, prompt=PROMPT, max_tokens=1, request_id="abc-42")["id"] == "cmpl-abc-42"
    assert chat(server, messages=MESSAGES, max_tokens=1, request_id="abc-43")["id"] == "chatcmpl-abc-43"


def test_tool_choice_none_and_auto_without_tools(server):
    for choice in ("none", "auto"):
        r = chat(server, messages=MESSAGES, max_tokens=2, tool_choice=choice, parallel_tool_calls=False)
        assert r["choices"][0]["message"]["role"] == "assistant"


def test_chat_template_controls_match_the_rendered_prompt(server):
    """Chat output equals completions output on the prompt /tokenize renders for the same messages (greedy)."""
    prefill = [*MESSAGES, {"role": "assistant", "content": "Blue, and"}]
    cases = [
        dict(messages=MESSAGES),
        dict(messages=MESSAGES, add_generation_prompt=False),
        dict(messages=prefill, add_generation_prompt=False, continue_final_message=True),
        dict(messages=[{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]),
    ]
    for case in cases:
        ids = tokenize(server, **case)["tokens"]
        via_chat = chat(server, max_tokens=8, **case, **NOEOS)
        via_completion = complete(server, prompt=ids, max_tokens=8, **NOEOS)
        assert via_chat["choices"][0]["message"]["content"] == via_completion["choices"][0]["text"], case
        assert via_chat["usage"]["prompt_tokens"] == len(ids)
    text = server.http.post("/detokenize", json={"tokens": tokenize(server, **cases[3])["tokens"]}).json()["prompt"]
    assert "a\nb" in text  # content parts joined with a newline, as vLLM joins them
    continued = server.http.post("/detokenize", json={"tokens": tokenize(server, **cases[2])["tokens"]}).json()["prompt"]
    assert continued.endswith("Blue, and")  # the final message left open: no new turn after it

    r = server.http.post("/v1/chat/completions", json={"model": "tandem", "messages": prefill,
                                                       "continue_final_message": True})  # fmt: skip
    assert r.status_code == 400 and r.json()["error"]["param"] == "continue_final_message"


def test_chat_template_kwargs_reach_the_template(server):
    # The default template ignores unknown variables: the render is unchanged, and reserved names are refused.
    base = tokenize(server, messages=MESSAGES)["tokens"]
    assert tokenize(server, messages=MESSAGES, chat_template_kwargs={"enable_thinking": False})["tokens"] == base
    assert tokenize(server, messages=MESSAGES, documents=[{"title": "t", "text": "x"}])["tokens"] == base
    assert chat(server, messages=MESSAGES, max_tokens=2, chat_template_kwargs={"enable_thinking": False})
    r = server.http.post("/v1/chat/completions", json={"model": "tandem", "messages": MESSAGES,
                                                       "chat_template_kwargs": {"add_generation_prompt": False}})  # fmt: skip
    assert r.status_code == 400 and r.json()["error"]["param"] == "chat_template_kwargs.add_generation_prompt"


def test_stop_reason_names_the_stop_string(server):
    full = complete(server, prompt=PROMPT, max_tokens=40, **NOEOS)["choices"][0]["text"]
    stop = next(full[i : i + 2] for i in range(5, len(full) - 2) if full[i : i + 2].strip() and full[i : i + 2].isascii())
    r = complete(server, prompt=PROMPT, max_tokens=40, stop=[stop], **NOEOS)["choices"][0]
    assert r["finish_reason"] == "stop" and r["stop_reason"] == stop
    r = complete(server, prompt=PROMPT, max_tokens=3, **NOEOS)["choices"][0]
    assert r["finish_reason"] == "length" and r["stop_reason"] is None


# -- routes ---------------------------------------------------------------------------------------------


def test_tokenize_detokenize_version_and_model_fields(server):
    ids = tokenize(server, model="tandem", prompt=PROMPT)["tokens"]
    assert server.http.post("/detokenize", json={"model": "tandem", "tokens": ids}).json()["prompt"].endswith(PROMPT)
    r = server.http.post("/detokenize", json={"tokens": [10**7]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tokens"
    r = server.http.post("/tokenize", json={"model": "nope", "prompt": "x"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert isinstance(server.http.get("/version").json()["version"], str)
    card = server.http.get("/v1/models").json()["data"][0]
    assert card["root"] and card["parent"] is None and card["max_model_len"] > 0
    assert card["permission"][0]["object"] == "model_permission"


@pytest.mark.parametrize("body", [{"prompt": 5}, {"messages": []}, {"tokens": "x"}, {}])
def test_tokenize_refuses_bad_bodies_with_400(server, body):
    path = "/detokenize" if "tokens" in body else "/tokenize"
    r = server.http.post(path, json=body)
    assert r.status_code == 400 and "error" in r.json()
