"""Real ``tandem serve`` subprocesses for the tests.

Each server runs as ``python -m service.cli serve`` on a free port, in an environment without the developer's
``TANDEM_*`` settings, is waited for over HTTP, and is stopped with SIGTERM (whose exit status the fixtures
check: a clean drain exits 0). Clients: ``http`` (httpx) and ``client()`` (the official OpenAI client).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path

import httpx
import openai

from loadtests import prometheus
from loadtests.procs import ServerProcess, free_port

START_TIMEOUT_S = 180.0  # import torch + load models, on a busy 2-core machine


def isolated_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment without ``TANDEM_*`` (a developer's settings must not leak into a server
    under test), unbuffered, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TANDEM_")}
    env.update({"PYTHONUNBUFFERED": "1", **(extra or {})})
    return env


class Gateway(ServerProcess):
    """One ``tandem serve`` subprocess; dies with the test run (SIGKILL if pytest itself is killed)."""

    def __init__(
        self,
        args: tuple[str, ...],
        *,
        log_path: Path,
        env: Mapping[str, str] | None = None,
        api_key: str | None = None,
        model: str = "tandem",
        name: str = "tandem serve",
    ):
        port = free_port()
        cmd = [sys.executable, "-m", "service.cli", "serve", "--port", str(port), *args]
        super().__init__(cmd, port=port, log_path=log_path, name=name, env=isolated_env(env), die_with_parent=True)
        self.api_key = api_key
        self.model = model
        self._http: httpx.Client | None = None

    @property
    def base_url(self) -> str:
        return self.url

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

    def metrics(self) -> prometheus.Samples:
        """Every sample of /metrics as {(name, sorted labels): value}."""
        return prometheus.fetch(f"{self.base_url}/metrics", timeout=30)

    def metric(self, name: str, **labels: str) -> float:
        """Sum of the samples of ``name`` whose labels include ``labels``."""
        return prometheus.total(self.metrics(), name, **labels)

    def stop(self, timeout: float = 60.0) -> int | None:
        if self._http is not None:
            self._http.close()
        return super().stop(timeout)


def start_server(
    log_path: Path,
    *args: str,
    env: Mapping[str, str] | None = None,
    api_key: str | None = None,
    model: str = "tandem",
    wait_ready: bool = True,
    name: str = "tandem serve",
) -> Gateway:
    """Spawn ``tandem serve ARGS`` on a free port; with ``wait_ready``, wait until /ready answers 200."""
    server = Gateway(args, log_path=log_path, env=env, api_key=api_key, model=model, name=name).spawn()
    if wait_ready:
        wait_until_up(server, "/ready")
    return server


def wait_until_up(server: ServerProcess, path: str, timeout: float = START_TIMEOUT_S) -> None:
    """Wait until ``path`` answers 200 (RuntimeError with the log's tail if the server exits or never does)."""
    server.wait_http(path, timeout=timeout)


def model_args(verifier: Path, drafter: Path) -> tuple[str, ...]:
    return ("--verifier", str(verifier), "--drafter", str(drafter))
