"""What a run reports, with ``vllm bench serve``'s definitions: TTFT, TPOT, ITL, E2EL, goodput, percentiles;
the tables printed for a run, a sweep and a comparison; the JSON written."""

from __future__ import annotations

import json
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from loadtests.load.client import RequestResult
from loadtests.load.config import RunConfig
from loadtests.load.scrape import SPEC_PREFIXES

METRICS = ("ttft", "tpot", "itl", "e2el")
METRIC_NAMES = {
    "ttft": "Time to First Token",
    "tpot": "Time per Output Token (excl. 1st token)",
    "itl": "Inter-token Latency (per chunk)",
    "e2el": "End-to-end Latency",
}


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (``q`` in [0, 100]) of ``values``, linearly interpolated between the two nearest
    ranks (numpy's default, the figures ``vllm bench serve`` reports); None when there are no values.
    The one percentile of the load generator, the benchmarks and their reports."""
    import numpy as np

    return float(np.percentile(values, q)) if len(values) else None


def summarize(cfg: RunConfig, results: list[RequestResult], duration: float, spec: dict[str, Any]) -> dict[str, Any]:
    import numpy as np

    ok = [r for r in results if r.success]
    values_ms = {
        "ttft": [r.ttft * 1000 for r in ok if r.ttft is not None],
        "tpot": [r.tpot * 1000 for r in ok if r.tpot is not None],
        "itl": [g * 1000 for r in ok for g in r.itl],
        "e2el": [r.latency * 1000 for r in ok],
    }
    out: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "label": cfg.label,
        "config": cfg.to_json(),
        "duration": duration,
        "num_requests": len(results),
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "errors_by_status": dict(sorted(Counter(r.status for r in results if not r.success).items())),
        "total_input_tokens": sum(r.prompt_tokens for r in ok),
        "total_output_tokens": sum(r.output_tokens for r in ok),
    }
    out["request_throughput"] = len(ok) / duration if duration else 0.0
    out["output_throughput"] = out["total_output_tokens"] / duration if duration else 0.0
    out["total_token_throughput"] = (out["total_input_tokens"] + out["total_output_tokens"]) / duration if duration else 0.0
    for m in METRICS:
        v = values_ms[m]
        out[f"mean_{m}_ms"] = float(np.mean(v)) if v else None
        out[f"median_{m}_ms"] = float(np.median(v)) if v else None
        out[f"std_{m}_ms"] = float(np.std(v)) if v else None
        for q in cfg.percentiles:
            out[f"p{q:g}_{m}_ms"] = percentile(v, q)
    if cfg.goodput:
        good = 0
        for r in ok:
            t = {"ttft": (r.ttft or 0) * 1000, "tpot": (r.tpot or 0) * 1000, "e2el": r.latency * 1000}
            good += all(t[k] <= slo for k, slo in cfg.goodput.items())
        out["goodput_slo_ms"] = cfg.goodput
        out["good_requests"] = good
        out["request_goodput"] = good / duration if duration else 0.0
    by_status: dict[str, list[float]] = defaultdict(list)
    for r in results:
        if not r.success:
            by_status[r.status].append(r.latency * 1000)
    out["error_latency_ms"] = {
        s: {"count": len(v), "mean": float(np.mean(v)), "p50": percentile(v, 50), "p90": percentile(v, 90), "p99": percentile(v, 99), "max": max(v)}
        for s, v in sorted(by_status.items())
    }
    out["error_examples"] = {s: next(r.error for r in results if r.status == s) for s in by_status}
    out["spec_decode"] = spec
    out["requests"] = [
        {
            "start": round(r.start, 6),
            "status": r.status,
            "latency": round(r.latency, 6),
            "ttft": None if r.ttft is None else round(r.ttft, 6),
            "itl": [round(g, 6) for g in r.itl],
            "prompt_tokens": r.prompt_tokens,
            "output_tokens": r.output_tokens,
        }
        for r in sorted(results, key=lambda r: r.start)
    ]
    return out


def _fmt(v: Any, nd: int = 2) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def format_table(res: dict[str, Any]) -> str:
    """The run as ``vllm bench serve`` prints it, plus errors and acceptance."""
    w = 50
    lines = ["{s:{c}^{n}}".format(s=" Serving Benchmark Result ", n=w, c="=")]
    row = lambda k, v: lines.append(f"{k:<40}{v:<10}")  # noqa: E731
    cfg = res["config"]
    if res.get("label"):
        row("Label:", res["label"])
    row("Request rate (req/s):", cfg["request_rate"])
    row("Max concurrency:", _fmt(cfg["max_concurrency"]))
    row("Successful requests:", res["completed"])
    row("Failed requests:", res["failed"])
    row("Benchmark duration (s):", _fmt(res["duration"]))
    row("Total input tokens:", res["total_input_tokens"])
    row("Total generated tokens:", res["total_output_tokens"])
    row("Request throughput (req/s):", _fmt(res["request_throughput"]))
    if "request_goodput" in res:
        slo = " ".join(f"{k}:{v:g}" for k, v in res["goodput_slo_ms"].items())
        row(f"Request goodput (req/s) [{slo} ms]:", _fmt(res["request_goodput"]))
    row("Output token throughput (tok/s):", _fmt(res["output_throughput"]))
    row("Total token throughput (tok/s):", _fmt(res["total_token_throughput"]))
    for m in METRICS:
        lines.append("{s:{c}^{n}}".format(s=METRIC_NAMES[m], n=w, c="-"))
        row(f"Mean {m.upper()} (ms):", _fmt(res[f"mean_{m}_ms"]))
        row(f"Median {m.upper()} (ms):", _fmt(res[f"median_{m}_ms"]))
        for q in cfg["percentiles"]:
            if q != 50:  # = the median
                row(f"P{q:g} {m.upper()} (ms):", _fmt(res.get(f"p{q:g}_{m}_ms")))
    if res["errors_by_status"]:
        lines.append("{s:{c}^{n}}".format(s="Errors by status", n=w, c="-"))
        for status, n in res["errors_by_status"].items():
            lat = res["error_latency_ms"][status]
            row(f"{status}:", f"{n}  (latency p50 {_fmt(lat['p50'])} ms, p99 {_fmt(lat['p99'])} ms)")
    spec = res.get("spec_decode", {})
    for source in SPEC_PREFIXES:
        s = spec.get(source)
        if not s:
            continue
        lines.append("{s:{c}^{n}}".format(s=f"Speculative decoding ({source} /metrics)", n=w, c="-"))
        row("Drafts:", _fmt(s["num_drafts"], 0))
        row("Draft tokens:", _fmt(s["num_draft_tokens"], 0))
        row("Accepted tokens:", _fmt(s["num_accepted_tokens"], 0))
        row("Acceptance rate:", _fmt(s["acceptance_rate"], 3))
        row("Mean acceptance length:", _fmt(s["mean_acceptance_length"], 3))
        row("Acceptance by position:", " ".join(_fmt(x, 3) for x in s["acceptance_per_position"]) or "-")
    lines.append("=" * w)
    return "\n".join(lines)


def find_knee(levels: list[dict[str, Any]], factor: float = 2.0) -> dict[str, Any] | None:
    """The first level whose p99 ITL is at least ``factor`` x the lowest level's."""
    base = next((lv for lv in levels if lv.get("p99_itl_ms") is not None), None)
    if base is None:
        return None
    for lv in levels:
        if lv.get("p99_itl_ms") is not None and lv["p99_itl_ms"] >= factor * base["p99_itl_ms"]:
            return {"concurrency": lv["concurrency"], "p99_itl_ms": lv["p99_itl_ms"], "baseline_p99_itl_ms": base["p99_itl_ms"],
                    "baseline_concurrency": base["concurrency"], "factor": factor}  # fmt: skip
    return None


def format_sweep(res: dict[str, Any]) -> str:
    head = f"{'conc':>5} {'req/s':>8} {'out tok/s':>10} {'p50 TTFT':>9} {'p99 TTFT':>9} {'p50 ITL':>8} {'p99 ITL':>8} {'p99 TPOT':>9} {'errors':>6}"
    lines = [head, "-" * len(head)]
    for lv in res["levels"]:
        lines.append(
            f"{lv['concurrency']:>5} {lv['request_throughput']:>8.2f} {lv['output_throughput']:>10.1f} "
            f"{_fmt(lv['median_ttft_ms'], 1):>9} {_fmt(lv['p99_ttft_ms'], 1):>9} {_fmt(lv['median_itl_ms'], 1):>8} "
            f"{_fmt(lv['p99_itl_ms'], 1):>8} {_fmt(lv['p99_tpot_ms'], 1):>9} {lv['failed']:>6}"
        )
    k = res["knee"]
    lines.append(
        f"knee: p99 ITL doubles at concurrency {k['concurrency']} ({k['p99_itl_ms']:.1f} ms vs {k['baseline_p99_itl_ms']:.1f} ms "
        f"at {k['baseline_concurrency']})" if k else "knee: p99 ITL did not double over the levels run"
    )
    return "\n".join(lines)


def run_name(res: dict[str, Any], fallback: str) -> str:
    """A saved run's name in tables and plots: its label, else its server's URL."""
    return res.get("label") or res.get("base_url", fallback)



COMPARE_KEYS = [
    ("completed", "Successful requests", 0),
    ("failed", "Failed requests", 0),
    ("request_throughput", "Request throughput (req/s)", 2),
    ("request_goodput", "Request goodput (req/s)", 2),
    ("output_throughput", "Output token throughput (tok/s)", 1),
    *[(f"{s}_{m}_ms", f"{s.capitalize()} {m.upper()} (ms)", 1) for m in METRICS for s in ("median", "p99")],
]


def format_compare(a: dict[str, Any], b: dict[str, Any]) -> str:
    na, nb = run_name(a, "A")[:22], run_name(b, "B")[:22]
    lines = [f"{'':<34}{na:>24}{nb:>24}{'B/A':>8}"]
    for key, title, nd in COMPARE_KEYS:
        va, vb = a.get(key), b.get(key)
        ratio = f"{vb / va:.2f}" if isinstance(va, (int, float)) and isinstance(vb, (int, float)) and va else "-"
        lines.append(f"{title:<34}{_fmt(va if not isinstance(va, int) else float(va), nd):>24}{_fmt(vb if not isinstance(vb, int) else float(vb), nd):>24}{ratio:>8}")
    for source in SPEC_PREFIXES:
        sa, sb = a.get("spec_decode", {}).get(source) or {}, b.get("spec_decode", {}).get(source) or {}
        if sa or sb:
            lines.append(f"{f'Acceptance rate ({source})':<34}{_fmt(sa.get('acceptance_rate'), 3):>24}{_fmt(sb.get('acceptance_rate'), 3):>24}")
            lines.append(f"{f'Mean acceptance length ({source})':<34}{_fmt(sa.get('mean_acceptance_length'), 3):>24}{_fmt(sb.get('mean_acceptance_length'), 3):>24}")
    return "\n".join(lines)


def write_json(res: dict[str, Any], path: str | None) -> None:
    """Write a run's or benchmark's results to ``path`` (nothing when None), creating its folder."""
    if path:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(res, indent=2) + "\n")
        print(f"wrote {p}", file=sys.stderr)
