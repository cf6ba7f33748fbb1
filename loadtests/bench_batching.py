"""Benchmark of the embedded verifier's continuous batching: concurrent streams, batched vs one pass each.

For 1, 2, 4, 8 ... concurrent streams it runs the same prompts through the in-process
router twice, with the models batching concurrent requests' passes (``max_batch``: the
verifier's verify passes and the drafter's steps) and with one request per pass, and
reports aggregate tokens/s, the mean batch each model ran, and whether greedy outputs
are identical. Both configurations share the same two models.

    python -m loadtests.bench_batching --streams 1,4,8 --json runs/batching.json --plot runs/batching.png
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from decoding.causal_lm import CausalLM
from decoding.drafters import HFDrafter, NgramDrafter
from decoding.sampling import SamplingParams
from decoding.speculative import SpecOptions, SpeculativeRouter
from decoding.verifiers import HFVerifier
from loadtests.bench_core import bench_prompts, open_verifier
from loadtests.load.report import write_json


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m loadtests.bench_batching",
        description="Aggregate tokens/s of N concurrent in-process streams with the embedded verifier batching "
        "concurrent verify passes vs one request per pass.",
    )
    p.add_argument("--verifier", help="verifier model dir (default: the default pair: the real one once installed)")
    p.add_argument("--drafter", help="drafter model dir or 'ngram' (default: the default pair)")
    p.add_argument("--streams", default="1,2,4,8", help="comma-separated concurrency levels (default: 1,2,4,8)")
    p.add_argument("--max-batch", type=int, default=8, help="max_batch of the batched configuration (default: 8)")
    p.add_argument("--modes", default="verifier-only,speculative", help="comma-separated modes (default: both)")
    p.add_argument("--prompt-tokens", type=int, default=64, help="tokens per prompt (default: 64)")
    p.add_argument("--max-tokens", type=int, default=48, help="tokens generated per stream (default: 48)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default), which also checks identity")
    p.add_argument("--device", default="cpu", help="torch device of both models, e.g. cuda (default: cpu)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="model dtype")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0, help="prompt selection and sampling seed")
    p.add_argument("--json", metavar="PATH", help="write the results as JSON")
    p.add_argument("--plot", metavar="PNG", help="write a chart of tokens/s against streams")
    return p.parse_args(argv)


async def run_streams(router: SpeculativeRouter, prompts, params, options) -> tuple[float, list[list[int]]]:
    """All prompts at once; returns (wall seconds, the token ids of each stream)."""
    t0 = time.perf_counter()
    outs = await asyncio.gather(*(router.generate(ids, params, options) for ids in prompts))
    return time.perf_counter() - t0, [o.token_ids for o in outs]


async def main_async(args: argparse.Namespace) -> dict:
    verifier_dir, drafter_arg, tokenizer, vlm = open_verifier(args)
    dtype = vlm.model.dtype
    # Both configurations share the models: batching only changes how passes are grouped.
    verifiers = {"one pass each": HFVerifier(vlm), "batched": HFVerifier(vlm, max_batch=args.max_batch)}
    if verifiers["batched"].batcher is None:
        raise SystemExit(f"{verifier_dir}: this model family does not support batched passes")
    if drafter_arg == "ngram":
        drafters = dict.fromkeys(verifiers, NgramDrafter(vlm.vocab_size))
    else:
        dlm = CausalLM(drafter_arg, dtype=dtype, device=args.device)
        ratio = dlm.num_parameters / vlm.num_parameters
        drafters = {"one pass each": HFDrafter(dlm, cost_ratio=ratio),
                    "batched": HFDrafter(dlm, cost_ratio=ratio, max_batch=args.max_batch)}  # fmt: skip
    routers = {name: SpeculativeRouter(v, drafters[name], tokenizer) for name, v in verifiers.items()}
    streams = [int(s) for s in args.streams.split(",")]
    modes = args.modes.split(",")
    prompts = bench_prompts(tokenizer, max(streams), args.prompt_tokens, args.seed)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed, ignore_eos=True)

    for router in routers.values():  # warm-up: first passes allocate and pick kernels
        await run_streams(router, prompts[:2], SamplingParams(max_tokens=4, ignore_eos=True), SpecOptions())
    rows = []
    configs = [(m, n, name) for m in modes for n in streams for name in routers]
    for mode, n, name in tqdm(configs, desc="configurations", unit="run", file=sys.stderr):
        batchers = {"verifier": verifiers[name].batcher, "drafter": getattr(drafters[name], "batcher", None)}
        for b in batchers.values():
            if b is not None:
                b.batch_sizes.clear()
        wall, outputs = await run_streams(routers[name], prompts[:n], params, SpecOptions(mode=mode))
        tokens = sum(len(o) for o in outputs)
        rows.append({
            "mode": mode, "streams": n, "verifier": name, "wall_s": wall, "tokens": tokens,
            "tokens_per_s": tokens / wall,
            **{f"mean_{m}_batch": statistics.fmean(b.batch_sizes) if b and b.batch_sizes else 1.0
               for m, b in batchers.items()},
            "outputs": outputs,
        })  # fmt: skip
    summary = []
    for mode in modes:
        for n in streams:
            one, bat = (next(r for r in rows if (r["mode"], r["streams"], r["verifier"]) == (mode, n, v))
                        for v in ("one pass each", "batched"))  # fmt: skip
            single = next(r for r in rows if (r["mode"], r["streams"], r["verifier"]) == (mode, streams[0], "batched"))
            summary.append({
                "mode": mode, "streams": n,
                "tokens_per_s_one_pass_each": one["tokens_per_s"], "tokens_per_s_batched": bat["tokens_per_s"],
                "batched_over_one_pass_each": bat["tokens_per_s"] / one["tokens_per_s"],
                "batched_over_fewest_streams": bat["tokens_per_s"] / single["tokens_per_s"],
                "mean_verifier_batch": bat["mean_verifier_batch"],
                "mean_drafter_batch": bat["mean_drafter_batch"],
                "greedy_identical": None if args.temperature > 0 else one["outputs"] == bat["outputs"],
            })  # fmt: skip
    for r in rows:
        r.pop("outputs")
    return {
        "machine": {"torch_threads": torch.get_num_threads(), "python": sys.version.split()[0], "torch": torch.__version__,
                    "device": torch.cuda.get_device_name(vlm.device) if vlm.device.type == "cuda" else "cpu",
                    "dtype": args.dtype},  # fmt: skip
        "verifier": str(verifier_dir),
        "drafter": drafter_arg,
        "args": vars(args),
        "runs": rows,
        "summary": summary,
    }


def print_report(r: dict) -> None:
    print(f"verifier {r['verifier']}, drafter {r['drafter']}, device {r['machine']['device']}\n")
    print("| mode | streams | tok/s one pass each | tok/s batched | batched / one each | vs fewest streams | "
          "mean batch verifier / drafter | greedy identical |\n|---|---:|---:|---:|---:|---:|---:|---|")  # fmt: skip
    for s in r["summary"]:
        print(f"| {s['mode']} | {s['streams']} | {s['tokens_per_s_one_pass_each']:.1f} | {s['tokens_per_s_batched']:.1f} "
              f"| {s['batched_over_one_pass_each']:.2f}x | {s['batched_over_fewest_streams']:.2f}x "
              f"| {s['mean_verifier_batch']:.2f} / {s['mean_drafter_batch']:.2f} "
              f"| {s['greedy_identical']} |")  # fmt: skip


def plot(r: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for mode in dict.fromkeys(s["mode"] for s in r["summary"]):
        pts = [s for s in r["summary"] if s["mode"] == mode]
        xs = [s["streams"] for s in pts]
        ax.plot(xs, [s["tokens_per_s_batched"] for s in pts], "o-", label=f"{mode}, batched")
        ax.plot(xs, [s["tokens_per_s_one_pass_each"] for s in pts], "o--", label=f"{mode}, one pass each")
    ax.set_xlabel("concurrent streams")
    ax.set_ylabel("aggregate tokens/s")
    ax.set_xscale("log", base=2)
    ax.set_title(f"Embedded verifier batching ({Path(r['verifier']).name}, {r['machine']['device']})")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = asyncio.run(main_async(args))
    print_report(result)
    write_json(result, args.json)
    if args.plot:
        plot(result, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
