"""The batching benchmark runs, batches, stays token-identical and writes its JSON and chart."""

from __future__ import annotations

import json

from loadtests import bench_batching


def test_bench_batching_measures_batched_against_one_pass_each(tiny_pair, tmp_path, capsys):
    verifier, drafter = tiny_pair
    out, png = tmp_path / "batching.json", tmp_path / "batching.png"
    rc = bench_batching.main(["--verifier", str(verifier), "--drafter", str(drafter), "--streams", "1,4",
                              "--max-tokens", "12", "--prompt-tokens", "16", "--json", str(out), "--plot", str(png)])  # fmt: skip
    assert rc == 0
    report = json.loads(out.read_text())
    summary = {(s["mode"], s["streams"]): s for s in report["summary"]}
    assert set(summary) == {(m, n) for m in ("verifier-only", "speculative") for n in (1, 4)}
    assert all(s["greedy_identical"] for s in summary.values())
    # Four verifier-only streams start together and stay in step: every pass holds all four.
    assert summary[("verifier-only", 4)]["mean_verifier_batch"] == 4.0
    assert summary[("verifier-only", 1)]["mean_verifier_batch"] == 1.0
    assert summary[("speculative", 4)]["mean_drafter_batch"] > 1.0  # the drafter's steps batch too
    assert all(r["tokens"] == 12 * r["streams"] for r in report["runs"])
    assert "| verifier-only | 4 |" in capsys.readouterr().out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
