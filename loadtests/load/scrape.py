"""The server's speculative-decoding counters, scraped from its /metrics before and after a run."""

from __future__ import annotations

from typing import Any

import httpx

from loadtests import prometheus

SPEC_PREFIXES = {"tandem": "tandem_spec_decode_", "vllm": "vllm:spec_decode_"}


def scrape(url: str | None, headers: dict[str, str] | None = None) -> dict[str, Any] | None:
    """Speculative-decoding counters from a Prometheus text endpoint (None when unreachable)."""
    if not url:
        return None
    try:
        samples = prometheus.fetch(url, timeout=10, headers=headers)
    except (httpx.HTTPError, ValueError):
        return None
    out: dict[str, Any] = {}
    for (name, label_pairs), value in samples.items():
        labels = dict(label_pairs)
        for source, prefix in SPEC_PREFIXES.items():
            if not name.startswith(prefix) or not name.endswith("_total"):
                continue
            key = name[len(prefix) : -len("_total")]
            d = out.setdefault(source, {"per_pos": {}})
            if key == "num_accepted_tokens_per_pos":
                pos = labels.get("position", "?")
                d["per_pos"][pos] = d["per_pos"].get(pos, 0.0) + value
            elif key in ("num_drafts", "num_draft_tokens", "num_accepted_tokens"):
                d[key] = d.get(key, 0.0) + value
        if name == "tandem_generation_tokens_total":
            out.setdefault("tandem_generation_tokens", {})[labels.get("mode", "")] = value
    return out


def spec_delta(before: dict[str, Any] | None, after: dict[str, Any] | None) -> dict[str, Any]:
    """Acceptance figures over the run, from counter deltas."""
    if before is None or after is None:
        return {"scraped": False}
    res: dict[str, Any] = {"scraped": True}
    for source in SPEC_PREFIXES:
        a, b = after.get(source), before.get(source, {"per_pos": {}})
        if not a:
            continue
        drafts = a.get("num_drafts", 0) - b.get("num_drafts", 0)
        draft_tokens = a.get("num_draft_tokens", 0) - b.get("num_draft_tokens", 0)
        accepted = a.get("num_accepted_tokens", 0) - b.get("num_accepted_tokens", 0)
        positions = sorted(a["per_pos"], key=lambda p: int(p) if p.isdigit() else 1 << 30)
        per_pos = [(a["per_pos"][p] - b["per_pos"].get(p, 0.0)) / drafts if drafts else None for p in positions]
        res[source] = {
            "num_drafts": drafts,
            "num_draft_tokens": draft_tokens,
            "num_accepted_tokens": accepted,
            "acceptance_rate": accepted / draft_tokens if draft_tokens else None,
            "mean_acceptance_length": 1 + accepted / drafts if drafts else None,
            "acceptance_per_position": per_pos,
        }
    if "tandem_generation_tokens" in after:
        gb = before.get("tandem_generation_tokens", {})
        # Every mode is exported from zero; the report names only the modes this run used.
        deltas = {m: v - gb.get(m, 0.0) for m, v in after["tandem_generation_tokens"].items()}
        res["tandem_generation_tokens"] = {m: d for m, d in deltas.items() if d}
    return res
