"""service/vllm/launcher.py and plugin.py: what reaches vLLM, and how vLLM finds the routes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import httpx

from loadtests.vllm_server import TANDEM_CLI, vllm_python
from service.vllm.launcher import main, python_environment
from service.vllm.plugin import MAX_SESSIONS_ENV, SESSION_TTL_ENV, TandemEndpointPlugin, limits_from_env
from service.vllm.sessions import StoreLimits

REPO = Path(__file__).resolve().parents[3]


def test_launcher_passes_vllm_arguments_through_with_defaults(capsys):
    assert main(["--model", "/m", "--port", "8001", "--tensor-parallel-size", "2", "--tandem-print-argv"]) == 0
    argv = json.loads(capsys.readouterr().out)
    assert argv[:6] == ["--model", "/m", "--port", "8001", "--tensor-parallel-size", "2"]
    assert "--enable-prefix-caching" in argv
    assert argv[argv.index("--block-size") + 1] == "32"  # this machine has no GPU: a round recomputes < 32 + k
    assert main(["--model", "/m", "--dtype", "bfloat16", "--no-enable-prefix-caching", "--block-size", "64",
                 "--tandem-print-argv"]) == 0  # fmt: skip
    argv = json.loads(capsys.readouterr().out)
    assert argv.count("--dtype") == 1 and "--enable-prefix-caching" not in argv
    assert argv.count("--block-size") == 1 and argv[argv.index("--block-size") + 1] == "64"
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "passed to vLLM unchanged" in out and "default: 4096" in out
    with pytest.raises(SystemExit) as exit_info:
        main(["--model", "/m", "--tandem-max-sessions", "0"])
    assert exit_info.value.code == 2 and "max_sessions must be >= 1" in capsys.readouterr().err


def test_module_entry_points_run_the_launcher():
    """``python -m service.vllm`` (and, as before, ``python -m service.vllm.route``) are ``tandem verifier``."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    for module in ("service.vllm", "service.vllm.route"):
        out = subprocess.run(
            [sys.executable, "-m", module, "--model", "/m", "--tandem-no-cpu-defaults", "--tandem-print-argv"],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout) == ["--model", "/m", "--enable-prefix-caching"]


def test_plugin_limits_come_from_the_environment():
    assert limits_from_env({}) == StoreLimits()
    assert limits_from_env({MAX_SESSIONS_ENV: "7", SESSION_TTL_ENV: "1.5"}) == StoreLimits(7, 1.5)
    with pytest.raises(ValueError, match=MAX_SESSIONS_ENV):
        limits_from_env({MAX_SESSIONS_ENV: "many"})


def test_declared_entry_point_is_loaded_by_vllm(tmp_path):
    """pyproject's ``vllm.endpoint_plugins`` entry point, loaded by vLLM's own plugin code into vLLM's own app.

    The entry point is installed into a throwaway dist-info (the vLLM venv's copy of
    tandem may predate it); vLLM then discovers it, gates it on ``VLLM_PLUGINS`` and
    the server's tasks, and attaches the routes in ``build_app``.
    """
    python = vllm_python()
    if not python.exists():
        pytest.fail(f"vLLM is not installed: {python} does not exist (make install-vllm, or set TANDEM_VLLM_PYTHON)",
                    pytrace=False)  # fmt: skip
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["entry-points"]["vllm.endpoint_plugins"]
    assert declared == {TandemEndpointPlugin.name: "service.vllm.plugin:TandemEndpointPlugin"}
    dist = tmp_path / "tandem_entry_points-0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: tandem-entry-points\nVersion: 0\n")
    lines = "".join(f"{name} = {value}\n" for name, value in declared.items())
    (dist / "entry_points.txt").write_text(f"[vllm.endpoint_plugins]\n{lines}")
    code = """
import json, sys
from vllm.entrypoints.launchers.app import build_app
from vllm.entrypoints.launchers.cli_args import make_arg_parser
from vllm.plugins.endpoint_plugins.interface import EndpointPlugin
from vllm.utils.argparse_utils import FlexibleArgumentParser
from service.vllm.plugin import plugin_enabled

args = make_arg_parser(FlexibleArgumentParser()).parse_args(["--model", "/unused"])
out = {}
for tasks in (("generate",), ("embed",)):
    app = build_app(args, tasks)
    plugins = getattr(app.state, "endpoint_plugins", [])
    out[tasks[0]] = {
        "routes": sorted(r.path for r in app.routes if r.path.startswith("/tandem/")),
        "protocol": all(isinstance(p, EndpointPlugin) for p in plugins),
    }
out["plugin_enabled"] = plugin_enabled()
print(json.dumps(out))
"""
    env = dict(os.environ, VLLM_PLUGINS="tandem_verify",
               PYTHONPATH=os.pathsep.join([str(REPO), str(tmp_path), os.environ.get("PYTHONPATH", "")]))  # fmt: skip
    proc = subprocess.run([str(python), "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["generate"] == {
        "routes": ["/tandem/v1/info", "/tandem/v1/sessions/{session}", "/tandem/v1/tokenizer", "/tandem/v1/verify"],
        "protocol": True,
    }  # fmt: skip
    assert out["embed"]["routes"] == []  # required_tasks: a pooling server gets no verify route
    assert out["plugin_enabled"]  # so the launcher leaves attaching the routes to vLLM


def test_venvs_on_one_base_interpreter_are_told_apart(tmp_path):
    """Both venvs' ``bin/python`` resolve to the same base binary; the launcher compares the venvs."""
    base = Path(sys.executable).resolve()
    envs = []
    for name in ("tandem-venv", "vllm-venv"):
        (tmp_path / name / "bin").mkdir(parents=True)
        (tmp_path / name / "pyvenv.cfg").write_text(f"home = {base.parent}\n")
        (tmp_path / name / "bin" / "python").symlink_to(base)
        envs.append(python_environment(tmp_path / name / "bin" / "python"))
    assert (tmp_path / "tandem-venv" / "bin" / "python").resolve() == (tmp_path / "vllm-venv" / "bin" / "python").resolve()
    assert envs[0] != envs[1]
    assert python_environment(base) == base  # outside a venv: the interpreter itself


def test_cli_without_a_vllm_venv_says_what_to_do(tmp_path):
    env = dict(os.environ, TANDEM_VLLM_PYTHON=str(tmp_path / "missing" / "python"),
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))  # fmt: skip
    out = subprocess.run([str(TANDEM_CLI), "verifier", "--model", "/m", "--port", "8001"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert out.returncode == 2
    assert "does not exist" in out.stderr and "TANDEM_VLLM_PYTHON" in out.stderr and "Traceback" not in out.stderr


def test_readme_command_serves(vllm_server):
    """The README's ``.venv/bin/tandem verifier --model DIR --port P``, run from tandem's venv (which has no
    vLLM): the session's shared server is started exactly that way (tests/support/vllm.py), and it serves."""
    assert ".venv/bin/tandem verifier --model /models/verifier --port 8001" in (REPO / "README.md").read_text()
    assert vllm_server.cmd[:6] == [
        str(TANDEM_CLI), "verifier", "--model", str(vllm_server.model), "--port", str(vllm_server.port),
    ]  # fmt: skip
    assert subprocess.run([str(REPO / ".venv" / "bin" / "python"), "-c", "import vllm"], capture_output=True).returncode != 0
    info = httpx.get(vllm_server.url + "/tandem/v1/info", timeout=30).json()
    assert info["protocol"] == 1 and info["vocab_size"] > 0
    # The launcher replaced itself (same pid) with vLLM's Python running `-m service.vllm`.
    cmdline = Path(f"/proc/{vllm_server.proc.pid}/cmdline").read_bytes().decode().split("\0")
    assert cmdline[1:3] == ["-m", "service.vllm"]
    assert python_environment(Path(cmdline[0])) == python_environment(vllm_python())
