"""Gateway overhead: the decoding core called in-process vs the same work through `tandem serve`.

For each concurrency level (default 1 and 8), the same prompts are generated
twice with identical settings (greedy, ``ignore_eos``, fixed ``max_tokens``,
so both paths do exactly the same model work):

* **direct**: ``router.stream()`` in this process, C concurrent asyncio tasks;
* **http**: a ``tandem serve`` subprocess with the same models, C concurrent
  streaming clients (httpx, ``stream_options.include_usage``).

Definitions are ``vllm bench serve``'s (see loadtests/load/):

* TTFT: request sent -> first chunk carrying tokens (direct: first router chunk);
* TPOT = (e2e - TTFT) / (output tokens - 1), per request: the per-token latency;
* ITL: gaps between consecutive chunks, **per chunk** (one chunk = one speculative
  round, often several tokens);
* req/s and tok/s over the wall time of the run.

Gateway overhead = TPOT(http) / TPOT(direct) - 1, on the mean and the median; the
target is < 5 % at 1 and at 8 concurrent streams. The two paths alternate
(``--repeat``) so that drift of a shared machine hits both alike.

``--soak-minutes M`` instead drives the server at ``--soak-concurrency`` for M
minutes and reports failed requests and the server's resident memory
(``process_resident_memory_bytes`` from /metrics) after warm-up vs at the end.

    python -m loadtests.bench_gateway --json runs/gateway.json
    python -m loadtests.bench_gateway --concurrency 1 8 --requests 48 --max-tokens 96 --repeat 2
    python -m loadtests.bench_gateway --soak-minutes 30 --soak-concurrency 4 --json runs/soak.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from tqdm import tqdm

from loadtests import prometheus
from loadtests.load.report import percentile, write_json
from loadtests.procs import ServerProcess, free_port


@dataclass
class Sample:
    ttft: float
    e2e: float
    tokens: int
    itl: list[float] = field(default_factory=list)
    ok: bool = True

    @property
    def tpot(self) -> float | None:
        return (self.e2e - self.ttft) / (self.tokens - 1) if self.tokens > 1 else None


def summary_ms(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"mean": None, "median": None, "p99": None}
    return {
        "mean": statistics.fmean(values) * 1e3,
        "median": percentile(values, 50) * 1e3,
        "p99": percentile(values, 99) * 1e3,
    }


def report(path: str, concurrency: int, samples: list[Sample], wall: float) -> dict:
    ok = [s for s in samples if s.ok]
    tokens = sum(s.tokens for s in ok)
    return {
        "path": path,
        "concurrency": concurrency,
        "requests": len(samples),
        "failed": len(samples) - len(ok),
        "output_tokens": tokens,
        "wall_s": wall,
        "req_per_s": len(ok) / wall,
        "tok_per_s": tokens / wall,
        "ttft_ms": summary_ms([s.ttft for s in ok]),
        "tpot_ms": summary_ms([s.tpot for s in ok if s.tpot is not None]),
        "itl_ms": summary_ms([g for s in ok for g in s.itl]),
        "e2e_ms": summary_ms([s.e2e for s in ok]),
    }


# -- prompts ---------------------------------------------------------------------------------------


def make_prompts(n: int, chars: int) -> list[str]:
    """Deterministic prompts: snippets of this interpreter's standard library (every machine has it)."""
    import sysconfig

    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[-60:]  # not the tiny tokenizer's training files
    prompts = []
    for i in range(n):
        text = files[i % len(files)].read_text(encoding="utf-8", errors="replace")
        start = (i * 997) % max(1, len(text) - chars)
        prompts.append(text[start : start + chars])
    return prompts


# -- direct ------------------------------------------------------------------------------------------


async def run_direct(router, prompts: list[str], concurrency: int, max_tokens: int, options, desc: str) -> dict:
    from decoding.sampling import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    encoded = [router.encode(p) for p in prompts]
    todo = list(range(len(prompts)))
    samples: list[Sample] = []
    bar = tqdm(total=len(prompts), desc=desc, leave=False)

    async def worker() -> None:
        while todo:
            ids = encoded[todo.pop()]
            t0 = time.perf_counter()
            first = last = None
            itl: list[float] = []
            n = 0
            async for chunk in router.stream(ids, params, options):
                now = time.perf_counter()
                if chunk.token_ids:
                    if first is None:
                        first = now
                    else:
                        itl.append(now - last)
                    last = now
                    n += len(chunk.token_ids)
            samples.append(Sample(ttft=first - t0, e2e=time.perf_counter() - t0, tokens=n, itl=itl))
            bar.update()

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - t0
    bar.close()
    return report("direct", concurrency, samples, wall)


# -- http ---------------------------------------------------------------------------------------------


async def stream_one(client: httpx.AsyncClient, prompt: str, max_tokens: int, model: str) -> Sample:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
    t0 = time.perf_counter()
    first = last = None
    itl: list[float] = []
    tokens = 0
    try:
        async with client.stream("POST", "/v1/completions", json=body) as r:
            if r.status_code != 200:
                await r.aread()
                return Sample(0, time.perf_counter() - t0, 0, ok=False)
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                now = time.perf_counter()
                data = json.loads(line[6:])
                if "error" in data:
                    return Sample(0, now - t0, 0, ok=False)
                if data.get("usage"):
                    tokens = data["usage"]["completion_tokens"]
                if data["choices"] and (data["choices"][0]["text"] or data["choices"][0]["finish_reason"]):
                    if first is None:
                        first = now
                    else:
                        itl.append(now - last)
                    last = now
    except httpx.HTTPError:
        return Sample(0, time.perf_counter() - t0, 0, ok=False)
    return Sample(ttft=(first or time.perf_counter()) - t0, e2e=time.perf_counter() - t0, tokens=tokens, itl=itl,
                  ok=first is not None and tokens > 0)  # fmt: skip


async def run_http(base_url: str, prompts: list[str], concurrency: int, max_tokens: int, model: str, desc: str) -> dict:
    todo = list(range(len(prompts)))
    samples: list[Sample] = []
    bar = tqdm(total=len(prompts), desc=desc, leave=False)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base_url, timeout=600, limits=limits) as client:

        async def worker() -> None:
            while todo:
                samples.append(await stream_one(client, prompts[todo.pop()], max_tokens, model))
                bar.update()

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    bar.close()
    return report("http", concurrency, samples, wall)


# -- the server -----------------------------------------------------------------------------------------


class Server(ServerProcess):
    """``tandem serve`` with the benchmark's models, ``concurrency`` slots and a queue of 256."""

    def __init__(self, args: argparse.Namespace, concurrency: int):
        port = free_port()
        cmd = [sys.executable, "-m", "service.cli", "serve", "--port", str(port), "--mode", args.mode,
               "--max-concurrency", str(concurrency), "--max-queue", "256", "--log-level", "warning"]  # fmt: skip
        if args.verifier:
            cmd += ["--verifier", args.verifier]
        if args.drafter:
            cmd += ["--drafter", args.drafter]
        env = dict(os.environ)
        if args.threads:
            env["OMP_NUM_THREADS"] = str(args.threads)
        super().__init__(cmd, port=port, log_path=args.server_log, name="tandem serve", env=env)
        self.spawn().wait_http("/ready", timeout=300)

    def rss_bytes(self) -> float:
        samples = prometheus.fetch(self.url + "/metrics", timeout=30)
        return samples.get(("process_resident_memory_bytes", ()), float("nan"))

    def stop(self, timeout: float = 60.0) -> int:
        return super().stop(timeout)


# -- runs -------------------------------------------------------------------------------------------------


def build_router(args: argparse.Namespace):
    from service.backends import build_backends, spec_options
    from service.config import TandemSettings

    settings = TandemSettings.load(verifier=args.verifier, drafter=args.drafter, mode=args.mode)
    backends = build_backends(settings)
    return backends, spec_options(settings)


def overhead(direct: dict, http: dict) -> dict:
    out = {}
    for stat in ("mean", "median"):
        d, h = direct["tpot_ms"][stat], http["tpot_ms"][stat]
        out[f"tpot_{stat}_pct"] = None if not d or h is None else (h / d - 1) * 100
    d, h = direct["ttft_ms"]["median"], http["ttft_ms"]["median"]
    out["ttft_median_added_ms"] = None if d is None or h is None else h - d
    return out


def merge(reports: list[dict]) -> dict:
    """Combine repeated runs of one (path, concurrency): medians of the per-run statistics."""
    if len(reports) == 1:
        return reports[0]
    out = dict(reports[0])
    for key in ("req_per_s", "tok_per_s", "wall_s"):
        out[key] = statistics.median(r[key] for r in reports)
    for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
        out[key] = {s: statistics.median(r[key][s] for r in reports if r[key][s] is not None) for s in reports[0][key]}
    out["requests"] = sum(r["requests"] for r in reports)
    out["failed"] = sum(r["failed"] for r in reports)
    out["repeats"] = len(reports)
    return out


async def bench(args: argparse.Namespace) -> dict:
    prompts = make_prompts(args.requests, args.prompt_chars)
    backends, options = build_router(args)
    router = backends.router
    server = Server(args, max(args.concurrency))
    model = "tandem"
    results: dict[int, dict[str, list[dict]]] = {c: {"direct": [], "http": []} for c in args.concurrency}
    try:
        warm = prompts[: max(2, max(args.concurrency))]
        await run_direct(router, warm, max(args.concurrency), args.max_tokens, options, "warm-up direct")
        await run_http(server.url, warm, max(args.concurrency), args.max_tokens, model, "warm-up http")
        for rep in range(args.repeat):
            for c in args.concurrency:
                order = ("direct", "http") if rep % 2 == 0 else ("http", "direct")
                for path in order:
                    desc = f"{path} c={c} ({rep + 1}/{args.repeat})"
                    if path == "direct":
                        r = await run_direct(router, prompts, c, args.max_tokens, options, desc)
                    else:
                        r = await run_http(server.url, prompts, c, args.max_tokens, model, desc)
                    results[c][path].append(r)
    finally:
        server.stop()
        await backends.aclose()
    rows = []
    comparison = {}
    for c in args.concurrency:
        d, h = merge(results[c]["direct"]), merge(results[c]["http"])
        rows += [d, h]
        comparison[str(c)] = overhead(d, h)
        # paired per repetition (each pair ran back to back): the spread shows the machine's noise
        paired = [overhead(dr, hr)["tpot_mean_pct"] for dr, hr in zip(results[c]["direct"], results[c]["http"])]
        comparison[str(c)]["tpot_mean_pct_per_repeat"] = paired
    raw = {str(c): results[c] for c in args.concurrency}
    return {"config": config_dict(args), "results": rows, "gateway_overhead": comparison, "runs": raw}


async def soak(args: argparse.Namespace) -> dict:
    prompts = make_prompts(max(64, args.requests), args.prompt_chars)
    server = Server(args, args.soak_concurrency)
    deadline = time.monotonic() + args.soak_minutes * 60
    samples: list[Sample] = []
    memory: list[tuple[float, float]] = []
    t_start = time.monotonic()
    bar = tqdm(total=int(args.soak_minutes * 60), desc="soak (s)", unit="s")
    limits = httpx.Limits(max_connections=args.soak_concurrency)
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=600, limits=limits) as client:
            i = 0

            async def worker() -> None:
                nonlocal i
                while time.monotonic() < deadline:
                    prompt = prompts[i % len(prompts)]
                    i += 1
                    samples.append(await stream_one(client, prompt, args.max_tokens, "tandem"))

            async def sampler() -> None:
                while time.monotonic() < deadline:
                    elapsed = time.monotonic() - t_start
                    memory.append((elapsed, await asyncio.to_thread(server.rss_bytes)))
                    bar.n = min(int(elapsed), bar.total)
                    bar.set_postfix(requests=len(samples), failed=sum(not s.ok for s in samples))
                    await asyncio.sleep(10)

            await asyncio.gather(sampler(), *(worker() for _ in range(args.soak_concurrency)))
        memory.append((time.monotonic() - t_start, server.rss_bytes()))
    finally:
        bar.close()
        exit_code = server.stop()
    wall = time.monotonic() - t_start
    warm = [m for t, m in memory if t >= min(120.0, wall / 4)]  # after warm-up
    baseline, end = (warm[0], warm[-1]) if warm else (float("nan"), float("nan"))
    return {
        "config": config_dict(args),
        "soak": report("http", args.soak_concurrency, samples, wall),
        "rss_mb": [(round(t, 1), round(m / 2**20, 1)) for t, m in memory],
        "rss_growth_pct": (end / baseline - 1) * 100,
        "server_exit_code": exit_code,
    }


def config_dict(args: argparse.Namespace) -> dict:
    from decoding.default_models import default_pair

    v, d = default_pair() if not (args.verifier and args.drafter) else (args.verifier, args.drafter)
    cfg = {k: v for k, v in vars(args).items() if k not in ("json",)}
    cfg.update(verifier=str(args.verifier or v), drafter=str(args.drafter or d), cpu_count=os.cpu_count())
    return cfg


def print_bench(r: dict) -> None:
    print(f"{'path':<7} {'C':>2} {'req/s':>7} {'tok/s':>8} {'TTFT p50':>9} {'TTFT p99':>9} {'TPOT mean':>10} "
          f"{'TPOT p50':>9} {'ITL p50':>8} {'ITL p99':>8} {'fail':>4}")  # fmt: skip
    for row in r["results"]:
        print(
            f"{row['path']:<7} {row['concurrency']:>2} {row['req_per_s']:>7.2f} {row['tok_per_s']:>8.1f} "
            f"{row['ttft_ms']['median']:>8.1f}ms {row['ttft_ms']['p99']:>7.1f}ms {row['tpot_ms']['mean']:>8.2f}ms "
            f"{row['tpot_ms']['median']:>7.2f}ms {row['itl_ms']['median']:>6.2f}ms {row['itl_ms']['p99']:>6.2f}ms "
            f"{row['failed']:>4}"
        )
    for c, o in r["gateway_overhead"].items():
        per = ", ".join(f"{x:+.1f}%" for x in o["tpot_mean_pct_per_repeat"])
        print(f"gateway overhead at {c} stream(s): TPOT mean {o['tpot_mean_pct']:+.1f}%, median {o['tpot_median_pct']:+.1f}%, "
              f"TTFT median {o['ttft_median_added_ms']:+.1f} ms (TPOT mean per repetition: {per})")  # fmt: skip


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m loadtests.bench_gateway",
        description="Gateway overhead: the decoding core in-process vs the same requests streamed through "
        "`tandem serve` (TTFT, TPOT, ITL p50/p99, req/s, tok/s); or a soak run (--soak-minutes).",
    )
    p.add_argument("--verifier", help="verifier model dir (default: the demo pair)")
    p.add_argument("--drafter", help="drafter model dir or 'ngram' (default: the demo pair)")
    p.add_argument("--mode", default="speculative", choices=["speculative", "verifier-only", "drafter-only"])
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8], help="concurrent streams (default: 1 8)")
    p.add_argument("--requests", type=int, default=32, help="requests per run (default: 32)")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens per request (default: 64)")
    p.add_argument("--prompt-chars", type=int, default=400, help="prompt length in characters (default: 400)")
    p.add_argument("--repeat", type=int, default=2, help="alternating repetitions of each run (default: 2)")
    p.add_argument("--threads", type=int, help="torch threads in both processes (default: torch's choice)")
    p.add_argument("--soak-minutes", type=float, help="run a soak of this length instead of the comparison")
    p.add_argument("--soak-concurrency", type=int, default=4, help="concurrent streams of the soak (default: 4)")
    p.add_argument("--server-log", metavar="PATH", help="write the server's log here")
    p.add_argument("--json", metavar="PATH", help="write the results as JSON")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.soak_minutes:
        result = asyncio.run(soak(args))
        s = result["soak"]
        print(f"soak: {s['requests']} requests, {s['failed']} failed, {s['tok_per_s']:.1f} tok/s, "
              f"TPOT p50 {s['tpot_ms']['median']:.2f} ms; RSS growth after warm-up {result['rss_growth_pct']:+.1f}%; "
              f"server exit {result['server_exit_code']}")  # fmt: skip
    else:
        result = asyncio.run(bench(args))
        print_bench(result)
    write_json(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
