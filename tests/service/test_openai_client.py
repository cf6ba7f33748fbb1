"""The gateway through the official `openai` client, against a real `tandem serve`."""

from __future__ import annotations

import json
import subprocess
import sys

import httpx
import pytest

from tests.service.conftest import REPO, model_args

PROMPT = "def fibonacci(n):\n    "
NOEOS = {"ignore_eos": True}  # vLLM-style extra: long enough outputs from random tiny models


def test_models_lists_the_served_model(server):
    models = server.client().models.list()
    assert [m.id for m in models.data] == ["tandem"]
    assert models.data[0].object == "model" and models.data[0].owned_by == "tandem"
    assert server.client().models.retrieve("tandem").id == "tandem"


def test_completion_non_streamed(server):
    r = server.client().completions.create(model="tandem", prompt=PROMPT, max_tokens=12, temperature=0, extra_body=NOEOS)
    assert r.object == "text_completion" and r.id.startswith("cmpl-")
    assert len(r.choices) == 1 and r.choices[0].index == 0
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 12
    assert r.usage.total_tokens == r.usage.prompt_tokens + 12
    assert r.system_fingerprint
    stats = r.model_extra["tandem"]
    assert stats["mode"] == "speculative"
    assert 0 <= stats["accepted_tokens"] <= stats["draft_tokens"]
    assert stats["rounds"] >= 1 and stats["verifier_forward_passes"] == stats["rounds"]


def test_completion_streamed_matches_non_streamed(server):
    client = server.client()
    args = dict(model="tandem", prompt=PROMPT, max_tokens=24, temperature=0, extra_body=NOEOS)
    whole = client.completions.create(**args).choices[0].text
    chunks = list(client.completions.create(**args, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == whole
    assert len(chunks) >= 2
    assert [c.choices[0].finish_reason for c in chunks][-1] == "length"
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])
    assert all(c.usage is None for c in chunks)


def test_stream_include_usage(server):
    chunks = list(
        server.client().completions.create(
            model="tandem", prompt=PROMPT, max_tokens=10, temperature=0, extra_body=NOEOS,
            stream=True, stream_options={"include_usage": True},
        )
    )  # fmt: skip
    *body, last = chunks
    assert last.choices == [] and last.usage is not None
    assert last.usage.completion_tokens == 10
    assert last.usage.total_tokens == last.usage.prompt_tokens + 10
    assert all(c.usage is None for c in body)
    assert last.model_extra["tandem"]["rounds"] >= 1


def test_chat_non_streamed_and_streamed(server):
    client = server.client()
    messages = [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "A loop, please."}]
    r = client.chat.completions.create(model="tandem", messages=messages, max_tokens=16, temperature=0, extra_body=NOEOS)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 16

    chunks = list(
        client.chat.completions.create(
            model="tandem", messages=messages, max_tokens=16, temperature=0, extra_body=NOEOS,
            stream=True, stream_options={"include_usage": True},
        )
    )  # fmt: skip
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == r.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 16
    # max_completion_tokens is chat's newer name for max_tokens
    r2 = client.chat.completions.create(model="tandem", messages=messages, max_completion_tokens=5, temperature=0,
                                        extra_body=NOEOS)  # fmt: skip
    assert r2.usage.completion_tokens == 5


def test_chat_uses_the_default_template_when_the_tokenizer_has_none(server, tiny_verifier_dir):
    from decoding.causal_lm import load_tokenizer
    from service.openai_api import DEFAULT_CHAT_TEMPLATE

    tok = load_tokenizer(tiny_verifier_dir)
    assert not tok.chat_template
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    text = tok.apply_chat_template(messages, chat_template=DEFAULT_CHAT_TEMPLATE, tokenize=False, add_generation_prompt=True)
    assert text == "Be brief.\n\nUser: Hi\nAssistant:"
    r = server.client().chat.completions.create(model="tandem", messages=messages, max_tokens=1)
    assert r.usage.prompt_tokens == len(tok.encode(text))


def test_stop_sequence_cuts_the_output_before_it(server):
    client = server.client()
    args = dict(model="tandem", prompt=PROMPT, max_tokens=40, temperature=0, extra_body=NOEOS)
    full = client.completions.create(**args).choices[0].text
    stop = full[10:13]
    expected = full[: full.index(stop)]
    r = client.completions.create(**args, stop=[stop, "never-appears-xyz"])
    assert r.choices[0].text == expected
    assert r.choices[0].finish_reason == "stop"
    streamed = list(client.completions.create(**args, stop=stop, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == expected
    assert streamed[-1].choices[0].finish_reason == "stop"


def test_seed_gives_reproducible_sampling(server):
    client = server.client()
    args = dict(model="tandem", prompt=PROMPT, max_tokens=24, temperature=1.0, extra_body=NOEOS)
    a = client.completions.create(**args, seed=1234).choices[0].text
    b = client.completions.create(**args, seed=1234).choices[0].text
    c = client.completions.create(**args, seed=1234, stream=True)
    assert a == b == "".join(x.choices[0].text for x in c)
    others = {client.completions.create(**args, seed=s).choices[0].text for s in (1, 2, 3)}
    assert others - {a}, "different seeds should give different samples"


def test_n_choices(server):
    client = server.client()
    r = client.completions.create(model="tandem", prompt=PROMPT, max_tokens=8, n=3, temperature=1.0, seed=7,
                                  extra_body=NOEOS)  # fmt: skip
    assert sorted(c.index for c in r.choices) == [0, 1, 2]
    assert r.usage.completion_tokens == 24
    assert len({c.text for c in r.choices}) > 1  # seed + index: distinct samples
    # choice 0 is exactly the n=1 sample with the same seed
    single = client.completions.create(model="tandem", prompt=PROMPT, max_tokens=8, temperature=1.0, seed=7,
                                       extra_body=NOEOS)  # fmt: skip
    assert single.choices[0].text == r.choices[0].text

    chunks = list(client.chat.completions.create(
        model="tandem", messages=[{"role": "user", "content": "x"}], max_tokens=6, n=2, extra_body=NOEOS, stream=True,
        stream_options={"include_usage": True}))  # fmt: skip
    finished = {c.choices[0].index for c in chunks if c.choices and c.choices[0].finish_reason}
    assert finished == {0, 1}
    assert chunks[-1].usage.completion_tokens == 12


def test_token_id_prompts_and_prompt_lists(server, tiny_verifier_dir):
    from decoding.causal_lm import load_tokenizer

    ids = load_tokenizer(tiny_verifier_dir).encode(PROMPT)
    client = server.client()
    by_text = client.completions.create(model="tandem", prompt=PROMPT, max_tokens=10, temperature=0, extra_body=NOEOS)
    by_ids = client.completions.create(model="tandem", prompt=ids, max_tokens=10, temperature=0, extra_body=NOEOS)
    assert by_ids.choices[0].text == by_text.choices[0].text
    assert by_ids.usage.prompt_tokens == len(ids)
    batch = client.completions.create(model="tandem", prompt=[PROMPT, "import os"], max_tokens=10, temperature=0,
                                      extra_body=NOEOS)  # fmt: skip
    assert [c.index for c in batch.choices] == [0, 1]
    assert batch.choices[0].text == by_text.choices[0].text
    assert batch.usage.completion_tokens == 20


def test_per_request_tandem_options(server):
    client = server.client()
    args = dict(model="tandem", prompt=PROMPT, max_tokens=16, temperature=0, extra_body=NOEOS)
    args.pop("extra_body")
    spec = client.completions.create(**args, extra_body={**NOEOS, "tandem": {"num_draft_tokens": 3, "max_draft_tokens": 3,
                                                                             "adaptive": False}})  # fmt: skip
    ref = client.completions.create(**args, extra_body={**NOEOS, "tandem": {"mode": "verifier-only"}})
    draft = client.completions.create(**args, extra_body={**NOEOS, "tandem": {"mode": "drafter-only"}})
    s_spec, s_ref, s_draft = (r.model_extra["tandem"] for r in (spec, ref, draft))
    assert s_ref["mode"] == "verifier-only" and s_ref["draft_tokens"] == 0 and s_ref["rounds"] == 16
    assert s_draft["mode"] == "drafter-only" and s_draft["verifier_forward_passes"] == 0
    assert s_spec["mode"] == "speculative" and s_spec["draft_tokens"] > 0
    # every round drafts k = 3 (fewer only when the token budget runs out)
    assert s_spec["draft_tokens"] <= 3 * s_spec["rounds"]
    # lossless: greedy speculative output is the verifier's own
    assert spec.choices[0].text == ref.choices[0].text


def test_greedy_api_output_equals_tandem_generate_verifier_only(server, tiny_pair):
    cli = subprocess.run(
        [sys.executable, "-m", "service.cli", "generate", "--prompt", PROMPT, "--max-tokens", "30", "--ignore-eos",
         "--mode", "verifier-only", "--json", *model_args(*tiny_pair)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert cli.returncode == 0, cli.stderr
    expected = json.loads(cli.stdout)
    r = server.client().completions.create(model="tandem", prompt=PROMPT, max_tokens=30, temperature=0, extra_body=NOEOS)
    assert r.choices[0].text == expected["text"]
    assert r.usage.completion_tokens == len(expected["token_ids"])
    chat_free = server.client().completions.create(model="tandem", prompt=PROMPT, max_tokens=30, temperature=0,
                                                   extra_body=NOEOS, stream=True)  # fmt: skip
    assert "".join(c.choices[0].text for c in chat_free) == expected["text"]


def test_sse_wire_format(server):
    body = {"model": "tandem", "prompt": PROMPT, "max_tokens": 6, "temperature": 0, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}  # fmt: skip
    with httpx.stream("POST", server.base_url + "/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == ""  # every event ends with a blank line
    events = events[:-1]
    assert all(e.startswith("data: ") and "\n" not in e for e in events)
    assert events[-1] == "data: [DONE]"
    payloads = [json.loads(e[len("data: ") :]) for e in events[:-1]]
    assert all(p["object"] == "text_completion" and p["model"] == "tandem" for p in payloads)
    assert len({p["id"] for p in payloads}) == 1
    assert payloads[-1]["choices"] == [] and payloads[-1]["usage"]["completion_tokens"] == 6


def test_default_max_tokens_is_openais_16_for_completions(server):
    r = server.client().completions.create(model="tandem", prompt=PROMPT, extra_body=NOEOS)
    assert r.usage.completion_tokens == 16 and r.choices[0].finish_reason == "length"


def test_request_id_header_is_echoed(server):
    r = server.http.get("/health", headers={"X-Request-Id": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123"
    assert len(server.http.get("/health").headers["x-request-id"]) == 32


def test_langchain_style_extra_fields_are_ignored(server):
    # Fields newer clients send that do not change the output are accepted.
    r = server.http.post("/v1/chat/completions", json={
        "model": "tandem", "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
        "max_tokens": 3, "store": False, "metadata": {"a": "b"}, "parallel_tool_calls": False,
        "frequency_penalty": 0, "presence_penalty": 0.0, "logprobs": False, "tool_choice": "none",
        "response_format": {"type": "text"}, "user": "someone",
    })  # fmt: skip
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] <= 3


@pytest.mark.parametrize("path", ["/health", "/ready"])
def test_probes(server, path):
    r = server.http.get(path)
    assert r.status_code == 200 and r.json()["status"] in ("ok", "ready")
