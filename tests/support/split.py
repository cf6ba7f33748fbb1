"""Real split workers: ``tandem split-worker`` subprocesses on free local ports.

Workers are started once per session and shared (start-up is an interpreter
importing torch and transformers: seconds). Tests that kill or reconfigure a
worker start their own through ``start_worker``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from loadtests.procs import REPO, ServerProcess, free_port

TOKEN = "split-test-secret"
DEMO_VERIFIER = REPO / "models" / "demo" / "verifier"


class WorkerProcess(ServerProcess):
    """One ``tandem split-worker`` subprocess; restartable on the same port (``spawn()`` again)."""

    def __init__(self, model: Path, layers: str, *, token: str | None = TOKEN, extra: list[str] | None = None):
        self.model, self.layers, self.token = model, layers, token
        self.extra = list(extra or [])
        port = free_port()
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env.pop("TANDEM_SPLIT_TOKEN", None)
        if token:
            env["TANDEM_SPLIT_TOKEN"] = token
        cmd = [sys.executable, "-m", "service.cli", "split-worker", "--model", str(model), "--layers", layers,
               "--port", str(port), *self.extra]
        super().__init__(cmd, port=port, name="split worker", env=env, die_with_parent=True,
                         log_path=Path(os.environ.get("TMPDIR", "/tmp")) / f"tandem-split-worker-{port}.log")

    def wait_ready(self, timeout: float = 240.0) -> None:
        # Start-up is mostly importing torch and transformers: seconds on an idle machine, far more on a busy one.
        self.wait_http("/health", timeout=timeout, interval=0.1)

    def start(self) -> WorkerProcess:
        self.spawn()
        self.wait_ready()
        return self

    def stop(self, timeout: float = 10.0) -> int | None:
        return super().stop(timeout)

    def headers(self) -> dict:
        return {"authorization": f"Bearer {self.token}"} if self.token else {}


@pytest.fixture(scope="session")
def start_worker():
    """A factory: start_worker(model, "a:b", extra=[...]) -> a ready WorkerProcess, stopped at session end."""
    started: list[WorkerProcess] = []

    def start(model: Path, layers: str, **kwargs) -> WorkerProcess:
        w = WorkerProcess(model, layers, **kwargs)
        started.append(w)
        return w.start()

    yield start
    for w in started:
        w.stop()


SPLITS = ["1:2", "1:3", "2:3"]  # the tiny verifier has L = 3: a = 1, b = L - 1 and b = L all appear


@pytest.fixture(scope="session")
def tiny_workers(tiny_verifier_dir) -> dict[str, WorkerProcess]:
    """One shared worker per split point of the tiny verifier, started in parallel."""
    workers = {s: WorkerProcess(tiny_verifier_dir, s, extra=["--max-body-bytes", str(1 << 20)]) for s in SPLITS}
    try:
        for w in workers.values():
            w.spawn()
        for w in workers.values():
            w.wait_ready()
        yield workers
    finally:
        for w in workers.values():
            w.stop()


@pytest.fixture(scope="session")
def demo_worker(start_worker):
    from decoding.partition import load_config

    L = load_config(DEMO_VERIFIER).num_hidden_layers
    return start_worker(DEMO_VERIFIER, f"1:{L - 1}")
