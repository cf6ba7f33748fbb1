"""/metrics after real traffic: names, buckets, labels, and values that agree with the responses' usage."""

from __future__ import annotations

import re

from prometheus_client.parser import text_string_to_metric_families

from decoding.speculative import MAX_DRAFT_TOKENS
from service.metrics import FINISHED_REASONS, MODES, REJECTION_REASONS

from tests.service.conftest import REPO, model_args, start_server, sum_metric

PROMPT = "for i in range(10):\n"
NOEOS = {"ignore_eos": True}

TTFT_EDGES = [.001, .005, .01, .02, .04, .06, .08, .1, .25, .5, .75, 1, 2.5, 5, 7.5, 10, 20, 40, 80, 160, 640, 2560]
ITL_EDGES = [.01, .025, .05, .075, .1, .15, .2, .3, .4, .5, .75, 1, 2.5, 5, 7.5, 10, 20, 40, 80]
E2E_EDGES = [.3, .5, .8, 1, 1.5, 2, 2.5, 5, 10, 15, 20, 30, 40, 50, 60, 120, 240, 480, 960, 1920, 7680]
ALLOWED_LABELS = {"route", "status", "mode", "finished_reason", "reason", "position", "kind", "backend", "direction", "to", "model", "le"}


def test_metric_families_buckets_and_bounded_labels(server):
    server.client().completions.create(model="tandem", prompt=PROMPT, max_tokens=4)
    text = server.http.get("/metrics").text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    expected = {
        "tandem_requests": "counter",
        "tandem_requests_finished": "counter",
        "tandem_requests_rejected": "counter",
        "tandem_requests_running": "gauge",
        "tandem_requests_waiting": "gauge",
        "tandem_draft_length_tokens": "gauge",
        "tandem_time_to_first_token_seconds": "histogram",
        "tandem_inter_token_latency_seconds": "histogram",
        "tandem_e2e_request_latency_seconds": "histogram",
        "tandem_request_queue_time_seconds": "histogram",
        "tandem_verify_round_latency_seconds": "histogram",
        "tandem_accepted_tokens_per_round": "histogram",
        "tandem_prompt_tokens": "counter",
        "tandem_generation_tokens": "counter",
        "tandem_spec_decode_num_drafts": "counter",
        "tandem_spec_decode_num_draft_tokens": "counter",
        "tandem_spec_decode_num_accepted_tokens": "counter",
        "tandem_spec_decode_num_accepted_tokens_per_pos": "counter",
        "tandem_verifier_errors": "counter",
        "tandem_fallbacks": "counter",
    }
    for name, kind in expected.items():
        assert families[name].type == kind, name
    assert "process_resident_memory_bytes" in families

    def edges(name):
        return [float(s.labels["le"]) for s in families[name].samples if s.name.endswith("_bucket")][:-1]

    assert edges("tandem_time_to_first_token_seconds") == TTFT_EDGES
    assert edges("tandem_inter_token_latency_seconds") == ITL_EDGES
    assert edges("tandem_e2e_request_latency_seconds") == E2E_EDGES
    for family in families.values():
        for sample in family.samples:
            assert set(sample.labels) <= ALLOWED_LABELS, sample
            assert ":" not in sample.name
    routes = {s.labels["route"] for s in families["tandem_requests"].samples if "route" in s.labels}
    assert routes <= {"/v1/completions", "/v1/chat/completions", "/v1/models", "/v1/models/{model_id:path}", "/health",
                      "/ready", "/metrics", "/tokenize", "/detokenize", "/version", "other"}  # fmt: skip


def test_metrics_agree_with_usage(server):
    client = server.client()
    before = server.metrics()
    responses = [
        client.completions.create(model="tandem", prompt=PROMPT, max_tokens=20, temperature=0, extra_body=NOEOS),
        client.completions.create(model="tandem", prompt=PROMPT, max_tokens=15, temperature=0.8, seed=3, n=2,
                                  extra_body=NOEOS),  # fmt: skip
        client.completions.create(model="tandem", prompt=PROMPT, max_tokens=12,
                                  extra_body={**NOEOS, "tandem": {"mode": "verifier-only"}}),  # fmt: skip
        client.chat.completions.create(model="tandem", messages=[{"role": "user", "content": "hello"}], max_tokens=9,
                                       extra_body=NOEOS),  # fmt: skip
    ]
    chunks = list(client.completions.create(model="tandem", prompt=PROMPT, max_tokens=11, stream=True,
                                            stream_options={"include_usage": True}, extra_body=NOEOS))  # fmt: skip
    final = chunks[-1]
    after = server.metrics()

    def delta(name: str, **labels: str) -> float:
        return sum_metric(after, name, **labels) - sum_metric(before, name, **labels)

    usages = [r.usage for r in responses] + [final.usage]
    stats = [r.model_extra["tandem"] for r in responses] + [final.model_extra["tandem"]]
    n_choices = sum(len(r.choices) for r in responses) + 1
    completion = sum(u.completion_tokens for u in usages)
    assert completion == 20 + 30 + 12 + 9 + 11
    assert all(u.prompt_tokens_details is None for u in usages)  # the embedded verifier has no prefix cache to report

    assert delta("tandem_generation_tokens_total") == completion
    assert delta("tandem_generation_tokens_total", mode="verifier-only") == 12
    assert delta("tandem_prompt_tokens_total") == sum(u.prompt_tokens for u in usages)
    assert delta("tandem_spec_decode_num_draft_tokens_total") == sum(s["draft_tokens"] for s in stats)
    assert delta("tandem_spec_decode_num_accepted_tokens_total") == sum(s["accepted_tokens"] for s in stats)
    assert delta("tandem_spec_decode_num_accepted_tokens_per_pos_total") == sum(s["accepted_tokens"] for s in stats)
    assert delta("tandem_accepted_tokens_per_round_sum") == sum(s["accepted_tokens"] for s in stats)
    assert delta("tandem_accepted_tokens_per_round_count") == delta("tandem_spec_decode_num_drafts_total")
    assert 0 < delta("tandem_spec_decode_num_drafts_total") <= sum(s["rounds"] for s in stats if s["mode"] == "speculative")
    assert delta("tandem_verify_round_latency_seconds_count") == sum(s["rounds"] for s in stats)

    assert delta("tandem_requests_total", route="/v1/completions", status="200", mode="speculative") == 3
    assert delta("tandem_requests_total", route="/v1/completions", status="200", mode="verifier-only") == 1
    assert delta("tandem_requests_total", route="/v1/chat/completions", status="200") == 1
    assert delta("tandem_requests_finished_total", finished_reason="length") == n_choices
    assert delta("tandem_time_to_first_token_seconds_count") == n_choices
    # one ITL sample per token after each choice's first round (a round's tokens share its gap)
    assert 0 < delta("tandem_inter_token_latency_seconds_count") <= completion - n_choices
    assert delta("tandem_e2e_request_latency_seconds_count") == 5
    assert delta("tandem_request_queue_time_seconds_count") == 5
    assert sum_metric(after, "tandem_requests_running") == 0
    assert sum_metric(after, "tandem_requests_waiting") == 0
    assert 1 <= sum_metric(after, "tandem_draft_length_tokens") <= 8


def test_forward_batches_are_counted_per_model(server):
    """Four choices of one verifier-only request step together: the verifier runs their passes as
    batches, and the histogram counts every request-pass once (12 tokens = 12 passes each)."""
    before = server.metrics()
    server.client().completions.create(model="tandem", prompt=PROMPT, max_tokens=12, n=4,
                                       extra_body={**NOEOS, "tandem": {"mode": "verifier-only"}})  # fmt: skip
    after = server.metrics()

    def delta(name: str) -> float:
        return sum_metric(after, name, model="verifier") - sum_metric(before, name, model="verifier")

    assert delta("tandem_forward_batch_size_sum") == 4 * 12
    assert 0 < delta("tandem_forward_batch_size_count") < 4 * 12  # some passes held several choices


def test_rejections_are_counted_by_reason(server):
    before = server.metrics()
    server.http.post("/v1/completions", json={"model": "tandem", "prompt": PROMPT, "temperature": -1})
    server.http.post("/v1/completions", json={"model": "other", "prompt": PROMPT})
    server.http.post("/v1/completions", json={"model": "tandem", "prompt": [3] * 3000})
    after = server.metrics()
    for reason in ("invalid", "not_found", "context_length"):
        assert sum_metric(after, "tandem_requests_rejected_total", reason=reason) - sum_metric(
            before, "tandem_requests_rejected_total", reason=reason
        ) == 1, reason
    assert sum_metric(after, "tandem_requests_total", route="/v1/completions", status="400") - sum_metric(
        before, "tandem_requests_total", route="/v1/completions", status="400"
    ) == 2


def _dashboard_metrics() -> set[str]:
    """Every tandem_* series the Grafana dashboard and the alert rules query (the split worker's own
    tandem_split_worker_* come from the worker process, not the gateway)."""
    import json

    import yaml

    exprs: list[str] = []

    def walk(node) -> None:
        if isinstance(node, dict):
            exprs.extend(v for k, v in node.items() if k == "expr" and isinstance(v, str))
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(json.loads((REPO / "docker/grafana/dashboards/tandem.json").read_text()))
    walk(yaml.safe_load((REPO / "docker/prometheus/rules/tandem-alerts.yml").read_text()))
    names = set(re.findall(r"\b(tandem_[a-z0-9_]+)", " ".join(exprs)))
    assert len(names) > 20
    return {n for n in names if not n.startswith("tandem_split_worker_")}


def test_every_dashboard_metric_exists_from_start_and_after_one_request(tiny_pair, tmp_path):
    """A fresh gateway exports every family the dashboard reads, and every fixed label set, at zero,
    so rate() and the alert rules see the first event; one request changes nothing about that."""
    server = start_server(tmp_path / "serve.log", *model_args(*tiny_pair))
    try:
        for requests in (0, 1):
            if requests:
                server.client().completions.create(model="tandem", prompt=PROMPT, max_tokens=4, extra_body=NOEOS)
            samples = server.metrics()
            names = {name for name, _ in samples}
            missing = sorted(n for n in _dashboard_metrics() if n not in names)
            assert not missing, (requests, missing)

            def labelled(name: str, key: str) -> set[str]:
                return {dict(labels)[key] for n, labels in samples if n == name and key in dict(labels)}

            assert labelled("tandem_requests_rejected_total", "reason") >= set(REJECTION_REASONS)
            assert labelled("tandem_requests_finished_total", "finished_reason") >= set(FINISHED_REASONS)
            assert labelled("tandem_requests_finished_total", "mode") >= set(MODES)
            assert labelled("tandem_requests_total", "status") >= {"200", "400", "429", "500", "503"}
            assert labelled("tandem_spec_decode_num_accepted_tokens_per_pos_total", "position") == {
                str(i) for i in range(MAX_DRAFT_TOKENS)}  # fmt: skip
            assert labelled("tandem_fallbacks_total", "reason") and labelled("tandem_split_failures_total", "reason")
            if not requests:
                assert sum_metric(samples, "tandem_requests_total", route="/v1/completions") == 0
                assert sum_metric(samples, "tandem_requests_finished_total") == 0
    finally:
        assert server.stop() == 0
