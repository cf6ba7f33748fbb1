"""Load generator for OpenAI-compatible LLM servers, in the style of ``vllm bench serve``.

    python -m loadtests run --base-url http://127.0.0.1:8000 --num-prompts 200 --request-rate 4 \\
        --max-concurrency 16 --goodput ttft:500 tpot:50 --json runs/a.json --plot runs/a.png
    python -m loadtests run --max-concurrency 16 --request-rate inf --duration 600      # soak, closed loop
    python -m loadtests sweep --concurrency 1,2,4,8,16,32 --json runs/sweep.json        # the throughput knee
    python -m loadtests plot runs/a.json --out runs/a.png
    python -m loadtests compare runs/a.json runs/b.json --plot runs/a-vs-b.png
    tandem load ...                                                                     # the same tool

It talks to any OpenAI-compatible URL (tandem, vLLM alone, vLLM with in-engine
speculation), so the same run can be pointed at each for a side-by-side comparison.

Definitions are ``vllm bench serve``'s, so figures line up with the ones vLLM users quote:

* arrivals are open-loop at ``--request-rate`` req/s: gamma-distributed gaps with shape
  ``--burstiness`` and mean 1/rate (burstiness 1 = Poisson, < 1 burstier, > 1 more regular);
  ``inf`` sends everything at once. ``--max-concurrency`` caps requests in flight (the others
  wait on the client, and their clock starts when they are sent). With ``--request-rate inf``
  and ``--max-concurrency N`` this is a fixed-concurrency (closed-loop) run.
* TTFT: from sending the request to the first streamed chunk that carries ``choices``.
* ITL: the gaps between consecutive streamed chunks, **per chunk**, not per token. A tandem
  chunk usually carries every token of one speculative round (several tokens), so tandem's ITL
  is per round; the gateway's own ``tandem_inter_token_latency_seconds`` histogram is per token.
* TPOT = (e2e latency - TTFT) / (output tokens - 1), per request; output tokens come from the
  stream's ``usage`` (``stream_options.include_usage``).
* E2EL: from sending the request to the end of its stream.
* Goodput (``--goodput ttft:MS tpot:MS e2el:MS``): successful requests meeting every stated SLO,
  per second of the run.
* Percentiles are numpy's linear-interpolation percentiles over all requests (ITL: over all gaps).

What vLLM's tool does not do, and this one adds: error counts by HTTP status (429, 503, ...),
with the latency of the refused requests (an overloaded server should answer 429 fast), client
timeouts counted as ``timeout`` (never silent), and the server's speculative-decoding counters
scraped from ``/metrics`` before and after the run (``tandem_spec_decode_*``, and vLLM's own
``vllm:spec_decode_*`` when pointed at a vLLM with in-engine speculation): acceptance rate, mean
acceptance length and acceptance by draft position over exactly this run's traffic (plus anything
else the server did meanwhile).
"""

# One module a concept: config (RunConfig), workload (prompts, arrivals), client (one streamed request),
# scrape (the server's /metrics around a run), runner (a run, a sweep), report (the definitions, tables
# and JSON), plots (PNG), cli (python -m loadtests, tandem load).
from loadtests.load.cli import build_parser, main
from loadtests.load.client import RequestResult, request_body, resolve_model, send_request
from loadtests.load.config import RunConfig, parse_goodput
from loadtests.load.plots import plot_compare, plot_run, plot_sweep
from loadtests.load.report import (
    METRIC_NAMES,
    METRICS,
    find_knee,
    format_compare,
    format_sweep,
    format_table,
    percentile,
    summarize,
    write_json,
)
from loadtests.load.runner import prepare, run, run_load, sweep
from loadtests.load.scrape import SPEC_PREFIXES, scrape, spec_delta
from loadtests.load.workload import (
    Prompt,
    TokenCounter,
    arrival_gap,
    arrivals,
    default_tokenizer_dir,
    heldout_files,
    heldout_texts,
    make_prompts,
)

__all__ = [
    "METRICS", "METRIC_NAMES", "SPEC_PREFIXES", "Prompt", "RequestResult", "RunConfig", "TokenCounter", "arrival_gap",
    "arrivals", "build_parser", "default_tokenizer_dir", "find_knee", "format_compare", "format_sweep", "format_table",
    "heldout_files", "heldout_texts", "main", "make_prompts", "parse_goodput", "percentile", "plot_compare", "plot_run",
    "plot_sweep", "prepare", "request_body", "resolve_model", "run", "run_load", "scrape", "send_request", "spec_delta",
    "summarize", "sweep", "write_json",
]  # fmt: skip
