"""The split worker's Prometheus metrics (its own registry, served on its /metrics)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# vLLM's inter-token-latency bucket edges (ops conventions), with finer low end for a CPU body.
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1, 2.5, 5, 7.5, 10, 20, 40, 80)


class WorkerMetrics:
    def __init__(self, registry: CollectorRegistry):
        self.sessions = Gauge("tandem_split_worker_sessions", "Sessions whose KV cache the worker holds", registry=registry)
        self.kv_bytes = Gauge("tandem_split_worker_kv_cache_bytes", "Bytes held by all sessions' KV caches", registry=registry)
        self.kv_limit = Gauge("tandem_split_worker_kv_cache_limit_bytes", "Bound on the KV caches' total size", registry=registry)
        self.evictions = Counter(
            "tandem_split_worker_evictions_total", "Sessions evicted, by reason (ttl, memory)", ["reason"], registry=registry
        )
        self.steps = Counter("tandem_split_worker_steps_total", "Steps served", registry=registry)
        self.tokens = Counter("tandem_split_worker_tokens_total", "Positions run through the body", registry=registry)
        self.errors = Counter("tandem_split_worker_errors_total", "Refused requests, by error code", ["code"], registry=registry)
        self.received = Counter("tandem_split_worker_received_bytes_total", "Request frame bytes received", registry=registry)
        self.sent = Counter("tandem_split_worker_sent_bytes_total", "Response frame bytes sent", registry=registry)
        self.step_seconds = Histogram(
            "tandem_split_worker_step_seconds", "Body compute time of one step", buckets=STEP_BUCKETS, registry=registry
        )
