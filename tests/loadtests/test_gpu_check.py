"""The GPU check runs end to end where there is no GPU (``--dry-run``: every step on CPU, small)."""

from __future__ import annotations

import json
import subprocess
import sys

from loadtests.procs import REPO


def test_gpu_check_dry_run_passes_every_step(tmp_path):
    out = tmp_path / "gpu_dry.json"
    r = subprocess.run(
        [sys.executable, "-m", "loadtests.gpu_check", "--dry-run", "--json", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["dry_run"] and report["failed"] == []
    assert set(report["steps"]) == {"environment", "install", "kernel_tests", "kernel_bench", "gateway", "bench_core",
                                    "bench_batching"}
    gateway = report["steps"]["gateway"]
    assert gateway["greedy_identical_to_cpu"] == gateway["greedy_prompts"] > 0
    assert gateway["tokens_per_s_8_streams"] > 0 and report["steps"]["bench_core"]["results"]["machine"]
    batching = report["steps"]["bench_batching"]["results"]["summary"]
    assert [s["streams"] for s in batching] == [1, 2, 1, 2] and all(s["greedy_identical"] for s in batching)
