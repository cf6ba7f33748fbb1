"""Real `tandem serve` subprocesses for the gateway tests.

Each server is started as ``python -m service.cli serve`` on a free port with
the tiny models from tests/conftest.py, waited for on ``/ready`` and stopped
with SIGTERM (whose exit status the fixtures check: a clean drain exits 0).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 180.0  # import torch + load models, on a busy 2-core machine


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ServerProcess:
    proc: subprocess.Popen
    port: int
    log_path: Path
    api_key: str | None = None
    model: str = "tandem"
    _http: httpx.Client | None = field(default=None, repr=False)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def http(self) -> httpx.Client:
        if self._http is None:
            headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
            self._http = httpx.Client(base_url=self.base_url, timeout=60, headers=headers)
        return self._http

    def client(self, **kwargs) -> openai.OpenAI:
        """The official OpenAI client, pointed at this server (no retries: tests see every status)."""
        kwargs.setdefault("api_key", self.api_key or "unused")
        kwargs.setdefault("max_retries", 0)
        kwargs.setdefault("timeout", 60)
        return openai.OpenAI(base_url=f"{self.base_url}/v1", **kwargs)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """Every sample of /metrics as {(name, sorted labels): value}."""
        text = httpx.get(f"{self.base_url}/metrics", timeout=30).text
        out = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
        return out

    def metric(self, name: str, **labels: str) -> float:
        """Sum of the samples of ``name`` whose labels include ``labels``."""
        return sum_metric(self.metrics(), name, **labels)

    def stop(self, timeout: float = 60.0) -> int:
        if self._http is not None:
            self._http.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def sum_metric(samples: dict, name: str, **labels: str) -> float:
    return sum(
        v for (n, lbl), v in samples.items() if n == name and all(dict(lbl).get(k) == want for k, want in labels.items())
    )


def start_server(
    log_path: Path,
    *args: str,
    env: dict[str, str] | None = None,
    api_key: str | None = None,
    model: str = "tandem",
    wait_ready: bool = True,
) -> ServerProcess:
    port = free_port()
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("TANDEM_")}
    full_env.update({"PYTHONUNBUFFERED": "1", **(env or {})})
    cmd = [sys.executable, "-m", "service.cli", "serve", "--port", str(port), *args]
    log_file = open(log_path, "w")
    proc = subprocess.Popen(cmd, cwd=REPO, env=full_env, stdout=log_file, stderr=subprocess.STDOUT)
    log_file.close()
    server = ServerProcess(proc, port, log_path, api_key=api_key, model=model)
    if wait_ready:
        wait_until_up(server, "/ready")
    return server


def wait_until_up(server: ServerProcess, path: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(f"tandem serve exited with {server.proc.returncode}:\n{server.log()[-4000:]}")
        try:
            if httpx.get(server.base_url + path, timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    server.stop()
    raise RuntimeError(f"tandem serve did not become ready in {START_TIMEOUT_S}s:\n{server.log()[-4000:]}")


def model_args(verifier: Path, drafter: Path) -> tuple[str, ...]:
    return ("--verifier", str(verifier), "--drafter", str(drafter))


# -- the servers ------------------------------------------------------------------------------------
# Every server the selected tests need is spawned at once, when the first one is requested, so
# their start-ups (importing torch, loading models) overlap; each fixture then waits for its own.

LIMITED_KEY = "sk-test-limited-0123456789"
LIMITED_OTHER_KEY = "sk-test-second-key"
SERVER_FIXTURES = ("server", "limited_server", "fuzz_server", "verifier_down_server", "drain_server")


def pytest_collection_modifyitems(config, items):
    config._tandem_servers = {name for item in items for name in getattr(item, "fixturenames", ()) if name in SERVER_FIXTURES}


def _spec_server(request, root: Path) -> dict:
    """The main gateway: tiny pair, speculative by default, 4 slots, queue 16, no auth."""
    return dict(args=(*model_args(*request.getfixturevalue("tiny_pair")), "--max-concurrency", "4", "--max-queue", "16"))


def _spec_limited_server(request, root: Path) -> dict:
    """Auth on (keys from TANDEM_API_KEYS), 1 slot, queue 1, a 4 s request timeout; settings from a YAML file."""
    verifier, drafter = request.getfixturevalue("tiny_pair")
    config = root / "tandem.yaml"
    config.write_text(
        f"verifier: {verifier}\n"
        f"drafter: {drafter}\n"
        "model_name: tiny-limited\n"
        "max_concurrency: 1\n"
        "max_queue: 1\n"
        "request_timeout_s: 4\n"
        "shutdown_grace_s: 2\n"
    )
    return dict(
        args=("--config", str(config)),
        env={"TANDEM_API_KEYS": f"{LIMITED_KEY},{LIMITED_OTHER_KEY}"},
        api_key=LIMITED_KEY,
        model="tiny-limited",
    )


def _spec_fuzz_server(request, root: Path) -> dict:
    """64-token context models: every generation is short, so fuzzing stays fast."""
    return dict(args=(*model_args(*request.getfixturevalue("short_context_pair")), "--max-concurrency", "2",
                      "--max-queue", "64"))  # fmt: skip


def _spec_verifier_down_server(request, root: Path) -> dict:
    """The verifier is a vLLM URL where nothing listens: a real outage (the drafter is local)."""
    return dict(
        args=("--verifier", f"http://127.0.0.1:{free_port()}", "--drafter", str(request.getfixturevalue("tiny_drafter_dir"))),
        env={"TANDEM_VERIFIER_RETRIES": "0", "TANDEM_VERIFIER_TIMEOUT_S": "2"},
        ready_path="/health",
    )


def _spec_drain_server(request, root: Path) -> dict:
    """For the SIGTERM test (which stops it): 2 s grace, 5 slots, JSON logs."""
    return dict(args=(*model_args(*request.getfixturevalue("tiny_pair")), "--shutdown-grace", "2",
                      "--max-concurrency", "5", "--log-json"))  # fmt: skip


@pytest.fixture(scope="session")
def _spawned(request, tmp_path_factory) -> Iterator[dict[str, tuple[ServerProcess, str]]]:
    wanted = getattr(request.config, "_tandem_servers", set(SERVER_FIXTURES))
    spawned: dict[str, tuple[ServerProcess, str]] = {}
    for name in SERVER_FIXTURES:
        if name not in wanted:
            continue
        root = tmp_path_factory.mktemp(name)
        spec = globals()[f"_spec_{name}"](request, root)
        ready_path = spec.pop("ready_path", "/ready")
        spawned[name] = (start_server(root / "serve.log", *spec.pop("args"), wait_ready=False, **spec), ready_path)
    yield spawned
    # SIGTERM all at once (each drains and exits on its own), then check that every one exited 0.
    for s, _ in spawned.values():
        if s.proc.poll() is None:
            s.proc.send_signal(signal.SIGTERM)
    failed = {name: s.stop() for name, (s, _) in spawned.items()}
    failed = {name: code for name, code in failed.items() if code != 0}
    assert not failed, {name: (code, spawned[name][0].log()[-2000:]) for name, code in failed.items()}


def _serve(spawned: dict, name: str) -> Iterator[ServerProcess]:
    s, ready_path = spawned[name]
    wait_until_up(s, ready_path)
    yield s  # stopped, and its exit status checked, by _spawned


@pytest.fixture(scope="session")
def server(_spawned) -> Iterator[ServerProcess]:
    yield from _serve(_spawned, "server")


@pytest.fixture(scope="session")
def limited_server(_spawned) -> Iterator[ServerProcess]:
    yield from _serve(_spawned, "limited_server")


@pytest.fixture(scope="session")
def fuzz_server(_spawned) -> Iterator[ServerProcess]:
    yield from _serve(_spawned, "fuzz_server")


@pytest.fixture(scope="session")
def verifier_down_server(_spawned) -> Iterator[ServerProcess]:
    yield from _serve(_spawned, "verifier_down_server")


@pytest.fixture
def drain_server(_spawned) -> ServerProcess:
    return next(_serve(_spawned, "drain_server"))  # the test stops it


@pytest.fixture(scope="session")
def short_context_pair(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny pair with a 64-token context."""
    from dataclasses import replace

    from decoding.causal_lm import load_tokenizer
    from decoding.offline.tiny_models import TINY_DRAFTER, TINY_VERIFIER, build_model, build_tiny_pair

    root = tmp_path_factory.mktemp("shortctx")
    verifier, _ = build_tiny_pair(root / "base", seed=3)
    tokenizer = load_tokenizer(verifier)
    v = build_model(root / "verifier", tokenizer, replace(TINY_VERIFIER, max_position_embeddings=64), seed=3)
    d = build_model(root / "drafter", tokenizer, replace(TINY_DRAFTER, max_position_embeddings=64), seed=4)
    return v, d
