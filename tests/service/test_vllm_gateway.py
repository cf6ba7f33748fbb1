"""The gateway in front of a real vLLM verifier: its rounds reach /metrics, and it survives the verifier dying mid-stream.

Kills the session's shared vLLM server and starts it again, so it runs after
the tests that need it undisturbed (tests/decoding runs before tests/service).
"""

from __future__ import annotations

import time

import httpx
import openai
import pytest

from tests.service.conftest import start_server, sum_metric, wait_until_up


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
