"""A throttling TCP proxy for the browser benchmarks (these machines have no ``tc netem``).

    python -m bench.throttle --listen 8100 --upstream 127.0.0.1:8042 [--rate-mbit 10] [--latency-ms 50]

The model is one shared link between the browser and a server:

- **bandwidth**: ``--rate-mbit`` megabits per second shared by *every* connection *in both directions* — one
  serialisation clock (a token bucket without burst) that every chunk of every connection, request or response,
  passes through in arrival order, like a half-duplex shared uplink at a district hospital (a browser opening six
  connections does not get six links);
- **latency**: ``--latency-ms`` added *one way, per direction* after a chunk has been serialised: 50 ms gives a
  round trip of ~100 ms on top of the serialisation time;
- **queueing**: each connection keeps at most ``WINDOW_BYTES`` per direction in the link's queue before the proxy
  stops reading from its source (TCP's flow control then pushes back on the sender), so a bulk download cannot
  queue megabytes in front of a later request as an unbounded buffer would; a new request still waits behind what
  the other connections have queued, as on a real FIFO bottleneck.

``--rate-mbit 0`` and ``--latency-ms 0`` forward unthrottled. The proxy counts connections and bytes each way;
:class:`ThrottleProcess` runs it as a child process (no GIL shared with the measuring process) and reads its counters
from the lines it prints on SIGUSR1.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from tests.support.net import free_port, wait_until

CHUNK_BYTES = 16 * 1024  # read size: 13 ms of a 10 Mbit/s link per chunk
WINDOW_BYTES = 64 * 1024  # per connection and direction, queued on the link before the proxy stops reading


@dataclass
class Counters:
    connections: int = 0
    up_bytes: int = 0  # browser -> server
    down_bytes: int = 0  # server -> browser


class Link:
    """The shared link: one serialisation clock for every connection and both directions, then the latency."""

    def __init__(self, rate_mbit: float, latency_ms: float) -> None:
        self.bytes_per_s = rate_mbit * 1e6 / 8 if rate_mbit > 0 else 0.0
        self.latency_s = max(0.0, latency_ms) / 1000
        self.free_at = 0.0  # when the link has sent everything given to it so far
        self.counters = Counters()

    def due(self, now: float, size: int) -> float:
        """When a chunk of ``size`` bytes handed to the link at ``now`` arrives at the other end."""
        if self.bytes_per_s:
            self.free_at = max(now, self.free_at) + size / self.bytes_per_s
            now = self.free_at
        return now + self.latency_s


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, link: Link, up: bool) -> None:
    """Copy one direction of a connection through the link, in order, with at most WINDOW_BYTES queued."""
    loop = asyncio.get_running_loop()
    queue: deque[tuple[float, bytes]] = deque()
    queued = 0
    ready = asyncio.Event()  # something is queued
    space = asyncio.Event()  # the queue is under the window
    space.set()
    finished = False

    broken = False

    async def deliver() -> None:
        nonlocal queued, broken
        try:
            while True:
                while not queue:
                    if finished:
                        return
                    ready.clear()
                    await ready.wait()
                due, data = queue.popleft()
                delay = due - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                writer.write(data)
                await writer.drain()
                queued -= len(data)
                if queued < WINDOW_BYTES:
                    space.set()
        except (ConnectionError, OSError):
            broken = True
            space.set()

    sender = asyncio.create_task(deliver())
    try:
        while True:
            data = await reader.read(CHUNK_BYTES)
            if not data:
                break
            if up:
                link.counters.up_bytes += len(data)
            else:
                link.counters.down_bytes += len(data)
            queue.append((link.due(loop.time(), len(data)), data))
            queued += len(data)
            ready.set()
            if queued >= WINDOW_BYTES and not broken:
                space.clear()
                await space.wait()
            if broken:
                break
    except (ConnectionError, OSError):
        pass
    finally:
        finished = True
        ready.set()
        with contextlib.suppress(ConnectionError, OSError):
            await sender
            if writer.can_write_eof():
                writer.write_eof()


async def _serve_connection(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter, link: Link,
                            upstream: tuple[str, int]) -> None:
    link.counters.connections += 1
    try:
        server_r, server_w = await asyncio.open_connection(*upstream)
    except OSError:
        client_w.close()
        return
    try:
        await asyncio.gather(_pipe(client_r, server_w, link, True), _pipe(server_r, client_w, link, False))
    finally:
        for w in (client_w, server_w):
            with contextlib.suppress(Exception):
                w.close()


async def serve(port: int, upstream: tuple[str, int], rate_mbit: float, latency_ms: float) -> None:
    link = Link(rate_mbit, latency_ms)
    server = await asyncio.start_server(lambda r, w: _serve_connection(r, w, link, upstream), "127.0.0.1", port)
    loop = asyncio.get_running_loop()

    def report() -> None:
        print(json.dumps(link.counters.__dict__), flush=True)

    loop.add_signal_handler(signal.SIGUSR1, report)
    loop.add_signal_handler(signal.SIGTERM, lambda: os._exit(0))  # open connections and all: nothing to keep
    print("listening", flush=True)
    async with server:
        await server.serve_forever()


class ThrottleProcess:
    """``python -m bench.throttle`` as a child process on a free loopback port in front of ``upstream``."""

    def __init__(self, upstream: str, rate_mbit: float, latency_ms: float, log_path: Path) -> None:
        host, _, port = upstream.rpartition(":")
        self.upstream = (host, int(port))
        self.rate_mbit, self.latency_ms = rate_mbit, latency_ms
        self.port = free_port()
        self.log_path = log_path
        self.proc: subprocess.Popen[str] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> ThrottleProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.throttle", "--listen", str(self.port), "--upstream",
             f"{self.upstream[0]}:{self.upstream[1]}", "--rate-mbit", str(self.rate_mbit), "--latency-ms",
             str(self.latency_ms)], stdout=self.log_path.open("w"), stderr=subprocess.STDOUT, text=True,
            cwd=Path(__file__).resolve().parent.parent)
        wait_until(lambda: "listening" in self.log_path.read_text(), timeout=30, interval=0.1,
                   what=f"the throttling proxy on port {self.port}")
        return self

    def counters(self) -> Counters:
        """The proxy's counters now (it prints them on SIGUSR1)."""
        assert self.proc is not None
        before = len(self.log_path.read_text().splitlines())
        self.proc.send_signal(signal.SIGUSR1)
        wait_until(lambda: len(self.log_path.read_text().splitlines()) > before, timeout=10, interval=0.02,
                   what="the proxy's counters")
        return Counters(**json.loads(self.log_path.read_text().splitlines()[before]))

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)

    def __enter__(self) -> ThrottleProcess:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--listen", type=int, required=True, help="loopback port to listen on")
    parser.add_argument("--upstream", required=True, help="host:port to forward to")
    parser.add_argument("--rate-mbit", type=float, default=10.0, help="shared bandwidth, both directions (10)")
    parser.add_argument("--latency-ms", type=float, default=50.0, help="added one-way latency per direction (50)")
    args = parser.parse_args(argv)
    host, _, port = args.upstream.rpartition(":")
    asyncio.run(serve(args.listen, (host, int(port)), args.rate_mbit, args.latency_ms))


if __name__ == "__main__":
    main()
