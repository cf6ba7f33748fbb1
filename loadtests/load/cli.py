"""``python -m loadtests`` and ``tandem load``: run (the default), sweep, plot, compare."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

from loadtests.load.config import RunConfig, parse_goodput
from loadtests.load.plots import plot_compare, plot_run, plot_sweep
from loadtests.load.report import format_compare, format_sweep, format_table, write_json
from loadtests.load.runner import run, sweep


def _rate(value: str) -> float:
    v = float(value)
    if not v > 0:
        raise argparse.ArgumentTypeError("--request-rate must be > 0 (or inf)")
    return v


def _add_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base-url", default="http://127.0.0.1:8000", help="server root, e.g. http://127.0.0.1:8000 (default)")
    p.add_argument("--endpoint", default="/v1/completions", help="/v1/completions (default) or /v1/chat/completions")
    p.add_argument("--model", help="model name (default: the first of GET /v1/models)")
    p.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"), help="bearer key (default: $OPENAI_API_KEY)")
    p.add_argument("--dataset", choices=["heldout", "random"], default="heldout",
                   help="heldout: windows of the demo pair's held-out text (default); random: random token ids, as vLLM's random dataset")  # fmt: skip
    p.add_argument("--input-len", type=int, default=128, help="prompt tokens (default: 128)")
    p.add_argument("--output-len", type=int, default=64, help="max_tokens per request (default: 64)")
    p.add_argument("--num-prompts", type=int, default=200, help="requests to send (with --duration: distinct prompts cycled)")
    p.add_argument("--request-rate", type=_rate, default=math.inf, help="requests per second, open loop (default: inf = all at once)")
    p.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of the arrival gaps: 1 = Poisson (default), <1 burstier")
    p.add_argument("--max-concurrency", type=int, help="most requests in flight (with --request-rate inf: a fixed-concurrency run)")
    p.add_argument("--duration", type=float, metavar="S", help="send requests for S seconds instead of --num-prompts")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (default: 0, greedy)")
    p.add_argument("--ignore-eos", action="store_true", help="vLLM extra: always generate --output-len tokens")
    p.add_argument("--extra-body", type=json.loads, default={}, metavar="JSON", help='merged into every request, e.g. \'{"tandem": {"mode": "split"}}\'')
    p.add_argument("--goodput", nargs="+", metavar="NAME:MS", help="SLOs for goodput: ttft:MS tpot:MS e2el:MS")
    p.add_argument("--percentiles", default="50,90,99", help="percentiles to report (default: 50,90,99)")
    p.add_argument("--timeout", type=float, default=300.0, help="client timeout per request, s (a timeout counts as an error)")
    p.add_argument("--metrics-url", default="", help="Prometheus endpoint scraped before/after (default: BASE_URL/metrics; 'none' = off)")
    p.add_argument("--tokenizer", help="tokenizer directory for prompt lengths (default: tandem's default pair)")
    p.add_argument("--label", help="name of this run in tables and plots")
    p.add_argument("--no-probe", dest="probe", action="store_false", help="skip the initial single test request")
    p.add_argument("--disable-tqdm", dest="progress", action="store_false", help="no progress bar")


def _config(args: argparse.Namespace) -> RunConfig:
    if args.max_concurrency is not None and args.max_concurrency < 1:
        raise SystemExit("load: --max-concurrency must be >= 1")
    if args.burstiness <= 0:
        raise SystemExit("load: --burstiness must be > 0")
    try:
        goodput = parse_goodput(args.goodput)
    except argparse.ArgumentTypeError as exc:
        raise SystemExit(f"load: {exc}") from None
    return RunConfig(
        base_url=args.base_url.rstrip("/"),
        endpoint=args.endpoint,
        model=args.model,
        api_key=args.api_key,
        dataset=args.dataset,
        input_len=args.input_len,
        output_len=args.output_len,
        num_prompts=args.num_prompts,
        request_rate=args.request_rate,
        burstiness=args.burstiness,
        max_concurrency=args.max_concurrency,
        duration=args.duration,
        seed=args.seed,
        temperature=args.temperature,
        ignore_eos=args.ignore_eos,
        extra_body=args.extra_body,
        goodput=goodput,
        percentiles=tuple(float(x) for x in args.percentiles.split(",") if x),
        timeout=args.timeout,
        metrics_url=None if args.metrics_url == "none" else args.metrics_url,
        tokenizer=args.tokenizer,
        label=args.label,
        probe=args.probe,
        progress=args.progress,
    )


def build_parser(prog: str = "python -m loadtests") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Load generator for OpenAI-compatible LLM servers (vllm bench serve's definitions). "
        "Subcommands: run (default), sweep, plot, compare.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    import loadtests.load  # the package's docstring is the tool's manual: its definitions

    r = sub.add_parser("run", help="one load test", description=loadtests.load.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_run_args(r)
    r.add_argument("--json", metavar="FILE", help="write the result (with per-request records) as JSON")
    r.add_argument("--plot", metavar="PNG", help="write the run's plots")
    r.add_argument("--fail-on-error", action="store_true", help="exit 1 if any request failed")
    s = sub.add_parser("sweep", help="fixed-concurrency levels: throughput and the knee (p99 ITL doubles)")
    _add_run_args(s)
    s.add_argument("--concurrency", default="1,2,4,8,16,32", help="levels (default: 1,2,4,8,16,32)")
    s.add_argument("--prompts-per-level", type=int, default=8, help="requests per level = this x concurrency (default: 8)")
    s.add_argument("--level-duration", type=float, metavar="S", help="run each level for S seconds instead")
    s.add_argument("--json", metavar="FILE")
    s.add_argument("--plot", metavar="PNG")
    p = sub.add_parser("plot", help="plot a saved run or sweep")
    p.add_argument("result", help="JSON written by run --json or sweep --json")
    p.add_argument("--out", required=True, metavar="PNG")
    c = sub.add_parser("compare", help="compare two saved runs (table, optional PNG)")
    c.add_argument("a")
    c.add_argument("b")
    c.add_argument("--plot", metavar="PNG")
    return parser


def main(argv: list[str] | None = None, prog: str = "python -m loadtests") -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] not in ("run", "sweep", "plot", "compare", "-h", "--help"):
        argv.insert(0, "run")  # `run` is the default subcommand
    args = build_parser(prog).parse_args(argv)
    if args.command == "plot":
        res = json.loads(Path(args.result).read_text())
        print(f"wrote {plot_run(res, args.out)}")
        return 0
    if args.command == "compare":
        a, b = (json.loads(Path(x).read_text()) for x in (args.a, args.b))
        print(format_compare(a, b))
        if args.plot:
            print(f"wrote {plot_compare(a, b, args.plot)}")
        return 0
    cfg = _config(args)
    if args.command == "sweep":
        levels = [int(x) for x in args.concurrency.split(",") if x]
        res = sweep(cfg, levels, args.prompts_per_level, args.level_duration)
        print(format_sweep(res))
        write_json(res, args.json)
        if args.plot:
            print(f"wrote {plot_sweep(res, args.plot)}", file=sys.stderr)
        return 0
    res = run(cfg)
    print(format_table(res))
    write_json(res, args.json)
    if args.plot:
        print(f"wrote {plot_run(res, args.plot)}", file=sys.stderr)
    return 1 if args.fail_on_error and res["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
