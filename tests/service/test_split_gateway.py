"""The gateway routes private requests to split inference (`tandem.mode = "split"`).

A real `tandem serve` and a real `tandem split-worker`, both subprocesses.
"""

from __future__ import annotations

import httpx
import pytest

from tests.support.split import TOKEN, WorkerProcess
from tests.service.conftest import model_args, start_server, wait_until_up

PROMPT = "def main():\n    return"


@pytest.fixture(scope="module")
def split_gateway(tiny_verifier_dir, tiny_drafter_dir, tmp_path_factory):
    worker = WorkerProcess(tiny_verifier_dir, "1:2").start()
    # Noise 0: the lossless case (with noise, greedy agreement is a measured utility cost, see the audit).
    env = {"TANDEM_SPLIT_WORKER_URL": worker.url, "TANDEM_SPLIT_LAYERS": "1:2", "TANDEM_SPLIT_TOKEN": TOKEN,
           "TANDEM_SPLIT_NOISE_SCALE": "0", "TANDEM_SPLIT_RECONNECT_S": "2"}
    server = start_server(tmp_path_factory.mktemp("split_gw") / "serve.log",
                          *model_args(tiny_verifier_dir, tiny_drafter_dir), env=env)
    yield server, worker
    server.stop()
    worker.stop()


def test_split_requests_are_token_identical_and_go_through_the_worker(split_gateway):
    server, worker = split_gateway
    client = server.client()
    common = dict(model="tandem", prompt=PROMPT, max_tokens=24, temperature=0, extra_body={"ignore_eos": True})
    plain = client.completions.create(**common)
    before = server.metric("tandem_requests_total", mode="split")
    split = client.completions.create(**{**common, "extra_body": {"ignore_eos": True, "tandem": {"mode": "split"}}})
    # Lossless: the split model, drafted speculatively, gives the unsplit verifier's greedy tokens.
    assert split.choices[0].text == plain.choices[0].text
    assert split.model_extra["tandem"]["mode"] == "split"
    assert split.model_extra["tandem"]["verifier_forward_passes"] >= 1
    assert server.metric("tandem_requests_total", mode="split") == before + 1
    worker_metrics = httpx.get(worker.url + "/metrics", timeout=10).text
    steps = [line for line in worker_metrics.splitlines() if line.startswith("tandem_split_worker_steps_total")]
    assert steps and float(steps[0].split()[-1]) >= split.model_extra["tandem"]["verifier_forward_passes"]
    # The edge's own split metrics are on the gateway's /metrics (what the dashboard's split panels read).
    assert server.metric("tandem_split_rounds_total") >= split.model_extra["tandem"]["verifier_forward_passes"]
    # Every token the split rounds emitted counts (bytes per token = uplink bytes / tokens).
    assert server.metric("tandem_split_uplink_bytes_total") > 0
    assert server.metric("tandem_split_tokens_total") == split.usage.completion_tokens


def test_ready_reports_the_worker_and_a_dead_worker_fails_only_split_requests(split_gateway):
    server, worker = split_gateway
    assert server.http.get("/ready").json() == {"status": "ready", "model": "tandem", "split_worker": "ready"}
    worker.kill()
    try:
        # Plain requests do not need the worker: the gateway stays ready and says what is missing.
        ready = server.http.get("/ready")
        assert ready.status_code == 200 and ready.json()["split_worker"] == "unavailable"
        body = {"model": "tandem", "prompt": PROMPT, "max_tokens": 4}
        assert server.http.post("/v1/completions", json=body).status_code == 200
        r = server.http.post("/v1/completions", json={**body, "tandem": {"mode": "split"}})
        assert r.status_code == 503, r.text
        assert r.json()["error"]["type"] == "service_unavailable_error" and "Traceback" not in r.text
    finally:
        worker.spawn()
        worker.wait_ready()
    # The worker is back (a new process, empty caches): split requests work again.
    assert server.http.get("/ready").json()["split_worker"] == "ready"
    r = server.http.post("/v1/completions", json={"model": "tandem", "prompt": PROMPT, "max_tokens": 4,
                                                  "tandem": {"mode": "split"}})
    assert r.status_code == 200, r.text


def test_with_split_policy_always_a_dead_worker_makes_the_gateway_unready(tiny_verifier_dir, tiny_drafter_dir,
                                                                          tmp_path_factory):
    env = {"TANDEM_SPLIT_WORKER_URL": "http://127.0.0.1:9", "TANDEM_SPLIT_LAYERS": "1:2",
           "TANDEM_SPLIT_POLICY": "always", "TANDEM_SPLIT_RECONNECT_S": "0"}
    server = start_server(tmp_path_factory.mktemp("split_always") / "serve.log",
                          *model_args(tiny_verifier_dir, tiny_drafter_dir), env=env, wait_ready=False)
    try:
        wait_until_up(server, "/health")  # up, but never ready: that is the point
        ready = server.http.get("/ready")
        assert ready.status_code == 503 and "split worker" in ready.json()["error"]["message"], ready.text
        r = server.http.post("/v1/completions", json={"model": "tandem", "prompt": PROMPT, "max_tokens": 4})
        assert r.status_code == 503, r.text
    finally:
        server.stop()


def test_split_mode_without_a_worker_is_a_clear_400(tiny_verifier_dir, tiny_drafter_dir, tmp_path_factory):
    server = start_server(tmp_path_factory.mktemp("nosplit") / "serve.log",
                          *model_args(tiny_verifier_dir, tiny_drafter_dir))
    try:
        r = server.http.post("/v1/completions", json={"model": "tandem", "prompt": "x", "max_tokens": 2,
                                                      "tandem": {"mode": "split"}})
        assert r.status_code == 400
        assert r.json()["error"]["param"] == "tandem.mode" and "split_worker_url" in r.json()["error"]["message"]
    finally:
        server.stop()
