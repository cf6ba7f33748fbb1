"""loadtests/procs.py, the server-process helper of the benchmarks and the tests, against real processes."""

from __future__ import annotations

import os
import signal
import sys
import time

import httpx
import pytest

from loadtests.procs import ServerProcess, free_port

# A real HTTP server that first starts a child of its own which ignores SIGTERM, as an engine process might.
SERVER = """
import http.server, subprocess, sys
child = subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"])
print("child pid", child.pid, flush=True)
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), http.server.SimpleHTTPRequestHandler).serve_forever()
"""


def child_pids(server: ServerProcess, n: int = 1) -> list[int]:
    """The pids the server's children printed, once there are ``n``."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        pids = [int(line.split()[2]) for line in server.log().splitlines() if line.startswith("child pid ")]
        if len(pids) >= n:
            return pids
        time.sleep(0.05)
    raise AssertionError(server.log())


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    with open(f"/proc/{pid}/stat") as f:  # a zombie (exited, not reaped by its parent yet) is gone too
        return f.read().rsplit(")", 1)[1].split()[0] == "Z"


def test_stop_ends_the_whole_group_and_a_restart_comes_back_on_the_same_port(tmp_path):
    port = free_port()
    script = tmp_path / "server.py"
    script.write_text(SERVER)
    server = ServerProcess([sys.executable, script, str(port)], port=port, log_path=tmp_path / "s.log", log_header=True)
    try:
        server.spawn().wait_http("/", timeout=60, interval=0.05)
        [child] = child_pids(server)
        assert server.alive and httpx.get(server.url + "/").status_code == 200
        assert server.stop(timeout=5) == -15  # SIGTERM ended the server...
        deadline = time.monotonic() + 10
        while not gone(child) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert gone(child)  # ...and the SIGKILL that follows, the child that ignored SIGTERM

        server.spawn().wait_http("/", timeout=60, interval=0.05)  # same command, same port, appended log
        assert httpx.get(f"http://127.0.0.1:{port}/").status_code == 200
        assert [line for line in server.log().splitlines() if line.startswith("=== start")] == [
            f"=== start 0: {' '.join(server.cmd)}", f"=== start 1: {' '.join(server.cmd)}"
        ]
        server.kill()
        assert not server.alive and server.proc.returncode == -9
    finally:  # nothing outlives a failed test
        server.kill()
        for pid in child_pids(server, n=0):
            if not gone(pid):
                os.kill(pid, signal.SIGKILL)


def test_a_server_that_exits_or_never_answers_fails_the_wait_with_its_log(tmp_path):
    crash = ServerProcess([sys.executable, "-c", "import sys; print('no model here'); sys.exit(3)"], port=free_port(),
                          log_path=tmp_path / "crash.log", name="crasher")  # fmt: skip
    with pytest.raises(RuntimeError, match=r"(?s)crasher exited with 3.*no model here"):
        crash.spawn().wait_http("/health", timeout=30, interval=0.05)

    silent = ServerProcess([sys.executable, "-c", "import time; print('loading'); time.sleep(600)"], port=free_port(),
                           log_path=tmp_path / "silent.log", name="silent")  # fmt: skip
    with pytest.raises(RuntimeError, match=r"(?s)silent: GET /health did not answer 200 in 1s.*loading"):
        silent.spawn().wait_http("/health", timeout=1, interval=0.05)
    assert not silent.alive  # killed, not left running
