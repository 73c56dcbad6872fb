"""The load generator: asyncio on loopback, in a process of its own, one JSON line of results.

    .venv/bin/python bench/loadgen.py --port P --mode persistent --clients 50 --requests 1000
    .venv/bin/python bench/loadgen.py --port P --mode oneshot --clients 50 --requests 200
    .venv/bin/python bench/loadgen.py --port P --mode hold --connections 10000
    .venv/bin/python bench/loadgen.py --port P --mode leases --leases 10000

Modes:
  - `persistent`: each client opens one connection and sends `--requests` lines on it, one at a
    time (send, wait for the reply line, send the next);
  - `oneshot`: each client opens a new connection per request (connect, send one line, read
    the reply, close), as the seed guide's Tcl and Python snippets do;
  - `hold`: open `--connections` idle connections, print `held N`, keep them until stdin
    closes (the caller reads the server's memory meanwhile);
  - `leases`: on one connection, `GET_WORKER client=leaseN` for N new clients (a lease each).

It uses asyncio's Protocol API, not streams: about half the CPU per request, so on this
project's 2-core machine one generator process on one core can drive one server on the other
(`cpu_seconds` in the result says how busy the generator itself was; near `seconds` means the
generator, not the server, was the bottleneck). Latency is from just before the line is sent
(before the connect, one-shot) to the reply's newline. Talks only to 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import statistics
import sys
import time
from typing import Any

HOST = "127.0.0.1"
REPLY_TIMEOUT = 60.0  # seconds any one reply may take before the run fails


class LineClient(asyncio.Protocol):
    """One connection: hands each complete reply line to whoever awaits `reply()`."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._buffer = b""
        self._lines: list[bytes] = []
        self._waiter: asyncio.Future[bytes] | None = None
        self._lost: BaseException | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        while b"\n" in self._buffer:
            line, _, self._buffer = self._buffer.partition(b"\n")
            self._lines.append(line)
        if self._lines and self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(self._lines.pop(0))

    def connection_lost(self, exc: BaseException | None) -> None:
        self._lost = exc or ConnectionResetError("closed by the server")
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(self._lost)

    async def reply(self) -> bytes:
        """The next reply line (without its newline)."""
        if self._lines:
            return self._lines.pop(0)
        if self._lost is not None:
            raise self._lost
        self._waiter = asyncio.get_running_loop().create_future()
        return await asyncio.wait_for(self._waiter, REPLY_TIMEOUT)


async def connect(port: int) -> LineClient:
    _, client = await asyncio.get_running_loop().create_connection(LineClient, HOST, port)
    return client


class Tally:
    """Latencies and failures of one run."""

    def __init__(self) -> None:
        self.latencies: list[float] = []
        self.errors = 0
        self.first_error = ""

    def add(self, reply: bytes, seconds: float) -> None:
        self.latencies.append(seconds)
        if reply.startswith(b"ERROR"):
            self.errors += 1
            self.first_error = self.first_error or reply.decode(errors="replace")


async def persistent(port: int, clients: int, requests: int, line: bytes, tally: Tally) -> None:
    async def one_client() -> None:
        client = await connect(port)
        assert client.transport is not None
        try:
            for _ in range(requests):
                start = time.perf_counter()
                client.transport.write(line)
                reply = await client.reply()
                tally.add(reply, time.perf_counter() - start)
        finally:
            client.transport.close()

    await asyncio.gather(*(one_client() for _ in range(clients)))


async def oneshot(port: int, clients: int, requests: int, line: bytes, tally: Tally) -> None:
    async def one_client() -> None:
        for _ in range(requests):
            start = time.perf_counter()
            client = await connect(port)
            assert client.transport is not None
            client.transport.write(line)
            try:
                reply = await client.reply()
            finally:
                client.transport.close()
            tally.add(reply, time.perf_counter() - start)

    await asyncio.gather(*(one_client() for _ in range(clients)))


def percentile(samples: list[float], q: float) -> float:
    """The q-quantile (0..1) by rank, of a non-empty list."""
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def summary(tally: Tally, seconds: float, cpu_seconds: float) -> dict[str, Any]:
    lat = tally.latencies
    return {
        "requests": len(lat),
        "seconds": round(seconds, 4),
        "rate": round(len(lat) / seconds, 1) if seconds > 0 else 0.0,
        "p50_ms": round(statistics.median(lat) * 1000, 3),
        "p99_ms": round(percentile(lat, 0.99) * 1000, 3),
        "max_ms": round(max(lat) * 1000, 3),
        "errors": tally.errors,
        "first_error": tally.first_error,
        "cpu_seconds": round(cpu_seconds, 4),
    }


async def run_load(
    port: int, mode: str, clients: int, requests: int, warmup: int, line: bytes
) -> dict[str, Any]:
    """A warm-up of `warmup` requests per client (not counted), then the measured run."""
    drive = persistent if mode == "persistent" else oneshot
    if warmup:
        await drive(port, clients, warmup, line, Tally())
    tally = Tally()
    cpu, start = time.process_time(), time.perf_counter()
    await drive(port, clients, requests, line, tally)
    seconds = time.perf_counter() - start
    return summary(tally, seconds, time.process_time() - cpu)


async def hold(port: int, connections: int) -> None:
    """Open `connections` idle connections, say so, keep them until stdin closes."""
    held: list[LineClient] = []
    for _ in range(connections):
        held.append(await connect(port))
    print(json.dumps({"held": len(held)}), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    for client in held:
        if client.transport is not None:
            client.transport.close()


async def make_leases(port: int, count: int) -> dict[str, Any]:
    """`count` new clients, one GET_WORKER each, on one connection."""
    client = await connect(port)
    assert client.transport is not None
    tally = Tally()
    start = time.perf_counter()
    for n in range(count):
        t = time.perf_counter()
        client.transport.write(f"GET_WORKER client=lease{n}\n".encode())
        tally.add(await client.reply(), time.perf_counter() - t)
    client.transport.close()
    return summary(tally, time.perf_counter() - start, 0.0)


def raise_fd_limit() -> int:
    """Raise this process's open-file soft limit to its hard limit; the new soft limit."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument(
        "--mode", choices=["persistent", "oneshot", "hold", "leases"], default="persistent"
    )
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--requests", type=int, default=1000, help="per client")
    parser.add_argument("--warmup", type=int, default=0, help="requests per client, not counted")
    parser.add_argument("--line", default="GET_WORKER", help="the request line (no newline)")
    parser.add_argument("--connections", type=int, default=1000, help="hold: how many")
    parser.add_argument("--leases", type=int, default=1000, help="leases: how many")
    parser.add_argument("--cpu", type=int, help="pin this process to this CPU")
    args = parser.parse_args()
    if args.cpu is not None:
        os.sched_setaffinity(0, {args.cpu})
    raise_fd_limit()
    if args.mode == "hold":
        asyncio.run(hold(args.port, args.connections))
        return
    if args.mode == "leases":
        print(json.dumps(asyncio.run(make_leases(args.port, args.leases))), flush=True)
        return
    line = args.line.encode() + b"\n"
    result = asyncio.run(
        run_load(args.port, args.mode, args.clients, args.requests, args.warmup, line)
    )
    print(json.dumps({"mode": args.mode, "clients": args.clients, **result}), flush=True)


if __name__ == "__main__":
    main()
