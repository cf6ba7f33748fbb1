"""service/plan.py: what plan_request decides for a request (real tiny models, no server, no network)."""

from __future__ import annotations

import asyncio

import pytest

from service.backends import build_backends
from service.config import TandemSettings
from service.errors import APIError
from service.logs import RequestRecord
from service.openai_api import ChatCompletionRequest, CompletionRequest
from service.plan import plan_request


@pytest.fixture(scope="module")
def backends(tiny_verifier_dir, tiny_drafter_dir):
    # An unreachable split worker: planning never contacts it.
    settings = TandemSettings.load(verifier=str(tiny_verifier_dir), drafter=str(tiny_drafter_dir),
                                   split_worker_url="http://127.0.0.1:9", split_layers="1:2")  # fmt: skip
    b = build_backends(settings)
    yield b
    asyncio.run(b.aclose())


def plan(body: CompletionRequest | ChatCompletionRequest, backends, record=None, **settings):
    return asyncio.run(plan_request(body, TandemSettings.load(**settings), backends, record))


def completion(**fields) -> CompletionRequest:
    return CompletionRequest.model_validate({"model": "tandem", "prompt": "hello", **fields})


def test_router_options_and_mode_are_decided_together(backends):
    p = plan(completion(), backends)
    assert p.router is backends.router and p.mode == p.options.mode == "speculative"
    p = plan(completion(tandem={"mode": "verifier-only", "max_draft_tokens": 3}), backends)
    assert p.router is backends.router and p.mode == "verifier-only"
    assert (p.options.min_draft_tokens, p.options.num_draft_tokens, p.options.max_draft_tokens) == (1, 3, 3)
    # A private request runs on the split router: the label says "split", the router runs speculative.
    p = plan(completion(tandem={"mode": "split", "adaptive": False}), backends)
    assert p.router is backends.split_router and p.mode == "split"
    assert p.options.mode == "speculative" and p.options.adaptive is False
    p = plan(completion(tandem={"mode": "split"}), backends, split_speculative=False)
    assert p.options.mode == "verifier-only"
    # split_policy: always sends every request to the worker, except drafter-only (no verifier).
    assert plan(completion(), backends, split_policy="always").router is backends.split_router
    p = plan(completion(tandem={"mode": "drafter-only"}), backends, split_policy="always")
    assert p.router is backends.router and p.mode == "drafter-only"


def test_each_choice_gets_its_prompt_and_sampling_parameters(backends):
    p = plan(completion(prompt=[[5, 6, 7], [8, 9]], n=2, seed=10, stop="x", temperature=0.5), backends)
    assert [c.index for c in p.choices] == [0, 1, 2, 3]  # prompt_index * n + j
    assert [c.prompt_ids for c in p.choices] == [[5, 6, 7], [5, 6, 7], [8, 9], [8, 9]]
    assert [c.params.seed for c in p.choices] == [10, 11, 10, 11]  # seed + j within each prompt
    assert all(c.params.stop == ("x",) and c.params.temperature == 0.5 for c in p.choices)
    assert p.prompt_tokens == 5  # each prompt once, not once per choice
    assert p.choices[0].params.max_tokens == 16  # OpenAI's default for completions
    chat = ChatCompletionRequest.model_validate({"model": "tandem", "messages": [{"role": "user", "content": "hi"}]})
    p = plan(chat, backends)
    max_context = backends.verifier.max_context
    assert p.choices[0].params.max_tokens == max_context - p.prompt_tokens  # chat: up to the context end
    assert plan(chat, backends, default_max_tokens=7).choices[0].params.max_tokens == 7


def test_a_refused_request_is_recorded_under_its_mode(backends):
    record = RequestRecord(request_id="r", method="POST", path="/v1/completions")
    with pytest.raises(APIError) as info:
        plan(completion(tandem={"mode": "verifier-only"}), backends, record, max_prompt_tokens=1, log_prompts=True)
    assert info.value.code == "context_length_exceeded" and info.value.param == "prompt"
    assert record.mode == "verifier-only" and record.prompt == ["hello"]
    with pytest.raises(APIError) as info:
        plan(completion(model="other"), backends)
    assert info.value.status == 404 and info.value.code == "model_not_found"
