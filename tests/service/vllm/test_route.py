"""service/vllm/route.py inside a real vLLM (``tandem verifier``): the wire contract seen from raw HTTP.

The client's view (exactness, caching, faults) is tests/decoding/backends/test_vllm_client.py;
here the route's own answers: /info, the error envelope and codes, sessions.
"""

from __future__ import annotations

import uuid

import httpx
import pytest

from decoding.protocol import INFO_PATH, MAX_DRAFT, SESSIONS_PATH, VERIFY_PATH, VERIFY_PROTOCOL_VERSION


@pytest.fixture(scope="module")
def http(vllm_server):
    with httpx.Client(base_url=vllm_server.url, timeout=120) as client:
        yield client


def verify(http: httpx.Client, **fields) -> httpx.Response:
    body = {"session": uuid.uuid4().hex, "base": 0, "append": [1, 2, 3], "draft": [4, 5], "top_k": 5, "cache_salt": None}
    return http.post(VERIFY_PATH, json={**body, **fields})


def assert_error(r: httpx.Response, status: int, code: str, mentions: str) -> None:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == code
    assert mentions in error["message"] and "Traceback" not in r.text


def test_info_describes_protocol_and_limits(http):
    info = http.get(INFO_PATH).json()
    assert info["protocol"] == VERIFY_PROTOCOL_VERSION and info["max_draft"] == MAX_DRAFT
    assert (info["vocab_size"], info["max_model_len"], info["max_logprobs"]) == (512, 2048, 64)
    assert info["prefix_caching"] and info["fast_prompt_logprobs"] and len(info["vocab_sha256"]) == 64


def test_a_round_then_its_continuation_then_release(http):
    sid = uuid.uuid4().hex
    first = verify(http, session=sid)
    assert first.status_code == 200, first.text
    body = first.json()
    assert (body["context_len"], body["num_prompt_tokens"]) == (3, 5)
    assert [len(r) for r in body["top_ids"]] == [5, 5, 5] and len(body["draft_ranks"]) == 2
    # Only the committed tokens since the last round travel: base=3 keeps the stored [1, 2, 3].
    second = verify(http, session=sid, base=3, append=[6], draft=[])
    assert second.status_code == 200 and second.json()["context_len"] == 4
    assert http.delete(f"{SESSIONS_PATH}/{sid}").status_code == 204
    assert http.delete(f"{SESSIONS_PATH}/{sid}").status_code == 404
    assert_error(verify(http, session=sid, base=4, append=[]), 409, "unknown_session", "resend the context with base=0")


@pytest.mark.parametrize(
    ("fields", "code", "mentions"),
    [
        ({"session": "not valid!"}, "invalid_request", "session"),
        ({"base": -1}, "invalid_request", "base"),
        ({"append": [1, 10**6]}, "invalid_request", "append"),
        ({"draft": [1] * (MAX_DRAFT + 1)}, "invalid_request", "draft"),
        ({"top_k": 65}, "invalid_request", "--max-logprobs"),
        ({"cache_salt": "a/b"}, "invalid_request", "cache_salt"),
        ({"append": []}, "invalid_request", "context is empty"),
        ({"append": [1] * 2047}, "context_length_exceeded", "max_model_len 2048"),
    ],
)
def test_bad_requests_get_a_400_naming_the_problem(http, fields, code, mentions):
    assert_error(verify(http, **fields), 400, code, mentions)


def test_a_body_that_is_not_a_json_object_is_a_400(http):
    r = http.post(VERIFY_PATH, content=b"[1, 2", headers={"Content-Type": "application/json"})
    assert_error(r, 400, "invalid_json", "invalid JSON body")
    assert_error(http.post(VERIFY_PATH, json=[1, 2]), 400, "invalid_json", "not a JSON object")
