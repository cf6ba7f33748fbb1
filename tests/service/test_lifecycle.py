"""Disconnects, graceful shutdown, start-up configuration errors, liveness under load, private logs."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

from tests.service.conftest import LIMITED_KEY, REPO

PROMPT = "class Stack:\n"


def wait_for(predicate, timeout: float = 30.0, interval: float = 0.05) -> float:
    """Poll until ``predicate()``; return the seconds it took."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if predicate():
            return time.monotonic() - t0
        time.sleep(interval)
    raise AssertionError("condition not reached in time")


def long_body(model: str = "tandem", **extra) -> dict:
    return {"model": model, "prompt": PROMPT, "max_tokens": 2000, "ignore_eos": True, **extra}


# Long on any machine: 4 choices x 2000 verifier passes, all on the verifier's one worker thread.
SLOW = {"n": 4, "tandem": {"mode": "verifier-only"}}


# -- client disconnects ------------------------------------------------------------------------------------


def test_disconnect_mid_stream_stops_the_generation_and_frees_the_slot(server):
    aborted = server.metric("tandem_requests_finished_total", finished_reason="abort")
    tokens = server.metric("tandem_generation_tokens_total")
    with httpx.stream("POST", server.base_url + "/v1/completions", json=long_body(stream=True), timeout=60) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        received = [line for _, line in zip(range(6), lines) if line.startswith("data: ")]
        assert len(received) >= 3
        assert server.metric("tandem_requests_running") == 1
    t_closed = time.monotonic()
    wait_for(lambda: server.metric("tandem_requests_finished_total", finished_reason="abort") == aborted + 1)
    wait_for(lambda: server.metric("tandem_requests_running") == 0)
    assert time.monotonic() - t_closed < 5
    # the generation really stopped: no more tokens, far fewer than requested
    generated = server.metric("tandem_generation_tokens_total")
    time.sleep(0.5)
    assert server.metric("tandem_generation_tokens_total") == generated
    assert generated - tokens < 2000


def test_disconnect_of_a_non_streamed_request_aborts_it(server):
    aborted = server.metric("tandem_requests_finished_total", finished_reason="abort")
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.base_url + "/v1/completions", json=long_body(tandem={"mode": "verifier-only"}), timeout=1.0)
    wait_for(lambda: server.metric("tandem_requests_finished_total", finished_reason="abort") == aborted + 1)
    wait_for(lambda: server.metric("tandem_requests_running") == 0)
    assert "status=499" in server.log()


def test_disconnect_while_queued_leaves_the_queue(limited_server):
    s = limited_server
    auth = {"Authorization": f"Bearer {LIMITED_KEY}"}
    done = threading.Event()

    def occupy():
        body = long_body("tiny-limited", stream=True, **SLOW)
        with httpx.stream("POST", s.base_url + "/v1/completions", json=body, headers=auth, timeout=60) as r:
            for _ in r.iter_lines():
                if done.is_set():
                    return

    t = threading.Thread(target=occupy)
    t.start()
    try:
        wait_for(lambda: s.metric("tandem_requests_running") == 1)
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(s.base_url + "/v1/completions", json=long_body("tiny-limited"), headers=auth, timeout=0.5)
        wait_for(lambda: s.metric("tandem_requests_waiting") == 0, timeout=5)
        assert s.metric("tandem_requests_running") == 1
    finally:
        done.set()
        t.join(30)
    wait_for(lambda: s.metric("tandem_requests_running") == 0)


# -- liveness under load ----------------------------------------------------------------------------------------


def test_health_answers_quickly_while_generations_run(server):
    stop = threading.Event()

    def stream():
        with httpx.stream("POST", server.base_url + "/v1/completions", json=long_body(stream=True), timeout=60) as r:
            for _ in r.iter_lines():
                if stop.is_set():
                    return

    threads = [threading.Thread(target=stream) for _ in range(6)]  # 4 slots busy, 2 queued
    for t in threads:
        t.start()
    try:
        wait_for(lambda: server.metric("tandem_requests_running") == 4)
        latencies = []
        for _ in range(20):
            t0 = time.perf_counter()
            assert httpx.get(server.base_url + "/health", timeout=10).status_code == 200
            latencies.append(time.perf_counter() - t0)
            time.sleep(0.02)
        latencies.sort()
        assert latencies[len(latencies) // 2] < 0.25, latencies
        assert latencies[-1] < 2.0, latencies
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    wait_for(lambda: server.metric("tandem_requests_running") == 0 and server.metric("tandem_requests_waiting") == 0)


# -- graceful shutdown --------------------------------------------------------------------------------------------


def test_sigterm_drains_in_flight_streams_then_exits_0(drain_server):
    s = drain_server
    results: dict = {}
    first_chunk = {name: threading.Event() for name in ("short", "long")}

    def stream(name: str, body: dict) -> None:
        with httpx.stream("POST", s.base_url + "/v1/completions", json=body, timeout=60) as r:
            text = ""
            for line in r.iter_lines():
                first_chunk[name].set()
                text += line + "\n"
            results[name] = (r.status_code, text)

    short = threading.Thread(target=stream, args=("short", {"model": "tandem", "prompt": PROMPT, "max_tokens": 40,
                                                            "ignore_eos": True, "stream": True}))  # fmt: skip
    long = threading.Thread(target=stream, args=("long", long_body(stream=True, **SLOW)))
    long.start()
    assert first_chunk["long"].wait(60)
    short.start()
    assert first_chunk["short"].wait(60)
    t_term = time.monotonic()
    s.proc.send_signal(signal.SIGTERM)

    # the listening socket closes at once: new connections are refused (or, when one raced into the
    # backlog just before the close, reset), never served
    def refused() -> bool:
        try:
            httpx.get(s.base_url + "/health", timeout=1)
            return False
        except (httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError):
            return True

    wait_for(refused, timeout=5)
    short.join(30)
    long.join(30)
    status, text = results["short"]
    assert status == 200 and text.rstrip().endswith("data: [DONE]"), text[-300:]
    # An error event, not the word: the tiny model's text can contain "error" (it learnt from Python code).
    events = [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")]
    assert events[-1]["choices"][0]["finish_reason"] == "length" and not any("error" in e for e in events)
    status, text = results["long"]
    assert status == 200 and text.rstrip().endswith("data: [DONE]"), text[-300:]
    assert '"finish_reason":"length"' not in text
    assert '"code":"shutting_down"' in text  # cut off at the end of the grace period, with an error event
    assert s.proc.wait(30) == 0
    assert 1.5 < time.monotonic() - t_term < 20
    # JSON-lines logs: one line per request with its id, status and token counts
    lines = [json.loads(line) for line in s.log().splitlines() if line.startswith("{")]
    assert lines and len(lines) == len(s.log().strip().splitlines())
    requests = [entry for entry in lines if entry["logger"] == "tandem.access"]
    gen = [entry for entry in requests if entry["route"] == "/v1/completions"]
    assert len(gen) == 2
    assert all(e["status"] == 200 and e["request_id"] and e["completion_tokens"] > 0 for e in gen)
    assert {e.get("aborted") for e in gen} == {None, "shutdown"}


# -- configuration errors at start ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "config,env,named",
    [
        ("max_concurrency: 0\n", {}, "max_concurrency"),
        ("max_queeu: 3\n", {}, "max_queeu"),
        ("", {"TANDEM_PORT": "eighty"}, "port"),
        ("", {"TANDEM_REQUEST_TIMEOUT_S": "-1"}, "request_timeout_s"),
        ("min_draft_tokens: 6\nmax_draft_tokens: 2\n", {}, "draft"),
    ],
)
def test_invalid_configuration_fails_at_start_naming_the_setting(tmp_path, monkeypatch, capsys, config, env, named):
    from service.cli import main

    path = tmp_path / "tandem.yaml"
    path.write_text(config)
    for key in list(__import__("os").environ):
        if key.startswith("TANDEM_"):
            monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert main(["serve", "--config", str(path)]) == 2  # the CLI entry point, in-process: fails before serving
    err = capsys.readouterr().err
    assert err.startswith("tandem serve: error: ") and named in err and "Traceback" not in err


# -- privacy ------------------------------------------------------------------------------------------------------


def test_prompts_and_outputs_are_not_logged_by_default(server):
    marker = "PRIVATE-MARKER-7f3a"
    r = server.client().completions.create(model="tandem", prompt=f"{marker} secret text", max_tokens=24,
                                           extra_body={"ignore_eos": True}, user="alice@example.com")  # fmt: skip
    output = r.choices[0].text
    r2 = server.client().chat.completions.create(model="tandem", messages=[{"role": "user", "content": marker}],
                                                 max_tokens=4)  # fmt: skip
    time.sleep(0.2)
    log = server.log()
    assert r.id and r2.id
    assert marker not in log and "alice@example.com" not in log
    assert len(output) >= 12 and output not in log
    assert "completion_tokens=24" in log  # the request line is there, without the data
