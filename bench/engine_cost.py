"""Per-request cost by pool size: the engine alone, in this process, no sockets.

    .venv/bin/python bench/engine_cost.py [--quick] [--sizes 10,1000,100000] [--workers 1000]

For each size it builds a `broker.engine.Engine` with an in-memory cloud (`BenchCloud`
below: `--workers` running instances of the pool, which the engine adopts at start through
its own reconciliation) and a `MemoryRegistry`, fills it with that many leases (one new
client each, round robin over the workers, through the pool's `hand_out` and the registry's
`claim_lease`; `--fill engine` makes them through `Engine.get_worker` instead, which takes
minutes at 100,000 while a hand-out scans the workers), then times, p50 over many calls (p99
beside it), through the engine's API:

  - warm GET_WORKER: a client that already holds a worker asks again (the issue's target);
  - PING from a holder;
  - RELEASE by a holder whose worker has other holders (the worker stays; the lease for each
    release is made beforehand, untimed, through the pool's `hand_out` and the registry's
    `claim_lease`, as the hand-out room does);
  - STATUS: the document (`Engine.report`) rendered as the server renders it, its size;
  - last (it adds leases), a new client's first GET_WORKER: a new lease.

Then the same at 1,000 leases with fewer workers (`--contrast-workers`, 10 and 100): whether
a cost follows the worker count rather than the lease count.

The issue's target: GET_WORKER, PING and RELEASE p50 within 10 % of each other across sizes.
Logging is configured as shipped (`info`, JSON) into /dev/null, so the engine's own events
(`lease.ended`, `worker.release`) cost what they cost; the server's per-request line is not
part of this (see the throughput benchmark). Time is the real clock; the engine's loops run
but have nothing to do (reap_interval is a day).
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import os
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import trio

from broker.clock import Clock
from broker.cloud import Instance, LaunchSpec, Market
from broker.context import EngineSettings
from broker.engine import Engine
from broker.log import configure_logging
from broker.memory_registry import MemoryRegistry
from broker.model import Limits, WorkerRequest
from broker.prices import PriceTable
from broker.registry import LeaseRecord

POOL = "bench"
SPEC = LaunchSpec("c7i.8xlarge", Market.SPOT)
POOL_TAG = "compute-broker:pool"
STATUS_SECONDS = 2.0  # STATUS is timed 3 to 20 times, within about this long
NEW_LEASE_CALLS = 100  # new clients timed at the end of each size (each adds a lease)
CONTRAST_LEASES = 1000  # the lease count of the rows that vary the worker count
HOLDERS = 100  # the clients whose warm GET_WORKERs and PINGs are timed, in turn


class BenchCloud:
    """`broker.cloud.Cloud` in memory: `workers` running instances of the pool from the start;
    launches (none are expected) boot at once. IPs from TEST-NET-3 (never contacted)."""

    def __init__(self, workers: int, now: float) -> None:
        self._ids = itertools.count(1)
        self.instances: dict[str, Instance] = {}
        self.terminated: list[str] = []
        for _ in range(workers):
            self._add(now)

    def _add(self, now: float) -> Instance:
        n = next(self._ids)
        instance = Instance(
            instance_id=f"i-{n:017x}",
            instance_type=SPEC.instance_type,
            market=SPEC.market,
            state="running",
            public_ip=f"203.0.{n // 250}.{n % 250 + 1}",
            launched_at=now,
            tags={POOL_TAG: POOL},
        )
        self.instances[instance.instance_id] = instance
        return instance

    async def launch(
        self, spec: LaunchSpec, count: int, client_token: str, *, subnet: str | None = None
    ) -> list[Instance]:
        await trio.lowlevel.checkpoint()
        return [self._add(time.time()) for _ in range(count)]

    async def describe(self, instance_ids: Sequence[str]) -> list[Instance]:
        await trio.lowlevel.checkpoint()
        return [self.instances[i] for i in instance_ids if i in self.instances]

    async def list_pool(self) -> list[Instance]:
        await trio.lowlevel.checkpoint()
        return list(self.instances.values())

    async def terminate(self, instance_ids: Sequence[str]) -> None:
        await trio.lowlevel.checkpoint()
        for instance_id in instance_ids:
            if self.instances.pop(instance_id, None) is not None:
                self.terminated.append(instance_id)


def rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


async def timed(calls: int, fn: Callable[[int], Awaitable[Any]]) -> list[float]:
    """Seconds of each of `calls` awaits of fn(i)."""
    samples = []
    for i in range(calls):
        start = time.perf_counter()
        await fn(i)
        samples.append(time.perf_counter() - start)
    return samples


def p(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _json_default(value: object) -> object:
    return str(value)


async def fill_through_pool(engine: Engine, leases: int) -> None:
    """`leases` leases for new clients, spread evenly over the workers (as the hand-out's
    fewest-holders choice spreads them; fewer leases than workers go to workers spread over
    the pool's order, not to its first ones), through the pool's `hand_out` and the
    registry's `claim_lease`: what the hand-out room does for a new lease, without choosing
    a worker."""
    workers = list(engine.pool.workers.values())
    timeout = engine.settings.limits.idle_timeout
    for n in range(leases):
        index = n * len(workers) // leases if leases < len(workers) else n % len(workers)
        worker = workers[index]
        assert worker.ip is not None
        client, now = f"c{n}", engine.clock.now()
        lease, _ = engine.pool.hand_out(worker, client, now)
        engine.pool.note_persisted(lease, now)
        record = LeaseRecord.start(client, worker.instance_id, worker.ip, now, timeout)
        assert await engine.registry.claim_lease(record, None)


def spread_holders(engine: Engine, count: int) -> list[str]:
    """Up to `count` clients, one on each of `count` held workers spread evenly over the
    pool's order, so where a client's worker sits in any scan averages out alike at every
    size."""
    held = [w for w in engine.pool.workers.values() if engine.pool.holders(w.instance_id)]
    step = max(1, len(held) // count)
    return [engine.pool.holders(w.instance_id)[0].client for w in held[::step][:count]]


async def measure_size(leases: int, workers: int, calls: int, fill: str = "pool") -> dict[str, Any]:
    """Build an engine with `workers` workers and `leases` leases; time the requests."""
    clock = Clock()
    cloud = BenchCloud(workers, clock.now())
    settings = EngineSettings(
        default_spec=SPEC,
        limits=Limits(max_workers=workers + 100, max_hourly_cost=None, idle_timeout=900.0),
        reap_interval=86400.0,
    )
    engine = Engine(cloud, settings, clock, PriceTable.default(), MemoryRegistry(POOL))
    request = WorkerRequest()
    result: dict[str, Any] = {"leases": leases, "workers": workers}
    async with trio.open_nursery() as nursery:
        await nursery.start(engine.run)
        assert len(engine.pool.workers) == workers, "the engine did not adopt the workers"
        rss_before = rss_kib()
        start = time.perf_counter()
        if fill == "engine":
            for n in range(leases):
                await engine.get_worker(request, f"c{n}")
        else:
            await fill_through_pool(engine, leases)
        result["fill_seconds"] = round(time.perf_counter() - start, 2)
        result["rss_per_lease_bytes"] = round((rss_kib() - rss_before) * 1024 / max(leases, 1))
        assert len(engine.pool.leases) == leases
        holders = spread_holders(engine, HOLDERS)
        ips = {}
        for client in holders:
            ips[client] = (await engine.get_worker(request, client)).ip
        gc.collect()

        async def get(i: int) -> None:
            await engine.get_worker(request, holders[i % len(holders)])

        async def ping(i: int) -> None:
            client = holders[i % len(holders)]
            await engine.ping(ips[client], client)

        result["get_worker"] = await timed(calls, get)
        result["ping"] = await timed(calls, ping)

        # RELEASE: a fresh lease, made untimed, on a worker someone else holds too.
        anchor = engine.pool.workers[(await engine.get_worker(request, holders[0])).instance_id]
        assert anchor.ip is not None
        release_samples = []
        for i in range(calls):
            client = f"r{i}"
            now = clock.now()
            lease, _ = engine.pool.hand_out(anchor, client, now)
            engine.pool.note_persisted(lease, now)
            record = LeaseRecord.start(client, anchor.instance_id, anchor.ip, now, 900.0)
            assert await engine.registry.claim_lease(record, None)
            start = time.perf_counter()
            await engine.release(anchor.ip, client)
            release_samples.append(time.perf_counter() - start)
        result["release"] = release_samples
        assert not cloud.terminated, "a timed RELEASE terminated a worker"
        assert len(engine.pool.leases) == leases, "RELEASE left or took other leases"

        status_samples: list[float] = []
        size = 0
        deadline = time.perf_counter() + STATUS_SECONDS
        while len(status_samples) < 3 or (
            len(status_samples) < 20 and time.perf_counter() < deadline
        ):
            start = time.perf_counter()
            document = await engine.report()
            line = json.dumps(document, separators=(",", ":"), default=_json_default)
            status_samples.append(time.perf_counter() - start)
            size = len(line) + 1
        result["status"] = status_samples
        result["status_bytes"] = size

        # Last, as it adds leases: a new client's first GET_WORKER (a new lease).
        async def new_lease(i: int) -> None:
            await engine.get_worker(request, f"new{i}")

        result["new_lease"] = await timed(min(calls, NEW_LEASE_CALLS), new_lease)
        nursery.cancel_scope.cancel()
    return result


def summarize(raw: dict[str, Any]) -> dict[str, Any]:
    """Microseconds (p50, p99) of each timed request; STATUS in ms and bytes."""
    out = {k: v for k, v in raw.items() if not isinstance(v, list)}
    for name in ("get_worker", "ping", "release", "new_lease"):
        out[f"{name}_p50_us"] = round(statistics.median(raw[name]) * 1e6, 1)
        out[f"{name}_p99_us"] = round(p(raw[name], 0.99) * 1e6, 1)
    out["status_ms"] = round(statistics.median(raw["status"]) * 1000, 2)
    return out


def spread(rows: list[dict[str, Any]], key: str) -> float:
    """How far apart the sizes are: max/min - 1 of the p50s (0.10 = within 10 %)."""
    values = [float(row[key]) for row in rows]
    return max(values) / min(values) - 1


def run(
    sizes: Sequence[int],
    workers: int,
    calls: int,
    fill: str = "pool",
    contrast: Sequence[int] = (),
) -> list[dict[str, Any]]:
    """A row per lease count at `workers` workers, then one per worker count in `contrast`
    at 1,000 leases (what the cost follows when it is not the lease count)."""
    cases = [(size, workers) for size in sizes]
    cases += [(CONTRAST_LEASES, n) for n in contrast if n != workers]
    with open(os.devnull, "w") as devnull:
        configure_logging("json", "info", stream=devnull)
        rows = []
        for leases, pool_workers in cases:
            rows.append(summarize(trio.run(measure_size, leases, pool_workers, calls, fill)))
            gc.collect()
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| leases | workers | GET_WORKER p50 (p99) us | PING p50 (p99) us "
        "| RELEASE p50 (p99) us | new lease p50 us | STATUS ms | STATUS bytes "
        "| RSS per lease B |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        # RSS moves in pages and arenas: per lease only means something over many leases.
        per_lease = f"{r['rss_per_lease_bytes']:,}" if r["leases"] >= 10_000 else "-"
        lines.append(
            f"| {r['leases']:,} | {r['workers']:,} "
            f"| {r['get_worker_p50_us']:.1f} ({r['get_worker_p99_us']:.0f}) "
            f"| {r['ping_p50_us']:.1f} ({r['ping_p99_us']:.0f}) "
            f"| {r['release_p50_us']:.1f} ({r['release_p99_us']:.0f}) "
            f"| {r['new_lease_p50_us']:.1f} "
            f"| {r['status_ms']:,.2f} | {r['status_bytes']:,} | {per_lease} |"
        )
    by_leases = [r for r in rows if r["workers"] == rows[0]["workers"]]
    if len(by_leases) > 1:
        lines.append(
            f"\nspread across lease counts at {rows[0]['workers']:,} workers "
            "(max/min - 1 of p50; target <= 10 %): "
            + ", ".join(
                f"{name} {spread(by_leases, key) * 100:.0f} %"
                for name, key in (
                    ("GET_WORKER", "get_worker_p50_us"),
                    ("PING", "ping_p50_us"),
                    ("RELEASE", "release_p50_us"),
                )
            )
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="sizes 10,1000,10000; fewer calls")
    parser.add_argument("--sizes", help="lease counts, comma-separated (default 10,1000,100000)")
    parser.add_argument("--workers", type=int, default=1000)
    parser.add_argument(
        "--contrast-workers",
        default="10,100",
        help="also these worker counts at 1,000 leases, comma-separated ('' for none)",
    )
    parser.add_argument("--calls", type=int, help="timed calls per request kind")
    parser.add_argument(
        "--fill",
        choices=["pool", "engine"],
        default="pool",
        help="make the leases through the pool's transitions (fast, default) or through "
        "Engine.get_worker (slow while a hand-out scans the workers: minutes at 100,000)",
    )
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = parser.parse_args()
    default_sizes = "10,1000,10000" if args.quick else "10,1000,100000"
    sizes = [int(s) for s in (args.sizes or default_sizes).split(",")]
    calls = args.calls or (300 if args.quick else 2000)
    contrast = [int(n) for n in args.contrast_workers.split(",") if n]
    rows = run(sizes, args.workers, calls, args.fill, contrast)
    if args.json:
        json.dump(rows, sys.stdout)
        print()
    else:
        print(table(rows))


if __name__ == "__main__":
    main()
