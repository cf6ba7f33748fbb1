"""Soak tier (not CI): a real ``tandem serve`` under a mix of good and bad clients for a long while.

Virtual users loop over weighted actions, each counted exactly once by its outcome:

* ``valid``      a completion or chat, streamed or not (the latency figures are these);
* ``disconnect`` a stream the client drops after its first chunks;
* ``oversized``  a body over ``max_request_bytes`` (413), announced or chunked, or a prompt past what the
                 context can hold (400);
* ``invalid``    malformed JSON or a bad parameter (400);
* ``slow-head``  a request head trickled a byte at a time: the server must close it (header timeout);
* ``slow-body``  a small body trickled: 408 once ``body_timeout_s`` passes.

Alongside, ``/health`` is probed every 100 ms, and the server's RSS and open file descriptors are read from
``/metrics`` (``process_resident_memory_bytes``, ``process_open_fds``) every 10 s.

The report: requests by action and outcome (status, "closed", "dropped by the client"), **lost** requests
(neither answered nor closed as designed: a transport error where none belongs), 5xx answers, p50/p99 latency
of valid requests, ``/health`` p50/p99/max, RSS after warm-up and at the end, open fds, and the targets
(0 5xx for client-caused errors, RSS growth < 5 %, ``/health`` p99 < 50 ms, zero lost).

    python -m loadtests.soak --minutes 30 --json runs/soak.json
    python -m loadtests.soak --minutes 3 --users 6 --server-arg=--torch-threads=1 --server-log runs/soak-serve.log
    python -m loadtests.soak --url http://127.0.0.1:8000 --minutes 10     # an already running gateway
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from collections import Counter
from dataclasses import dataclass, field

import httpx

from loadtests import prometheus
from loadtests.load.report import percentile, write_json
from loadtests.procs import ServerProcess, free_port

#: (action, weight)
MIX = [("valid", 55), ("disconnect", 12), ("oversized", 10), ("invalid", 10), ("slow-head", 6), ("slow-body", 7)]
#: Server settings of a self-started gateway: the defaults but the timeouts, shortened so that a slow client
#: costs seconds, not a tenth of the run.
SERVER_FLAGS = ["--header-timeout-s", "5", "--body-timeout-s", "5", "--max-request-bytes", str(4 << 20)]
PROMPTS = ["def fibonacci(n):", "import os\nimport sys\n", "class Stack:\n    def __init__(self", "for i in range(10):"]


@dataclass
class Tally:
    outcomes: Counter = field(default_factory=Counter)  # (action, outcome) -> count
    valid_latency: list[float] = field(default_factory=list)
    valid_ttft: list[float] = field(default_factory=list)
    health: list[tuple[float, float]] = field(default_factory=list)  # (t, latency)
    health_failures: int = 0
    process: list[tuple[float, float, float]] = field(default_factory=list)  # (t, rss bytes, open fds)
    lost: list[str] = field(default_factory=list)

    def count(self, action: str, outcome: str | int) -> None:
        self.outcomes[(action, str(outcome))] += 1


class Soak:
    def __init__(self, url: str, model: str, max_request_bytes: int, tally: Tally, seed: int):
        self.url = url
        self.host, self.port = url.removeprefix("http://").split(":")
        self.model = model
        self.max_request_bytes = max_request_bytes
        self.tally = tally
        self.rng = random.Random(seed)

    # -- actions: each counts exactly one outcome ----------------------------------------------------------

    async def valid(self, client: httpx.AsyncClient) -> None:
        chat = self.rng.random() < 0.4
        stream = self.rng.random() < 0.5
        prompt = self.rng.choice(PROMPTS)
        body: dict = {"model": self.model, "max_tokens": self.rng.randint(8, 48), "stream": stream}
        if chat:
            body["messages"] = [{"role": "user", "content": prompt}]
        else:
            body["prompt"] = prompt
        if self.rng.random() < 0.5:
            body.update(temperature=0.8, seed=self.rng.randint(0, 1000))
        route = "/v1/chat/completions" if chat else "/v1/completions"
        t0 = time.perf_counter()
        if not stream:
            r = await client.post(route, json=body)
            self.tally.count("valid", r.status_code)
            if r.status_code == 200:
                self.tally.valid_latency.append(time.perf_counter() - t0)
            return
        async with client.stream("POST", route, json=body) as r:
            ttft = None
            async for line in r.aiter_lines():
                if ttft is None and line.startswith("data: {"):
                    ttft = time.perf_counter() - t0
            self.tally.count("valid", r.status_code)
            if r.status_code == 200:
                self.tally.valid_latency.append(time.perf_counter() - t0)
                if ttft is not None:
                    self.tally.valid_ttft.append(ttft)

    async def disconnect(self, client: httpx.AsyncClient) -> None:
        body = {"model": self.model, "prompt": self.rng.choice(PROMPTS), "max_tokens": 200, "stream": True,
                "ignore_eos": True}  # fmt: skip
        async with client.stream("POST", "/v1/completions", json=body) as r:
            if r.status_code != 200:
                self.tally.count("disconnect", r.status_code)
                return
            chunks = 0
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    chunks += 1
                    if chunks >= self.rng.randint(1, 3):
                        break  # leaving the block closes the connection mid-stream
        self.tally.count("disconnect", "dropped by the client")

    async def oversized(self, client: httpx.AsyncClient) -> None:
        kind = self.rng.choice(["announced", "chunked", "long-prompt"])
        if kind == "long-prompt":  # under the body limit, far past what the context can hold
            r = await client.post("/v1/completions", json={"model": self.model, "prompt": "word " * 200_000})
        else:
            size = self.max_request_bytes

            async def chunks():
                yield b'{"model":"%s","prompt":"' % self.model.encode()
                sent = 0
                while sent <= size:
                    yield b"a" * (256 << 10)
                    sent += 256 << 10
                yield b'"}'

            content = chunks() if kind == "chunked" else (
                b'{"model":"%s","prompt":"' % self.model.encode() + b"a" * size + b'"}'
            )  # fmt: skip
            try:
                r = await client.post("/v1/completions", content=content, headers={"content-type": "application/json"})
            except (httpx.WriteError, httpx.RemoteProtocolError, httpx.ReadError):
                # The server answered 413 at once and closed while the body was still being sent: httpx cannot
                # read an answer that comes before its request is sent. Refused as designed (the server's log
                # has the 413); counted apart.
                self.tally.count("oversized", "413, closed while sending")
                return
        self.tally.count("oversized", r.status_code)

    async def invalid(self, client: httpx.AsyncClient) -> None:
        kind = self.rng.choice(["json", "param", "model"])
        if kind == "json":
            r = await client.post("/v1/completions", content=b'{"model": "x", "prompt": ', headers={"content-type": "application/json"})
        elif kind == "param":
            r = await client.post("/v1/completions", json={"model": self.model, "prompt": "x", "temperature": 7})
        else:
            r = await client.post("/v1/completions", json={"model": "no-such-model", "prompt": "x"})
        self.tally.count("invalid", r.status_code)

    async def slow_head(self, _client: httpx.AsyncClient) -> None:
        head = b"GET /health HTTP/1.1\r\nHost: soak\r\nX-Slow: " + b"x" * 400 + b"\r\n\r\n"
        await self._trickle("slow-head", b"", head, interval_s=0.5)

    async def slow_body(self, _client: httpx.AsyncClient) -> None:
        body = json.dumps({"model": self.model, "prompt": "x", "max_tokens": 4}).encode()
        head = (b"POST /v1/completions HTTP/1.1\r\nHost: soak\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body))  # fmt: skip
        await self._trickle("slow-body", head, body, interval_s=1.0)

    async def _trickle(self, action: str, first: bytes, rest: bytes, interval_s: float) -> None:
        """Send ``first``, then ``rest`` a byte every ``interval_s``, reading all along: the outcome is the status the
        server answers, or "closed" when it closes without one."""
        reader, writer = await asyncio.open_connection(self.host, int(self.port))
        answer = asyncio.ensure_future(reader.read())  # everything until the server closes
        try:
            writer.write(first)
            for byte in rest:
                if answer.done():
                    break
                writer.write(bytes([byte]))
                await writer.drain()
                await asyncio.wait([answer], timeout=interval_s)
            data = await asyncio.wait_for(answer, timeout=60)
            self.tally.count(action, "closed" if not data else data.split(b" ", 2)[1].decode())
        except (ConnectionResetError, BrokenPipeError):
            self.tally.count(action, "closed")
        finally:
            answer.cancel()
            writer.close()

    # -- the loops -----------------------------------------------------------------------------------------------

    async def user(self, deadline: float) -> None:
        actions, weights = zip(*MIX)
        async with httpx.AsyncClient(base_url=self.url, timeout=120) as client:
            while time.monotonic() < deadline:
                action = self.rng.choices(actions, weights)[0]
                try:
                    await getattr(self, action.replace("-", "_"))(client)
                except (httpx.HTTPError, OSError, asyncio.TimeoutError) as exc:
                    self.tally.count(action, "lost")
                    self.tally.lost.append(f"{action}: {type(exc).__name__}: {exc}")

    async def probe_health(self, deadline: float, t0: float) -> None:
        async with httpx.AsyncClient(base_url=self.url, timeout=10) as client:
            while time.monotonic() < deadline:
                start = time.perf_counter()
                try:
                    ok = (await client.get("/health")).status_code == 200
                except httpx.HTTPError:
                    ok = False
                if ok:
                    self.tally.health.append((time.monotonic() - t0, time.perf_counter() - start))
                else:
                    self.tally.health_failures += 1
                await asyncio.sleep(0.1)

    async def sample_process(self, deadline: float, t0: float) -> None:
        while True:
            try:
                samples = await asyncio.to_thread(prometheus.fetch, self.url + "/metrics", timeout=30)
                rss = samples.get(("process_resident_memory_bytes", ()), float("nan"))
                fds = samples.get(("process_open_fds", ()), float("nan"))
                self.tally.process.append((time.monotonic() - t0, rss, fds))
            except (httpx.HTTPError, ValueError):
                pass
            if time.monotonic() >= deadline:
                return
            await asyncio.sleep(min(10.0, max(0.0, deadline - time.monotonic())))


def report(tally: Tally, minutes: float, warmup_s: float) -> dict:
    by_action: dict[str, dict[str, int]] = {}
    for (action, outcome), n in sorted(tally.outcomes.items()):
        by_action.setdefault(action, {})[outcome] = n
    client_caused = ("oversized", "invalid", "slow-head", "slow-body", "disconnect")
    five_xx = {a: {o: n for o, n in d.items() if o[:1] == "5"} for a, d in by_action.items()}
    five_xx = {a: d for a, d in five_xx.items() if d}
    health = [lat for t, lat in tally.health]
    warm = [(t, rss, fds) for t, rss, fds in tally.process if t >= warmup_s] or tally.process
    rss0, rss1 = warm[0][1], tally.process[-1][1]
    ms = lambda v: None if v is None else round(v * 1000, 1)  # noqa: E731
    out = {
        "minutes": minutes,
        "requests": sum(tally.outcomes.values()),
        "by_action": by_action,
        "lost": len(tally.lost),
        "lost_examples": tally.lost[:10],
        "5xx": five_xx,
        "valid_latency_ms": {"n": len(tally.valid_latency), "p50": ms(percentile(tally.valid_latency, 50)),
                             "p99": ms(percentile(tally.valid_latency, 99))},
        "valid_ttft_ms": {"n": len(tally.valid_ttft), "p50": ms(percentile(tally.valid_ttft, 50)),
                          "p99": ms(percentile(tally.valid_ttft, 99))},
        "health_ms": {"n": len(health), "failed": tally.health_failures, "p50": ms(percentile(health, 50)),
                      "p99": ms(percentile(health, 99)), "max": ms(max(health, default=None))},
        "rss_mib": {"after_warmup": round(rss0 / 2**20, 1), "end": round(rss1 / 2**20, 1),
                    "growth_pct": round((rss1 / rss0 - 1) * 100, 2)},
        "open_fds": {"after_warmup": warm[0][2], "end": tally.process[-1][2],
                     "max": max(f for _, _, f in tally.process)},
        "samples": [(round(t, 1), round(r / 2**20, 1), f) for t, r, f in tally.process],
    }  # fmt: skip
    out["targets"] = {
        "no 5xx for client-caused errors": not any(a in five_xx for a in client_caused),
        "RSS growth < 5%": out["rss_mib"]["growth_pct"] < 5,
        "/health p99 < 50 ms": (out["health_ms"]["p99"] or 1e9) < 50 and tally.health_failures == 0,
        "zero requests lost": not tally.lost,
    }
    return out


def print_report(r: dict) -> None:
    print(f"\nsoak: {r['minutes']:g} min, {r['requests']} requests")
    for action, outcomes in r["by_action"].items():
        print(f"  {action:<11} " + ", ".join(f"{o}: {n}" for o, n in outcomes.items()))
    v, t, h = r["valid_latency_ms"], r["valid_ttft_ms"], r["health_ms"]
    print(f"  valid latency p50 {v['p50']} ms, p99 {v['p99']} ms (n={v['n']}); streamed TTFT p50 {t['p50']} ms, p99 {t['p99']} ms")
    print(f"  /health p50 {h['p50']} ms, p99 {h['p99']} ms, max {h['max']} ms (n={h['n']}, failed {h['failed']})")
    print(f"  RSS {r['rss_mib']['after_warmup']} MiB after warm-up -> {r['rss_mib']['end']} MiB ({r['rss_mib']['growth_pct']:+.2f}%)")
    print(f"  open fds {r['open_fds']['after_warmup']:.0f} after warm-up -> {r['open_fds']['end']:.0f} (max {r['open_fds']['max']:.0f})")
    print(f"  lost {r['lost']}, 5xx {r['5xx'] or 'none'}")
    for example in r["lost_examples"][:5]:
        print(f"    lost: {example}")
    for name, ok in r["targets"].items():
        print(f"  [{'met' if ok else 'MISSED'}] {name}")


async def run(args: argparse.Namespace) -> dict:
    server = None
    url = args.url
    if url is None:
        port = free_port()
        cmd = [sys.executable, "-m", "service.cli", "serve", "--port", str(port), *SERVER_FLAGS, *args.server_arg]
        if args.verifier:
            cmd += ["--verifier", args.verifier]
        if args.drafter:
            cmd += ["--drafter", args.drafter]
        server = ServerProcess(cmd, port=port, log_path=args.server_log, name="tandem serve")
        server.spawn().wait_http("/ready", timeout=300)
        url = server.url
    tally = Tally()
    soak = Soak(url, args.model, args.max_request_bytes, tally, args.seed)
    t0 = time.monotonic()
    deadline = t0 + args.minutes * 60
    try:
        await asyncio.gather(
            soak.sample_process(deadline, t0), soak.probe_health(deadline, t0),
            *(soak.user(deadline) for _ in range(args.users)),
        )  # fmt: skip
    finally:
        exit_code = server.stop(60) if server is not None else None
    out = report(tally, args.minutes, warmup_s=min(60.0, args.minutes * 60 / 5))
    out["server_exit_code"] = exit_code
    out["config"] = {k: v for k, v in vars(args).items() if k != "json"} | {"server_flags": SERVER_FLAGS if server else None}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtests.soak", description=__doc__.split("\n\n")[0])
    p.add_argument("--url", help="an already running gateway (default: start `tandem serve` with the demo pair)")
    p.add_argument("--verifier", help="verifier of the started server (default: the demo pair)")
    p.add_argument("--drafter", help="drafter of the started server (default: the demo pair)")
    p.add_argument("--model", default="tandem", help="model name (default: tandem)")
    p.add_argument("--max-request-bytes", type=int, default=4 << 20, help="the server's body limit (default: 4 MiB)")
    p.add_argument("--minutes", type=float, default=30.0, help="duration (default: 30)")
    p.add_argument("--users", type=int, default=6, help="virtual users, each looping over the mix (default: 6)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--server-arg", action="append", default=[], metavar="ARG",
                   help="an extra flag of the started server, e.g. --server-arg=--torch-threads=1 (repeatable)")
    p.add_argument("--server-log", metavar="PATH", help="write the started server's log here")
    p.add_argument("--json", metavar="PATH", help="write the report as JSON")
    args = p.parse_args(argv)
    r = asyncio.run(run(args))
    print_report(r)
    write_json(r, args.json)
    return 0 if all(r["targets"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
