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

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import sys
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

METRICS = ("ttft", "tpot", "itl", "e2el")
METRIC_NAMES = {
    "ttft": "Time to First Token",
    "tpot": "Time per Output Token (excl. 1st token)",
    "itl": "Inter-token Latency (per chunk)",
    "e2el": "End-to-end Latency",
}
SPEC_PREFIXES = {"tandem": "tandem_spec_decode_", "vllm": "vllm:spec_decode_"}


# -- configuration -------------------------------------------------------------------------------


@dataclass
class RunConfig:
    base_url: str = "http://127.0.0.1:8000"
    endpoint: str = "/v1/completions"
    model: str | None = None
    api_key: str | None = None
    dataset: str = "heldout"
    input_len: int = 128
    output_len: int = 64
    num_prompts: int = 200
    request_rate: float = math.inf
    burstiness: float = 1.0
    max_concurrency: int | None = None
    duration: float | None = None
    seed: int = 0
    temperature: float = 0.0
    ignore_eos: bool = False
    extra_body: dict[str, Any] = field(default_factory=dict)
    goodput: dict[str, float] = field(default_factory=dict)
    percentiles: tuple[float, ...] = (50.0, 90.0, 99.0)
    timeout: float = 300.0
    metrics_url: str | None = ""  # "" = base_url + /metrics; None = do not scrape
    tokenizer: str | None = None
    label: str | None = None
    probe: bool = True
    progress: bool = True

    @property
    def chat(self) -> bool:
        return "chat" in self.endpoint

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("api_key")
        d["request_rate"] = "inf" if math.isinf(self.request_rate) else self.request_rate
        return d


def parse_goodput(items: Sequence[str] | None) -> dict[str, float]:
    """``["ttft:500", "tpot:50"]`` -> ``{"ttft": 500.0, "tpot": 50.0}`` (milliseconds)."""
    out: dict[str, float] = {}
    for item in items or ():
        name, sep, value = item.partition(":")
        if not sep or name not in ("ttft", "tpot", "e2el"):
            raise argparse.ArgumentTypeError(f"--goodput takes ttft:MS, tpot:MS or e2el:MS, got {item!r}")
        try:
            out[name] = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"--goodput {item!r}: {value!r} is not a number of milliseconds") from None
        if out[name] <= 0:
            raise argparse.ArgumentTypeError(f"--goodput {item!r}: the SLO must be > 0 ms")
    return out


# -- prompts -------------------------------------------------------------------------------------


class TokenCounter:
    """A Hugging Face ``tokenizer.json`` loaded with ``tokenizers`` (fast; no torch)."""

    def __init__(self, directory: str | Path):
        from tokenizers import Tokenizer

        path = Path(directory)
        path = path / "tokenizer.json" if path.is_dir() else path
        if not path.is_file():
            raise SystemExit(f"load: no tokenizer.json at {path} (pass --tokenizer DIR of the served model)")
        self.tok = Tokenizer.from_file(str(path))
        self.path = path

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()


def default_tokenizer_dir() -> Path:
    """The served default's tokenizer: the demo pair (or the tiny fallback pair tandem builds)."""
    from decoding.default_models import default_pair

    return default_pair()[1]


@dataclass
class Prompt:
    text: str
    tokens: int


def heldout_files(seed: int = 0, heldout_fraction: float = 0.1) -> list[Path]:
    """The demo pair's held-out files (never trained on), chosen exactly as ``decoding.offline.training.split_corpus``
    chooses them (this interpreter's stdlib ``.py`` files, seeded shuffle), without importing torch.
    tests/deploy checks that the two agree."""
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    order = sorted(p for p in root.glob("*.py") if p.is_file())
    random.Random(seed).shuffle(order)
    return sorted(order[: max(1, round(heldout_fraction * len(order)))])


def heldout_texts(seed: int = 0) -> list[str]:
    return [f.read_text(encoding="utf-8", errors="replace") for f in heldout_files(seed)]


def make_prompts(cfg: RunConfig, tok: TokenCounter, n: int) -> list[Prompt]:
    """``n`` prompts of about ``input_len`` tokens (exactly, under ``tok``, for held-out text)."""
    rng = random.Random(cfg.seed)
    prompts: list[Prompt] = []
    if cfg.dataset == "random":
        # vLLM's random dataset: uniformly random token ids, decoded to text.
        special = {i for i in range(tok.vocab_size) if tok.tok.id_to_token(i) in ("<|endoftext|>", "<|pad|>")}
        ids_pool = [i for i in range(tok.vocab_size) if i not in special]
        for _ in range(n):
            ids = [rng.choice(ids_pool) for _ in range(cfg.input_len)]
            text = tok.decode(ids)
            prompts.append(Prompt(text, len(tok.encode(text))))
        return prompts
    if cfg.dataset != "heldout":
        raise SystemExit(f"load: unknown dataset {cfg.dataset!r} (heldout or random)")
    per_file = []
    for text in heldout_texts(0):
        starts = [0] + [i + 1 for i, c in enumerate(text) if c == "\n" and i + 1 < len(text)]
        per_file.append((text, starts))
    attempts = 0
    while len(prompts) < n and attempts < 100 * n + 100:
        text, starts = per_file[attempts % len(per_file)]
        attempts += 1
        pos = starts[rng.randrange(len(starts))]
        ids = tok.encode(text[pos : pos + 8 * cfg.input_len + 64])
        if len(ids) >= cfg.input_len:
            prompts.append(Prompt(tok.decode(ids[: cfg.input_len]), cfg.input_len))
    if len(prompts) < n:
        raise SystemExit(f"load: the held-out files yield only {len(prompts)} prompts of {cfg.input_len} tokens")
    return prompts


# -- one request ---------------------------------------------------------------------------------


@dataclass
class RequestResult:
    start: float  # seconds from the start of the run to sending the request
    status: str  # "200" when successful; an HTTP status, "timeout", "connect_error", "stream_error", ...
    latency: float  # seconds from sending to the end of the response (e2e for successes)
    ttft: float | None = None
    itl: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    output_tokens: int = 0
    error: str = ""

    @property
    def success(self) -> bool:
        return self.status == "200"

    @property
    def tpot(self) -> float | None:
        if not self.success or self.ttft is None or self.output_tokens <= 1:
            return None
        return (self.latency - self.ttft) / (self.output_tokens - 1)


def request_body(cfg: RunConfig, model: str, prompt: Prompt) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": model,
        "max_tokens": cfg.output_len,
        "temperature": cfg.temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if cfg.chat:
        body["messages"] = [{"role": "user", "content": prompt.text}]
    else:
        body["prompt"] = prompt.text
    if cfg.ignore_eos:
        body["ignore_eos"] = True
    body.update(cfg.extra_body)
    return body


async def send_request(
    client: httpx.AsyncClient, cfg: RunConfig, model: str, prompt: Prompt, t_run: float, tok: TokenCounter | None
) -> RequestResult:
    """One streamed request, timed as ``vllm bench serve`` times it."""
    st = time.perf_counter()
    result = RequestResult(start=st - t_run, status="", latency=0.0, prompt_tokens=prompt.tokens)
    text_parts: list[str] = []
    usage_tokens: int | None = None
    done = False
    try:
        async with client.stream("POST", cfg.endpoint, json=request_body(cfg, model, prompt)) as resp:
            if resp.status_code != 200:
                body = (await resp.aread()).decode("utf-8", "replace")
                result.status = str(resp.status_code)
                result.latency = time.perf_counter() - st
                try:
                    result.error = json.loads(body)["error"]["message"][:300]
                except (ValueError, KeyError, TypeError):
                    result.error = body[:300]
                return result
            last = st
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    done = True
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    err = chunk["error"]
                    result.status = "stream_error"
                    result.error = str(err.get("message", err) if isinstance(err, dict) else err)[:300]
                    result.latency = time.perf_counter() - st
                    return result
                if choices := chunk.get("choices"):
                    now = time.perf_counter()
                    if result.ttft is None:
                        result.ttft = now - st
                    else:
                        result.itl.append(now - last)
                    last = now
                    c = choices[0]
                    text_parts.append(c.get("text") or (c.get("delta") or {}).get("content") or "")
                elif usage := chunk.get("usage"):
                    usage_tokens = usage.get("completion_tokens")
                    if usage.get("prompt_tokens") is not None:
                        result.prompt_tokens = usage["prompt_tokens"]
        result.latency = time.perf_counter() - st
        if not done:
            result.status, result.error = "truncated", "the stream ended without data: [DONE]"
            return result
        result.status = "200"
        if usage_tokens is not None:
            result.output_tokens = usage_tokens
        elif tok is not None:
            result.output_tokens = len(tok.encode("".join(text_parts)))
        else:
            result.output_tokens = len(result.itl) + (result.ttft is not None)
    except httpx.TimeoutException as exc:
        result.status, result.error = "timeout", f"{type(exc).__name__} after {time.perf_counter() - st:.1f}s"
    except httpx.ConnectError as exc:
        result.status, result.error = "connect_error", str(exc)[:300]
    except (httpx.HTTPError, ValueError) as exc:  # protocol errors, bad JSON in the stream
        result.status, result.error = "protocol_error", f"{type(exc).__name__}: {exc}"[:300]
    if not result.latency:
        result.latency = time.perf_counter() - st
    return result


# -- the server's /metrics -------------------------------------------------------------------------


def scrape(url: str | None, headers: dict[str, str] | None = None) -> dict[str, Any] | None:
    """Speculative-decoding counters from a Prometheus text endpoint (None when unreachable)."""
    if not url:
        return None
    from prometheus_client.parser import text_string_to_metric_families

    try:
        resp = httpx.get(url, timeout=10, headers=headers)
        if resp.status_code != 200:
            return None
        families = list(text_string_to_metric_families(resp.text))
    except (httpx.HTTPError, ValueError):
        return None
    out: dict[str, Any] = {}
    for fam in families:
        for s in fam.samples:
            for source, prefix in SPEC_PREFIXES.items():
                if not s.name.startswith(prefix) or not s.name.endswith("_total"):
                    continue
                key = s.name[len(prefix) : -len("_total")]
                d = out.setdefault(source, {"per_pos": {}})
                if key == "num_accepted_tokens_per_pos":
                    pos = s.labels.get("position", "?")
                    d["per_pos"][pos] = d["per_pos"].get(pos, 0.0) + s.value
                elif key in ("num_drafts", "num_draft_tokens", "num_accepted_tokens"):
                    d[key] = d.get(key, 0.0) + s.value
            if s.name == "tandem_generation_tokens_total":
                mode = s.labels.get("mode", "")
                out.setdefault("tandem_generation_tokens", {})[mode] = s.value
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
        res["tandem_generation_tokens"] = {m: v - gb.get(m, 0.0) for m, v in after["tandem_generation_tokens"].items()}
    return res


# -- a run -----------------------------------------------------------------------------------------


def arrival_gap(rate: float, burstiness: float, rng: random.Random) -> float:
    """Seconds to the next request: gamma(shape=burstiness, scale=1/(rate*burstiness)), mean 1/rate, as vLLM.
    Burstiness 1 gives exponential gaps (a Poisson process); the coefficient of variation is 1/sqrt(burstiness)."""
    if math.isinf(rate):
        return 0.0
    return rng.gammavariate(burstiness, 1.0 / (rate * burstiness))


async def arrivals(cfg: RunConfig, n_prompts: int, rng: random.Random) -> AsyncIterator[int]:
    """Prompt indices at the request rate (gamma gaps, as vLLM), until num_prompts or duration."""
    t0 = time.perf_counter()
    i = 0
    while True:
        if cfg.duration is not None:
            if time.perf_counter() - t0 >= cfg.duration:
                return
        elif i >= cfg.num_prompts:
            return
        yield i % n_prompts
        i += 1
        if not math.isinf(cfg.request_rate):
            await asyncio.sleep(arrival_gap(cfg.request_rate, cfg.burstiness, rng))


def resolve_model(client: httpx.Client) -> str:
    resp = client.get("/v1/models")
    resp.raise_for_status()
    return resp.json()["data"][0]["id"]


async def run_load(
    cfg: RunConfig, prompts: list[Prompt], model: str, tok: TokenCounter | None, metrics_url: str | None = None
) -> tuple[list[RequestResult], float, dict[str, Any]]:
    """Send the run's requests; return the results, the duration and the /metrics deltas (probe excluded)."""
    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=cfg.max_concurrency or 100)
    timeout = httpx.Timeout(cfg.timeout, connect=min(cfg.timeout, 30.0))
    results: list[RequestResult] = []
    rng = random.Random(cfg.seed + 1)
    async with httpx.AsyncClient(base_url=cfg.base_url, headers=headers, timeout=timeout, limits=limits) as client:
        if cfg.probe:
            probe = await send_request(client, cfg, model, prompts[0], time.perf_counter(), tok)
            if not probe.success:
                raise SystemExit(f"load: the initial test request failed with {probe.status}: {probe.error}")
        before = await asyncio.to_thread(scrape, metrics_url)
        bar = None
        if cfg.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=None if cfg.duration else cfg.num_prompts, unit="req", dynamic_ncols=True, file=sys.stderr)
        errors: Counter[str] = Counter()
        tokens = 0
        sem = asyncio.Semaphore(cfg.max_concurrency) if cfg.max_concurrency else None
        closed_loop = sem is not None and math.isinf(cfg.request_rate)

        def done(r: RequestResult) -> None:
            nonlocal tokens
            results.append(r)
            tokens += r.output_tokens
            if not r.success:
                errors[r.status] += 1
            if bar is not None:
                bar.update(1)
                elapsed = max(time.perf_counter() - t_run, 1e-9)
                post = {"out_tok/s": f"{tokens / elapsed:.0f}", "errors": sum(errors.values())}
                post.update({f"e{k}": v for k, v in errors.most_common(3)})
                bar.set_postfix(post, refresh=False)

        async def one(idx: int, acquired: bool) -> None:
            try:
                if sem is not None and not acquired:
                    async with sem:
                        r = await send_request(client, cfg, model, prompts[idx], t_run, tok)
                else:
                    r = await send_request(client, cfg, model, prompts[idx], t_run, tok)
            finally:
                if acquired:
                    sem.release()
            done(r)

        tasks: list[asyncio.Task] = []
        t_run = time.perf_counter()
        async for idx in arrivals(cfg, len(prompts), rng):
            if closed_loop:
                await sem.acquire()
                if cfg.duration is not None and time.perf_counter() - t_run >= cfg.duration:
                    sem.release()
                    break
            tasks.append(asyncio.create_task(one(idx, closed_loop)))
        await asyncio.gather(*tasks)
        duration = time.perf_counter() - t_run
        if bar is not None:
            bar.close()
        after = await asyncio.to_thread(scrape, metrics_url)
    return results, duration, spec_delta(before, after)


def _pct(values: Sequence[float], q: float) -> float | None:
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
            out[f"p{q:g}_{m}_ms"] = _pct(v, q)
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
        s: {"count": len(v), "mean": float(np.mean(v)), "p50": _pct(v, 50), "p90": _pct(v, 90), "p99": _pct(v, 99), "max": max(v)}
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


def prepare(cfg: RunConfig) -> tuple[list[Prompt], str, TokenCounter]:
    tok = TokenCounter(cfg.tokenizer or default_tokenizer_dir())
    n = cfg.num_prompts if cfg.duration is None else max(cfg.num_prompts, 1)
    prompts = make_prompts(cfg, tok, n)
    model = cfg.model
    if model is None:
        headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
        with httpx.Client(base_url=cfg.base_url, headers=headers, timeout=30) as c:
            model = resolve_model(c)
    return prompts, model, tok


def run(cfg: RunConfig, prepared: tuple[list[Prompt], str, TokenCounter] | None = None) -> dict[str, Any]:
    """Run one load test and return its summary (what ``--json`` writes)."""
    prompts, model, tok = prepared or prepare(cfg)
    metrics_url = cfg.base_url.rstrip("/") + "/metrics" if cfg.metrics_url == "" else cfg.metrics_url
    results, duration, spec = asyncio.run(run_load(cfg, prompts, model, tok, metrics_url))
    res = summarize(cfg, results, duration, spec)
    res["model"] = model
    res["base_url"] = cfg.base_url
    res["endpoint"] = cfg.endpoint
    return res


# -- sweep: the throughput knee ------------------------------------------------------------------


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


def sweep(cfg: RunConfig, concurrencies: list[int], per_level: int, level_duration: float | None) -> dict[str, Any]:
    levels = []
    prepared = prepare(cfg)
    for c in concurrencies:
        lc = RunConfig(**{**asdict(cfg), "max_concurrency": c, "request_rate": math.inf, "label": f"c={c}"})
        lc.num_prompts, lc.duration = max(per_level * c, c), level_duration
        if cfg.progress:
            print(f"concurrency {c}:", file=sys.stderr)
        res = run(lc, prepared)
        levels.append({
            "concurrency": c,
            "completed": res["completed"],
            "failed": res["failed"],
            "errors_by_status": res["errors_by_status"],
            "request_throughput": res["request_throughput"],
            "output_throughput": res["output_throughput"],
            **{k: res.get(k) for m in METRICS for k in (f"median_{m}_ms", f"p99_{m}_ms")},
            "spec_decode": res["spec_decode"],
        })  # fmt: skip
        prepared = (prepared[0], res["model"], prepared[2])
    return {"kind": "sweep", "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "config": cfg.to_json(), "levels": levels, "knee": find_knee(levels)}


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


# -- plots ----------------------------------------------------------------------------------------


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


def _name(res: dict[str, Any], fallback: str) -> str:
    return res.get("label") or res.get("base_url", fallback)


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
    fig.suptitle(f"{_name(res, 'run')}: {res['completed']} ok, {res['failed']} failed, {res['output_throughput']:.1f} out tok/s")
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
    na, nb = _name(a, "A"), _name(b, "B")
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


COMPARE_KEYS = [
    ("completed", "Successful requests", 0),
    ("failed", "Failed requests", 0),
    ("request_throughput", "Request throughput (req/s)", 2),
    ("request_goodput", "Request goodput (req/s)", 2),
    ("output_throughput", "Output token throughput (tok/s)", 1),
    *[(f"{s}_{m}_ms", f"{s.capitalize()} {m.upper()} (ms)", 1) for m in METRICS for s in ("median", "p99")],
]


def format_compare(a: dict[str, Any], b: dict[str, Any]) -> str:
    na, nb = _name(a, "A")[:22], _name(b, "B")[:22]
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


# -- command line ---------------------------------------------------------------------------------


def _rate(value: str) -> float:
    v = float(value)
    if not v > 0:
        raise argparse.ArgumentTypeError("--request-rate must be > 0 (or inf)")
    return v


def _add_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base-url", default="http://127.0.0.1:8000", help="server root, e.g. http://127.0.0.1:8000 (default)")
    p.add_argument("--endpoint", default="/v1/completions", help="/v1/completions (default) or /v1/chat/completions")
    p.add_argument("--model", help="model name (default: the first of GET /v1/models)")
    p.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"), help="bearer key (default: $OPENAI_API_KEY)")
    p.add_argument("--dataset", choices=["heldout", "random"], default="heldout",
                   help="heldout: windows of the demo pair's held-out text (default); random: random token ids, as vLLM's random dataset")  # fmt: skip
    p.add_argument("--input-len", type=int, default=128, help="prompt tokens (default: 128)")
    p.add_argument("--output-len", type=int, default=64, help="max_tokens per request (default: 64)")
    p.add_argument("--num-prompts", type=int, default=200, help="requests to send (with --duration: distinct prompts cycled)")
    p.add_argument("--request-rate", type=_rate, default=math.inf, help="requests per second, open loop (default: inf = all at once)")
    p.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of the arrival gaps: 1 = Poisson (default), <1 burstier")
    p.add_argument("--max-concurrency", type=int, help="most requests in flight (with --request-rate inf: a fixed-concurrency run)")
    p.add_argument("--duration", type=float, metavar="S", help="send requests for S seconds instead of --num-prompts")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (default: 0, greedy)")
    p.add_argument("--ignore-eos", action="store_true", help="vLLM extra: always generate --output-len tokens")
    p.add_argument("--extra-body", type=json.loads, default={}, metavar="JSON", help='merged into every request, e.g. \'{"tandem": {"mode": "split"}}\'')
    p.add_argument("--goodput", nargs="+", metavar="NAME:MS", help="SLOs for goodput: ttft:MS tpot:MS e2el:MS")
    p.add_argument("--percentiles", default="50,90,99", help="percentiles to report (default: 50,90,99)")
    p.add_argument("--timeout", type=float, default=300.0, help="client timeout per request, s (a timeout counts as an error)")
    p.add_argument("--metrics-url", default="", help="Prometheus endpoint scraped before/after (default: BASE_URL/metrics; 'none' = off)")
    p.add_argument("--tokenizer", help="tokenizer directory for prompt lengths (default: tandem's default pair)")
    p.add_argument("--label", help="name of this run in tables and plots")
    p.add_argument("--no-probe", dest="probe", action="store_false", help="skip the initial single test request")
    p.add_argument("--disable-tqdm", dest="progress", action="store_false", help="no progress bar")


def _config(args: argparse.Namespace) -> RunConfig:
    if args.max_concurrency is not None and args.max_concurrency < 1:
        raise SystemExit("load: --max-concurrency must be >= 1")
    if args.burstiness <= 0:
        raise SystemExit("load: --burstiness must be > 0")
    try:
        goodput = parse_goodput(args.goodput)
    except argparse.ArgumentTypeError as exc:
        raise SystemExit(f"load: {exc}") from None
    return RunConfig(
        base_url=args.base_url.rstrip("/"),
        endpoint=args.endpoint,
        model=args.model,
        api_key=args.api_key,
        dataset=args.dataset,
        input_len=args.input_len,
        output_len=args.output_len,
        num_prompts=args.num_prompts,
        request_rate=args.request_rate,
        burstiness=args.burstiness,
        max_concurrency=args.max_concurrency,
        duration=args.duration,
        seed=args.seed,
        temperature=args.temperature,
        ignore_eos=args.ignore_eos,
        extra_body=args.extra_body,
        goodput=goodput,
        percentiles=tuple(float(x) for x in args.percentiles.split(",") if x),
        timeout=args.timeout,
        metrics_url=None if args.metrics_url == "none" else args.metrics_url,
        tokenizer=args.tokenizer,
        label=args.label,
        probe=args.probe,
        progress=args.progress,
    )


def write_json(res: dict[str, Any], path: str | None) -> None:
    """Write a run's or benchmark's results to ``path`` (nothing when None), creating its folder."""
    if path:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(res, indent=2) + "\n")
        print(f"wrote {p}", file=sys.stderr)


def build_parser(prog: str = "python -m loadtests") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Load generator for OpenAI-compatible LLM servers (vllm bench serve's definitions). "
        "Subcommands: run (default), sweep, plot, compare.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    r = sub.add_parser("run", help="one load test", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_run_args(r)
    r.add_argument("--json", metavar="FILE", help="write the result (with per-request records) as JSON")
    r.add_argument("--plot", metavar="PNG", help="write the run's plots")
    r.add_argument("--fail-on-error", action="store_true", help="exit 1 if any request failed")
    s = sub.add_parser("sweep", help="fixed-concurrency levels: throughput and the knee (p99 ITL doubles)")
    _add_run_args(s)
    s.add_argument("--concurrency", default="1,2,4,8,16,32", help="levels (default: 1,2,4,8,16,32)")
    s.add_argument("--prompts-per-level", type=int, default=8, help="requests per level = this x concurrency (default: 8)")
    s.add_argument("--level-duration", type=float, metavar="S", help="run each level for S seconds instead")
    s.add_argument("--json", metavar="FILE")
    s.add_argument("--plot", metavar="PNG")
    p = sub.add_parser("plot", help="plot a saved run or sweep")
    p.add_argument("result", help="JSON written by run --json or sweep --json")
    p.add_argument("--out", required=True, metavar="PNG")
    c = sub.add_parser("compare", help="compare two saved runs (table, optional PNG)")
    c.add_argument("a")
    c.add_argument("b")
    c.add_argument("--plot", metavar="PNG")
    return parser


def main(argv: list[str] | None = None, prog: str = "python -m loadtests") -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] not in ("run", "sweep", "plot", "compare", "-h", "--help"):
        argv.insert(0, "run")  # `run` is the default subcommand
    args = build_parser(prog).parse_args(argv)
    if args.command == "plot":
        res = json.loads(Path(args.result).read_text())
        print(f"wrote {plot_run(res, args.out)}")
        return 0
    if args.command == "compare":
        a, b = (json.loads(Path(x).read_text()) for x in (args.a, args.b))
        print(format_compare(a, b))
        if args.plot:
            print(f"wrote {plot_compare(a, b, args.plot)}")
        return 0
    cfg = _config(args)
    if args.command == "sweep":
        levels = [int(x) for x in args.concurrency.split(",") if x]
        res = sweep(cfg, levels, args.prompts_per_level, args.level_duration)
        print(format_sweep(res))
        write_json(res, args.json)
        if args.plot:
            print(f"wrote {plot_sweep(res, args.plot)}", file=sys.stderr)
        return 0
    res = run(cfg)
    print(format_table(res))
    write_json(res, args.json)
    if args.plot:
        print(f"wrote {plot_run(res, args.plot)}", file=sys.stderr)
    return 1 if args.fail_on_error and res["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
