"""PNG plots of a saved run, a sweep, or two runs side by side (matplotlib, Agg)."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import Any

from loadtests.load.report import METRIC_NAMES, METRICS, run_name


def _series_ms(res: dict[str, Any], m: str) -> list[float]:
    ok = [r for r in res.get("requests", []) if r["status"] == "200"]
    if m == "ttft":
        return [r["ttft"] * 1000 for r in ok if r["ttft"] is not None]
    if m == "itl":
        return [g * 1000 for r in ok for g in r["itl"]]
    if m == "e2el":
        return [r["latency"] * 1000 for r in ok]
    return [(r["latency"] - r["ttft"]) / (r["output_tokens"] - 1) * 1000 for r in ok if r["ttft"] is not None and r["output_tokens"] > 1]


def _cdf(ax, values: list[float], label: str) -> None:
    import numpy as np

    if not values:
        return
    v = np.sort(np.asarray(values))
    ax.plot(v, np.arange(1, len(v) + 1) / len(v), label=label)



def plot_run(res: dict[str, Any], out: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if res.get("kind") == "sweep":
        return plot_sweep(res, out)
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    ax = axes[0][0]
    for m in METRICS:
        _cdf(ax, _series_ms(res, m), m.upper())
    ax.set(xscale="log", xlabel="ms", ylabel="fraction of requests (ITL: of chunks)", title="Latency CDFs")
    ax.legend()
    ax.grid(alpha=0.3)
    reqs = res.get("requests", [])
    ax = axes[0][1]
    ok = [r for r in reqs if r["status"] == "200"]
    bad = [r for r in reqs if r["status"] != "200"]
    ax.scatter([r["start"] for r in ok], [r["latency"] * 1000 for r in ok], s=6, label="ok: e2e")
    ax.scatter([r["start"] for r in ok if r["ttft"] is not None], [r["ttft"] * 1000 for r in ok if r["ttft"] is not None], s=6, label="ok: TTFT")
    if bad:
        ax.scatter([r["start"] for r in bad], [r["latency"] * 1000 for r in bad], s=10, marker="x", color="red", label="errors")
    ax.set(yscale="log", xlabel="request sent (s into the run)", ylabel="ms", title="Latency over the run")
    ax.legend()
    ax.grid(alpha=0.3)
    ax = axes[1][0]
    span = max([r["start"] + r["latency"] for r in reqs] + [res.get("duration", 1.0)])
    bins = max(1, int(math.ceil(span)))
    tok_s = [0.0] * bins
    for r in ok:  # a request's tokens spread evenly from its first token to its end
        t0, t1 = r["start"] + (r["ttft"] or 0), r["start"] + r["latency"]
        n = r["output_tokens"]
        if t1 <= t0:
            tok_s[min(int(t1), bins - 1)] += n
            continue
        for b in range(int(t0), min(int(math.ceil(t1)), bins)):
            overlap = min(t1, b + 1) - max(t0, b)
            if overlap > 0:
                tok_s[b] += n * overlap / (t1 - t0)
    ax.plot(range(bins), tok_s)
    ax.set(xlabel="s into the run", ylabel="output tokens/s", title="Output throughput")
    ax.grid(alpha=0.3)
    ax = axes[1][1]
    counts = Counter(r["status"] for r in reqs)
    labels = sorted(counts)
    ax.bar(labels, [counts[k] for k in labels], color=["tab:green" if k == "200" else "tab:red" for k in labels])
    ax.set(xlabel="status", ylabel="requests", title="Responses by status")
    fig.suptitle(f"{run_name(res, 'run')}: {res['completed']} ok, {res['failed']} failed, {res['output_throughput']:.1f} out tok/s")
    fig.tight_layout()
    return _save(fig, out)


def plot_sweep(res: dict[str, Any], out: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lv = res["levels"]
    c = [x["concurrency"] for x in lv]
    fig, ax = plt.subplots(figsize=(8, 5))
    ax.plot(c, [x["output_throughput"] for x in lv], "o-", color="tab:blue", label="output tok/s")
    ax.set(xscale="log", xlabel="concurrency", ylabel="output tokens/s")
    ax2 = ax.twinx()
    ax2.plot(c, [x["p99_itl_ms"] for x in lv], "s--", color="tab:red", label="p99 ITL (ms, per chunk)")
    ax2.set_ylabel("p99 ITL (ms)")
    if res.get("knee"):
        ax.axvline(res["knee"]["concurrency"], color="grey", ls=":", label="knee (p99 ITL x2)")
    fig.legend(loc="upper left")
    ax.set_title("Concurrency sweep")
    fig.tight_layout()
    return _save(fig, out)


def plot_compare(a: dict[str, Any], b: dict[str, Any], out: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    na, nb = run_name(a, "A"), run_name(b, "B")
    if na == nb:
        na, nb = f"A: {na}", f"B: {nb}"
    for ax, m in zip([axes[0][0], axes[0][1], axes[1][0], axes[1][1]], METRICS):
        _cdf(ax, _series_ms(a, m), na)
        _cdf(ax, _series_ms(b, m), nb)
        ax.set(xscale="log", xlabel="ms", ylabel="CDF", title=METRIC_NAMES[m])
        ax.legend()
        ax.grid(alpha=0.3)
    ax = axes[0][2]
    keys = ["request_throughput", "request_goodput"]
    x = range(len(keys))
    ax.bar([i - 0.2 for i in x], [a.get(k) or 0 for k in keys], 0.4, label=na)
    ax.bar([i + 0.2 for i in x], [b.get(k) or 0 for k in keys], 0.4, label=nb)
    ax.set_xticks(list(x), ["req/s", "goodput req/s"])
    ax.legend()
    ax = axes[1][2]
    ax.bar([0], [a["output_throughput"]], 0.4, label=na)
    ax.bar([0.5], [b["output_throughput"]], 0.4, label=nb)
    ax.set_xticks([0, 0.5], [na, nb])
    ax.set(ylabel="output tokens/s", title="Output throughput")
    fig.tight_layout()
    return _save(fig, out)


def _save(fig, out: str | Path) -> Path:
    import matplotlib.pyplot as plt

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
