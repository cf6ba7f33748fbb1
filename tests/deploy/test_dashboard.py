"""The Grafana dashboard: its structure, and every PromQL query evaluated by a real Prometheus
against live tandem, split-worker and vLLM processes after real traffic. No panel may be empty."""

from __future__ import annotations

import json
import math
import re
import threading
import time
from pathlib import Path

import httpx
import pytest
import yaml

from loadtests import load
from tests.deploy.conftest import DOCKER

DASHBOARD = DOCKER / "grafana" / "dashboards" / "tandem.json"
# Grafana's variables, as Grafana would expand them for "All" over the last minutes.
SUBSTITUTIONS = {"$__rate_interval": "2m", "$__interval": "15s", "$instance": ".*", "$vllm_instance": ".*"}

#: The row of the remote verifier's panels (the ``tandem_verifier_*`` families of service/metrics.py).
VERIFIER_ROW = "Remote verifier (vLLM, split)"

#: Queries of that row that may stay at zero after the stack's traffic, and why. Every other query of the
#: row must show a value above zero: the pre-exported zero series would otherwise pass for data.
VERIFIER_ZERO_ALLOWED: dict[tuple[str, str], str] = {
    ("Verifier retries and resyncs", "A"): (
        "a retry is a transient failure inside a round that then succeeds; the stack's faults are permanent (the "
        "unreachable verifier: errors, no round) or a lost session (the split worker's TTL: a resync, panel B). "
        "Retries are counted against injected faults in tests/decoding/backends/test_vllm_client.py"
    ),
}

#: Metrics the dashboard shows that no live program emits yet. A query on these must still be valid
#: PromQL and the metric must be declared on the gateway's /metrics (so the name is right); data is
#: not required. (Empty: the verifier-down gateway with the drafter-only fallback fills the fallbacks panel.)
NOT_EMITTED_YET: dict[str, str] = {}


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def panels() -> list[dict]:
    return [p for p in dashboard()["panels"] if p["type"] != "row"]


def queries() -> list[tuple[str, str, str]]:
    """(panel title, refId, expression with Grafana variables substituted)."""
    out = []
    for p in panels():
        for t in p["targets"]:
            expr = t["expr"]
            for var, value in SUBSTITUTIONS.items():
                expr = expr.replace(var, value)
            out.append((p["title"], t["refId"], expr))
    return out


def row_panels(row_title: str) -> list[dict]:
    """The panels under a row, in the dashboard's order."""
    out, inside = [], False
    for p in dashboard()["panels"]:
        if p["type"] == "row":
            inside = p["title"] == row_title
        elif inside:
            out.append(p)
    return out


def metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\b((?:tandem_|vllm:)[a-z_:]+)", expr))


# -- structure ----------------------------------------------------------------------------------


def test_dashboard_has_the_panels_operators_need():
    titles = {p["title"] for p in panels()}
    required = {
        "Requests by status", "Errors by status", "Time to first token", "Inter-token latency (per token)",
        "End-to-end request latency", "Tokens/s", "Acceptance rate", "Acceptance by draft position",
        "Mean accepted draft tokens per round", "Current draft length k", "Verify-round latency",
        "Queue depth and in-flight requests", "Fallbacks", "Verifier errors", "Bytes per token", "Split round latency",
        "Replays and failures", "Prefix-cache hit rate", "vLLM running and waiting requests", "vLLM KV-cache usage",
    }  # fmt: skip
    assert required <= titles, sorted(required - titles)
    for title in ("Time to first token", "Inter-token latency (per token)", "End-to-end request latency"):
        legends = [t["legendFormat"] for p in panels() if p["title"] == title for t in p["targets"]]
        assert legends == ["p50", "p90", "p99"], (title, legends)


def test_dashboard_layout_ids_and_datasources():
    d = dashboard()
    assert d["uid"] == "tandem" and d["schemaVersion"] >= 36
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    cells: dict[tuple[int, int], str] = {}
    for p in d["panels"]:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24, (p["title"], g)
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"panels {cells[(x, y)]!r} and {p['title']!r} overlap"
                cells[(x, y)] = p["title"]
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    provisioned = yaml.safe_load((DOCKER / "grafana/provisioning/datasources/prometheus.yml").read_text())["datasources"][0]
    assert variables["datasource"]["current"]["value"] == provisioned["uid"]
    for p in panels():
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        assert p["targets"], f"panel {p['title']!r} has no query"
        assert p.get("description"), f"panel {p['title']!r} has no description"
        for t in p["targets"]:
            assert t["datasource"]["uid"] == "${datasource}"
    used = {v for _, _, e in queries() for v in re.findall(r"\$\w+", e)}
    assert not used, f"unsubstituted variables {used}: add them to SUBSTITUTIONS"


def test_queries_follow_the_conventions():
    """Ratios guard their denominators (idle = No data, not NaN); quantiles go through _bucket by le."""
    for title, ref, expr in queries():
        names = metric_names(expr)
        assert names, (title, expr)
        for m in names:
            assert m.startswith("tandem_") or m.startswith("vllm:"), m
        for denominator in re.findall(r"\)\s*/\s*(?:on\(\)\s*group_left\(\)\s*)?(\(.*)", expr):
            assert re.match(r"\(.*>\s*0\)", denominator), f"{title}/{ref}: unguarded denominator in {expr}"
        if "histogram_quantile" in expr:
            assert "_bucket" in expr and re.search(r"by \((\w+, )*le\)", expr), (title, expr)  # per series: by (model, le)
        if re.search(r"\b(rate|increase)\(", expr):
            assert "[2m]" in expr, f"{title}/{ref}: use $__rate_interval"


def test_every_remote_verifier_family_has_a_panel():
    """Each tandem_verifier_* family the gateway exports is on the dashboard, in the remote verifier's row
    (the errors by kind sit with the faults)."""
    from service.metrics import Metrics

    families = {m.name for m in Metrics().registry.collect() if m.name.startswith("tandem_verifier_")}
    assert {"tandem_verifier_mode_switches", "tandem_verifier_streamed_tokens", "tandem_verifier_rtt_seconds"} <= families
    row_names = {n for p in row_panels(VERIFIER_ROW) for t in p["targets"] for n in metric_names(t["expr"])}
    everywhere = {n for _, _, e in queries() for n in metric_names(e)}
    on_dashboard = {f for f in families if any(re.fullmatch(rf"{f}(_total|_bucket|_sum|_count)?", n) for n in everywhere)}
    assert on_dashboard == families, f"tandem_verifier_* families without a panel: {sorted(families - on_dashboard)}"
    in_row = {f for f in families if any(re.fullmatch(rf"{f}(_total|_bucket|_sum|_count)?", n) for n in row_names)}
    assert families - in_row == {"tandem_verifier_errors"}, sorted(families - in_row)
    titles = {p["title"] for p in row_panels(VERIFIER_ROW)}
    assert {title for title, _ in VERIFIER_ZERO_ALLOWED} <= titles


def test_provisioning_points_grafana_at_the_dashboard():
    provider = yaml.safe_load((DOCKER / "grafana/provisioning/dashboards/tandem.yml").read_text())["providers"][0]
    compose = yaml.safe_load((DOCKER / "docker-compose.yml").read_text())
    mounts = compose["services"]["grafana"]["volumes"]
    assert f"./grafana/dashboards:{provider['options']['path']}:ro" in mounts
    assert "./grafana/provisioning:/etc/grafana/provisioning:ro" in mounts
    home = compose["services"]["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{provider['options']['path']}/{DASHBOARD.name}"


# -- live --------------------------------------------------------------------------------------------


def drive_traffic(stack) -> dict:
    """Real traffic at every target: completions (some shed with 429), client errors, 503s, vLLM, split."""
    stop = threading.Event()
    counts = {"errors_sent": 0}

    def error_traffic() -> None:
        with httpx.Client(timeout=30) as c:
            while not stop.is_set():
                c.post(stack.gateway.url + "/v1/completions", json={"model": "tandem", "prompt": "x", "max_tokens": -1})
                c.post(stack.gateway.url + "/v1/completions", json={"model": "no-such-model", "prompt": "x"})
                c.post(stack.gateway_dead.url + "/v1/completions", json={"model": "tandem", "prompt": "x", "max_tokens": 4})
                c.get(stack.gateway_dead.url + "/ready")
                counts["errors_sent"] += 4
                stop.wait(0.5)

    thread = threading.Thread(target=error_traffic, daemon=True)
    thread.start()
    stack.split_edge.proc.stdin.write(b"go\n")
    stack.split_edge.proc.stdin.flush()
    common = dict(dataset="heldout", input_len=32, output_len=16, ignore_eos=True, tokenizer=str(stack.drafter_dir), progress=False)
    try:
        # 8 concurrent streams against 2 slots + a queue of 2: some are shed with 429.
        counts["gateway"] = load.run(load.RunConfig(base_url=stack.gateway.url, num_prompts=12, max_concurrency=8, **common))
        counts["gateway_vllm"] = load.run(load.RunConfig(base_url=stack.gateway_vllm.url, num_prompts=4, max_concurrency=2, **common))
        deadline = time.monotonic() + 240
        while "READY" not in stack.split_edge.log():
            assert stack.split_edge.proc.poll() is None, stack.split_edge.log()[-3000:]
            assert time.monotonic() < deadline, "split traffic did not finish:\n" + stack.split_edge.log()[-3000:]
            time.sleep(0.5)
        counts["gateway_vllm_modes"] = drive_remote_verifier(stack.gateway_vllm)
        time.sleep(2)  # errors keep coming while Prometheus scrapes
    finally:
        stop.set()
        thread.join()
    return counts


def drive_remote_verifier(gateway) -> dict[str, int]:
    """Requests that exercise each remote-verifier path of a gateway on vLLM (behind the proxy's RTT):
    speculative (the router measures the RTT, then switches to one stream), verifier-only (one stream),
    and a request with logprobs (rounds scored on top-K rows: the RTT and the tail mass are measured).
    Returns the HTTP status of each."""
    prompt = "def parse(self, text):\n    for line in text.splitlines():\n"
    base = {"model": "tandem", "prompt": prompt, "temperature": 0, "ignore_eos": True}
    requests = {
        "speculative": {**base, "max_tokens": 32},
        "verifier_only": {**base, "max_tokens": 16, "tandem": {"mode": "verifier-only"}},
        "logprobs": {**base, "max_tokens": 8, "logprobs": 1},
    }
    with httpx.Client(timeout=120) as c:
        return {name: c.post(gateway.url + "/v1/completions", json=body).status_code for name, body in requests.items()}


@pytest.fixture(scope="module")
def traffic(stack, prometheus) -> dict:
    return drive_traffic(stack)


def test_every_dashboard_query_returns_data_from_live_targets(stack, prometheus, traffic):
    counts = traffic
    assert counts["gateway"]["completed"] > 0 and counts["gateway"]["errors_by_status"].get("429", 0) > 0, counts["gateway"]
    assert counts["gateway_vllm"]["completed"] == 4, counts["gateway_vllm"]
    prometheus.wait_scrapes(3)
    targets = prometheus.api("targets")["activeTargets"]
    down = [(t["scrapeUrl"], t["lastError"]) for t in targets if t["health"] != "up"]
    assert not down, f"targets down: {down}"
    gateway_metrics = httpx.get(stack.gateway.url + "/metrics", timeout=30).text

    empty = []
    for title, ref, expr in queries():
        result = prometheus.query(expr)
        finite = [s for s in result if math.isfinite(float(s["value"][1]))]
        names = metric_names(expr)
        if names and names <= set(NOT_EMITTED_YET):
            for name in names:
                assert f"# TYPE {name} counter" in gateway_metrics or f"# TYPE {name.removesuffix('_total')} counter" in gateway_metrics, (
                    f"{name} is not even declared on the gateway's /metrics"
                )
            continue
        if not finite:
            empty.append(f"{title} [{ref}]: {expr} -> {result}")
    assert not empty, "dashboard queries with no data:\n" + "\n".join(empty)


def test_remote_verifier_panels_show_the_traffic(stack, prometheus, traffic):
    """Every query of the remote verifier's row shows a value above zero after the traffic (a rate or an
    increase of the zero series exported at start would otherwise count as data), except the listed ones.
    Evaluated over 10 minutes, so that the earliest traffic (the split edge's resync) is still in the window."""
    assert traffic["gateway_vllm_modes"] == {"speculative": 200, "verifier_only": 200, "logprobs": 200}, traffic
    prometheus.wait_scrapes(3)
    zero, checked = [], 0
    for p in row_panels(VERIFIER_ROW):
        for t in p["targets"]:
            expr = t["expr"]
            for var, value in {**SUBSTITUTIONS, "$__rate_interval": "10m"}.items():
                expr = expr.replace(var, value)
            values = [float(s["value"][1]) for s in prometheus.query(expr)]
            positive = [v for v in values if math.isfinite(v) and v > 0]
            checked += 1
            if (p["title"], t["refId"]) in VERIFIER_ZERO_ALLOWED:
                continue
            if not positive:
                zero.append(f"{p['title']} [{t['refId']}]: {expr} -> {values}")
    assert checked >= 10
    assert not zero, "remote verifier queries without traffic:\n" + "\n".join(zero)
    # The switch came from the router's own measurement of the proxy's RTT.
    rtt = prometheus.query('histogram_quantile(0.5, sum by (le) (rate(tandem_verifier_rtt_seconds_bucket{backend="vllm"}[10m])))')
    assert rtt and float(rtt[0]["value"][1]) >= 0.1, rtt


def test_template_variables_resolve_on_live_targets(stack, prometheus, traffic):
    for var in dashboard()["templating"]["list"]:
        if var["type"] != "query":
            continue
        m = re.fullmatch(r"label_values\(([\w:]+),\s*(\w+)\)", var["query"]["query"])
        assert m, var["query"]
        values = prometheus.api(f"label/{m.group(2)}/values", **{"match[]": m.group(1)})
        assert values, f"variable {var['name']}: no {m.group(2)} values for {m.group(1)}"


def test_alert_rules_load_and_evaluate_on_live_data(stack, prometheus, traffic):
    prometheus.wait_scrapes(2)
    groups = prometheus.api("rules")["groups"]
    rules = [r for g in groups for r in g["rules"]]
    shipped = yaml.safe_load((DOCKER / "prometheus/rules/tandem-alerts.yml").read_text())
    assert {r["name"] for r in rules} == {r["alert"] for g in shipped["groups"] for r in g["rules"]}
    bad = [(r["name"], r.get("health"), r.get("lastError")) for r in rules if r.get("health") != "ok"]
    assert not bad, bad
    # The dead gateway's verifier errors were seen by the alert's expression.
    verifier_alert = next(r for r in rules if r["name"] == "TandemVerifierErrors")
    assert verifier_alert["state"] in ("pending", "firing"), verifier_alert
