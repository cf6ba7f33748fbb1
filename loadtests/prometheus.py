"""Prometheus text exposition as samples, read with prometheus_client's own parser.

A sample is keyed by its name and its sorted labels::

    {("tandem_requests_total", (("route", "/v1/completions"), ("status", "200"))): 7.0, ...}

The one reader of ``/metrics`` for the load generator, the benchmarks and the tests.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping

import httpx
from prometheus_client.parser import text_string_to_metric_families

Labels = tuple[tuple[str, str], ...]
Samples = dict[tuple[str, Labels], float]


def parse(text: str) -> Samples:
    """Every sample of a Prometheus text exposition (histograms as their ``_bucket``/``_count``/``_sum`` samples).
    Raises ValueError on text that is not the exposition format."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def fetch(url: str, *, timeout: float = 30.0, headers: Mapping[str, str] | None = None) -> Samples:
    """GET ``url`` (a /metrics endpoint) and parse it. httpx.HTTPError when it is unreachable or answers
    other than 2xx; ValueError when the body is not the exposition format."""
    resp = httpx.get(url, timeout=timeout, headers=headers)
    resp.raise_for_status()
    return parse(resp.text)


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum of the samples named ``name`` whose labels include ``labels`` (0.0 when there are none)."""
    out = 0.0
    for (n, label_pairs), value in samples.items():
        if n == name and all(dict(label_pairs).get(k) == want for k, want in labels.items()):
            out += value
    return out


def by_name(samples: Samples) -> dict[str, float]:
    """{name: value summed over its label sets}."""
    out: dict[str, float] = defaultdict(float)
    for (name, _), value in samples.items():
        out[name] += value
    return dict(out)
