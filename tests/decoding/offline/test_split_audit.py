"""``tandem split audit`` on the tiny verifier (small token counts: a smoke test that can fail)."""

from __future__ import annotations

import json
import subprocess
import sys

import torch

from decoding.offline.split_audit import perturb
from service.cli import main


def test_noise_is_relative_to_the_norm():
    h = torch.randn(2000, 64) * torch.linspace(0.1, 10, 2000)[:, None]
    noisy = perturb(h, 0.5, torch.Generator().manual_seed(0))
    ratio = (noisy - h).norm(dim=-1) / h.norm(dim=-1)
    assert abs(ratio.mean().item() - 0.5) < 0.02
    assert perturb(h, 0.0, torch.Generator()) is h


def test_audit_cli_reports_recovery_and_utility(tiny_verifier_dir, tmp_path):
    out = tmp_path / "audit"
    rc = main(["split", "audit", "--model", str(tiny_verifier_dir), "--split-points", "1,2", "--noise", "0,3",
               "--train-tokens", "6000", "--eval-tokens", "1024", "--search-positions", "32", "--out", str(out)])
    assert rc == 0
    report = json.loads((out / "audit.json").read_text())
    rows = {(r["a"], r["noise"]): r for r in report["rows"]}
    assert set(rows) == {(1, 0.0), (1, 3.0), (2, 0.0), (2, 3.0)}
    for a in (1, 2):
        clean, noisy = rows[(a, 0.0)], rows[(a, 3.0)]
        # Without noise the split is exact and the uplink is invertible: the attacker recovers most tokens.
        assert clean["agreement"] > 0.999
        assert abs(clean["perplexity"] - report["meta"]["unsplit_perplexity"]) < 1e-2 * clean["perplexity"]
        assert clean["recovery"] > 0.8
        assert clean["by_attacker"]["search"] == 1.0  # the weights-aware search inverts a noiseless uplink exactly
        # Heavy noise costs utility and hides tokens.
        assert noisy["agreement"] < clean["agreement"]
        assert noisy["recovery"] < clean["recovery"]
    assert (out / "audit.png").stat().st_size > 10_000
    assert "| a | noise |" in (out / "audit.md").read_text()
    assert report["recommendation"]["agreement"] >= 0.95


def test_the_serving_path_never_imports_the_audit():
    """The audit (attackers, matplotlib) is an offline tool: neither the gateway, nor the split edge,
    nor the split worker loads it."""
    code = (
        "import sys, service.app, service.backends, service.split_worker.app, decoding.backends.split_edge; "
        "print(sorted(m for m in sys.modules if m.startswith('decoding.offline.split_audit') or m == 'matplotlib'))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300)
    assert out.stdout.strip() == "[]", out.stdout
