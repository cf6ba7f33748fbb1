"""Real split workers: ``tandem split-worker`` subprocesses on free local ports.

Workers are started once per session and shared (start-up is an interpreter
importing torch and transformers: seconds). Tests that kill or reconfigure a
worker start their own through ``start_worker``.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[2]
TOKEN = "split-test-secret"
DEMO_VERIFIER = REPO / "models" / "demo" / "verifier"


def _die_with_parent() -> None:
    """Linux: SIGKILL the worker when the test process dies, so no worker outlives a killed run."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class WorkerProcess:
    """One ``tandem split-worker`` subprocess; restartable on the same port."""

    def __init__(self, model: Path, layers: str, *, token: str | None = TOKEN, extra: list[str] | None = None):
        self.model, self.layers, self.token = model, layers, token
        self.extra = list(extra or [])
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.log = Path(os.environ.get("TMPDIR", "/tmp")) / f"tandem-split-worker-{self.port}.log"

    def spawn(self) -> None:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env.pop("TANDEM_SPLIT_TOKEN", None)
        if self.token:
            env["TANDEM_SPLIT_TOKEN"] = self.token
        cmd = [sys.executable, "-m", "service.cli", "split-worker", "--model", str(self.model), "--layers", self.layers,
               "--port", str(self.port), *self.extra]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent
            )

    def wait_ready(self, timeout: float = 240.0) -> None:
        # Start-up is mostly importing torch and transformers: seconds on an idle machine, far more on a busy one.
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"split worker exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"split worker did not become ready in {timeout} s:\n{self.log.read_text()[-3000:]}")

    def start(self) -> WorkerProcess:
        self.spawn()
        self.wait_ready()
        return self

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

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
