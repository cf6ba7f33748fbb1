"""Where a verify round's time goes inside vLLM: one engine in this process, profiled (run with vLLM's Python).

    VLLM_ENABLE_V1_MULTIPROCESSING=0 .venv-vllm/bin/python -m loadtests.profile_vllm_round \\
        --model DIR --block-size 32 --contexts 256,1024,4096 [--profile 4096] [--json out.json]

A round is what ``service.vllm.route`` submits: a new request for ``context + draft`` with
``prompt_logprobs=K``, ``max_tokens=1``, the prefix cache read. The engine runs in this process
(``LLMEngine`` with multiprocessing off), so the wall time of ``add_request`` + ``step()`` until the
request finishes is vLLM's per-request work without the API server and ZMQ hops, and ``--profile N``
prints cProfile's top functions for the rounds at context N. For comparison it also times a k = 0
round without prompt logprobs, and one decode step of a running request at the same context (what a
verify position costs when vLLM keeps the request alive).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import statistics
import time
import uuid


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtests.profile_vllm_round")
    p.add_argument("--model", required=True)
    p.add_argument("--block-size", type=int, default=32)
    p.add_argument("--contexts", default="256,1024,4096")
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--top-k", type=int, default=20)
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--profile", type=int, default=None, metavar="N", help="cProfile the rounds at context N")
    p.add_argument("--decide", action="store_true",
                   help="rounds decided in the engine (service.vllm.engine_verify) instead of top-K prompt-logprob rows")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")

    if args.decide:
        from service.vllm.engine_verify import register

        register()  # this process is the engine's (multiprocessing off)
    from vllm import EngineArgs, LLMEngine, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.sampling_params import RequestOutputKind

    contexts = [int(c) for c in args.contexts.split(",")]
    engine = LLMEngine.from_engine_args(EngineArgs(
        model=args.model, block_size=args.block_size, enable_prefix_caching=True, max_model_len=max(contexts) + 64,
        max_logprobs=64, enforce_eager=True, dtype="float32", gpu_memory_utilization=0.3,
        max_num_batched_tokens=max(contexts) + 64,
    ))  # fmt: skip
    vocab = engine.model_config.get_vocab_size()
    import random

    from service.vllm.logprobs_trim import EXTRA_ARGS_ROWS_KEY, install_prompt_logprobs_trim

    trim = install_prompt_logprobs_trim()  # as the route does: only the last k prompt rows reach Python objects
    rng = random.Random(0)
    phases = {"add_request": 0.0, "engine_core_step": 0.0, "output_processing": 0.0}

    def timed(obj, name: str, phase: str) -> None:
        inner = getattr(obj, name)

        def wrapper(*a, **kw):
            t0 = time.perf_counter()
            try:
                return inner(*a, **kw)
            finally:
                phases[phase] += time.perf_counter() - t0

        setattr(obj, name, wrapper)

    timed(engine, "add_request", "add_request")
    timed(engine.engine_core, "get_output", "engine_core_step")
    timed(engine.output_processor, "process_outputs", "output_processing")

    def run(prompt: list[int], params) -> tuple[float, object]:
        rid = uuid.uuid4().hex
        t0 = time.perf_counter()
        engine.add_request(rid, TokensPrompt(prompt_token_ids=prompt), params)
        final = None
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    final = out
        return time.perf_counter() - t0, final

    def verify_params(k: int):
        if args.decide and k:
            from service.vllm.engine_verify import DecideSpec

            return SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=1, skip_reading_prefix_cache=False,
                                  detokenize=False, output_kind=RequestOutputKind.FINAL_ONLY,
                                  extra_args=DecideSpec(k, 0.0, 0, 1.0, 0).to_extra_args())  # fmt: skip
        return SamplingParams(max_tokens=1, temperature=0.0, logprobs=args.top_k, prompt_logprobs=args.top_k if k else None,
                              skip_reading_prefix_cache=False, detokenize=False, output_kind=RequestOutputKind.FINAL_ONLY,
                              extra_args={EXTRA_ARGS_ROWS_KEY: k} if k else None)

    report: dict = {"block_size": args.block_size, "k": args.k, "top_k": args.top_k, "trim": trim, "decide": args.decide,
                    "contexts": {}}  # fmt: skip
    for n in contexts:
        context = [rng.randrange(vocab) for _ in range(n)]
        run(context, verify_params(0))  # fill the prefix cache with the context
        rounds, plain, cached = [], [], []
        profiler = cProfile.Profile() if args.profile == n else None
        for phase in phases:
            phases[phase] = 0.0
        for _ in range(args.rounds):
            draft = [rng.randrange(vocab) for _ in range(args.k)]
            if profiler:
                profiler.enable()
            dt, out = run(context + draft, verify_params(args.k))
            if profiler:
                profiler.disable()
            rounds.append(dt)
            cached.append(out.num_cached_tokens)
            # One committed token per round (as a rejected round commits), so that no round's needed row is cached.
            context.append(draft[0] ^ 1)
        per_round = {f"{phase}_s": total / args.rounds for phase, total in phases.items()}
        for _ in range(args.rounds):  # k = 0 without prompt logprobs: vLLM's bare per-request cost at this context
            context.append(rng.randrange(vocab))
            dt0, _ = run(context, verify_params(0))
            plain.append(dt0)
        # One decode step of a live request at this context: time per generated token of a long generation.
        live = SamplingParams(max_tokens=17, temperature=0.0, ignore_eos=True, detokenize=False,
                              output_kind=RequestOutputKind.FINAL_ONLY)  # fmt: skip
        t_gen, _ = run(context, live)
        t_first, _ = run(context + [1], SamplingParams(max_tokens=1, temperature=0.0, detokenize=False,
                                                       output_kind=RequestOutputKind.FINAL_ONLY))  # fmt: skip
        row = {
            "round_median_s": statistics.median(rounds[1:]),
            "k0_no_prompt_logprobs_median_s": statistics.median(plain[1:]),
            "recomputed_tokens_mean": statistics.fmean(n + i + args.k - c for i, c in enumerate(cached)),
            "decode_step_s": (t_gen - t_first) / 16,
            **per_round,
        }
        report["contexts"][n] = row
        mode = "decide" if args.decide else "rows"
        print(f"{mode} block {args.block_size} context {n}: " + ", ".join(f"{k} {v:.4g}" for k, v in row.items()),
              flush=True)  # fmt: skip
        if profiler:
            buf = io.StringIO()
            stats = pstats.Stats(profiler, stream=buf).sort_stats("cumulative")
            stats.print_stats(45)
            text = buf.getvalue()
            print(text)
            report["profile"] = text
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
