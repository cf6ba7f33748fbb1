"""Every error status, triggered for real, with OpenAI's error body."""

from __future__ import annotations

import json
import threading
import time

import httpx
import openai
import pytest

from tests.service.conftest import LIMITED_KEY, LIMITED_OTHER_KEY

PROMPT = "import sys\n"


def assert_error(response: httpx.Response, status: int, param: str | None = None, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"}
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    assert "Traceback" not in err["message"]
    if param is not None:
        assert err["param"] == param, err
    if code is not None:
        assert err["code"] == code, err
    return err


# -- 400 -------------------------------------------------------------------------------------------

BAD_PARAMS = [
    ({"temperature": -0.5}, "temperature"),
    ({"temperature": 2.5}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_k": -2}, "top_k"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": "many"}, "max_tokens"),
    ({"n": 0}, "n"),
    ({"n": 1000}, "n"),
    ({"n": 50, "prompt": ["a", "b", "c"]}, "n"),  # 150 choices > 128
    ({"seed": 2**70}, "seed"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"stop": [""]}, "stop"),
    ({"stop": 5}, "stop"),
    ({"logprobs": 21}, "logprobs"),
    ({"min_tokens": 99}, "min_tokens"),
    ({"suffix": "x"}, "suffix"),
    ({"best_of": 3}, "best_of"),
    ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"frequency_penalty": -3}, "frequency_penalty"),
    ({"logit_bias": {"5": 101}}, "logit_bias"),
    ({"prompt": 5}, "prompt"),
    ({"prompt": [1, "a"]}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": [1, 2, 10**6]}, "prompt"),
    ({"prompt": "\ud800 lone surrogate"}, "prompt"),
    ({"stream": "sometimes"}, "stream"),
    ({"stream_options": {"include_usage": "maybe"}}, "stream_options.include_usage"),
    ({"tandem": {"mode": "telepathy"}}, "tandem.mode"),
    ({"tandem": {"num_draft_tokens": 0}}, "tandem.num_draft_tokens"),
    ({"tandem": {"max_draft_tokens": 99}}, "tandem.max_draft_tokens"),
    ({"tandem": {"min_draft_tokens": 6, "max_draft_tokens": 2}}, "tandem.min_draft_tokens"),
    ({"tandem": {"num_draft_tokens": 9, "max_draft_tokens": 4}}, "tandem.num_draft_tokens"),
    ({"tandem": {"speed": "max"}}, "tandem.speed"),
    ({"model": None}, "model"),
]


@pytest.mark.parametrize("override,param", BAD_PARAMS, ids=[p for _, p in BAD_PARAMS])
def test_invalid_completion_parameters_are_400_naming_the_parameter(server, override, param):
    body = {"model": "tandem", "prompt": PROMPT, "max_tokens": 4, **override}
    # json.dumps escapes to ASCII, so even a lone surrogate travels (as the JSON escape \ud800)
    r = server.http.post("/v1/completions", content=json.dumps(body), headers={"content-type": "application/json"})
    err = assert_error(r, 400, param=param)
    assert err["type"] == "invalid_request_error"
    assert param.split(".")[-1] in err["message"] or param == "prompt"


BAD_CHAT = [
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages[0].content[0]"),  # fmt: skip
    ({"top_logprobs": 3}, "top_logprobs"),  # without logprobs: true
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "required"}, "tools"),  # no template support
    ({"max_completion_tokens": 0}, "max_completion_tokens"),
]


@pytest.mark.parametrize("override,param", BAD_CHAT, ids=[p for _, p in BAD_CHAT])
def test_invalid_chat_parameters_are_400(server, override, param):
    body = {"model": "tandem", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **override}
    assert_error(server.http.post("/v1/chat/completions", json=body), 400, param=param)


def test_openai_client_raises_bad_request_with_the_body(server):
    with pytest.raises(openai.BadRequestError) as info:
        server.client().completions.create(model="tandem", prompt=PROMPT, temperature=-1)
    assert info.value.status_code == 400
    assert info.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as info:
        server.client().completions.create(model="tandem", prompt=PROMPT, logprobs=30)
    assert info.value.body["param"] == "logprobs"


@pytest.mark.parametrize(
    "content,headers",
    [
        (b'{"model": "tandem", "prompt": ', {"content-type": "application/json"}),
        (b"", {"content-type": "application/json"}),
        (b"[1, 2]", {"content-type": "application/json"}),
        (b'"just a string"', {}),
        (b"\xff\xfe garbage", {"content-type": "text/plain"}),
        (b'{"model": "tandem", "prompt": "x", "temperature": NaN}', {"content-type": "application/json"}),
    ],
)
def test_malformed_bodies_are_400_not_422(server, content, headers):
    for path in ("/v1/completions", "/v1/chat/completions"):
        assert_error(server.http.post(path, content=content, headers=headers), 400)


def test_oversized_body_is_413(server):
    body = b'{"model": "tandem", "prompt": "' + b"a" * (33 * 2**20) + b'"}'
    assert_error(server.http.post("/v1/completions", content=body, headers={"content-type": "application/json"}), 413,
                 code="request_too_large")  # fmt: skip

    def chunks():  # no Content-Length: counted as it arrives
        yield b'{"model": "tandem", "prompt": "'
        for _ in range(34):
            yield b"a" * 2**20
        yield b'"}'

    assert_error(server.http.post("/v1/completions", content=chunks(), headers={"content-type": "application/json"}),
                 413, code="request_too_large")  # fmt: skip


def test_curl_style_form_content_type_is_read_as_json(server):
    r = server.http.post(
        "/v1/completions",
        content=b'{"model": "tandem", "prompt": "x", "max_tokens": 2}',
        headers={"content-type": "application/x-www-form-urlencoded"},
    )
    assert r.status_code == 200, r.text


# -- context length ------------------------------------------------------------------------------------


def test_prompt_longer_than_the_context_is_400_context_length_exceeded(server):
    err = assert_error(
        server.http.post("/v1/completions", json={"model": "tandem", "prompt": [5] * 2100, "max_tokens": 1}),
        400, param="prompt", code="context_length_exceeded",
    )  # fmt: skip
    assert "2048" in err["message"]
    long_text = "hello world " * 3000
    assert_error(
        server.http.post("/v1/chat/completions", json={"model": "tandem", "messages": [{"role": "user", "content": long_text}]}),
        400, code="context_length_exceeded",
    )  # fmt: skip
    with pytest.raises(openai.BadRequestError) as info:
        server.client().completions.create(model="tandem", prompt=PROMPT, max_tokens=5000)
    assert info.value.body["code"] == "context_length_exceeded" and info.value.body["param"] == "max_tokens"


def test_default_max_tokens_never_exceeds_the_context(server):
    # chat's default runs to the context end: a 2000-token prompt leaves 48 tokens, not an error
    r = server.http.post("/v1/chat/completions", json={
        "model": "tandem", "messages": [{"role": "user", "content": "ab " * 900}], "ignore_eos": True,
    })  # fmt: skip
    assert r.status_code == 200, r.text
    usage = r.json()["usage"]
    assert usage["prompt_tokens"] + usage["completion_tokens"] == 2048
    assert r.json()["choices"][0]["finish_reason"] == "length"


# -- 404 -----------------------------------------------------------------------------------------------


def test_unknown_model_is_404(server):
    with pytest.raises(openai.NotFoundError) as info:
        server.client().chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert info.value.body["code"] == "model_not_found" and info.value.body["param"] == "model"
    assert_error(server.http.post("/v1/completions", json={"model": "nope", "prompt": "x", "stream": True}), 404,
                 code="model_not_found")  # fmt: skip
    assert_error(server.http.get("/v1/models/nope"), 404, code="model_not_found")


def test_unknown_route_and_method_use_the_openai_error_body(server):
    assert_error(server.http.get("/v1/embeddings"), 404)
    assert_error(server.http.post("/v1/models", json={}), 405)


# -- 401 -----------------------------------------------------------------------------------------------


def test_auth_required_on_v1_only(limited_server):
    url = limited_server.base_url
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": LIMITED_KEY}, {"Authorization": "Basic x"}):
        for method, path in (("GET", "/v1/models"), ("POST", "/v1/completions"), ("POST", "/v1/chat/completions")):
            err = assert_error(httpx.request(method, url + path, headers=headers, json={}), 401, code="invalid_api_key")
            assert LIMITED_KEY not in err["message"]
    with pytest.raises(openai.AuthenticationError):
        limited_server.client(api_key="sk-wrong").models.list()
    # both configured keys work; /health, /ready and /metrics stay open
    for key in (LIMITED_KEY, LIMITED_OTHER_KEY):
        assert [m.id for m in limited_server.client(api_key=key).models.list().data] == ["tiny-limited"]
    for path in ("/health", "/ready", "/metrics"):
        assert httpx.get(url + path).status_code == 200
    r = limited_server.client().completions.create(model="tiny-limited", prompt=PROMPT, max_tokens=3)
    assert r.usage.completion_tokens <= 3


def test_keys_never_reach_logs(limited_server):
    httpx.get(limited_server.base_url + "/v1/models", headers={"Authorization": "Bearer sk-guess-123"})
    log = limited_server.log()
    assert LIMITED_KEY not in log and "sk-guess-123" not in log


# -- 429 and 504 (1 slot, queue 1, 4 s timeout) ---------------------------------------------------------


# Far longer than the 4 s timeout on any machine: with 1 slot, the 4 choices run one after the
# other, 2000 verifier passes each.
SLOW = {"max_tokens": 2000, "n": 4, "ignore_eos": True, "tandem": {"mode": "verifier-only"}}


def _long_stream(server, results: dict, name: str) -> None:
    body = {"model": "tiny-limited", "prompt": PROMPT, "stream": True, **SLOW}
    try:
        with httpx.stream("POST", server.base_url + "/v1/completions", json=body, timeout=60,
                          headers={"Authorization": f"Bearer {LIMITED_KEY}"}) as r:  # fmt: skip
            results[name] = (r.status_code, r.read().decode())
    except httpx.HTTPError as exc:  # pragma: no cover - reported by the assertion below
        results[name] = (None, repr(exc))


def _wait_for(predicate, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError("condition not reached in time")


def test_queue_overflow_is_429_with_retry_after_and_timeouts_are_504(limited_server):
    s = limited_server
    results: dict = {}
    rejected_before = s.metric("tandem_requests_rejected_total", reason="queue_full")
    running = threading.Thread(target=_long_stream, args=(s, results, "running"))
    running.start()
    _wait_for(lambda: s.metric("tandem_requests_running") == 1)
    queued = threading.Thread(target=_long_stream, args=(s, results, "queued"))
    queued.start()
    _wait_for(lambda: s.metric("tandem_requests_waiting") == 1)

    r = s.http.post("/v1/completions", json={"model": "tiny-limited", "prompt": PROMPT, "max_tokens": 2})
    err = assert_error(r, 429, code="queue_full")
    assert err["type"] == "rate_limit_error"
    assert int(r.headers["retry-after"]) >= 1
    with pytest.raises(openai.RateLimitError):
        s.client().chat.completions.create(model="tiny-limited", messages=[{"role": "user", "content": "x"}])
    assert s.metric("tandem_requests_rejected_total", reason="queue_full") == rejected_before + 2

    # The 4 s request timeout (queueing included) cuts both streams off with an error event:
    # the running one first, then the queued one, admitted in its place.
    running.join(30)
    queued.join(30)
    for name in ("running", "queued"):
        status, text = results[name]
        assert status == 200, (name, text[-500:])
        assert '"code":"request_timeout"' in text and text.endswith("data: [DONE]\n\n"), text[-500:]
    _wait_for(lambda: s.metric("tandem_requests_running") == 0 and s.metric("tandem_requests_waiting") == 0)

    # a non-streamed request past the timeout: 504 with the OpenAI body
    t0 = time.monotonic()
    r = s.http.post("/v1/completions", json={"model": "tiny-limited", "prompt": PROMPT, **SLOW})
    assert_error(r, 504, code="request_timeout")
    assert time.monotonic() - t0 < 10
    # and the slot is free again
    assert s.client().completions.create(model="tiny-limited", prompt=PROMPT, max_tokens=2).usage.completion_tokens <= 2


# -- 503 ---------------------------------------------------------------------------------------------------


def test_verifier_unavailable_is_503(verifier_down_server):
    s = verifier_down_server
    r = s.http.get("/ready")
    assert_error(r, 503, code="verifier_unavailable")
    assert s.http.get("/health").status_code == 200
    for stream in (False, True):
        r = s.http.post("/v1/completions", json={"model": "tandem", "prompt": PROMPT, "max_tokens": 4, "stream": stream})
        err = assert_error(r, 503, code="verifier_unavailable")
        assert err["type"] == "service_unavailable_error"
        assert "retry-after" in r.headers
    with pytest.raises(openai.InternalServerError) as info:
        s.client().chat.completions.create(model="tandem", messages=[{"role": "user", "content": "hi"}])
    assert info.value.status_code == 503
    # drafter-only needs no verifier and still works during the outage
    r = s.http.post("/v1/completions", json={"model": "tandem", "prompt": PROMPT, "max_tokens": 4,
                                             "tandem": {"mode": "drafter-only"}})  # fmt: skip
    assert r.status_code == 200, r.text
    assert s.metric("tandem_verifier_errors_total", kind="unavailable") >= 3
