"""The deploy tests' live stack: the compose topology as local processes, plus a real Prometheus.

What runs (session-scoped, started in parallel; everything is a real program):

* ``gateway``: ``tandem serve`` with the in-process verifier (the vLLM-servable tiny pair, whose
  drafter agrees with the verifier often, so acceptance counters move), 2 slots and a queue of 2, so
  an overload gets 429s;
* ``gateway_vllm``: ``tandem serve`` whose verifier is a real vLLM started through ``tandem
  verifier`` (the ``vllm_server`` fixture of tests/support/vllm.py, reused), reached through
  ``vllm_proxy``, a delay proxy (``python -m loadtests.delay_proxy``) adding a WAN-like RTT: rounds
  then lose to one stream from vLLM, so the router switches and the verifier's streaming, RTT and
  mode-switch panels get data;
* ``gateway_dead``: ``tandem serve`` whose remote verifier is unreachable, with the drafter-only
  fallback on: /ready answers 503 and counts verifier errors, completions fall back to the drafter;
* ``split_worker``: ``tandem split-worker`` with a 2 s session TTL, driven by ``split_edge`` (real
  edge code; the gateway does not route to split workers yet), which pauses past the TTL once;
* ``prometheus``: the Debian ``prometheus`` binary, with docker/prometheus/prometheus.yml (its job
  names, its rules) and only the targets and intervals replaced: scrape every second, targets on
  localhost.

Missing programs make these tests FAIL with the install command (no skips): CI installs them.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml

from loadtests.procs import REPO, ServerProcess, free_port
from tests.support.gateway import Gateway, isolated_env, start_server

DOCKER = REPO / "docker"
START_TIMEOUT_S = 300.0  # importing torch in four processes at once, on a busy 2-core machine
#: Between gateway_vllm and vLLM: far above a verify round's server time with the tiny pair (milliseconds),
#: so the router's measured policy prefers one stream (decoding/stream_policy.py).
VLLM_RTT_MS = 150

# vLLM's fixtures (vllm_pair, vllm_server) live in tests/support/vllm.py: one vLLM per test session.


def require(program: str, install: str) -> str:
    path = shutil.which(program) or (str(Path(sys.executable).parent / program) if (Path(sys.executable).parent / program).exists() else None)
    if path is None:
        pytest.fail(f"{program} is not installed; the deploy tests run the real program. Install it with: {install}", pytrace=False)
    return path


def spawn(name: str, cmd: list[str], log_dir: Path, port: int, env: dict[str, str] | None = None, stdin=None) -> ServerProcess:
    return ServerProcess(cmd, port=port, log_path=log_dir / f"{name}.log", name=name, env=isolated_env(env), stdin=stdin,
                         die_with_parent=True).spawn()  # fmt: skip


def tandem_serve(name: str, log_dir: Path, *args: str, env: dict[str, str] | None = None) -> Gateway:
    return start_server(log_dir / f"{name}.log", *args, env=env, wait_ready=False, name=name)


@dataclass
class Stack:
    gateway: Gateway
    gateway_vllm: Gateway
    gateway_dead: Gateway
    vllm_proxy: ServerProcess
    split_worker: ServerProcess
    split_edge: ServerProcess
    vllm_url: str
    verifier_dir: Path
    drafter_dir: Path
    log_dir: Path

    def tandem_targets(self) -> list[ServerProcess]:
        return [self.gateway, self.gateway_vllm, self.gateway_dead, self.split_edge]


@pytest.fixture(scope="session")
def stack(request, vllm_pair, tmp_path_factory) -> Iterator[Stack]:
    verifier, drafter = vllm_pair
    log_dir = tmp_path_factory.mktemp("deploy-logs")
    procs: list[ServerProcess] = []
    try:
        gateway = tandem_serve("gateway", log_dir, "--verifier", str(verifier), "--drafter", str(drafter),
                               "--max-concurrency", "2", "--max-queue", "2", "--request-timeout", "120")  # fmt: skip
        procs.append(gateway)
        dead = tandem_serve(
            "gateway-dead", log_dir, "--verifier", f"http://127.0.0.1:{free_port()}", "--drafter", str(drafter),
            env={"TANDEM_VERIFIER_TIMEOUT_S": "1", "TANDEM_VERIFIER_RETRIES": "0", "TANDEM_VERIFIER_FALLBACK": "drafter-only"},
        )
        procs.append(dead)
        wport = free_port()
        worker = spawn("split-worker", [sys.executable, "-m", "service.cli", "split-worker", "--model", str(verifier),
                                        "--layers", "1:3", "--port", str(wport), "--session-ttl", "2"], log_dir, wport)  # fmt: skip
        procs.append(worker)
        eport = free_port()
        edge = spawn(
            "split-edge", [sys.executable, "-m", "tests.deploy.split_edge", "--metrics-port", str(eport), "--pause", "4"],
            log_dir, eport, stdin=subprocess.PIPE,
            env={"TANDEM_SPLIT_WORKER_URL": f"http://127.0.0.1:{wport}", "TANDEM_SPLIT_MODEL": str(verifier),
                 "TANDEM_SPLIT_LAYERS": "1:3", "TANDEM_VERIFIER": str(verifier), "TANDEM_DRAFTER": str(drafter)},
        )  # fmt: skip
        procs.append(edge)
        # vLLM starts (about a minute or more) while the tandem processes import torch.
        vllm = request.getfixturevalue("vllm_server")
        pport = free_port()
        proxy = spawn("vllm-proxy", [sys.executable, "-m", "loadtests.delay_proxy", "--listen", f"127.0.0.1:{pport}",
                                     "--upstream", f"127.0.0.1:{vllm.port}", "--rtt-ms", str(VLLM_RTT_MS)], log_dir, pport)  # fmt: skip
        procs.append(proxy)
        proxy.wait_http("/health", timeout=60, interval=0.2)  # vLLM's /health, through the proxy
        gateway_vllm = tandem_serve("gateway-vllm", log_dir, "--verifier", proxy.url, "--drafter", str(drafter))
        procs.append(gateway_vllm)
        for proc, path in ((gateway, "/ready"), (dead, "/health"), (worker, "/health"), (edge, "/metrics"), (gateway_vllm, "/ready")):
            proc.wait_http(path, timeout=START_TIMEOUT_S, interval=0.3)
        yield Stack(gateway, gateway_vllm, dead, proxy, worker, edge, vllm.url, verifier, drafter, log_dir)
    finally:
        codes = {p.name: p.stop() for p in reversed(procs)}
    bad = {n: c for n, c in codes.items() if n.startswith("gateway") and c != 0}
    assert not bad, f"gateways did not drain and exit 0 on SIGTERM: {bad}; logs in {log_dir}"


def prometheus_config(stack: Stack, rules_dir: Path, port: int) -> dict:
    """docker/prometheus/prometheus.yml with local targets, 1 s intervals and absolute rule paths."""
    config = yaml.safe_load((DOCKER / "prometheus" / "prometheus.yml").read_text())
    config["global"].update({"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"})
    config["rule_files"] = [str(rules_dir / Path(f).name) for f in config["rule_files"]]
    targets = {
        "tandem": [p.address for p in stack.tandem_targets()],
        "tandem-split-worker": [stack.split_worker.address],
        "vllm": [stack.vllm_url.removeprefix("http://")],
        "prometheus": [f"127.0.0.1:{port}"],
    }
    for job in config["scrape_configs"]:
        if job["job_name"] in targets:
            job["static_configs"] = [{"targets": targets.pop(job["job_name"])}]
    assert not targets, f"docker/prometheus/prometheus.yml lacks the jobs {sorted(targets)}"
    return config


@dataclass
class Prometheus:
    proc: ServerProcess
    #: The scrape URLs of every configured target: waits count a scrape only when all of them took one.
    targets: set[str]

    @property
    def url(self) -> str:
        return self.proc.url

    def api(self, path: str, **params) -> dict:
        resp = httpx.get(f"{self.url}/api/v1/{path}", params=params, timeout=30)
        body = resp.json()
        assert resp.status_code == 200 and body["status"] == "success", f"{path} {params}: {resp.status_code} {body}"
        return body["data"]

    def query(self, expr: str) -> list[dict]:
        data = self.api("query", query=expr)
        assert data["resultType"] == "vector", (expr, data["resultType"])
        return data["result"]

    def wait_scrapes(self, n: int = 3) -> None:
        """Wait until every configured target has been scraped n more times (1 s interval).

        Prometheus answers /-/ready before its scrape manager has synced the targets, so
        activeTargets can be empty or partial at first: a wait that trusted it would return at
        once, and traffic sent next would predate the first sample (rate() then sees no increase).
        """
        def last_scrapes() -> dict[str, str]:
            return {t["scrapeUrl"]: t["lastScrape"] for t in self.api("targets")["activeTargets"]}

        seen = {u: "" for u in self.targets}
        now: dict[str, str] = {}
        for _ in range(n):
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                now = last_scrapes()
                if all(now.get(u, "") not in ("", "0001-01-01T00:00:00Z", seen[u]) for u in self.targets):
                    seen = now
                    break
                time.sleep(0.2)
            else:
                raise AssertionError(f"Prometheus did not scrape every target (want {sorted(self.targets)}): {now}")


@pytest.fixture(scope="session")
def prometheus(stack, tmp_path_factory) -> Iterator[Prometheus]:
    binary = require("prometheus", "apt-get install -y prometheus")
    root = tmp_path_factory.mktemp("prometheus")
    rules = root / "rules"
    shutil.copytree(DOCKER / "prometheus" / "rules", rules)
    port = free_port()
    config_path = root / "prometheus.yml"
    config_path.write_text(yaml.safe_dump(prometheus_config(stack, rules, port)))
    proc = spawn("prometheus", [binary, f"--config.file={config_path}", f"--storage.tsdb.path={root / 'data'}",
                                f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"], stack.log_dir, port)  # fmt: skip
    try:
        proc.wait_http("/-/ready", timeout=60, interval=0.3)
        config = yaml.safe_load(config_path.read_text())
        targets = {
            f"http://{t}{job.get('metrics_path', '/metrics')}"
            for job in config["scrape_configs"]
            for sc in job["static_configs"]
            for t in sc["targets"]
        }
        prom = Prometheus(proc, targets)
        prom.wait_scrapes(2)
        yield prom
    finally:
        proc.stop()
