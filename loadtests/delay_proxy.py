"""A TCP proxy that puts a configurable network delay between tandem and its verifier.

    python -m loadtests.delay_proxy --listen 127.0.0.1:9000 --upstream 127.0.0.1:8001 --rtt-ms 50

then point tandem at ``http://127.0.0.1:9000``. It needs no privileges and
touches no interface (``tc netem`` on ``lo`` would slow every process on the
machine; network namespaces need root), so it suits CI and shared machines.

Model:
- every byte is delivered ``rtt/2`` (+ jitter) after it arrived, in each
  direction, so a request/response exchange costs one RTT and throughput is
  not limited (bytes in flight are pipelined);
- opening a connection costs one RTT (the SYN/SYN-ACK exchange) before the
  upstream connection is used;
- ``--loss p``: TCP never loses bytes, it retransmits; each chunk is, with
  probability p, held back an extra retransmission timeout (``--rto-ms``,
  default max(200 ms, 2·RTT), Linux's minimum RTO) and everything behind it
  waits too (head-of-line blocking), which is what a lost segment costs a
  TCP stream. It is an approximation per chunk, not per packet.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import signal
import socket
import sys
import time
from dataclasses import dataclass, field


def _hostport(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host, int(port)


@dataclass
class ProxyStats:
    connections: int = 0
    bytes_up: int = 0  # client -> upstream
    bytes_down: int = 0  # upstream -> client
    delayed_chunks: int = 0
    lost_chunks: int = 0  # chunks that paid an extra RTO
    errors: list[str] = field(default_factory=list)


class DelayProxy:
    """``async with DelayProxy(upstream=("127.0.0.1", 8001), rtt_ms=50) as p: p.url``"""

    def __init__(
        self,
        upstream: tuple[str, int],
        rtt_ms: float = 0.0,
        *,
        listen: tuple[str, int] = ("127.0.0.1", 0),
        jitter_ms: float = 0.0,
        loss: float = 0.0,
        rto_ms: float | None = None,
        seed: int | None = None,
    ):
        if rtt_ms < 0 or jitter_ms < 0 or not 0 <= loss < 1:
            raise ValueError("need rtt_ms >= 0, jitter_ms >= 0 and 0 <= loss < 1")
        self.upstream = upstream
        self.listen = listen
        self.one_way_s = rtt_ms / 2000.0
        self.jitter_s = jitter_ms / 1000.0
        self.loss = loss
        self.rto_s = (rto_ms if rto_ms is not None else max(200.0, 2 * rtt_ms)) / 1000.0
        self.rng = random.Random(seed)
        self.stats = ProxyStats()
        self._server: asyncio.base_events.Server | None = None
        self._tasks: set[asyncio.Task] = set()

    @property
    def port(self) -> int:
        assert self._server is not None, "proxy not started"
        return self._server.sockets[0].getsockname()[1]

    @property
    def url(self) -> str:
        return f"http://{self.listen[0]}:{self.port}"

    async def start(self) -> DelayProxy:
        self._server = await asyncio.start_server(self._handle, self.listen[0], self.listen[1])
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def __aenter__(self) -> DelayProxy:
        return await self.start()

    async def __aexit__(self, *exc) -> None:
        await self.stop()

    def _delay(self) -> float:
        d = self.one_way_s
        if self.jitter_s:
            d = max(0.0, d + self.rng.uniform(-self.jitter_s, self.jitter_s))
        return d

    async def _handle(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        self.stats.connections += 1
        _nodelay(client_writer)
        try:
            await asyncio.sleep(2 * self.one_way_s)  # the handshake's round trip
            try:
                up_reader, up_writer = await asyncio.open_connection(*self.upstream)
            except OSError as exc:
                self.stats.errors.append(f"upstream: {exc}")
                return
            _nodelay(up_writer)
            try:
                await asyncio.gather(
                    self._pipe(client_reader, up_writer, "bytes_up"),
                    self._pipe(up_reader, client_writer, "bytes_down"),
                )
            finally:
                _close(up_writer)
        except asyncio.CancelledError:
            pass
        finally:
            _close(client_writer)
            if task is not None:
                self._tasks.discard(task)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, counter: str) -> None:
        """Copy reader -> writer, each chunk delivered at its arrival time + delay (FIFO)."""
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def deliver() -> None:
            ready_at = 0.0
            while True:
                due, chunk = await queue.get()
                # FIFO: a chunk never overtakes the one before it (TCP is ordered).
                ready_at = max(ready_at, due)
                wait = ready_at - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                if not chunk:
                    if writer.can_write_eof():
                        with contextlib.suppress(OSError):
                            writer.write_eof()
                    return
                writer.write(chunk)
                await writer.drain()

        deliverer = asyncio.ensure_future(deliver())
        try:
            while True:
                chunk = await reader.read(65536)
                due = time.monotonic() + self._delay()
                if chunk:
                    setattr(self.stats, counter, getattr(self.stats, counter) + len(chunk))
                    self.stats.delayed_chunks += 1
                    if self.loss and self.rng.random() < self.loss:
                        self.stats.lost_chunks += 1
                        due += self.rto_s
                queue.put_nowait((due, chunk))
                if not chunk:
                    break
            await deliverer
        except (ConnectionError, OSError):
            pass
        finally:
            if not deliverer.done():
                deliverer.cancel()
                with contextlib.suppress(asyncio.CancelledError, ConnectionError, OSError):
                    await deliverer


def _nodelay(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _close(writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(Exception):
        writer.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtests.delay_proxy", description=__doc__.split("\n\n")[0])
    p.add_argument("--listen", type=_hostport, default=("127.0.0.1", 9000), help="HOST:PORT to accept on (port 0: any)")
    p.add_argument("--upstream", type=_hostport, required=True, help="HOST:PORT of the verifier")
    p.add_argument("--rtt-ms", type=float, default=0.0, help="round-trip time to add (split evenly per direction)")
    p.add_argument("--jitter-ms", type=float, default=0.0, help="uniform +- jitter per chunk and direction")
    p.add_argument("--loss", type=float, default=0.0, help="probability that a chunk pays a retransmission timeout")
    p.add_argument("--rto-ms", type=float, default=None, help="retransmission timeout (default max(200, 2*RTT))")
    p.add_argument("--seed", type=int, default=None)
    args = p.parse_args(argv)

    async def run() -> None:
        proxy = DelayProxy(
            args.upstream, args.rtt_ms, listen=args.listen, jitter_ms=args.jitter_ms, loss=args.loss,
            rto_ms=args.rto_ms, seed=args.seed,
        )
        await proxy.start()
        print(f"delay proxy {proxy.listen[0]}:{proxy.port} -> {args.upstream[0]}:{args.upstream[1]} "
              f"rtt={args.rtt_ms}ms jitter={args.jitter_ms}ms loss={args.loss}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await proxy.stop()

    asyncio.run(run())
    return 0


if __name__ == "__main__":
    sys.exit(main())
