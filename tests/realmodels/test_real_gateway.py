"""The real pair through the gateway: a real `tandem serve` (default pair) and the official OpenAI client."""

from __future__ import annotations

import os

import pytest

from tests.realmodels.conftest import CHAT, CODE, hf_greedy
from tests.service.conftest import start_server


@pytest.fixture(scope="module")
def real_server(real_pair, tmp_path_factory):
    """`tandem serve` with no model flags: once installed, the real pair is the default."""
    from decoding.default_models import CACHE_DIR

    server = start_server(tmp_path_factory.mktemp("real") / "serve.log", "--max-concurrency", "1",
                          env={"TANDEM_CACHE_DIR": str(CACHE_DIR), "TANDEM_TORCH_THREADS": os.environ.get("TANDEM_TORCH_THREADS", "2")})  # fmt: skip
    yield server
    assert server.stop() == 0


def test_chat_greedy_equals_hf_generate_and_ends_at_end_of_turn(real_server, real_verifier_hf):
    model, tok = real_verifier_hf
    prompt = tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True, return_dict=False)
    ref = hf_greedy(model, prompt, 64)
    assert ref[-1] == tok.convert_tokens_to_ids("<|im_end|>")
    resp = real_server.client().chat.completions.create(model="tandem", messages=CHAT, max_tokens=64, temperature=0)
    choice = resp.choices[0]
    assert choice.finish_reason == "stop"
    assert choice.message.content == tok.decode(ref[:-1])  # the end-of-turn token ends the answer, not its text
    assert resp.usage.prompt_tokens == len(prompt) and resp.usage.completion_tokens == len(ref)
    stats = resp.model_extra["tandem"]
    assert stats["mode"] == "speculative" and stats["draft_tokens"] > 0

    stream = real_server.client().chat.completions.create(model="tandem", messages=CHAT, max_tokens=64, temperature=0,
                                                          stream=True)  # fmt: skip
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == choice.message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"


def test_completion_greedy_equals_hf_generate(real_server, real_verifier_hf):
    model, tok = real_verifier_hf
    prompt = tok.encode(CODE)
    ref = hf_greedy(model, prompt, 48, stop_at_eos=False)
    resp = real_server.client().completions.create(model="tandem", prompt=CODE, max_tokens=48, temperature=0,
                                                   extra_body={"ignore_eos": True})  # fmt: skip
    assert resp.choices[0].text == tok.decode(ref)
    assert resp.usage.completion_tokens == 48
