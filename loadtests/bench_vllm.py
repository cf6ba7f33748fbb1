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

The model pair and the server process are shared with the test suite:
:func:`loadtests.vllm_pair.build_pair` and :class:`loadtests.vllm_server.VLLMServer`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
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


async def vllm_tokens_per_s(url: str, model: str, prompt: list[int], *, max_tokens: int, repeats: int) -> dict:
    """vLLM generating alone, streamed (what a user streaming from vLLM directly gets), greedy."""
    times, ids = [], None
    async with httpx.AsyncClient(base_url=url, timeout=600.0) as client:
        for r in range(repeats + 1):
            t0 = time.perf_counter()
            tokens = []
            async with client.stream("POST", "/v1/completions", json={
                "model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True,
                "return_token_ids": True, "stream": True,
            }) as resp:  # fmt: skip
                resp.raise_for_status()
                async for line in resp.aiter_lines():
                    if line.startswith("data:") and line[5:].strip() != "[DONE]":
                        tokens += json.loads(line[5:])["choices"][0].get("token_ids") or []
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

    tandem = VLLMServer(verifier_dir, port=args.port, extra_args=common, log_path=work / "tandem-verifier.log")
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
            verifier_dir, tandem=False, log_path=work / "vllm-specdecode.log",
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
    p.add_argument("--verifier", help="verifier model dir (default: build a tiny pair)")
    p.add_argument("--drafter", help="drafter model dir (default: build a tiny pair)")
    p.add_argument("--contexts", type=int, nargs="+", default=[256, 1024, 4096])
    p.add_argument("--rounds", type=int, default=30, help="verify rounds per context (tandem)")
    p.add_argument("--stock-rounds", type=int, default=6, help="verify rounds per context (stock)")
    p.add_argument("--skip-stock", action="store_true")
    p.add_argument("--skip-peer", action="store_true", help="do not start vLLM's in-engine speculative decoding")
    p.add_argument("--concurrency", type=int, nargs="*", default=[1, 4, 8], help="concurrent sessions to measure")
    p.add_argument("--only-concurrency", action="store_true", help="stop after the concurrency figures")
    p.add_argument("-k", type=int, default=4, help="draft tokens per round")
    p.add_argument("--rtts-ms", type=float, nargs="+", default=[0, 10, 50])
    p.add_argument("--gen-context", type=int, default=256, help="prompt length of the tokens/s runs")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--block-size", type=int, default=32)
    p.add_argument("--port", type=int, default=None)
    p.add_argument("--vllm-arg", action="append", default=[], help="extra argument for both vLLM servers (repeatable)")
    p.add_argument("--workdir", default="runs/bench_vllm")
    p.add_argument("--json", help="write the report as JSON here")
    args = p.parse_args(argv)
    report = run(args)
    print(format_report(report))
    write_json(report, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
