"""The load generator (loadtests/load/): its definitions, and short real runs against a live
``tandem serve`` whose own /metrics cross-check what the client measured."""

from __future__ import annotations

import json
import math
import random
import statistics
import subprocess
import sys

import pytest

from loadtests import load, prometheus
from loadtests.procs import REPO


def server_counters(url: str) -> dict[str, float]:
    """The server's samples, keyed ``name|route=..|status=..|reason=..`` (summed over the other labels)."""
    out: dict[str, float] = {}
    for (name, labels), value in prometheus.fetch(f"{url}/metrics", timeout=30).items():
        key = name + "".join(f"|{k}={v}" for k, v in labels if k in ("status", "reason", "route"))
        out[key] = out.get(key, 0.0) + value
    return out


def delta(after: dict, before: dict, key: str) -> float:
    return after.get(key, 0.0) - before.get(key, 0.0)


# -- definitions ------------------------------------------------------------------------------------


def test_heldout_prompts_come_from_the_demo_pairs_heldout_files():
    from decoding.offline.training import DemoRecipe, split_corpus

    recipe = DemoRecipe()
    assert load.heldout_files(0, recipe.heldout_fraction) == split_corpus(0, recipe.heldout_fraction, recipe.max_files).heldout_files


@pytest.mark.parametrize("burstiness", [1.0, 0.25, 4.0])
def test_arrival_gaps_are_gamma_with_mean_one_over_rate(burstiness):
    """vLLM's arrival process: mean gap 1/rate; coefficient of variation 1/sqrt(burstiness) (1 = Poisson)."""
    rng = random.Random(7)
    gaps = [load.arrival_gap(20.0, burstiness, rng) for _ in range(40_000)]
    mean = statistics.fmean(gaps)
    assert mean == pytest.approx(1 / 20.0, rel=0.03)
    assert statistics.pstdev(gaps) / mean == pytest.approx(1 / math.sqrt(burstiness), rel=0.05)
    assert load.arrival_gap(math.inf, burstiness, rng) == 0.0


def test_goodput_and_knee_parsing():
    assert load.parse_goodput(["ttft:500", "tpot:50", "e2el:2000"]) == {"ttft": 500.0, "tpot": 50.0, "e2el": 2000.0}
    for bad in (["ttft"], ["itl:5"], ["ttft:x"], ["ttft:0"]):
        with pytest.raises(Exception, match="goodput"):
            load.parse_goodput(bad)
    levels = [{"concurrency": c, "p99_itl_ms": v} for c, v in [(1, 10.0), (2, 12.0), (4, 19.9), (8, 20.0), (16, 45.0)]]
    assert load.find_knee(levels)["concurrency"] == 8
    assert load.find_knee(levels[:3]) is None


def test_summary_follows_vllm_bench_definitions():
    r1 = load.RequestResult(start=0.0, status="200", latency=1.0, ttft=0.2, itl=[0.3, 0.5], prompt_tokens=10, output_tokens=5)
    r2 = load.RequestResult(start=0.1, status="429", latency=0.004, error="queue full")
    cfg = load.RunConfig(goodput={"ttft": 300.0, "tpot": 250.0}, percentiles=(50.0, 99.0))
    res = load.summarize(cfg, [r1, r2], 2.0, {"scraped": False})
    assert r1.tpot == pytest.approx((1.0 - 0.2) / (5 - 1))
    assert res["mean_tpot_ms"] == pytest.approx(200.0)
    assert res["median_itl_ms"] == pytest.approx(400.0)  # per chunk: the two gaps
    assert res["mean_e2el_ms"] == pytest.approx(1000.0)
    assert res["request_throughput"] == pytest.approx(0.5) and res["output_throughput"] == pytest.approx(2.5)
    assert res["good_requests"] == 1 and res["request_goodput"] == pytest.approx(0.5)
    assert res["errors_by_status"] == {"429": 1} and res["error_latency_ms"]["429"]["p99"] == pytest.approx(4.0)
    assert "Errors by status" in load.format_table(res)


# -- live ---------------------------------------------------------------------------------------------


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    r = subprocess.run([*args], cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{args}: exit {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


def test_smoke_run_through_tandem_load(stack, tmp_path):
    """`tandem load run` against a live `tandem serve`: streams, table, JSON and PNG, and the client's
    token counts equal the server's own counters."""
    before = server_counters(stack.gateway.url)
    out, png = tmp_path / "smoke.json", tmp_path / "smoke.png"
    r = run_cli(
        sys.executable, "-m", "service.cli", "load", "run", "--base-url", stack.gateway.url, "--num-prompts", "6",
        "--request-rate", "20", "--max-concurrency", "2", "--input-len", "32", "--output-len", "12", "--ignore-eos",
        "--tokenizer", str(stack.drafter_dir), "--goodput", "ttft:60000", "--json", str(out), "--plot", str(png),
        "--fail-on-error", "--label", "smoke",
    )  # fmt: skip
    after = server_counters(stack.gateway.url)
    assert "Serving Benchmark Result" in r.stdout and "Acceptance rate" in r.stdout, r.stdout
    assert "req/s" in r.stderr  # the progress bar
    res = json.loads(out.read_text())
    assert res["completed"] == 6 and res["failed"] == 0 and res["total_output_tokens"] == 6 * 12
    assert res["good_requests"] == 6
    # Held-out windows of 32 tokens, decoded to text and counted again by the server (a BPE may merge the last one).
    assert abs(res["total_input_tokens"] - 6 * 32) <= 6
    # The server saw the probe plus the 6 requests; the counters scraped around the run exclude the probe.
    assert delta(after, before, "tandem_requests_total|route=/v1/completions|status=200") == 7
    spec = res["spec_decode"]["tandem"]
    assert res["spec_decode"]["tandem_generation_tokens"] == {"speculative": 6 * 12}
    assert spec["num_draft_tokens"] > 0 and 0 < spec["acceptance_rate"] <= 1
    assert spec["mean_acceptance_length"] == pytest.approx(1 + spec["num_accepted_tokens"] / spec["num_drafts"])
    assert len(res["requests"]) == 6
    for rec in res["requests"]:
        assert rec["status"] == "200" and rec["output_tokens"] == 12
        # ITL is per chunk: a speculative chunk carries a whole round, so there are fewer gaps than tokens.
        assert len(rec["itl"]) + 1 <= rec["output_tokens"]
        assert rec["ttft"] + sum(rec["itl"]) <= rec["latency"] + 1e-6
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_overload_is_shed_with_429_counted_by_status(stack, tmp_path):
    """More concurrent streams than slots + queue: refused requests are 429s, counted by status with their
    latency, never client timeouts; the client's 429 count equals the server's queue_full rejections."""
    before = server_counters(stack.gateway.url)
    out = tmp_path / "overload.json"
    run_cli(
        sys.executable, "-m", "loadtests", "--base-url", stack.gateway.url, "--num-prompts", "12", "--max-concurrency", "12",
        "--input-len", "32", "--output-len", "12", "--ignore-eos", "--tokenizer", str(stack.drafter_dir), "--json", str(out),
        "--disable-tqdm", "--timeout", "120", "--label", "overload",
    )  # fmt: skip
    after = server_counters(stack.gateway.url)
    res = json.loads(out.read_text())
    shed = res["errors_by_status"].get("429", 0)
    assert shed > 0 and res["completed"] + res["failed"] == 12, res["errors_by_status"]
    assert set(res["errors_by_status"]) == {"429"}, res["error_examples"]
    assert delta(after, before, "tandem_requests_rejected_total|reason=queue_full") == shed
    assert res["error_latency_ms"]["429"]["count"] == shed and res["error_latency_ms"]["429"]["p99"] > 0
    smoke = tmp_path / "baseline.json"
    run_cli(
        sys.executable, "-m", "loadtests", "run", "--base-url", stack.gateway.url, "--num-prompts", "2", "--max-concurrency", "1",
        "--input-len", "32", "--output-len", "12", "--tokenizer", str(stack.drafter_dir), "--json", str(smoke), "--disable-tqdm",
        "--dataset", "random",
    )  # fmt: skip
    png = tmp_path / "compare.png"
    r = run_cli(sys.executable, "-m", "loadtests", "compare", str(smoke), str(out), "--plot", str(png))
    assert "Output token throughput" in r.stdout and "overload" in r.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sweep_reports_levels_and_plots(stack, tmp_path):
    out, png = tmp_path / "sweep.json", tmp_path / "sweep.png"
    r = run_cli(
        sys.executable, "-m", "loadtests", "sweep", "--base-url", stack.gateway.url, "--concurrency", "1,2",
        "--prompts-per-level", "1", "--input-len", "16", "--output-len", "6", "--ignore-eos", "--tokenizer",
        str(stack.drafter_dir), "--json", str(out), "--disable-tqdm",
    )  # fmt: skip
    res = json.loads(out.read_text())
    assert [lv["concurrency"] for lv in res["levels"]] == [1, 2]
    assert [lv["completed"] for lv in res["levels"]] == [1, 2]
    assert "knee:" in r.stdout
    run_cli(sys.executable, "-m", "loadtests", "plot", str(out), "--out", str(png))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
