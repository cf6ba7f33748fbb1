"""tandem against the peers a user would pick instead, on one machine, in one run.

    python -m loadtests.bench --out-dir loadtests/results/demo-pair

Systems (the same held-out prompts and max_tokens for all):

1. ``hf``           the verifier alone, autoregressive, ``transformers`` ``generate()``, in-process
2. ``hf-assisted``  Hugging Face assisted generation, ``generate(assistant_model=drafter)``
3. ``tandem``       tandem ``speculative`` in-process (the service's own backends)
4. ``vllm``         vLLM serving the verifier alone (``/v1/completions``, streamed)
5. ``vllm-spec``    vLLM's in-engine speculative decoding with the same drafter (``--speculative-config``)
6. ``tandem-vllm``  tandem ``speculative`` with the vLLM-hosted verifier (``tandem verifier``) behind
                    ``loadtests.delay_proxy`` at each ``--rtt-ms``

The in-process systems (1)-(3) are interleaved prompt by prompt (every system runs
prompt i before any runs prompt i+1), so drifts in the load of a shared machine hit
them alike; the vLLM-backed ones run after, one server at a time. Each runs greedy and sampled (``--temperature``, top_k 0, top_p 1) requests one at a
time. Reported per system and mode: tokens/s (generated tokens / summed request wall
time), time to first token (p50), inter-token latency p50/p99, mean accepted draft
tokens per verify round and acceptance per draft position, verifier forward passes per
generated token, and for greedy runs how many outputs are token-identical to (1).

Inter-token latency: systems that emit several tokens at once (every speculative
one) stream chunks; each token of a chunk is assigned the chunk's gap divided by its
token count (the amortised per-token latency), and the first chunk is excluded (it is
the TTFT). Verifier forward passes: a forward hook on the verifier (1, 2), the router's
counter (3), or vLLM's engine-step counter ``vllm:iteration_tokens_total`` (4, 5, 6:
one target forward per engine step with one request in flight). Acceptance for (2) is
derived per round from the streamer (tokens per round - 1) and the assistant's forward
count between rounds (tokens drafted); for (5) from vLLM's ``spec_decode`` counters.

Writes ``bench.json`` (every figure and per-request record), ``bench.md`` (the table)
and ``bench.png`` (tokens/s chart) into ``--out-dir``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from loadtests import prometheus
from loadtests.load.report import percentile
from loadtests.procs import ServerProcess

REPO = Path(__file__).resolve().parent.parent
SYSTEMS = ("hf", "hf-assisted", "tandem", "vllm", "vllm-spec", "tandem-vllm")
TITLES = {
    "hf": "(1) verifier alone, transformers",
    "hf-assisted": "(2) HF assisted generation",
    "tandem": "(3) tandem speculative, in-process",
    "vllm": "(4) vLLM, verifier alone",
    "vllm-spec": "(5) vLLM in-engine speculative",
    "tandem-vllm": "(6) tandem speculative, vLLM verifier",
}


@dataclass
class Request:
    prompt_index: int
    tokens: list[int] = field(default_factory=list)
    chunks: list[tuple[float, int]] = field(default_factory=list)  # (seconds since send, tokens in chunk)
    total_s: float = 0.0
    verifier_passes: int | None = None
    rounds: int | None = None
    accepted: int | None = None
    drafted_per_position: list[int] | None = None
    accepted_per_position: list[int] | None = None

    def add_chunk(self, t0: float, n: int, ids: list[int] | None = None) -> None:
        if n > 0:
            self.chunks.append((time.perf_counter() - t0, n))
            if ids is not None:
                self.tokens.extend(ids)


def summarize(reqs: list[Request], reference: list[list[int]] | None, greedy: bool) -> dict:
    gen = sum(sum(n for _, n in r.chunks) for r in reqs)
    wall = sum(r.total_s for r in reqs)
    ttft = [r.chunks[0][0] for r in reqs if r.chunks]
    itl: list[float] = []
    for r in reqs:
        for (t_prev, _), (t, n) in zip(r.chunks, r.chunks[1:]):
            itl += [(t - t_prev) / n] * n
    out: dict = {
        "requests": len(reqs),
        "generated_tokens": gen,
        "wall_s": wall,
        "tokens_per_s": gen / wall if wall else None,
        "ttft_p50_ms": 1e3 * percentile(ttft, 50) if ttft else None,
        "itl_p50_ms": 1e3 * percentile(itl, 50) if itl else None,
        "itl_p99_ms": 1e3 * percentile(itl, 99) if itl else None,
    }
    if all(r.verifier_passes is not None for r in reqs):
        out["verifier_passes_per_token"] = sum(r.verifier_passes for r in reqs) / gen if gen else None
    if all(r.rounds is not None for r in reqs) and sum(r.rounds for r in reqs):
        out["mean_accepted_per_round"] = sum(r.accepted for r in reqs) / sum(r.rounds for r in reqs)
    if all(r.drafted_per_position is not None for r in reqs):
        width = max((len(r.drafted_per_position) for r in reqs), default=0)
        d = [sum(r.drafted_per_position[i] for r in reqs if i < len(r.drafted_per_position)) for i in range(width)]
        a = [sum(r.accepted_per_position[i] for r in reqs if i < len(r.accepted_per_position)) for i in range(width)]
        out["acceptance_per_position"] = [x / y if y else None for x, y in zip(a, d)]
        out["drafted_per_position"] = d
    if greedy and reference is not None and all(r.tokens for r in reqs):
        out["identical_to_1"] = sum(r.tokens == ref for r, ref in zip(reqs, reference))
    return out


# -- prompts --------------------------------------------------------------------------------


def load_prompts(verifier_dir: Path, n: int, prompt_tokens: int, min_continuation: int, seed: int) -> tuple[list, list]:
    from decoding.causal_lm import load_tokenizer
    from decoding.offline.training import heldout_prompts, split_corpus

    build = json.loads((verifier_dir / "build.json").read_text()) if (verifier_dir / "build.json").is_file() else None
    tokenizer = load_tokenizer(verifier_dir)
    if build is not None:
        from decoding.offline.tiny_models import stdlib_files

        names = set(build["corpus"]["heldout_files"])
        files = [f for f in stdlib_files() if f.name in names]
    else:  # a pair not built by build-demo: hold out the default split's files
        files = split_corpus(0).heldout_files
    prompts = heldout_prompts(tokenizer, files, n, prompt_tokens, min_continuation, seed=seed + 1000)
    return prompts, [f.name for f in files]


# -- (1), (2): transformers ------------------------------------------------------------------


class HFRunner:
    """(1) and (2): ``transformers`` ``generate()``, with or without ``assistant_model``."""

    def __init__(self, args, assisted: bool):
        import torch
        from transformers import AutoModelForCausalLM

        self.args, self.assisted = args, assisted
        self.counts = {"v": 0, "d": 0}
        self.verifier = AutoModelForCausalLM.from_pretrained(args.verifier, dtype=torch.float32, local_files_only=True).eval()
        self.verifier.register_forward_hook(lambda *a: self._count("v"))
        models = [self.verifier]
        self.drafter = None
        if assisted:
            self.drafter = AutoModelForCausalLM.from_pretrained(args.drafter, dtype=torch.float32, local_files_only=True).eval()
            self.drafter.register_forward_hook(lambda *a: self._count("d"))
            models.append(self.drafter)
        for m in models:
            m.generation_config.eos_token_id = None  # same max_tokens for every system: no early stop
            m.generation_config.pad_token_id = m.config.pad_token_id

    def _count(self, key: str) -> None:
        self.counts[key] += 1

    def kwargs(self, greedy: bool, max_new_tokens: int) -> dict:
        kw = {"max_new_tokens": max_new_tokens, "do_sample": not greedy}
        if not greedy:
            kw.update(temperature=self.args.temperature, top_k=0, top_p=1.0)
        if self.assisted:
            kw["assistant_model"] = self.drafter
        return kw

    def warm_up(self, ids: list[int]) -> None:
        import torch

        with torch.inference_mode():
            for greedy in (True, False):
                self.verifier.generate(torch.tensor([ids]), **self.kwargs(greedy, 8))

    def run(self, i: int, ids: list[int], greedy: bool) -> Request:
        import torch
        from transformers.generation.streamers import BaseStreamer

        runner, counts, assisted = self, self.counts, self.assisted
        req = Request(i)
        if assisted:
            req.drafted_per_position, req.accepted_per_position = [], []

        class Recorder(BaseStreamer):
            def __init__(self, t0: float):
                self.t0, self.prompt_seen, self.d_mark = t0, False, counts["d"]

            def put(self, value):
                if not self.prompt_seen:  # generate() first streams the prompt
                    self.prompt_seen = True
                    self.d_mark = counts["d"]
                    return
                ids = value.reshape(-1).tolist()
                req.add_chunk(self.t0, len(ids), ids)
                if assisted:  # one put per round: accepted drafts + 1
                    drafted, self.d_mark = counts["d"] - self.d_mark, counts["d"]
                    acc = min(len(ids) - 1, drafted)
                    req.rounds = (req.rounds or 0) + 1
                    req.accepted = (req.accepted or 0) + acc
                    dp, ap = req.drafted_per_position, req.accepted_per_position
                    while len(dp) < drafted:
                        dp.append(0)
                        ap.append(0)
                    for n in range(drafted):
                        dp[n] += 1
                    for n in range(acc):
                        ap[n] += 1

            def end(self):
                pass

        with torch.inference_mode():
            torch.manual_seed(runner.args.seed + i)
            counts["v"] = 0
            t0 = time.perf_counter()
            self.verifier.generate(torch.tensor([ids]), streamer=Recorder(t0), **self.kwargs(greedy, runner.args.max_tokens))
            req.total_s = time.perf_counter() - t0
        req.verifier_passes = counts["v"]
        return req

    def close(self) -> None:
        pass


# -- (3), (6): tandem ------------------------------------------------------------------------


def _params(args, i: int, greedy: bool, max_tokens: int | None = None):
    from decoding.sampling import SamplingParams

    return SamplingParams(
        max_tokens=max_tokens or args.max_tokens,
        temperature=0.0 if greedy else args.temperature,
        seed=args.seed + i,
        ignore_eos=True,
    )


async def _stream_one(router, i: int, ids: list[int], params, passes_fn=None) -> Request:
    req = Request(i)
    before = passes_fn() if passes_fn else None
    t0 = time.perf_counter()
    stats = None
    async for chunk in router.stream(ids, params):
        req.add_chunk(t0, len(chunk.token_ids), chunk.token_ids)
        stats = chunk.stats
    req.total_s = time.perf_counter() - t0
    req.verifier_passes = (passes_fn() - before) if passes_fn else stats.verifier_forward_passes
    req.rounds, req.accepted = stats.rounds, stats.accepted_tokens
    req.drafted_per_position = list(stats.drafted_per_position)
    req.accepted_per_position = list(stats.accepted_per_position)
    return req


async def _run_router(args, router, prompts, greedy: bool, name: str, passes_fn=None) -> list[Request]:
    await router.generate(prompts[0], _params(args, 0, greedy, 8))  # warm-up
    reqs = []
    for i, ids in enumerate(prompts):
        reqs.append(await _stream_one(router, i, ids, _params(args, i, greedy), passes_fn))
        _progress(args, name, greedy, i, len(prompts))
    return reqs


class TandemRunner:
    """(3): tandem ``speculative`` in-process, built by the service's own ``build_backends``."""

    def __init__(self, args):
        from service.backends import build_backends
        from service.config import TandemSettings

        self.args = args
        settings = TandemSettings.load(
            None, verifier=str(args.verifier), drafter=str(args.drafter), draft_cost_ratio=draft_cost_ratio(args)
        )
        self.loop = asyncio.new_event_loop()
        self.backends = build_backends(settings)

    def warm_up(self, ids: list[int]) -> None:
        for greedy in (True, False):
            self.loop.run_until_complete(self.backends.router.generate(ids, _params(self.args, 0, greedy, 8)))

    def run(self, i: int, ids: list[int], greedy: bool) -> Request:
        return self.loop.run_until_complete(_stream_one(self.backends.router, i, ids, _params(self.args, i, greedy)))

    def close(self) -> None:
        self.loop.run_until_complete(self.backends.aclose())
        self.loop.close()


def draft_cost_ratio(args) -> float | None:
    """c for tandem's adaptive k: --draft-cost-ratio, else the measured one in the pair's build.json
    (TANDEM_DRAFT_COST_RATIO for a user), else None (the service's default: the parameter ratio)."""
    if args.draft_cost_ratio is not None:
        return args.draft_cost_ratio
    build = Path(args.verifier) / "build.json"
    if build.is_file():
        cost = json.loads(build.read_text()).get("cost") or {}
        if cost.get("ratio"):
            return 1.0 / cost["ratio"]
    return None


def run_tandem_vllm(args, prompts, greedy: bool, port: int, rtt_ms: float) -> list[Request]:
    from decoding.causal_lm import CausalLM, load_tokenizer
    from decoding.drafters import HFDrafter
    from decoding.speculative import SpecOptions, SpeculativeRouter
    from decoding.backends.vllm_client import VLLMVerifier
    from loadtests.delay_proxy import DelayProxy

    tokenizer = load_tokenizer(args.drafter)
    drafter_lm = CausalLM(args.drafter)
    verifier_params = _param_count(args.verifier)

    async def go():
        async with DelayProxy(upstream=("127.0.0.1", port), rtt_ms=rtt_ms) as proxy:
            verifier = VLLMVerifier(proxy.url, tokenizer, top_logprobs=args.top_logprobs, timeout_s=60.0)
            await verifier.connect()
            ratio = draft_cost_ratio(args)
            drafter = HFDrafter(drafter_lm, cost_ratio=ratio if ratio is not None else drafter_lm.num_parameters / verifier_params)
            router = SpeculativeRouter(verifier, drafter, tokenizer, SpecOptions())
            try:
                return await _run_router(
                    args, router, prompts, greedy, f"tandem-vllm@{rtt_ms:g}ms", lambda: _engine_steps(port)
                )
            finally:
                await verifier.aclose()

    try:
        return asyncio.run(go())
    finally:
        drafter_lm.close()


def _param_count(model_dir) -> int:
    from safetensors import safe_open

    n = 0
    with safe_open(str(Path(model_dir) / "model.safetensors"), "pt") as f:
        for k in f.keys():
            n += math.prod(f.get_slice(k).get_shape())
    return n


# -- (4), (5): vLLM ----------------------------------------------------------------------------


def _metrics(port: int) -> prometheus.Samples:
    return prometheus.fetch(f"http://127.0.0.1:{port}/metrics", timeout=30)


def _max_len(model_dir) -> int:
    config = json.loads((Path(model_dir) / "config.json").read_text())
    return min(1024, int(config.get("max_position_embeddings", 1024)))


def _engine_steps(port: int) -> int:
    return int(prometheus.total(_metrics(port), "vllm:iteration_tokens_total_count"))


def start_vllm(args, port: int, spec: bool, log: Path) -> ServerProcess:
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", PYTHONPATH=str(REPO))
    common = [
        "--model", str(args.verifier), "--port", str(port), "--host", "127.0.0.1",
        "--max-model-len", str(_max_len(args.verifier)), "--max-logprobs", "64", "--dtype", "float32",
        "--gpu-memory-utilization", "0.3", "--seed", str(args.seed),
    ]  # fmt: skip
    if spec:
        cfg = {"model": str(args.drafter), "num_speculative_tokens": args.vllm_spec_tokens}
        cmd = [args.vllm_python, "-m", "vllm.entrypoints.openai.api_server", *common, "--speculative-config", json.dumps(cfg)]
    else:  # vLLM's OpenAI server plus tandem's verify route: serves (4) and (6)
        cmd = [args.vllm_python, "-m", "service.vllm.route", *common]
    print("$ " + " ".join(shlex.quote(c) for c in cmd), file=sys.stderr, flush=True)
    server = ServerProcess(cmd, port=port, log_path=log, name="vLLM", env=env).spawn()
    server.wait_http("/health", timeout=args.vllm_start_timeout, interval=2.0)
    return server


def run_vllm(args, prompts, greedy: bool, port: int, spec: bool) -> list[Request]:
    import httpx

    name = "vllm-spec" if spec else "vllm"
    model = str(args.verifier)

    def body(ids, i, n):
        b = {
            "model": model, "prompt": ids, "max_tokens": n, "stream": True, "ignore_eos": True,
            "temperature": 0.0 if greedy else args.temperature, "top_k": 0 if not greedy else -1, "top_p": 1.0,
            "seed": args.seed + i, "return_token_ids": True,
        }  # fmt: skip
        if greedy:
            b.pop("top_k")
        return b

    reqs = []
    with httpx.Client(timeout=600) as client:
        client.post(f"http://127.0.0.1:{port}/v1/completions", json={**body(prompts[0], 0, 8), "stream": False})
        for i, ids in enumerate(prompts):
            req = Request(i)
            m0 = _metrics(port)
            t0 = time.perf_counter()
            with client.stream("POST", f"http://127.0.0.1:{port}/v1/completions", json=body(ids, i, args.max_tokens)) as r:
                r.raise_for_status()
                for line in r.iter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    choice = json.loads(line[6:])["choices"][0]
                    tok = choice.get("token_ids")
                    if tok:
                        req.add_chunk(t0, len(tok), list(tok))
            req.total_s = time.perf_counter() - t0
            m1 = _metrics(port)

            def grew(name: str, **labels: str) -> int:  # summed over the other labels (engine, model)
                return int(prometheus.total(m1, name, **labels) - prometheus.total(m0, name, **labels))

            req.verifier_passes = grew("vllm:iteration_tokens_total_count")
            if spec:
                drafts = grew("vllm:spec_decode_num_drafts_total")
                req.rounds = drafts
                req.accepted = grew("vllm:spec_decode_num_accepted_tokens_total")
                width = args.vllm_spec_tokens
                req.drafted_per_position = [drafts] * width
                req.accepted_per_position = [
                    grew("vllm:spec_decode_num_accepted_tokens_per_pos_total", position=str(p)) for p in range(width)
                ]
            reqs.append(req)
            _progress(args, name, greedy, i, len(prompts))
    return reqs


# -- driver ------------------------------------------------------------------------------------


def _progress(args, name: str, greedy: bool, i: int, n: int) -> None:
    if not args.quiet:
        print(f"  {name} {'greedy' if greedy else 'sample'} {i + 1}/{n}", file=sys.stderr, flush=True)


def machine() -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
        mem = Path("/proc/meminfo").read_text().split("\n")[0].split()[1]
        info["memory_gib"] = round(int(mem) / 2**20, 1)
    except OSError:
        pass
    try:
        import torch
        import transformers

        info["torch"], info["transformers"] = torch.__version__, transformers.__version__
        info["torch_threads"] = torch.get_num_threads()
    except ImportError:
        pass
    info["load_average_at_start"] = os.getloadavg()
    return info


def fmt(x, nd=1):
    return "–" if x is None else f"{x:.{nd}f}"


def write_outputs(out_dir: Path, result: dict) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "bench.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        "| system | mode | tokens/s | TTFT p50 ms | ITL p50 ms | ITL p99 ms | accepted/round | acceptance per position | "
        "verifier passes/token | greedy identical to (1) |",
        "|---|---|---:|---:|---:|---:|---:|---|---:|---:|",
    ]
    for row in result["rows"]:
        s = row.get("summary")
        if s is None:
            lines.append(f"| {row['title']} | {row['mode']} | not run: {row['reason']} | | | | | | | |")
            continue
        pos = s.get("acceptance_per_position")
        pos_s = " ".join(fmt(p, 2) for p in pos[:8]) if pos else "–"
        ident = f"{s['identical_to_1']}/{s['requests']}" if "identical_to_1" in s else "–"
        lines.append(
            f"| {row['title']} | {row['mode']} | {fmt(s['tokens_per_s'])} | {fmt(s['ttft_p50_ms'])} | "
            f"{fmt(s['itl_p50_ms'])} | {fmt(s['itl_p99_ms'])} | {fmt(s.get('mean_accepted_per_round'), 2)} | {pos_s} | "
            f"{fmt(s.get('verifier_passes_per_token'), 3)} | {ident} |"
        )
    cost = result.get("forward_cost")
    if cost:
        lines.append("")
        lines.append(
            f"Batch-1 KV-cached one-token forward, measured at the start of the run (median of {cost['passes']}, "
            f"context {cost['context']}): verifier {cost['verifier_ms']:.2f} ms, drafter {cost['drafter_ms']:.2f} ms, "
            f"ratio {cost['ratio']:.1f}x."
        )
    (out_dir / "bench.md").write_text("\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rows = [r for r in result["rows"] if r.get("summary")]
        labels = sorted({r["label"] for r in rows}, key=lambda l: [r["label"] for r in rows].index(l))
        fig, ax = plt.subplots(figsize=(max(7, 1.2 * len(labels)), 4.5))
        width = 0.4
        for j, mode in enumerate(("greedy", "sample")):
            vals = []
            for lab in labels:
                match = [r for r in rows if r["label"] == lab and r["mode"] == mode]
                vals.append(match[0]["summary"]["tokens_per_s"] if match else 0.0)
            xs = [i + (j - 0.5) * width for i in range(len(labels))]
            bars = ax.bar(xs, vals, width, label=mode if mode == "greedy" else f"sample (T={result['config']['temperature']})")
            ax.bar_label(bars, fmt="%.0f", fontsize=7)
        ax.set_xticks(range(len(labels)), labels, rotation=20, ha="right", fontsize=8)
        ax.set_ylabel("tokens/s (batch 1)")
        ax.set_title(f"Demo pair, {result['config']['prompts']} held-out prompts, {result['config']['max_tokens']} tokens each")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out_dir / "bench.png", dpi=120)
    except ImportError as exc:  # pragma: no cover
        print(f"no chart: {exc}", file=sys.stderr)


def parse_args(argv=None) -> argparse.Namespace:
    from decoding.default_models import DEMO_DIR

    p = argparse.ArgumentParser(
        prog="python -m loadtests.bench",
        description=__doc__.split("\n\n")[0] + " Writes bench.json, bench.md and bench.png.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Systems: " + "; ".join(f"{k}: {v}" for k, v in TITLES.items()),
    )
    p.add_argument("--verifier", type=Path, default=DEMO_DIR / "verifier", help="verifier model dir (default: the demo pair)")
    p.add_argument("--drafter", type=Path, default=DEMO_DIR / "drafter", help="drafter model dir (default: the demo pair)")
    p.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma-separated subset of {','.join(SYSTEMS)}")
    p.add_argument("--modes", default="greedy,sample", help="greedy,sample (default: both)")
    p.add_argument("--prompts", type=int, default=8, help="held-out prompts (default: 8)")
    p.add_argument("--prompt-tokens", type=int, default=96, help="tokens per prompt (default: 96)")
    p.add_argument("--max-tokens", type=int, default=128, help="tokens generated per request, every system (default: 128)")
    p.add_argument("--temperature", type=float, default=0.8, help="temperature of the sampled runs (default: 0.8)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--draft-cost-ratio", type=float, metavar="C",
        help="tandem's drafter/verifier cost ratio c (default: the measured one in the verifier's build.json)",
    )  # fmt: skip
    p.add_argument("--rtt-ms", default="0,10,50", help="emulated RTTs for tandem-vllm (default: 0,10,50)")
    p.add_argument("--top-logprobs", type=int, default=20, help="K of the vLLM verifier's top-K logprobs (default: 20)")
    p.add_argument("--vllm-python", default=str(REPO / ".venv-vllm" / "bin" / "python"), help="python of the vLLM venv")
    p.add_argument("--vllm-port", type=int, default=8411)
    p.add_argument("--vllm-spec-tokens", type=int, default=4, help="num_speculative_tokens of (5) (default: 4)")
    p.add_argument("--vllm-start-timeout", type=float, default=600.0)
    p.add_argument("--threads", type=int, default=1, help="torch threads in-process (default: 1; on a shared 2-core machine 2 threads measured slower)")
    p.add_argument("--out-dir", type=Path, default=REPO / "loadtests" / "results" / "demo-pair")
    p.add_argument("--quiet", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    bad = [s for s in systems if s not in SYSTEMS]
    if bad:
        raise SystemExit(f"unknown systems: {bad}; choose from {SYSTEMS}")
    modes = [m.strip() for m in args.modes.split(",")]
    rtts = [float(x) for x in args.rtt_ms.split(",") if x.strip()]
    prompts, held = load_prompts(args.verifier, args.prompts, args.prompt_tokens, 0, args.seed)
    result: dict = {
        "command": "python -m loadtests.bench " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)),
        "machine": machine(),
        "config": {
            "verifier": str(args.verifier), "drafter": str(args.drafter), "prompts": len(prompts),
            "prompt_tokens": args.prompt_tokens, "max_tokens": args.max_tokens, "temperature": args.temperature,
            "seed": args.seed, "heldout_files": held, "vllm_spec_tokens": args.vllm_spec_tokens,
            "top_logprobs": args.top_logprobs, "rtt_ms": rtts, "tandem_draft_cost_ratio": draft_cost_ratio(args),
            "torch_threads": args.threads,
        },  # fmt: skip
        "rows": [],
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    from decoding.offline.training import forward_cost

    # The drafter/verifier cost ratio on this machine, now (batch 1, KV-cached, interleaved).
    result["forward_cost"] = forward_cost(args.verifier, args.drafter, passes=200)
    print(f"forward cost: {json.dumps(result['forward_cost'])}", file=sys.stderr, flush=True)
    reference: list[list[int]] | None = None
    out_dir = args.out_dir
    out_dir.mkdir(parents=True, exist_ok=True)

    def record(system: str, label: str, mode: str, fn, elapsed: float | None = None) -> None:
        nonlocal reference
        t = time.perf_counter()
        row = {"system": system, "label": label, "title": TITLES[system] + (label[len(system):] if label != system else ""), "mode": mode}
        try:
            reqs = fn()
        except Exception as exc:  # report, do not hide: the row says why
            row["reason"] = f"{type(exc).__name__}: {exc}"[:300]
            print(f"{label} {mode}: FAILED {row['reason']}", file=sys.stderr, flush=True)
        else:
            if system == "hf" and mode == "greedy":
                reference = [r.tokens for r in reqs]
            row["summary"] = summarize(reqs, reference, mode == "greedy")
            row["requests"] = [asdict(r) for r in reqs]
            print(f"{label} {mode}: {json.dumps(row['summary'])}", file=sys.stderr, flush=True)
        row["elapsed_s"] = elapsed if elapsed is not None else time.perf_counter() - t
        result["rows"].append(row)
        write_outputs(out_dir, result)

    in_process = [s for s in ("hf", "hf-assisted", "tandem") if s in systems]
    if "hf" not in systems and "greedy" in modes:
        print("note: without system 'hf' there is no greedy reference", file=sys.stderr)
    if in_process:
        # Interleaved: for each prompt, every in-process system runs back to back, so a change
        # in the machine's load (it is shared) hits all of them alike.
        runners = {}
        for s in in_process:
            runners[s] = TandemRunner(args) if s == "tandem" else HFRunner(args, assisted=s == "hf-assisted")
            runners[s].warm_up(prompts[0])
        for mode in modes:
            greedy = mode == "greedy"
            reqs: dict[str, list[Request]] = {s: [] for s in in_process}
            t = time.perf_counter()
            for i, ids in enumerate(prompts):
                for s in in_process:
                    reqs[s].append(runners[s].run(i, ids, greedy))
                _progress(args, "+".join(in_process), greedy, i, len(prompts))
            for s in in_process:
                record(s, s, mode, lambda s=s: reqs[s], elapsed=time.perf_counter() - t)
        for r in runners.values():
            r.close()

    log_dir = out_dir / "logs"
    log_dir.mkdir(exist_ok=True)
    for spec in (False, True):
        wanted = [s for s in (("vllm-spec",) if spec else ("vllm", "tandem-vllm")) if s in systems]
        if not wanted:
            continue
        try:
            server = start_vllm(args, args.vllm_port, spec, log_dir / ("vllm-spec.log" if spec else "vllm.log"))
        except Exception as exc:
            for s in wanted:
                for mode in modes:
                    result["rows"].append({"system": s, "label": s, "title": TITLES[s], "mode": mode, "reason": str(exc)[:300]})
            write_outputs(out_dir, result)
            continue
        try:
            for mode in modes:
                greedy = mode == "greedy"
                if spec:
                    record("vllm-spec", "vllm-spec", mode, lambda: run_vllm(args, prompts, greedy, args.vllm_port, True))
                    continue
                if "vllm" in wanted:
                    record("vllm", "vllm", mode, lambda: run_vllm(args, prompts, greedy, args.vllm_port, False))
                if "tandem-vllm" in wanted:
                    for rtt in rtts:
                        record(
                            "tandem-vllm",
                            f"tandem-vllm RTT {rtt:g} ms",
                            mode,
                            lambda: run_tandem_vllm(args, prompts, greedy, args.vllm_port, rtt),
                        )
        finally:
            server.stop(timeout=60)
    result["finished"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    write_outputs(out_dir, result)
    print((out_dir / "bench.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
