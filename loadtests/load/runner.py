"""A run: the workload sent through the client at the configured rate and concurrency, the server's counters
scraped around it; and a sweep of fixed-concurrency runs."""

from __future__ import annotations

import asyncio
import math
import random
import sys
import time
from collections import Counter
from dataclasses import asdict
from typing import Any

import httpx

from loadtests.load.client import RequestResult, resolve_model, send_request
from loadtests.load.config import RunConfig
from loadtests.load.report import METRICS, find_knee, summarize
from loadtests.load.scrape import scrape, spec_delta
from loadtests.load.workload import Prompt, TokenCounter, arrivals, default_tokenizer_dir, make_prompts


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
