"""The rule: every request field is honoured, or refused with a 400 naming it unless its value is neutral.

The test walks the request schema (service/openai_api.py): each field has a
policy, each refused field is sent with a non-neutral value against a real
server and must come back 400 naming it, each no-effect field must be
accepted, and each honoured field must name the test that shows it working.
OpenAI's own parameters (read from the installed ``openai`` client) and vLLM
0.32's extras must all be declared, so none can fall through as "unknown".
"""

from __future__ import annotations

import importlib
import json
import typing

import pytest
from pydantic import BaseModel

from service.openai_api import ChatCompletionRequest, CompletionRequest, StreamOptions, policy_of

ENDPOINTS = {"/v1/completions": CompletionRequest, "/v1/chat/completions": ChatCompletionRequest}
BASE = {
    "/v1/completions": {"model": "tandem", "prompt": "def f(x):", "max_tokens": 2},
    "/v1/chat/completions": {"model": "tandem", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
}

# vLLM 0.32's request fields (vllm.entrypoints.openai.{completion,chat_completion}.protocol),
# listed from its source: a field vLLM adds later shows up when this list is refreshed.
VLLM_COMPLETION_FIELDS = """model prompt echo frequency_penalty logit_bias logprobs max_tokens n presence_penalty seed stop
stream stream_options suffix temperature top_p user use_beam_search top_k min_p repetition_penalty watermarking
length_penalty stop_token_ids include_stop_str_in_output ignore_eos min_tokens skip_special_tokens
spaces_between_special_tokens truncate_prompt_tokens truncation_side allowed_token_ids prompt_logprobs
logprob_token_ids bad_words prompt_embeds add_special_tokens response_format structured_outputs priority request_id
session_id return_tokens_as_token_ids return_token_ids routed_experts_prompt_start return_token_offsets mm_payload
return_mm_kwargs cache_salt kv_transfer_params ec_transfer_params vllm_xargs repetition_detection
thinking_token_budget stream_interval""".split()
VLLM_CHAT_FIELDS = """messages model frequency_penalty logit_bias logprobs top_logprobs max_tokens max_completion_tokens
n presence_penalty response_format seed stop stream stream_options temperature top_p tools tool_choice
reasoning_effort thinking_token_budget include_reasoning parallel_tool_calls user use_beam_search top_k min_p
repetition_penalty watermarking length_penalty stop_token_ids include_stop_str_in_output ignore_eos min_tokens
skip_special_tokens spaces_between_special_tokens truncate_prompt_tokens truncation_side prompt_logprobs
logprob_token_ids allowed_token_ids bad_words echo add_generation_prompt continue_final_message add_special_tokens
documents chat_template chat_template_kwargs media_io_kwargs mm_processor_kwargs structured_outputs priority
request_id session_id return_tokens_as_token_ids return_token_ids routed_experts_prompt_start return_token_offsets
return_prompt_text mm_payload return_mm_kwargs cache_salt kv_transfer_params ec_transfer_params vllm_xargs
repetition_detection stream_interval""".split()
# vLLM's older guided-decoding fields, still sent by many clients.
VLLM_GUIDED_FIELDS = ["guided_json", "guided_regex", "guided_choice", "guided_grammar", "guided_decoding_backend",
                      "guided_whitespace_pattern"]  # fmt: skip

#: Each honoured field -> the test that shows it doing what it does ("module::function").
HONOURED = {
    "model": "tests.service.test_openai_client::test_models_lists_the_served_model",
    "prompt": "tests.service.test_openai_client::test_token_id_prompts_and_prompt_lists",
    "messages": "tests.service.test_openai_client::test_chat_non_streamed_and_streamed",
    "max_tokens": "tests.service.test_openai_client::test_completion_non_streamed",
    "max_completion_tokens": "tests.service.test_api_fidelity::test_max_completion_tokens_on_both_endpoints",
    "temperature": "tests.service.test_openai_client::test_seed_gives_reproducible_sampling",
    "top_p": "tests.decoding.test_speculative::test_sampling_matches_the_verifiers_exact_sequence_distribution",
    "top_k": "tests.service.test_api_fidelity::test_top_k_1_is_greedy",
    "n": "tests.service.test_openai_client::test_n_choices",
    "seed": "tests.service.test_openai_client::test_seed_gives_reproducible_sampling",
    "stop": "tests.service.test_openai_client::test_stop_sequence_cuts_the_output_before_it",
    "stream": "tests.service.test_openai_client::test_completion_streamed_matches_non_streamed",
    "stream_options": "tests.service.test_openai_client::test_stream_include_usage",
    "ignore_eos": "tests.decoding.test_speculative::test_eos_stops_generation_and_is_kept_in_token_ids",
    "tandem": "tests.service.test_openai_client::test_per_request_tandem_options",
    "echo": "tests.service.test_api_fidelity::test_echo_on_both_endpoints",
    "best_of": "tests.service.test_api_fidelity::test_best_of_equal_to_n_is_accepted",
    "add_special_tokens": "tests.service.test_api_fidelity::test_add_special_tokens_and_tokenize_agree",
    "request_id": "tests.service.test_api_fidelity::test_request_id_names_the_response",
    "tools": "tests.service.test_clients::test_auto_tool_choice_and_a_tool_conversation",
    "tool_choice": "tests.service.test_clients::test_forced_tool_choices_always_give_valid_calls",
    "parallel_tool_calls": "tests.service.test_clients::test_forced_tool_choices_always_give_valid_calls",
    "add_generation_prompt": "tests.service.test_api_fidelity::test_chat_template_controls_match_the_rendered_prompt",
    "continue_final_message": "tests.service.test_api_fidelity::test_chat_template_controls_match_the_rendered_prompt",
    "chat_template_kwargs": "tests.service.test_api_fidelity::test_chat_template_kwargs_reach_the_template",
    "documents": "tests.service.test_api_fidelity::test_chat_template_kwargs_reach_the_template",
    "response_format": "tests.service.test_structured_api::test_response_format_on_chat_and_completions",
    **dict.fromkeys(["structured_outputs", "guided_json", "guided_regex", "guided_choice", "guided_grammar"],
                    "tests.service.test_structured_api::test_vllm_structured_outputs_and_guided_fields"),
    "logprobs": "tests.service.test_api_fidelity::test_logprobs_on_both_endpoints_streamed_and_not",
    "top_logprobs": "tests.service.test_api_fidelity::test_logprobs_on_both_endpoints_streamed_and_not",
    "return_tokens_as_token_ids": "tests.service.test_api_fidelity::test_return_tokens_as_token_ids",
    **dict.fromkeys(
        ["frequency_penalty", "presence_penalty", "repetition_penalty", "logit_bias", "min_p", "min_tokens",
         "stop_token_ids", "include_stop_str_in_output", "allowed_token_ids", "skip_special_tokens"],
        "tests.service.test_api_fidelity::test_processing_fields_reach_the_decoding_core",
    ),  # fmt: skip
}


def fields(model: type[BaseModel], policy: str) -> list[str]:
    return [name for name, f in model.model_fields.items() if policy_of(f) == policy]


def example(model: type[BaseModel], name: str):
    return model.model_fields[name].examples[0]


CASES = [(path, name) for path, model in ENDPOINTS.items() for name in fields(model, "refused")]


@pytest.mark.parametrize("path,name", CASES, ids=[f"{'chat' if 'chat' in p else 'completions'}-{n}" for p, n in CASES])
def test_each_refused_field_is_a_400_naming_it(server, path, name):
    body = {**BASE[path], name: example(ENDPOINTS[path], name)}
    r = server.http.post(path, json=body)
    assert r.status_code == 400, (name, r.text)
    err = r.json()["error"]
    assert err["param"] == name and name in err["message"], err


@pytest.mark.parametrize("path", ENDPOINTS)
def test_refused_fields_at_their_neutral_values_are_accepted(server, path):
    model = ENDPOINTS[path]
    body = dict(BASE[path])
    for name in fields(model, "refused"):
        extra = model.model_fields[name].json_schema_extra
        body[name] = extra["x-tandem-neutral"][0]  # type: ignore[index]
    body["stream_options"] = {"include_usage": True, "continuous_usage_stats": False}
    r = server.http.post(path, json={**body, "stream": True})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("path", ENDPOINTS)
def test_no_effect_fields_are_accepted(server, path):
    model = ENDPOINTS[path]
    body = {**BASE[path], **{name: example(model, name) for name in fields(model, "no_effect")}}
    r = server.http.post(path, json=body)
    assert r.status_code == 200, r.text


def test_refused_stream_options_are_named_with_their_path(server):
    r = server.http.post("/v1/completions", json={**BASE["/v1/completions"], "stream": True,
                                                  "stream_options": {"continuous_usage_stats": True}})  # fmt: skip
    assert r.status_code == 400 and r.json()["error"]["param"] == "stream_options.continuous_usage_stats"
    assert set(fields(StreamOptions, "refused")) == {"continuous_usage_stats"}


def test_every_honoured_field_names_a_test_that_exists():
    honoured = {name for model in ENDPOINTS.values() for name in fields(model, "honoured")}
    assert honoured == set(HONOURED), (honoured - set(HONOURED), set(HONOURED) - honoured)
    for target in HONOURED.values():
        module, function = target.split("::")
        assert callable(getattr(importlib.import_module(module), function, None)), target


def test_openai_and_vllm_fields_are_all_declared():
    import openai.types.chat.completion_create_params as chat
    import openai.types.completion_create_params as completion

    declared = {path: set(model.model_fields) for path, model in ENDPOINTS.items()}
    openai_completion = set(typing.get_type_hints(completion.CompletionCreateParamsBase, include_extras=False)) | {"stream"}
    openai_chat = set(typing.get_type_hints(chat.CompletionCreateParamsBase, include_extras=False)) | {"stream"}
    assert openai_completion <= declared["/v1/completions"], openai_completion - declared["/v1/completions"]
    assert openai_chat <= declared["/v1/chat/completions"], openai_chat - declared["/v1/chat/completions"]
    vllm_completion = set(VLLM_COMPLETION_FIELDS + VLLM_GUIDED_FIELDS)
    vllm_chat = set(VLLM_CHAT_FIELDS + VLLM_GUIDED_FIELDS)
    assert vllm_completion <= declared["/v1/completions"], vllm_completion - declared["/v1/completions"]
    assert vllm_chat <= declared["/v1/chat/completions"], vllm_chat - declared["/v1/chat/completions"]


def test_unknown_fields_are_logged_once_by_name_without_their_value(server):
    secret = "VALUE-NEVER-LOGGED-7f3a"
    name = "bogus_field\nforged log line"
    for _ in range(3):
        r = server.http.post("/v1/completions", content=json.dumps({**BASE["/v1/completions"], name: secret}),
                             headers={"content-type": "application/json"})  # fmt: skip
        assert r.status_code == 200, r.text
    log = server.log()
    lines = [line for line in log.splitlines() if "bogus_field" in line]
    assert len(lines) == 1, lines
    assert "WARNING" in lines[0] or "warning" in lines[0]
    assert "bogus_field\\nforged log line" in lines[0]  # escaped: one line, the newline visible
    assert secret not in log
