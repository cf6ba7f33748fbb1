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


# -- vLLM's logits processing, through the API ------------------------------------------------------------


def test_processing_fields_reach_the_decoding_core(server, tiny_tokenizer):
    """Each processing field changes the output as vLLM's does; speculative equals verifier-only (greedy)."""
    base = {"prompt": "x = x + x + x + x", "max_tokens": 24, **NOEOS}
    plain = complete(server, **base)["choices"][0]["text"]
    for extra in ({"repetition_penalty": 2.5}, {"frequency_penalty": 2.0}, {"presence_penalty": 2.0}):
        spec = complete(server, **base, **extra)["choices"][0]["text"]
        alone = complete(server, **base, **extra, tandem={"mode": "verifier-only"})["choices"][0]["text"]
        assert spec == alone != plain, extra
    sampled = [complete(server, **base, temperature=1.0, seed=s, min_p=0.999)["choices"][0]["text"] for s in (1, 2)]
    assert sampled == [plain, plain]  # min_p near 1 keeps only the most likely token: greedy

    forced = tiny_tokenizer.encode(" y", add_special_tokens=False)[-1]
    r = complete(server, **base, logit_bias={str(forced): 100})
    assert set(tiny_tokenizer.encode(r["choices"][0]["text"], add_special_tokens=False)) <= {forced}
    allowed = [forced, forced + 1]
    r = complete(server, **base, allowed_token_ids=allowed, temperature=1.0, seed=3)
    assert r["usage"]["completion_tokens"] == 24

    ids = tokenize(server, prompt=base["prompt"])["tokens"]
    free = complete(server, prompt=ids, max_tokens=24, **NOEOS, logprobs=0, return_tokens_as_token_ids=True)
    stop_token = int(free["choices"][0]["logprobs"]["tokens"][4].removeprefix("token_id:"))
    r = complete(server, prompt=ids, max_tokens=24, stop_token_ids=[stop_token], **NOEOS)["choices"][0]
    assert r["finish_reason"] == "stop" and r["stop_reason"] == stop_token
    kept = complete(server, prompt=ids, max_tokens=24, stop_token_ids=[stop_token], include_stop_str_in_output=True,
                    **NOEOS)["choices"][0]  # fmt: skip
    assert kept["text"].startswith(r["text"]) and len(kept["text"]) > len(r["text"])
    late = complete(server, prompt=ids, max_tokens=24, stop_token_ids=[stop_token], min_tokens=24, **NOEOS)
    assert late["usage"]["completion_tokens"] == 24

    eos = tiny_tokenizer.eos_token_id
    special = {"prompt": "a", "max_tokens": 3, "logit_bias": {str(eos): 100}, **NOEOS}
    assert complete(server, **special)["choices"][0]["text"] == ""
    assert tiny_tokenizer.eos_token in complete(server, **special, skip_special_tokens=False)["choices"][0]["text"]

    r = server.http.post("/v1/completions", json={"model": "tandem", **base, "min_tokens": 50})
    assert r.status_code == 400 and r.json()["error"]["param"] == "min_tokens"
    r = server.http.post("/v1/completions", json={"model": "tandem", **base, "logit_bias": {"x": 1}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "logit_bias"


# -- logprobs ---------------------------------------------------------------------------------------------


def test_logprobs_on_both_endpoints_streamed_and_not(server):
    client = server.client()
    r = client.completions.create(model="tandem", prompt=PROMPT, max_tokens=8, temperature=0, logprobs=3,
                                  extra_body=NOEOS)  # fmt: skip
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 8
    assert "".join(lp.tokens) == r.choices[0].text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(8)]
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert logprob <= 0 and 1 <= len(top) <= 4  # texts shared by several ids (byte tokens) merge
        assert top[token] == pytest.approx(logprob) == max(top.values())  # greedy: the chosen token is the likeliest
    streamed = list(client.completions.create(model="tandem", prompt=PROMPT, max_tokens=8, temperature=0, logprobs=3,
                                              stream=True, extra_body=NOEOS))  # fmt: skip
    tokens = [t for c in streamed if c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
    values = [v for c in streamed if c.choices[0].logprobs for v in c.choices[0].logprobs.token_logprobs]
    assert tokens == lp.tokens and values == pytest.approx(lp.token_logprobs, abs=1e-5)

    chat = client.chat.completions.create(model="tandem", messages=MESSAGES, max_tokens=6, temperature=0, logprobs=True,
                                          top_logprobs=2, extra_body=NOEOS)  # fmt: skip
    content = chat.choices[0].logprobs.content
    assert len(content) == 6 and "".join(c.token for c in content) == chat.choices[0].message.content
    assert all(len(c.top_logprobs) == 2 and c.bytes == list(c.token.encode()) for c in content)
    assert all(c.top_logprobs[0].logprob == pytest.approx(c.logprob) for c in content)
    bare = client.chat.completions.create(model="tandem", messages=MESSAGES, max_tokens=3, logprobs=True)
    assert all(c.top_logprobs == [] for c in bare.choices[0].logprobs.content)
    assert client.chat.completions.create(model="tandem", messages=MESSAGES, max_tokens=3).choices[0].logprobs is None
    r = server.http.post("/v1/chat/completions", json={"model": "tandem", "messages": MESSAGES, "top_logprobs": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "top_logprobs"


def test_echo_with_logprobs_scores_the_prompt(server, tiny_tokenizer):
    """What evaluation harnesses send for loglikelihood tasks (lm-eval: echo, logprobs, max_tokens 1)."""
    r = complete(server, prompt=PROMPT, max_tokens=1, echo=True, logprobs=1)["choices"][0]
    lp = r["logprobs"]
    prompt_ids = tiny_tokenizer.encode(PROMPT)
    assert len(lp["tokens"]) == len(prompt_ids) + 1
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert all(v <= 0 for v in lp["token_logprobs"][1:])
    assert "".join(lp["tokens"]) == r["text"]
    # the same numbers as scoring the prompt token by token through completions
    prefix = prompt_ids[:-1]
    last = complete(server, prompt=prefix, max_tokens=1, logprobs=5, add_special_tokens=False)["choices"][0]["logprobs"]
    target = lp["tokens"][len(prompt_ids) - 1]
    if target in last["top_logprobs"][0]:
        assert last["top_logprobs"][0][target] == pytest.approx(lp["token_logprobs"][len(prompt_ids) - 1], abs=1e-4)
    ids = tokenize(server, prompt=PROMPT, return_token_strs=True)
    streamed = _sse(server, "/v1/completions", {"model": "tandem", "prompt": PROMPT, "max_tokens": 1, "echo": True,
                                                "logprobs": 1, "stream": True, "temperature": 0})  # fmt: skip
    tokens = [t for c in streamed for t in (c["choices"][0]["logprobs"] or {}).get("tokens", [])]
    assert tokens == lp["tokens"] and len(tokens) == ids["count"] + 1


def test_return_tokens_as_token_ids(server, tiny_tokenizer):
    r = complete(server, prompt=PROMPT, max_tokens=4, logprobs=1, return_tokens_as_token_ids=True, **NOEOS)["choices"][0]
    ids = [int(t.removeprefix("token_id:")) for t in r["logprobs"]["tokens"]]
    assert tiny_tokenizer.decode(ids) == r["text"]
