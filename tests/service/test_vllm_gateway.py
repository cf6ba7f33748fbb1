"""The gateway in front of a real vLLM verifier: its rounds reach /metrics, and it survives the verifier dying mid-stream.

Kills the session's shared vLLM server and starts it again, so it runs after
the tests that need it undisturbed (tests/decoding runs before tests/service).
"""

from __future__ import annotations

import time
import uuid

import httpx
import openai
import pytest

from decoding.protocol import INFO_PATH, SESSIONS_PATH, VERIFY_PATH
from tests.service.conftest import start_server, sum_metric, wait_until_up
from tests.support.vllm import REPLICA_MAX_SESSIONS


@pytest.fixture(scope="module")
def gateway_on_vllm(vllm_server, vllm_pair, tmp_path_factory):
    server = start_server(
        tmp_path_factory.mktemp("gw_vllm") / "serve.log",
        "--verifier", vllm_server.url, "--drafter", str(vllm_pair[1]),
        # A generous timeout: the first round on a freshly restarted vLLM is slow on a loaded CPU.
        env={"TANDEM_VERIFIER_TIMEOUT_S": "15", "TANDEM_VERIFIER_RETRIES": "1"},
    )
    yield server
    server.stop()


def test_each_vllm_round_reaches_the_gateway_metrics(gateway_on_vllm):
    """The client's TransportEvent of every round is exported by the gateway as tandem_verifier_*{backend="vllm"}."""

    def sample() -> dict[str, float]:
        samples = gateway_on_vllm.metrics()
        return {
            "round_trips": sum_metric(samples, "tandem_verifier_round_trips_total", backend="vllm"),
            "to_stream": sum_metric(samples, "tandem_verifier_mode_switches_total", to="stream"),
            "streamed": sum_metric(samples, "tandem_verifier_streamed_tokens_total", backend="vllm"),
            "rtt_rounds": sum_metric(samples, "tandem_verifier_rtt_seconds_count", backend="vllm"),
            "tail_mass_rounds": sum_metric(samples, "tandem_verifier_tail_mass_count"),
            "up": sum_metric(samples, "tandem_verifier_wire_bytes_total", backend="vllm", direction="up"),
            "down": sum_metric(samples, "tandem_verifier_wire_bytes_total", backend="vllm", direction="down"),
        }

    before = sample()
    r = gateway_on_vllm.http.post("/v1/completions", json={
        "model": "tandem", "prompt": "def main():", "max_tokens": 12, "temperature": 0, "ignore_eos": True,
    })  # fmt: skip
    assert r.status_code == 200, r.text
    rounds = r.json()["tandem"]["verifier_forward_passes"]
    after = sample()
    grown = {key: after[key] - before[key] for key in after}
    assert rounds > 0
    # One exchange per round (no resync, no retry), and one per stream the request switched to.
    assert grown["round_trips"] == rounds + grown["to_stream"]
    assert grown["rtt_rounds"] == rounds  # each clean round measures the network
    assert grown["tail_mass_rounds"] == 0  # the engine decided every round on the full distribution: no tail
    assert grown["up"] >= 100 * rounds and grown["down"] >= 100 * rounds

    # verifier-only over the network: one streaming request, its tokens counted as streamed.
    before = sample()
    r = gateway_on_vllm.http.post("/v1/completions", json={
        "model": "tandem", "prompt": "def main():", "max_tokens": 12, "temperature": 0, "ignore_eos": True,
        "tandem": {"mode": "verifier-only"},
    })  # fmt: skip
    assert r.status_code == 200, r.text
    grown = {key: value - before[key] for key, value in sample().items()}
    assert grown["streamed"] == r.json()["usage"]["completion_tokens"] == 12
    assert grown["round_trips"] == 1 and grown["to_stream"] == 0  # verifier-only streams from the start


def test_usage_reports_the_prompt_tokens_vllms_prefix_cache_served(gateway_on_vllm):
    """usage.prompt_tokens_details.cached_tokens: a new prompt is cold, the same prompt again is served
    from vLLM's prefix cache (as much as whole cache blocks allow), never more than the prompt. A seeded
    sampled request always runs rounds (it never switches to vLLM's stream, whose usage would come
    only at its end), so its first round reports the prompt's cache hits."""
    prompt = f"# {uuid.uuid4().hex}\n" + "def handler(request):\n    return request.json()\n\n" * 12
    body = {"model": "tandem", "prompt": prompt, "max_tokens": 6, "temperature": 0.7, "seed": 1, "ignore_eos": True}
    first, second = (gateway_on_vllm.http.post("/v1/completions", json=body).json()["usage"] for _ in range(2))
    assert first["prompt_tokens"] == second["prompt_tokens"] > 100
    cold, warm = first["prompt_tokens_details"]["cached_tokens"], second["prompt_tokens_details"]["cached_tokens"]
    assert 0 <= cold < warm <= second["prompt_tokens"]


def test_a_full_verifier_is_a_503_at_the_gateway_until_a_slot_frees(vllm_replica, vllm_pair, tmp_path):
    """A verifier at its session limit answers a new session's round with 503 verifier_full; the gateway retries
    (TANDEM_VERIFIER_RETRIES), then answers its client 503 verifier_unavailable with Retry-After and the
    verifier's reason (no drafter-only fallback unless configured). Once a slot frees, the same request
    goes through without a gateway restart."""
    gateway = start_server(
        tmp_path / "serve.log", "--verifier", vllm_replica.url, "--drafter", str(vllm_pair[1]),
        env={"TANDEM_VERIFIER_TIMEOUT_S": "15", "TANDEM_VERIFIER_RETRIES": "1", "TANDEM_VERIFIER_BACKOFF_S": "0.05"},
    )  # fmt: skip
    body = {"model": "tandem", "prompt": "def main():", "max_tokens": 8, "temperature": 0, "ignore_eos": True}
    held = [uuid.uuid4().hex for _ in range(REPLICA_MAX_SESSIONS)]
    try:
        with httpx.Client(base_url=vllm_replica.url, timeout=60) as verifier:
            for sid in held:  # every slot taken by other edges' sessions
                r = verifier.post(VERIFY_PATH, json={"session": sid, "base": 0, "append": [1, 2, 3], "draft": [],
                                                     "top_k": 1, "cache_salt": None})  # fmt: skip
                assert r.status_code == 200, r.text
            refused_before = verifier.get(INFO_PATH).json()["counters"]["refused_full"]
            r = gateway.http.post("/v1/completions", json=body)
            assert r.status_code == 503 and int(r.headers["Retry-After"]) >= 1, r.text
            error = r.json()["error"]
            assert (error["type"], error["code"]) == ("service_unavailable_error", "verifier_unavailable")
            assert f"--tandem-max-sessions={REPLICA_MAX_SESSIONS}" in error["message"] and "Traceback" not in r.text
            assert verifier.get(INFO_PATH).json()["counters"]["refused_full"] == refused_before + 2  # 1 retry
            assert verifier.delete(f"{SESSIONS_PATH}/{held.pop()}").status_code == 204
            ok = gateway.http.post("/v1/completions", json=body)
            assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 8, ok.text
    finally:
        assert gateway.stop() == 0
        with httpx.Client(base_url=vllm_replica.url, timeout=60) as verifier:
            for sid in held:
                verifier.delete(f"{SESSIONS_PATH}/{sid}")


def test_vllm_killed_mid_stream_gives_a_clean_error_and_the_gateway_recovers(gateway_on_vllm, vllm_server):
    client = gateway_on_vllm.client()
    before = client.completions.create(model="tandem", prompt="def main():", max_tokens=16, temperature=0,
                                       extra_body={"ignore_eos": True})
    assert before.usage.completion_tokens > 0

    stream = client.completions.create(model="tandem", prompt="import os\n", max_tokens=400, temperature=0,
                                       stream=True, extra_body={"ignore_eos": True})
    received = 0
    with pytest.raises(openai.APIError) as err:
        for chunk in stream:
            received += len(chunk.choices[0].text) if chunk.choices else 0
            if received and vllm_server.proc.poll() is None:
                vllm_server.kill()
    assert received > 0
    assert "verifier" in str(err.value).lower() and "Traceback" not in str(err.value)

    # The gateway itself stays up: liveness answers, readiness says the verifier is gone,
    # and a new request gets a clean 503 with Retry-After.
    assert httpx.get(gateway_on_vllm.base_url + "/health", timeout=10).status_code == 200
    assert httpx.get(gateway_on_vllm.base_url + "/ready", timeout=30).status_code == 503
    r = gateway_on_vllm.http.post("/v1/completions", json={"model": "tandem", "prompt": "x", "max_tokens": 4})
    assert r.status_code == 503 and "Retry-After" in r.headers
    assert set(r.json()["error"]) >= {"message", "type", "param", "code"}

    vllm_server.start()  # same URL, empty cache, no sessions
    wait_until_up(gateway_on_vllm, "/ready")  # no gateway restart
    t0 = time.monotonic()
    after = client.completions.create(model="tandem", prompt="def main():", max_tokens=16, temperature=0,
                                      extra_body={"ignore_eos": True})
    assert after.choices[0].text == before.choices[0].text  # greedy, lossless, same as before the crash
    assert time.monotonic() - t0 < 60
