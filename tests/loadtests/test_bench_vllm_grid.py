"""bench_vllm's workload grid: every runner on every prompt, tandem's counters, greedy identity, the table and chart.

The grid's vLLM servers need minutes to start; here its measuring loop runs on tandem routers in process
(the tiny pair), with verifier-only standing in for vLLM alone as the identity reference. The real run
(`python -m loadtests.bench_vllm --workloads chat,code`) exercises the servers.
"""

from __future__ import annotations

import asyncio

from decoding.causal_lm import CausalLM, load_tokenizer
from decoding.drafters import HFDrafter
from decoding.speculative import SpecOptions, SpeculativeRouter
from decoding.verifiers import HFVerifier
from loadtests.bench_vllm import Workload, format_grid, mark_identity, measure_grid, plot_grid, router_runner


def test_grid_runs_every_system_on_every_prompt_and_checks_greedy_identity(tiny_pair, tmp_path):
    verifier_dir, drafter_dir = tiny_pair
    tok = load_tokenizer(verifier_dir)
    spec = SpeculativeRouter(HFVerifier(CausalLM(verifier_dir)), HFDrafter(CausalLM(drafter_dir), cost_ratio=0.2), tok)
    only = SpeculativeRouter(spec.verifier, None, tok, SpecOptions(mode="verifier-only"))
    prompts = [tok.encode("def add(a, b):\n    return"), tok.encode("import os\nimport sys\n")]
    runners = {("vllm", 0.0): router_runner(only), ("tandem", 0.0): router_runner(spec), ("tandem", 50.0): router_runner(spec)}
    rows = asyncio.run(measure_grid(runners, [Workload("code", prompts, stop_at_eos=False)], [0.0, 0.7],
                                    max_tokens=10, seed=3))  # fmt: skip

    assert [(r["temperature"], r["system"], r["rtt_ms"]) for r in rows] == [
        (t, s, rtt) for t in (0.0, 0.7) for s, rtt in (("vllm", 0.0), ("tandem", 0.0), ("tandem", 50.0))
    ]
    assert all(r["tokens"] == 20 and r["prompts"] == 2 and r["tokens_per_s"] > 0 for r in rows)
    tandem = [r for r in rows if r["system"] == "tandem"]
    assert all(r["accepted_per_round"] is not None and 0 <= r["acceptance_rate"] <= 1 for r in tandem)
    assert all(r["streamed_fraction"] == 0 for r in tandem)  # an in-process verifier has no stream

    # A greedy output that differs from the reference on one prompt is caught.
    rows[2]["outputs"][1] = rows[2]["outputs"][1][:-1] + [rows[2]["outputs"][1][-1] + 1]
    mark_identity(rows, tok.eos_token_id)
    greedy = {(r["system"], r["rtt_ms"]): r.get("identical_to_vllm") for r in rows if r["temperature"] == 0}
    assert greedy == {("vllm", 0.0): True, ("tandem", 0.0): True, ("tandem", 50.0): False}
    assert all("identical_to_vllm" not in r and "outputs" not in r for r in rows if r["temperature"] > 0)

    report = {"grid": rows + [{"system": "vllm_spec_ngram", "error": "RuntimeError: vLLM exited\nValueError: no"}],
              "verifier": str(verifier_dir), "machine": {"cpus": 2}}  # fmt: skip
    text = format_grid(report)
    assert "code, greedy:" in text and "code, T=0.7:" in text
    assert "| tandem | 50 |" in text and "| False |" in text
    assert "vllm_spec_ngram: could not run: ValueError: no" in text
    png = tmp_path / "grid.png"
    plot_grid(report, str(png))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
