"""Server subprocesses on local ports, for the benchmarks and the tests.

``free_port()`` picks a port; ``ServerProcess`` starts a server in its own process group (so that the
processes it spawns, vLLM's engine core for one, are stopped with it), waits until it answers over HTTP,
and stops the whole group: SIGTERM, then SIGKILL for whatever is left.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO

import httpx

REPO = Path(__file__).resolve().parent.parent

try:  # resolved here, not in the forked child, where loading a library could deadlock
    _prctl = ctypes.CDLL("libc.so.6", use_errno=True).prctl
except (OSError, AttributeError):  # not Linux
    _prctl = None
_PR_SET_PDEATHSIG = 1


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on now, the OS's choice (another process could take it before the server binds)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """In the child before exec (Linux): SIGKILL when the thread that started it exits, so a killed driver
    leaves no server behind."""
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL))


class ServerProcess:
    """One server subprocess listening on ``host:port``.

    ``spawn()`` starts ``cmd`` (stdout and stderr to ``log_path``, truncated on the first start and appended to
    on restarts); ``wait_http()`` polls until it answers; ``stop()`` and ``kill()`` end its process group.
    Restartable: ``spawn()`` again after a stop or a crash runs the same command on the same port.

    ``die_with_parent``: the server gets SIGKILL when the thread that spawned it exits (Linux), so spawn it
    from a thread that lives as long as the server should. ``log_header``: each start writes a line
    ``=== start N: CMD`` to the log first (not for servers whose log is parsed line by line).
    """

    def __init__(
        self,
        cmd: Sequence[str | os.PathLike],
        *,
        port: int,
        log_path: Path | str | None = None,
        name: str | None = None,
        env: Mapping[str, str] | None = None,
        cwd: Path | str = REPO,
        host: str = "127.0.0.1",
        stdin: int | IO | None = None,
        die_with_parent: bool = False,
        log_header: bool = False,
    ):
        self.cmd = [str(c) for c in cmd]
        self.port = port
        self.host = host
        self.log_path = Path(log_path) if log_path is not None else None
        self.name = name or Path(self.cmd[0]).name
        self.env = dict(env) if env is not None else None
        self.cwd = cwd
        self.stdin = stdin
        self.die_with_parent = die_with_parent
        self.log_header = log_header
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def address(self) -> str:
        """``host:port``, as a Prometheus target is written."""
        return f"{self.host}:{self.port}"

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def spawn(self) -> ServerProcess:
        """Start the server (without waiting for it)."""
        if self.log_path is None:
            log = subprocess.DEVNULL
        else:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            log = open(self.log_path, "ab" if self.starts else "wb")
        try:
            if self.log_header and self.log_path is not None:
                log.write(f"=== start {self.starts}: {' '.join(self.cmd)}\n".encode())
                log.flush()
            self.proc = subprocess.Popen(
                self.cmd, cwd=self.cwd, env=self.env, stdin=self.stdin, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True, preexec_fn=_die_with_parent if self.die_with_parent else None,
            )  # fmt: skip
        finally:
            if self.log_path is not None:
                log.close()
        self.starts += 1
        return self

    def wait_http(self, path: str = "/health", *, timeout: float = 300.0, status: int = 200, interval: float = 0.2) -> None:
        """Poll ``GET url+path`` until it answers ``status``. RuntimeError, with the log's tail, when the server
        exits first or does not answer within ``timeout`` s (it is then killed: a server that did not come up
        is not left running)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}; log tail:\n{self.log_tail()}")
            try:
                if httpx.get(self.url + path, timeout=5.0).status_code == status:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(interval)
        self.kill()
        raise RuntimeError(f"{self.name}: GET {path} did not answer {status} in {timeout:.0f}s; log tail:\n{self.log_tail()}")

    def log(self) -> str:
        """Everything the server wrote ("" without a log file)."""
        try:
            return self.log_path.read_text(errors="replace") if self.log_path is not None else ""
        except OSError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log().splitlines()[-lines:]) or "(no log)"

    def _signal_group(self, sig: int) -> None:
        # Only while the leader is unreaped: its id is then surely still our group's.
        if self.proc is None or self.proc.returncode is not None:
            return
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM to the group, then SIGKILL to what is left of it after ``timeout`` s, or once the server has
        exited (children it left behind). Returns the server's exit status (None if it never started)."""
        if self.proc is None:
            return None
        if self.proc.returncode is not None:  # reaped before: the group id may no longer be ours
            return self.proc.returncode
        self._signal_group(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
        try:  # the leader was ours a moment ago; its engine processes may linger
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        return self.proc.wait(timeout=30)

    def kill(self) -> None:
        """SIGKILL the whole group, as a crash would."""
        self._signal_group(signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait(timeout=30)
