"""service/vllm/route.py inside a real vLLM (``tandem verifier``): the wire contract seen from raw HTTP.

The client's view (exactness, caching, faults) is tests/decoding/backends/test_vllm_client.py;
here the route's own answers: /info, the error envelope and codes, sessions, the 503 of a full verifier
(on the second server, whose session limit is small).
"""

from __future__ import annotations

import time
import uuid

import httpx
import pytest

from decoding.protocol import INFO_PATH, MAX_DRAFT, SESSIONS_PATH, VERIFY_PATH, VERIFY_PROTOCOL_VERSION
from tests.support.vllm import REPLICA_MAX_SESSIONS


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


def test_a_full_verifier_answers_503_and_a_closed_session_frees_a_slot(vllm_replica):
    """The second server holds at most REPLICA_MAX_SESSIONS sessions (``--tandem-max-sessions``): one more
    gets the OpenAI error envelope with a 503 and Retry-After, naming the limit; the open sessions go on;
    closing one lets the newcomer in."""
    with httpx.Client(base_url=vllm_replica.url, timeout=120) as http:
        deadline = time.monotonic() + 10  # earlier tests' sessions are released in the background
        while http.get(INFO_PATH).json()["sessions"] and time.monotonic() < deadline:
            time.sleep(0.2)
        info = http.get(INFO_PATH).json()
        assert info["sessions"] == 0, f"sessions left open on the replica by earlier tests: {info}"
        sids = [uuid.uuid4().hex for _ in range(REPLICA_MAX_SESSIONS)]
        newcomer = uuid.uuid4().hex
        try:
            for sid in sids:
                assert verify(http, session=sid).status_code == 200
            full = verify(http, session=newcomer)
            assert_error(full, 503, "verifier_full", f"at the limit --tandem-max-sessions={REPLICA_MAX_SESSIONS}")
            assert full.json()["error"]["type"] == "service_unavailable_error"
            assert int(full.headers["Retry-After"]) >= 1
            info = http.get(INFO_PATH).json()
            assert info["sessions"] == REPLICA_MAX_SESSIONS and info["counters"]["refused_full"] >= 1
            # Refusing the newcomer evicted nobody: the open sessions' next rounds still find their context.
            for sid in sids:
                assert verify(http, session=sid, base=3, append=[6], draft=[7]).status_code == 200
            assert http.delete(f"{SESSIONS_PATH}/{sids[0]}").status_code == 204
            admitted = verify(http, session=newcomer)
            assert admitted.status_code == 200, admitted.text
            assert_error(verify(http), 503, "verifier_full", "retry later")  # full again, with the newcomer in
        finally:
            for sid in [*sids, newcomer]:
                http.delete(f"{SESSIONS_PATH}/{sid}")
