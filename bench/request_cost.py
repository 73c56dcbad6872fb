"""Per-request cost by pool size, through the server: the round trip a client on loopback waits.

    .venv/bin/python bench/request_cost.py [--quick] [--sizes 10,1000,100000] [--workers 1000]

bench/engine_cost.py times the engine alone; this times what issue #12's figures were (a warm
GET_WORKER "costs ~1.5 ms instead of 0.19 ms" at 20,000 leases): a request through the
broker's server. For each size a server process (`request_cost.py serve`, pinned to the
server's CPU) builds engine_cost's engine (its in-memory cloud with `--workers` running
instances, a `MemoryRegistry`, the leases made through the pool) and serves it with
`broker.server.Server` on loopback, logging as shipped (`info`, JSON lines, held and written
every 0.1 s) into /dev/null. This process (on the other CPU) then times round trips over one
persistent connection per server, going round the sizes request by request, so outside load
falls on every size alike (warm GET_WORKERs and PINGs first, then the RELEASEs, each followed
by a 2 ms pause: its background history write must not land on the next size's request):

  - warm GET_WORKER from a client that holds a worker (10 such clients in turn, the same 10
    at every size, spread over the pool);
  - PING from those clients;
  - RELEASE: a new client's GET_WORKER (untimed), then its RELEASE (timed). The new lease
    goes where the hand-out puts it, so at 10 leases the RELEASE leaves its worker idle and
    at 100,000 leases it leaves 99 other holders on it: what a client sees, not one code path
    (engine_cost.py times RELEASE on a worker others hold, at every size). The engines run
    `idle_policy: linger`, so a released worker is kept and no size's pool changes under
    the measurement (with `fixed`, each RELEASE at 10 leases would terminate a worker).

It prints the p50 and p99 in microseconds per size and the spread of the p50s (max/min - 1;
issue #12's target: within 10 %).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import signal
import socket
import statistics
import sys
import time
from typing import Any

import trio
from engine_cost import HOLDERS, SizeBench, p
from procs import BENCH, Placement, Server, pin_self

from broker.adaptive import IdlePolicy
from broker.log import active_sink, configure_logging
from broker.server import Server as BrokerServer
from broker.server import ServerSettings

LOOPBACK = "127.0.0.1"
OWNER_PREFIX = f"{LOOPBACK}/"  # `GET_WORKER client=cN` from loopback is owned by 127.0.0.1/cN
RELEASE_SETTLE = 0.002  # seconds after each RELEASE before the next request


# --- the server process -----------------------------------------------------------------------


async def _serve(leases: int, workers: int) -> None:
    async with trio.open_nursery() as nursery:
        # linger: a RELEASE that leaves its worker unheld keeps it (as `fixed` would not), so
        # no timed request terminates a worker and every size keeps its pool.
        bench = SizeBench(leases, workers, "pool", OWNER_PREFIX, IdlePolicy.LINGER)
        await bench.start(nursery)
        server = BrokerServer(bench.engine, ServerSettings(host=LOOPBACK, port=0))
        (listener,) = await trio.open_tcp_listeners(0, host=LOOPBACK)
        await nursery.start(functools.partial(server.run, listeners=[listener]))
        sink = active_sink()
        assert sink is not None
        sink.hold()  # as `compute-broker serve` does: info lines written every 0.1 s

        async def flush() -> None:
            while True:
                await trio.sleep(0.1)
                sink.flush()

        nursery.start_soon(flush)
        holders = [client.removeprefix(OWNER_PREFIX) for client in bench.holders]
        port = listener.socket.getsockname()[1]
        print(f"listening on {LOOPBACK}:{port}", flush=True)
        info = {"holders": holders, "ips": [bench.ips[c] for c in bench.holders]}
        print(json.dumps(info), flush=True)
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for _ in signals:
                break
        nursery.cancel_scope.cancel()


def serve(leases: int, workers: int) -> None:
    with open(os.devnull, "w") as devnull:
        configure_logging("json", "info", stream=devnull)
        trio.run(_serve, leases, workers)


# --- the client (this process) ----------------------------------------------------------------


class Size:
    """One size's server and the connection to it."""

    def __init__(self, leases: int, workers: int, placement: Placement) -> None:
        self.leases, self.workers = leases, workers
        argv = [sys.executable, str(BENCH / "request_cost.py"), "serve"]
        argv += [f"--leases={leases}", f"--workers={workers}"]
        self.server = Server(argv, cpu=placement.server)
        assert self.server.proc.stdout is not None
        info = json.loads(self.server.proc.stdout.readline())
        self.holders: list[str] = info["holders"]
        self.ips: list[str] = info["ips"]
        self.sock = socket.create_connection((LOOPBACK, self.server.port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.file = self.sock.makefile("rb")
        self.times: dict[str, list[float]] = {"get_worker": [], "ping": [], "release": []}

    def ask(self, line: str) -> str:
        self.sock.sendall(line.encode() + b"\n")
        return self.file.readline().decode().rstrip("\n")

    def timed(self, name: str, line: str) -> str:
        start = time.perf_counter()
        reply = self.ask(line)
        self.times[name].append(time.perf_counter() - start)
        assert not reply.startswith("ERROR"), (line, reply)
        return reply

    def warm(self, i: int) -> None:
        """A warm GET_WORKER and a PING from the i-th holder (in turn)."""
        k = i % len(self.holders)
        holder, ip = self.holders[k], self.ips[k]
        assert self.timed("get_worker", f"GET_WORKER client={holder}") == ip
        self.timed("ping", f"PING {ip} client={holder}")

    def release(self, i: int) -> None:
        """A new client's GET_WORKER (untimed), then its RELEASE (timed)."""
        new_ip = self.ask(f"GET_WORKER client=r{i}")
        assert not new_ip.startswith("ERROR"), new_ip
        self.timed("release", f"RELEASE {new_ip} client=r{i}")
        # A RELEASE hands the lease's history record to a background write; it runs after
        # the reply, on the servers' shared CPU, and would land on the next size's request.
        time.sleep(RELEASE_SETTLE)

    def close(self) -> None:
        self.file.close()
        self.sock.close()
        self.server.stop()

    def row(self) -> dict[str, Any]:
        row: dict[str, Any] = {"leases": self.leases, "workers": self.workers}
        for name, samples in self.times.items():
            row[f"{name}_p50_us"] = round(statistics.median(samples) * 1e6, 1)
            row[f"{name}_p99_us"] = round(p(samples, 0.99) * 1e6, 1)
        return row


def measure(cases: list[tuple[int, int]], calls: int, placement: Placement) -> list[dict[str, Any]]:
    sizes: list[Size] = []
    try:
        for leases, workers in cases:
            sizes.append(Size(leases, workers, placement))
        steps = ((Size.warm, ("get_worker", "ping")), (Size.release, ("release",)))
        for step, names in steps:  # apart: see RELEASE_SETTLE
            for i in range(min(200, calls)):  # warm-up, not counted
                for size in sizes:
                    step(size, i)
            for size in sizes:
                for name in names:
                    size.times[name].clear()
            for i in range(calls):
                for size in sizes:
                    step(size, calls + i)
        return [size.row() for size in sizes]
    finally:
        for size in sizes:
            size.close()


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| leases | workers | GET_WORKER p50 (p99) us | PING p50 (p99) us | RELEASE p50 (p99) us |",
        "| ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['leases']:,} | {r['workers']:,} "
            + " ".join(
                f"| {r[f'{n}_p50_us']:.0f} ({r[f'{n}_p99_us']:.0f})"
                for n in ("get_worker", "ping", "release")
            )
            + " |"
        )
    groups = [
        (
            f"lease counts at {rows[0]['workers']:,} workers",
            [r for r in rows if r["workers"] == rows[0]["workers"]],
        ),
        ("worker counts at 1,000 leases", [r for r in rows if r["leases"] == 1000]),
    ]
    for label, group in groups:
        if len(group) < 2:
            continue
        spreads = []
        for name, key in (("GET_WORKER", "get_worker"), ("PING", "ping"), ("RELEASE", "release")):
            values = [float(r[f"{key}_p50_us"]) for r in group]
            spreads.append(f"{name} {(max(values) / min(values) - 1) * 100:.0f} %")
        lines.append(
            f"\nround-trip p50 spread across {label} (target <= 10 %): " + ", ".join(spreads)
        )
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "serve":
        parser = argparse.ArgumentParser()
        parser.add_argument("serve")
        parser.add_argument("--leases", type=int, required=True)
        parser.add_argument("--workers", type=int, required=True)
        args = parser.parse_args()
        serve(args.leases, args.workers)
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="sizes 10,1000,10000; fewer calls")
    parser.add_argument("--sizes", help="lease counts, comma-separated (default 10,1000,100000)")
    parser.add_argument("--workers", type=int, default=1000)
    parser.add_argument(
        "--contrast-workers", default="10,10000", help="also these worker counts at 1,000 leases"
    )
    parser.add_argument("--calls", type=int, help="timed round trips per request kind and size")
    parser.add_argument("--no-pin", action="store_true")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    sizes = [
        int(s)
        for s in (args.sizes or ("10,1000,10000" if args.quick else "10,1000,100000")).split(",")
    ]
    cases = [(size, args.workers) for size in sizes]
    cases += [
        (1000, int(n)) for n in args.contrast_workers.split(",") if n and int(n) != args.workers
    ]
    placement = Placement.default(not args.no_pin)
    pin_self(placement.generator)
    rows = measure(cases, args.calls or (300 if args.quick else 2000), placement)
    if args.json:
        print(json.dumps(rows))
    else:
        print(f"placement: {placement.describe()}; {HOLDERS} holders timed per size")
        print(table(rows))


if __name__ == "__main__":
    main()
