"""Every ``tandem_*`` Prometheus metric, in one place.

Conventions (see docs/gateway.md): names carry their unit (``_seconds``,
``_tokens``) and counters end in ``_total``; histogram bucket edges are vLLM's,
so dashboards and SLOs written for vLLM line up; the speculative-decoding
counters mirror vLLM's ``spec_decode_*``. Labels stay bounded: route (the
route template, or ``other``), status, mode (3 values), finished_reason,
reason, position (< 32). Never request ids, prompts or users.

Each app owns its :class:`Metrics` with its own ``CollectorRegistry``, so a
test can build several apps in one process.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from decoding.events import RoundEvent, TransportEvent
from decoding.modes import MODES as MODE_NAMES
from decoding.speculative import MAX_DRAFT_TOKENS

# vLLM's bucket edges (vllm/v1/metrics/loggers.py).
TTFT_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
    160.0, 640.0, 2560.0,
)  # fmt: skip
ITL_BUCKETS = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
)  # fmt: skip
REQUEST_LATENCY_BUCKETS = (
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0,
    1920.0, 7680.0,
)  # fmt: skip
# One verify round is one verifier pass: it lives on the inter-token scale, with a finer low end
# (an in-process CPU pass of a small model takes a few milliseconds).
VERIFY_ROUND_BUCKETS = (0.001, 0.0025, 0.005, *ITL_BUCKETS)
# A split round is one network step: vLLM's inter-token edges with a finer low end.
SPLIT_ROUND_BUCKETS = (0.001, 0.005, *ITL_BUCKETS)
ACCEPTED_PER_ROUND_BUCKETS = (0, 1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 16, 24, 32)
FORWARD_BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64, 128, 256)

CONTENT_TYPE = CONTENT_TYPE_LATEST

# The fixed label values, exported at zero from the start so that rate() and the alert rules see
# the first event (a series born at 1 has no increase to show).
GENERATION_ROUTES = ("/v1/completions", "/v1/chat/completions")
STATUSES = ("200", "400", "401", "404", "413", "429", "499", "500", "503", "504")
MODES = (*MODE_NAMES, "split")
FINISHED_REASONS = ("stop", "length", "abort", "error")
REJECTION_REASONS = ("queue_full", "unauthorized", "invalid", "not_found", "context_length", "shutting_down", "timeout")
VERIFIER_ERROR_KINDS = ("unavailable", "timeout", "protocol", "other")
FALLBACK_REASONS = ("verifier_unavailable",)
BACKENDS = ("vllm", "split")
# Why a remote verifier re-sent a context: the server does not know the session (restarted, expired), the
# split worker evicted it (TTL, memory bound) or its cache disagrees, or its replica was lost
# (decoding/backends/vllm_replicas.py). All exported at zero: a resync series born at 1 shows no increase.
RESYNC_REASONS = ("unknown_session", "session_evicted", "cache_mismatch", "replica_lost")
SPLIT_FAILURE_REASONS = ("unreachable", "unavailable")


class Metrics:
    def __init__(self, max_draft_tokens: int = MAX_DRAFT_TOKENS) -> None:
        self.registry = registry = CollectorRegistry()
        # process_resident_memory_bytes & co.: what a soak test watches.
        ProcessCollector(registry=registry)

        # -- requests ------------------------------------------------------------
        self.requests = Counter(
            "tandem_requests_total",
            "HTTP requests answered, by route template, status code and decoding mode ('' off the generation routes).",
            ["route", "status", "mode"],
            registry=registry,
        )
        self.requests_finished = Counter(
            "tandem_requests_finished_total",
            "Generations (one per choice) finished, by finished_reason: stop, length, abort (client disconnect, "
            "timeout, shutdown) or error.",
            ["finished_reason", "mode"],
            registry=registry,
        )
        self.requests_rejected = Counter(
            "tandem_requests_rejected_total",
            "Requests refused before generating, by reason: queue_full, unauthorized, invalid, not_found, "
            "context_length, shutting_down, timeout.",
            ["reason"],
            registry=registry,
        )
        self.requests_running = Gauge(
            "tandem_requests_running", "Generations running now (slots in use).", registry=registry
        )
        self.requests_waiting = Gauge(
            "tandem_requests_waiting", "Requests waiting in the queue for a slot.", registry=registry
        )
        self.max_concurrency = Gauge(
            "tandem_max_concurrency", "Configured number of generation slots.", registry=registry
        )

        # -- latency ---------------------------------------------------------------
        self.time_to_first_token = Histogram(
            "tandem_time_to_first_token_seconds",
            "From request arrival (queueing included) to the first generated token, per choice.",
            buckets=TTFT_BUCKETS,
            registry=registry,
        )
        self.inter_token_latency = Histogram(
            "tandem_inter_token_latency_seconds",
            "Per token: the gap between two rounds divided evenly over the tokens the later round emitted.",
            buckets=ITL_BUCKETS,
            registry=registry,
        )
        self.e2e_latency = Histogram(
            "tandem_e2e_request_latency_seconds",
            "From request arrival to the end of its last generation.",
            buckets=REQUEST_LATENCY_BUCKETS,
            registry=registry,
        )
        self.queue_time = Histogram(
            "tandem_request_queue_time_seconds",
            "Time a request waited for a generation slot.",
            buckets=REQUEST_LATENCY_BUCKETS,
            registry=registry,
        )
        self.verify_round_latency = Histogram(
            "tandem_verify_round_latency_seconds",
            "Verifier time of one round (one verifier pass over context tail + draft).",
            buckets=VERIFY_ROUND_BUCKETS,
            registry=registry,
        )
        self.accepted_per_round = Histogram(
            "tandem_accepted_tokens_per_round",
            "Draft tokens accepted in one round, over rounds that drafted (k > 0).",
            buckets=ACCEPTED_PER_ROUND_BUCKETS,
            registry=registry,
        )

        # -- tokens ------------------------------------------------------------------
        self.prompt_tokens = Counter(
            "tandem_prompt_tokens_total", "Prompt tokens processed (once per prompt).", registry=registry
        )
        self.generation_tokens = Counter(
            "tandem_generation_tokens_total",
            "Tokens generated (the usage's completion_tokens), by mode.",
            ["mode"],
            registry=registry,
        )
        self.draft_length = Gauge(
            "tandem_draft_length_tokens", "Draft length k of the latest speculative round.", registry=registry
        )
        # vLLM's spec_decode_* counters, same meaning.
        self.spec_num_drafts = Counter(
            "tandem_spec_decode_num_drafts_total", "Rounds that proposed a draft (k > 0).", registry=registry
        )
        self.spec_num_draft_tokens = Counter(
            "tandem_spec_decode_num_draft_tokens_total", "Draft tokens proposed.", registry=registry
        )
        self.spec_num_accepted_tokens = Counter(
            "tandem_spec_decode_num_accepted_tokens_total", "Draft tokens accepted by the verifier.", registry=registry
        )
        self.spec_accepted_per_pos = Counter(
            "tandem_spec_decode_num_accepted_tokens_per_pos_total",
            "Accepted draft tokens by draft position (0 = first drafted token).",
            ["position"],
            registry=registry,
        )

        # -- backends (hooks for the remote verifier, fallbacks and split mode) --------
        self.verifier_errors = Counter(
            "tandem_verifier_errors_total",
            "Verifier failures seen by the gateway, by kind (unavailable, timeout, protocol, other).",
            ["kind"],
            registry=registry,
        )
        self.fallbacks = Counter(
            "tandem_fallbacks_total",
            "Generations that switched decoding path, by reason (e.g. verifier_unavailable -> drafter-only).",
            ["reason"],
            registry=registry,
        )

        # -- remote verifiers (decoding.events.TransportEvent) --------------------------
        self.verifier_round_trips = Counter(
            "tandem_verifier_round_trips_total", "Successful exchanges with a remote verifier, by backend (vllm, split).",
            ["backend"], registry=registry,
        )  # fmt: skip
        self.verifier_bytes = Counter(
            "tandem_verifier_wire_bytes_total", "Bytes exchanged with a remote verifier, by backend and direction (up, down).",
            ["backend", "direction"], registry=registry,
        )  # fmt: skip
        self.verifier_retries = Counter(
            "tandem_verifier_retries_total", "Failed verifier exchanges that were retried, by backend.",
            ["backend"], registry=registry,
        )  # fmt: skip
        self.verifier_resyncs = Counter(
            "tandem_verifier_resyncs_total",
            "Rounds that re-sent the committed context in full (new server, evicted session, replay), by backend and reason.",
            ["backend", "reason"], registry=registry,
        )  # fmt: skip
        self.verifier_resync_tokens = Counter(
            "tandem_verifier_resync_tokens_total", "Context positions re-sent by resyncs, by backend.",
            ["backend"], registry=registry,
        )  # fmt: skip
        self.verifier_tail_mass = Histogram(
            "tandem_verifier_tail_mass",
            "Per round, the target probability mass outside the top-K a transport returned (the exactness bound of "
            "sampling over a top-K transport; 0 = exact).",
            buckets=(0.0, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 0.05, 0.1, 0.25, 0.5, 1.0), registry=registry,
        )  # fmt: skip

        # -- the split edge (docs/split-inference.md) -------------------------------------
        self.split_uplink_bytes = Counter(
            "tandem_split_uplink_bytes_total", "Bytes sent to split workers (frames)", registry=registry
        )
        self.split_downlink_bytes = Counter(
            "tandem_split_downlink_bytes_total", "Bytes received from split workers (frames)", registry=registry
        )
        self.split_tokens = Counter(
            "tandem_split_tokens_total",
            "Tokens committed by split sessions (bytes per token = rate(uplink_bytes) / rate(tokens))",
            registry=registry,
        )
        self.split_rounds = Counter("tandem_split_rounds_total", "Split round trips that succeeded", registry=registry)
        self.split_round_seconds = Histogram(
            "tandem_split_round_seconds", "Network round trip of one split step, worker compute included",
            buckets=SPLIT_ROUND_BUCKETS, registry=registry,
        )  # fmt: skip
        self.split_replays = Counter(
            "tandem_split_replays_total", "Contexts replayed to rebuild a worker's body cache, by reason", ["reason"],
            registry=registry,
        )  # fmt: skip
        self.split_replayed_tokens = Counter(
            "tandem_split_replayed_tokens_total", "Positions re-sent by replays", registry=registry
        )
        self.split_failures = Counter(
            "tandem_split_failures_total", "Split steps that failed (503 to the client), by reason", ["reason"],
            registry=registry,
        )  # fmt: skip
        self.split_sessions = Gauge("tandem_split_sessions_active", "Split sessions open on this edge", registry=registry)
        # -- the vLLM verifier: streaming instead of rounds, and the measured network (docs/vllm-verifier.md) --
        self.verifier_mode_switches = Counter(
            "tandem_verifier_mode_switches_total",
            "Requests that switched between speculative rounds and one stream from the verifier, by what they switched to",
            ["to"], registry=registry,
        )  # fmt: skip
        self.verifier_streamed_tokens = Counter(
            "tandem_verifier_streamed_tokens_total",
            "Tokens the verifier generated by itself on one stream (verifier-only, or while streaming beat rounds)",
            ["backend"], registry=registry,
        )  # fmt: skip
        self.verifier_rtt = Histogram(
            "tandem_verifier_rtt_seconds",
            "Per clean round, its time minus the server's own time on it: the network round trip plus HTTP handling",
            ["backend"], buckets=SPLIT_ROUND_BUCKETS, registry=registry,
        )  # fmt: skip
        # -- in-process models: continuous batching (decoding/batching.py) --
        self.forward_batch_size = Histogram(
            "tandem_forward_batch_size",
            "Requests in one forward pass of an in-process model (the verifier's verify passes, the drafter's steps)",
            ["model"], buckets=FORWARD_BATCH_BUCKETS, registry=registry,
        )  # fmt: skip
        self._export_label_sets(max_draft_tokens)

    def observe_batches(self, model: str, batcher) -> None:
        """Record the size of every forward pass ``batcher`` (a decoding.batching.ForwardBatcher) runs."""
        batcher.on_batch = self.forward_batch_size.labels(model).observe

    def _export_label_sets(self, max_draft_tokens: int) -> None:
        """Create every fixed-label series at zero (a labelled family has no sample until a child exists)."""
        for route in GENERATION_ROUTES:
            for status in STATUSES:
                for mode in MODES:
                    self.requests.labels(route, status, mode)
        for mode in MODES:
            self.generation_tokens.labels(mode)
            for reason in FINISHED_REASONS:
                self.requests_finished.labels(reason, mode)
        for reason in REJECTION_REASONS:
            self.requests_rejected.labels(reason)
        for position in range(max_draft_tokens):
            self.spec_accepted_per_pos.labels(position=str(position))
        for kind in VERIFIER_ERROR_KINDS:
            self.verifier_errors.labels(kind)
        for reason in FALLBACK_REASONS:
            self.fallbacks.labels(reason)
        for backend in BACKENDS:
            self.verifier_round_trips.labels(backend)
            self.verifier_retries.labels(backend)
            self.verifier_resync_tokens.labels(backend)
            for direction in ("up", "down"):
                self.verifier_bytes.labels(backend, direction)
            for reason in RESYNC_REASONS:
                self.verifier_resyncs.labels(backend, reason)
        for reason in RESYNC_REASONS:
            self.split_replays.labels(reason)
        for reason in SPLIT_FAILURE_REASONS:
            self.split_failures.labels(reason)
        for to in ("stream", "rounds"):
            self.verifier_mode_switches.labels(to)
        for backend in BACKENDS:
            self.verifier_streamed_tokens.labels(backend)
            self.verifier_rtt.labels(backend)
        for model in ("verifier", "drafter"):
            self.forward_batch_size.labels(model)

    # -- helpers used by the gateway ------------------------------------------------

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def observe_round(self, event: RoundEvent) -> None:
        """Record one round of one generation."""
        if event.fallback:
            self.fallbacks.labels(reason="verifier_unavailable").inc()
        if event.transport is not None:
            self.observe_transport(event.transport, event.emitted)
        if event.switched:
            self.verifier_mode_switches.labels(to=event.switched).inc()
        if event.streamed and event.transport is not None:
            self.verifier_streamed_tokens.labels(event.transport.backend).inc(event.emitted)
        if not event.verified:
            return
        self.verify_round_latency.observe(event.verify_s)
        if event.k > 0:
            self.spec_num_drafts.inc()
            self.spec_num_draft_tokens.inc(event.k)
            self.accepted_per_round.observe(event.accepted)
            self.draft_length.set(event.next_k)
            if event.accepted > 0:
                self.spec_num_accepted_tokens.inc(event.accepted)
                for pos in range(event.accepted):
                    self.spec_accepted_per_pos.labels(position=str(pos)).inc()

    def observe_transport(self, t: TransportEvent, emitted: int) -> None:
        """A remote verifier's round: wire bytes, retries, resyncs, the exactness bound."""
        self.verifier_round_trips.labels(t.backend).inc(t.round_trips)
        self.verifier_bytes.labels(t.backend, "up").inc(t.bytes_up)
        self.verifier_bytes.labels(t.backend, "down").inc(t.bytes_down)
        if t.retries:
            self.verifier_retries.labels(t.backend).inc(t.retries)
        if t.resync_reason is not None:
            self.verifier_resyncs.labels(t.backend, t.resync_reason).inc()
            self.verifier_resync_tokens.labels(t.backend).inc(t.resync_tokens)
        if t.tail_mass is not None:
            self.verifier_tail_mass.observe(t.tail_mass)
        if t.server_s is not None and t.round_trips == 1 and not t.retries:
            self.verifier_rtt.labels(t.backend).observe(max(0.0, t.round_s - t.server_s))
        if t.backend == "split":  # the split edge's own families, as the dashboard reads them
            self.split_uplink_bytes.inc(t.bytes_up)
            self.split_downlink_bytes.inc(t.bytes_down)
            self.split_tokens.inc(emitted)
            self.split_rounds.inc(t.round_trips)
            self.split_round_seconds.observe(t.round_s / max(t.round_trips, 1))
            if t.resync_reason is not None:
                self.split_replays.labels(t.resync_reason).inc()
                self.split_replayed_tokens.inc(t.resync_tokens)
