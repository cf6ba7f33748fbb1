"""One command that checks tandem on a machine with an NVIDIA GPU and writes every figure to one JSON.

    python -m loadtests.gpu_check --json runs/gpu_check.json            # on the GPU machine (make gpu-check)
    python -m loadtests.gpu_check --dry-run --json runs/gpu_dry.json    # the same steps on CPU, small

Steps, each timed and recorded whether it passes or not (a failed step does not stop the others):

1. ``environment``: Python, torch, CUDA device, Triton, vLLM (if importable).
2. ``install``: the Python packages the checks import. Missing ones are installed from
   ``--wheelhouse DIR`` (offline, ``pip install --no-index --find-links DIR``) or, failing
   that, from the package index. ``make gpu-wheels`` fills a wheelhouse on a machine that
   reaches PyPI, for GPU machines that reach nothing.
3. ``kernel_tests``: ``tests/kernels`` on CUDA (the real kernels, not the interpreter).
4. ``kernel_bench``: ``python -m kernels.bench`` (vLLM's rejection sampler too where importable),
   B=256, K=8, V=152k among the shapes.
5. ``gateway``: ``tandem serve --device cuda`` with the default pair; greedy completions through
   the OpenAI API compared token for token with the same model on CPU in process; then
   aggregate tokens/s at 1 and 8 concurrent streams.
6. ``bench_core``: the in-process benchmark (speculative vs verifier-only) on the GPU.
7. ``bench_batching``: the embedded verifier's continuous batching, 1 to 8 concurrent streams,
   batched vs one pass each (the target: 8 streams at >= 4x the tokens/s of one).

``--dry-run`` runs every step on CPU with small sizes (the kernels in Triton's interpreter), so
the script itself is tested where no GPU is; its figures are not GPU figures.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

#: Import name -> pip requirement, for what the checks import beyond torch and triton.
REQUIRED = {
    "fastapi": "fastapi", "uvicorn": "uvicorn", "pydantic": "pydantic", "pydantic_settings": "pydantic-settings",
    "httpx": "httpx", "transformers": "transformers", "tokenizers": "tokenizers", "safetensors": "safetensors",
    "prometheus_client": "prometheus-client", "yaml": "pyyaml", "tqdm": "tqdm", "numpy": "numpy",
    "pytest": "pytest", "pytest_timeout": "pytest-timeout", "hypothesis": "hypothesis", "scipy": "scipy",
}  # fmt: skip

PROMPTS = [
    "def fibonacci(n):",
    "The capital of France is",
    "import numpy as np\n\ndef normalize(x):",
    "Write a haiku about the sea.",
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m loadtests.gpu_check",
        description="Check tandem on an NVIDIA GPU machine: install what is missing, kernel tests on CUDA, kernel "
        "benchmark (vs vLLM's rejection sampler where importable), the gateway on --device cuda with greedy output "
        "compared to CPU, concurrency scaling and the in-process benchmark; every figure in one JSON. "
        "--dry-run runs the same steps on CPU with small sizes.",
    )
    p.add_argument("--dry-run", action="store_true", help="run every step on CPU, small (tests the script itself)")
    p.add_argument("--json", metavar="PATH", default="runs/gpu_check.json", help="where to write the results")
    p.add_argument("--wheelhouse", metavar="DIR", help="install missing packages from these wheels (offline)")
    p.add_argument("--verifier", metavar="DIR", help="verifier directory (default: the default pair)")
    p.add_argument("--drafter", metavar="DIR", help="drafter directory (default: the default pair)")
    p.add_argument("--step", action="append", help="run only these steps (repeatable)")
    p.add_argument("--step-timeout", type=float, default=240, help="seconds each subprocess step may take")
    return p.parse_args(argv)


def run(cmd: list[str], timeout: float, env: dict | None = None) -> dict:
    """Run a subprocess in the repo root; keep its exit code and output tail."""
    t0 = time.perf_counter()
    try:
        out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
        rc, text = out.returncode, out.stdout + out.stderr
    except subprocess.TimeoutExpired as exc:
        rc, text = 124, f"timed out after {timeout:g}s\n{exc.stdout or ''}{exc.stderr or ''}"
    print(text[-2000:], flush=True)
    return {"cmd": " ".join(cmd), "rc": rc, "seconds": round(time.perf_counter() - t0, 2), "tail": text[-3000:]}


def child_env(dry_run: bool) -> dict:
    env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    if dry_run:
        env["TRITON_INTERPRET"] = "1"
    else:
        env.pop("TRITON_INTERPRET", None)
    return env


# -- steps ----------------------------------------------------------------------------------------


def step_environment(args) -> dict:
    import torch

    info = {"python": sys.version.split()[0], "platform": platform.platform(), "torch": torch.__version__,
            "cuda_available": torch.cuda.is_available()}  # fmt: skip
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    sms=props.multi_processor_count, cuda=torch.version.cuda)  # fmt: skip
    for mod in ("triton", "vllm"):
        try:
            info[mod] = importlib.import_module(mod).__version__
        except Exception as exc:  # noqa: BLE001 - reported, not fatal
            info[mod] = f"not importable ({type(exc).__name__})"
    if not args.dry_run and not info["cuda_available"]:
        raise RuntimeError("no CUDA device: run on a machine with an NVIDIA GPU, or pass --dry-run")
    return info


def step_install(args) -> dict:
    missing = []
    for mod, req in REQUIRED.items():
        try:
            importlib.import_module(mod)
        except ImportError:
            missing.append(req)
    result: dict = {"missing_before": missing}
    if missing and not args.dry_run:
        pip = [sys.executable, "-m", "pip", "install", "--quiet"]
        if args.wheelhouse:
            pip += ["--no-index", "--find-links", args.wheelhouse]
        result["pip"] = run(pip + missing, timeout=600)
        importlib.invalidate_caches()
        still = [r for m, r in REQUIRED.items() if importlib.util.find_spec(m) is None]
        result["missing_after"] = still
        if still:
            raise RuntimeError(f"could not install {', '.join(still)}; bring them with --wheelhouse (make gpu-wheels)")
    return result


def step_kernel_tests(args) -> dict:
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/kernels"]
    if args.dry_run:  # the interpreter is slow: a representative subset
        cmd += ["-k", "point_mass or greedy_matches_reference or public_entry"]
    r = run(cmd, args.step_timeout * (1 if args.dry_run else 2), child_env(args.dry_run))
    if r["rc"] != 0:
        raise RuntimeError(f"kernel tests failed (exit {r['rc']})")
    return r


def step_kernel_bench(args) -> dict:
    out = REPO / "runs" / "gpu_check_kernels.json"
    if args.dry_run:
        cmd = [sys.executable, "-m", "kernels.bench", "--smoke"]
    else:
        cmd = [sys.executable, "-m", "kernels.bench", "--batch", "1", "32", "256", "--k", "4", "8",
               "--vocab", "32000", "152064", "--json", str(out)]  # fmt: skip
    r = run(cmd, args.step_timeout * (1 if args.dry_run else 2), child_env(args.dry_run))
    if r["rc"] != 0:
        raise RuntimeError(f"kernels.bench failed (exit {r['rc']})")
    if out.exists() and not args.dry_run:
        r["results"] = json.loads(out.read_text())
    return r


def default_models(args) -> tuple[str, str]:
    """The default pair on a GPU; the small demo pair for a dry run (it tests the script, not the model)."""
    from decoding.default_models import default_pair, demo_pair

    verifier, drafter = demo_pair() if args.dry_run else default_pair()
    return args.verifier or str(verifier), args.drafter or str(drafter)


def cpu_reference(verifier: str, prompts: list[str], max_tokens: int) -> list[list[int]]:
    """Greedy continuations of the verifier alone, on CPU in process: what the GPU must reproduce."""
    from decoding.causal_lm import CausalLM, load_tokenizer
    from decoding.sampling import SamplingParams
    from decoding.speculative import SpecOptions, SpeculativeRouter
    from decoding.verifiers import HFVerifier

    lm = CausalLM(verifier)
    router = SpeculativeRouter(HFVerifier(lm), None, load_tokenizer(verifier), SpecOptions(mode="verifier-only"))
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    try:
        return [asyncio.run(router.generate(router.encode(p), params)).token_ids for p in prompts]
    finally:
        lm.close()


def step_gateway(args) -> dict:
    import httpx

    from loadtests.procs import ServerProcess, free_port

    verifier, drafter = default_models(args)
    device = "cpu" if args.dry_run else "cuda"
    max_tokens = 16 if args.dry_run else 64
    port = free_port()
    log = REPO / "runs" / "gpu_check_gateway.log"
    cmd = [sys.executable, "-m", "service.cli", "serve", "--port", str(port), "--device", device,
           "--verifier", verifier, "--drafter", drafter, "--max-concurrency", "8", "--max-queue", "64"]  # fmt: skip
    server = ServerProcess(cmd, port=port, log_path=log, name="tandem serve", env=child_env(args.dry_run))
    result: dict = {"device": device, "verifier": verifier, "drafter": drafter}
    server.spawn()
    try:
        server.wait_http("/ready", timeout=args.step_timeout)
        url = f"http://127.0.0.1:{port}/v1/completions"

        def complete(client: httpx.Client, prompt: str, n_tokens: int) -> dict:
            body = {"model": "tandem", "prompt": prompt, "max_tokens": n_tokens, "temperature": 0, "ignore_eos": True}
            r = client.post(url, json=body, timeout=120)
            r.raise_for_status()
            return r.json()

        with httpx.Client() as client:
            texts = [complete(client, p, max_tokens)["choices"][0]["text"] for p in PROMPTS]
        from decoding.causal_lm import load_tokenizer

        tok = load_tokenizer(verifier)
        reference = cpu_reference(verifier, PROMPTS, max_tokens)
        expected = [tok.decode(ids) for ids in reference]
        result["greedy_identical_to_cpu"] = sum(a == b for a, b in zip(texts, expected))
        result["greedy_prompts"] = len(PROMPTS)
        result["mismatches"] = [{"prompt": p, "gpu": a, "cpu": b} for p, a, b in zip(PROMPTS, texts, expected) if a != b]

        # Aggregate throughput with 1 and 8 concurrent streams (the embedded verifier serving many).
        async def load(concurrency: int, per_stream: int) -> float:
            async with httpx.AsyncClient(timeout=300) as ac:
                async def stream(i: int) -> int:
                    body = {"model": "tandem", "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": per_stream,
                            "temperature": 0, "ignore_eos": True}  # fmt: skip
                    r = await ac.post(url, json=body)
                    r.raise_for_status()
                    return r.json()["usage"]["completion_tokens"]

                t0 = time.perf_counter()
                tokens = sum(await asyncio.gather(*(stream(i) for i in range(concurrency))))
                return tokens / (time.perf_counter() - t0)

        per_stream = 16 if args.dry_run else 128
        result["tokens_per_s_1_stream"] = asyncio.run(load(1, per_stream))
        result["tokens_per_s_8_streams"] = asyncio.run(load(8, per_stream))
        result["scaling_8_vs_1"] = result["tokens_per_s_8_streams"] / result["tokens_per_s_1_stream"]
    finally:
        server.stop()
    if result["greedy_identical_to_cpu"] != result["greedy_prompts"]:
        raise RuntimeError(f"greedy output differs from CPU on {len(result['mismatches'])} prompt(s)")
    return result


def step_bench_core(args) -> dict:
    verifier, drafter = default_models(args)
    out = REPO / "runs" / "gpu_check_bench_core.json"
    cmd = [sys.executable, "-m", "loadtests.bench_core", "--verifier", verifier, "--drafter", drafter,
           "--json", str(out)]  # fmt: skip
    cmd += ["--prompts", "1", "--max-tokens", "16"] if args.dry_run else ["--device", "cuda", "--prompts", "8"]
    r = run(cmd, args.step_timeout * 2, child_env(args.dry_run))
    if r["rc"] != 0:
        raise RuntimeError(f"bench_core failed (exit {r['rc']})")
    r["results"] = json.loads(out.read_text())
    return r


def step_bench_batching(args) -> dict:
    verifier, drafter = default_models(args)
    out = REPO / "runs" / "gpu_check_bench_batching.json"
    cmd = [sys.executable, "-m", "loadtests.bench_batching", "--verifier", verifier, "--drafter", drafter,
           "--json", str(out), "--plot", str(out.with_suffix(".png"))]  # fmt: skip
    cmd += ["--streams", "1,2", "--max-tokens", "8"] if args.dry_run else ["--device", "cuda", "--streams", "1,2,4,8,16"]
    r = run(cmd, args.step_timeout * 2, child_env(args.dry_run))
    if r["rc"] != 0:
        raise RuntimeError(f"bench_batching failed (exit {r['rc']})")
    r["results"] = json.loads(out.read_text())
    if not all(s["greedy_identical"] for s in r["results"]["summary"]):
        raise RuntimeError("batched greedy output differs from one pass per request")
    return r


STEPS: dict[str, Callable[[argparse.Namespace], dict]] = {
    "environment": step_environment,
    "install": step_install,
    "kernel_tests": step_kernel_tests,
    "kernel_bench": step_kernel_bench,
    "gateway": step_gateway,
    "bench_core": step_bench_core,
    "bench_batching": step_bench_batching,
}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    (REPO / "runs").mkdir(exist_ok=True)
    report: dict = {"dry_run": args.dry_run, "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "steps": {}}
    failed = []
    for name, fn in STEPS.items():
        if args.step and name not in args.step:
            continue
        print(f"== {name}", flush=True)
        t0 = time.perf_counter()
        try:
            report["steps"][name] = {"ok": True, **fn(args)}
        except Exception as exc:  # noqa: BLE001 - every step is reported; the exit code says it failed
            report["steps"][name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
            failed.append(name)
        report["steps"][name]["wall_s"] = round(time.perf_counter() - t0, 2)
        print(f"== {name}: {'ok' if name not in failed else 'FAILED ' + report['steps'][name]['error']}", flush=True)
        if name == "environment" and failed:
            break  # nothing else can run without the device
    report["failed"] = failed
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2, default=str))
    print(f"wrote {args.json}; {'all steps passed' if not failed else 'FAILED: ' + ', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
