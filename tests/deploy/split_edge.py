"""A split-inference edge process for the deploy tests: real split traffic, real edge metrics.

    python -m tests.deploy.split_edge --metrics-port P --pause S     (then a line on stdin starts the traffic)

It stands in for the gateway's split path, because the faults the dashboard's
split panels show must happen on cue: it builds the edge exactly as the settings
describe it (``service.backends.build_split_verifier``, TANDEM_SPLIT_* variables), runs
greedy speculative generations through the real router against the live
``tandem split-worker``, pauses once mid-generation for longer than the
worker's session TTL (so the worker evicts the session and the edge replays
it), makes one step against an unreachable worker (a split failure), and
serves the ``tandem_split_*`` edge metrics (the gateway's own ``Metrics``, fed
with the router's round events) on /metrics for Prometheus. It prints ``LISTENING`` once /metrics is up, waits for a line on
stdin (so that Prometheus scrapes before, during and after the traffic),
prints ``READY`` once the traffic is done, then serves until SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import threading

from prometheus_client import start_http_server

from decoding.causal_lm import CausalLM, load_tokenizer
from decoding.drafters import HFDrafter
from decoding.sampling import SamplingParams
from decoding.speculative import SpecOptions, SpeculativeRouter
from decoding.verifiers import VerifierUnavailableError
from service.backends import build_split_verifier
from service.config import TandemSettings
from service.metrics import Metrics

PROMPTS = ["def main():\n    ", "import os\nimport sys\n\n", "class Parser:\n    def __init__(self"]


async def traffic(pause_s: float, metrics: Metrics) -> None:
    settings = TandemSettings.load()
    tokenizer = load_tokenizer(settings.drafter)
    verifier = build_split_verifier(settings, tokenizer)
    drafter = HFDrafter(CausalLM(settings.drafter), cost_ratio=0.25)
    router = SpeculativeRouter(verifier, drafter, tokenizer, SpecOptions(mode="speculative", num_draft_tokens=4))
    metrics.split_sessions.set_function(lambda: verifier.open_sessions)
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    try:
        await verifier.check_ready()
        for i, prompt in enumerate(PROMPTS):
            paused = False
            async for chunk in router.stream(tokenizer.encode(prompt), params):
                metrics.observe_round(chunk.event)
                if i == 0 and not paused and chunk.stats.generated_tokens >= 4:
                    paused = True
                    await asyncio.sleep(pause_s)  # > the worker's --session-ttl: evicted, then replayed
    finally:
        await verifier.aclose()
    # One step against a worker that is not there: counted as a split failure (a 503 at the gateway).
    dead = TandemSettings.load(split_worker_url="http://127.0.0.1:9", split_reconnect_s=0, split_timeout_s=2)
    broken = build_split_verifier(dead, tokenizer)
    try:
        session = await broken.start(tokenizer.encode(PROMPTS[0]))
        try:
            await session.score([])
        except VerifierUnavailableError as exc:
            metrics.split_failures.labels(exc.reason).inc()
        else:
            raise SystemExit("split_edge: a step against an unreachable worker did not fail")
        finally:
            await session.close()
    finally:
        await broken.aclose()


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--metrics-port", type=int, required=True)
    p.add_argument("--pause", type=float, default=3.0)
    args = p.parse_args()
    metrics = Metrics()
    start_http_server(args.metrics_port, addr="127.0.0.1", registry=metrics.registry)
    print("LISTENING", flush=True)
    sys.stdin.readline()
    asyncio.run(traffic(args.pause, metrics))
    print("READY", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    stop.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
