"""Benchmark of split inference: tokens/s split vs unsplit, plain vs speculative, at emulated RTTs.

    python -m loadtests.bench_split --json runs/bench_split.json

It starts a real ``tandem split-worker`` (layers a:b of the verifier) and puts
a :class:`loadtests.delay_proxy.DelayProxy` in front of it for each RTT (every
byte is delayed RTT/2 each way; the edge's keep-alive connection is opened
once per RTT setting and reused). Greedy decoding of the same held-out
prompts, four ways:

* ``unsplit plain``        the whole verifier on the edge, one token per forward (no network);
* ``unsplit speculative``  the same with the edge drafter (no network);
* ``split plain``          edge head/tail + worker body, one round trip per token;
* ``split speculative``    the edge drafter proposes k, one round trip verifies k+1 positions.

Every split run is checked token-identical to unsplit plain (wire dtype
"auto" = float32, noise 0). Bytes are the frames' sizes (HTTP headers not
counted), per generated token, prompt upload included.

Models: ``--verifier/--drafter``, else the demo pair (models/demo/), else
the tiny pair of ``loadtests.vllm_pair.build_pair`` (a drafter made from the
verifier's first layer, so acceptance is realistic rather than ~0).
Everything shares one machine: the worker, the edge and the drafter compete
for the same cores, so compute-bound figures (RTT 0) understate a real split.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
import tempfile
import time
from pathlib import Path

from loadtests.load.report import write_json
from loadtests.procs import REPO, ServerProcess, free_port


def pick_models(args) -> tuple[Path, Path, str]:
    if args.verifier and args.drafter:
        return Path(args.verifier), Path(args.drafter), "given"
    demo = REPO / "models" / "demo"
    if (demo / "verifier" / "config.json").is_file() and (demo / "drafter" / "config.json").is_file():
        return demo / "verifier", demo / "drafter", "demo pair (models/demo)"
    from loadtests.vllm_pair import build_pair

    out = Path(tempfile.mkdtemp(prefix="tandem-bench-split-"))
    v, d = build_pair(out)
    return v, d, "tiny pair of loadtests.vllm_pair.build_pair (demo pair absent)"


def prompts_for(verifier: Path, tokenizer, n: int, prompt_tokens: int, seed: int) -> list[list[int]]:
    """Prompts starting at line starts of held-out stdlib files (the demo's held-out files when recorded)."""
    from decoding.offline.split_audit import corpus_files

    _, held, _ = corpus_files(verifier)
    rng = random.Random(seed)
    out: list[list[int]] = []
    for f in held * 4:
        text = f.read_text(encoding="utf-8", errors="replace")
        starts = [0] + [i + 1 for i, c in enumerate(text) if c == "\n"]
        pos = starts[rng.randrange(len(starts))]
        ids = tokenizer.encode(text[pos : pos + 16 * prompt_tokens], add_special_tokens=False)
        if len(ids) >= prompt_tokens:
            out.append(ids[:prompt_tokens])
        if len(out) == n:
            return out
    raise ValueError("not enough held-out text for the prompts")


class Worker(ServerProcess):
    """``tandem split-worker`` serving layers ``layers`` of ``model``, without a token (local only)."""

    def __init__(self, model: Path, layers: str, dtype: str):
        port = free_port()
        cmd = [sys.executable, "-m", "service.cli", "split-worker", "--model", str(model), "--layers", layers,
               "--port", str(port), "--dtype", dtype]
        # No token: unset, not empty (an empty token is refused at start, since it would turn auth off).
        env = {k: v for k, v in os.environ.items() if k != "TANDEM_SPLIT_TOKEN"}
        super().__init__(cmd, port=port, name="split worker", env=env,
                         log_path=Path(tempfile.gettempdir()) / f"tandem-bench-split-worker-{port}.log")
        self.spawn().wait_http("/health", timeout=300)

    def stop(self, timeout: float = 20.0) -> int | None:
        return super().stop(timeout)


async def timed_generate(router, prompts, params, options) -> dict:
    """Generate every prompt; wire bytes come from the rounds' TransportEvents (0 in process)."""
    t0 = time.perf_counter()
    tokens, rounds, outputs, up, down = 0, 0, [], 0, 0
    for p in prompts:
        ids: list[int] = []
        async for chunk in router.stream(p, params, options):
            ids += chunk.token_ids
            if chunk.event.transport is not None:
                up += chunk.event.transport.bytes_up
                down += chunk.event.transport.bytes_down
        tokens += len(ids)
        rounds += chunk.stats.rounds
        outputs.append(ids)
    wall = time.perf_counter() - t0
    return {
        "tokens": tokens,
        "seconds": wall,
        "tokens_per_s": tokens / wall,
        "rounds": rounds,
        "tokens_per_round": tokens / rounds if rounds else None,
        "up_bytes_per_token": up / tokens,
        "down_bytes_per_token": down / tokens,
        "outputs": outputs,
    }


async def run(args) -> dict:
    import torch

    from decoding.causal_lm import CausalLM, load_tokenizer
    from decoding.drafters import HFDrafter
    from decoding.sampling import SamplingParams
    from decoding.speculative import SpecOptions, SpeculativeRouter
    from decoding.backends.split_edge import SplitVerifier
    from decoding.partition import EdgeModel, load_config, parse_layers
    from decoding.verifiers import HFVerifier
    from loadtests.delay_proxy import DelayProxy

    torch.set_num_threads(args.threads)
    verifier_dir, drafter_dir, source = pick_models(args)
    L = load_config(verifier_dir).num_hidden_layers
    layers = args.layers or f"1:{L - 1}"
    a, b = parse_layers(layers)
    tok = load_tokenizer(verifier_dir)
    prompts = prompts_for(verifier_dir, tok, args.prompts, args.prompt_tokens, args.seed)
    params = SamplingParams(max_tokens=args.max_tokens, ignore_eos=True)
    plain = SpecOptions(mode="verifier-only")
    spec = SpecOptions(mode="speculative", num_draft_tokens=args.k, max_draft_tokens=max(8, args.k),
                       adaptive=not args.fixed_k)

    vlm, dlm = CausalLM(verifier_dir), CausalLM(drafter_dir)
    ratio = args.draft_cost_ratio if args.draft_cost_ratio is not None else dlm.num_parameters / vlm.num_parameters
    drafter = HFDrafter(dlm, cost_ratio=ratio)
    results: list[dict] = []

    def record(name: str, rtt: float | None, r: dict, reference: list | None) -> None:
        row = {"config": name, "rtt_ms": rtt, **{k: v for k, v in r.items() if k != "outputs"}}
        if reference is not None:
            row["identical_to_unsplit"] = r["outputs"] == reference
        results.append(row)
        print(f"{name:22s} rtt={'-' if rtt is None else rtt:>4} {r['tokens_per_s']:8.1f} tok/s  "
              f"{r['tokens_per_round'] or 0:5.2f} tok/round  up {r['up_bytes_per_token']:8.0f} B/tok  "
              f"down {r['down_bytes_per_token']:8.0f} B/tok", flush=True)

    local = SpeculativeRouter(HFVerifier(vlm), drafter, tok)
    await local.generate(prompts[0][:8], SamplingParams(max_tokens=4, ignore_eos=True), plain)  # warm-up
    ref = await timed_generate(local, prompts, params, plain)
    record("unsplit plain", None, ref, None)
    record("unsplit speculative", None, await timed_generate(local, prompts, params, spec), ref["outputs"])

    worker = Worker(verifier_dir, layers, args.dtype)
    edge = EdgeModel(verifier_dir, a, b, dtype=getattr(torch, args.dtype))
    wire_dtype = None if args.wire_dtype == "auto" else getattr(torch, args.wire_dtype)
    try:
        for rtt in args.rtt:
            async with DelayProxy(("127.0.0.1", worker.port), rtt_ms=rtt) as proxy:
                verifier = SplitVerifier(edge, proxy.url, wire_dtype=wire_dtype)
                router = SpeculativeRouter(verifier, drafter, tok, measure_cost=not args.no_measured_cost)
                # Warm-up: opens the connection, and measures a round and a drafter step.
                await router.generate(prompts[0][:16], SamplingParams(max_tokens=8, ignore_eos=True), spec)
                p = await timed_generate(router, prompts, params, plain)
                record("split plain", rtt, p, ref["outputs"])
                s = await timed_generate(router, prompts, params, spec)
                record("split speculative", rtt, s, ref["outputs"])
                results[-1]["speedup_vs_split_plain"] = s["tokens_per_s"] / p["tokens_per_s"]
                results[-1]["draft_cost_ratio"] = router.cost.ratio
                await verifier.aclose()
    finally:
        worker.stop()
    return {
        "models": {"verifier": str(verifier_dir), "drafter": str(drafter_dir), "source": source, "num_layers": L},
        "layers": layers,
        "wire_dtype": args.wire_dtype,
        "prompts": len(prompts),
        "prompt_tokens": args.prompt_tokens,
        "max_tokens": args.max_tokens,
        "k": args.k,
        "adaptive": not args.fixed_k,
        "threads": args.threads,
        "results": results,
    }


def format_report(report: dict) -> str:
    m = report["models"]
    lines = [
        f"Models: {m['source']} (verifier L={m['num_layers']}); split {report['layers']}; wire {report['wire_dtype']}; "
        f"{report['prompts']} prompts x {report['max_tokens']} tokens (prompt {report['prompt_tokens']} tokens), greedy; "
        f"k={report['k']}{' adaptive' if report['adaptive'] else ' fixed'}; torch threads {report['threads']}.",
        "",
        "| config | RTT ms | tokens/s | tokens/round | up B/token | down B/token | identical | spec/plain | c used |",
        "|---|---:|---:|---:|---:|---:|:---:|---:|---:|",
    ]
    for r in report["results"]:
        rtt = "-" if r["rtt_ms"] is None else f"{r['rtt_ms']:g}"
        ident = {True: "yes", False: "NO"}.get(r.get("identical_to_unsplit"), "ref")
        sp = f"{r['speedup_vs_split_plain']:.2f}x" if "speedup_vs_split_plain" in r else ""
        c = f"{r['draft_cost_ratio']:.3f}" if "draft_cost_ratio" in r else ""
        lines.append(
            f"| {r['config']} | {rtt} | {r['tokens_per_s']:.1f} | {r['tokens_per_round'] or 0:.2f} | "
            f"{r['up_bytes_per_token']:.0f} | {r['down_bytes_per_token']:.0f} | {ident} | {sp} | {c} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--verifier", help="verifier model directory")
    p.add_argument("--drafter", help="drafter model directory")
    p.add_argument("--layers", help="split a:b (default 1:L-1)")
    p.add_argument("--rtt", type=lambda s: [float(x) for x in s.split(",")], default=[0.0, 10.0, 50.0],
                   help="emulated RTTs in ms (default 0,10,50)")
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--k", type=int, default=4, help="draft length of the first round (default 4)")
    p.add_argument("--fixed-k", action="store_true", help="keep k fixed instead of adapting it")
    p.add_argument("--no-measured-cost", action="store_true",
                   help="split speculative uses the drafter's static cost ratio, not the measured one (the router's CostEstimator)")
    p.add_argument("--draft-cost-ratio", type=float, help="drafter step / verifier round cost for the adaptive k "
                   "(default: the parameter ratio)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--wire-dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    p.add_argument("--threads", type=int, default=1, help="torch threads in this process (default 1: the worker needs the other core)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the report here")
    args = p.parse_args(argv)
    report = asyncio.run(run(args))
    text = format_report(report)
    print()
    print(text)
    write_json({**report, "table": text}, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
