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
  - STATUS: the document with the caller's own leases (`Engine.report(owner)`), rendered as
    the server renders it, and its size; STATUS all (every lease): the document's build, on
    the event loop, and its rendering, which the server does in a thread past 1,000 leases;
  - last (it adds leases), a new client's first GET_WORKER: a new lease.

Then the same at 1,000 leases with fewer workers (`--contrast-workers`, 10 and 100): whether
a cost follows the worker count rather than the lease count.

The issue's target: GET_WORKER, PING and RELEASE p50 within 10 % of each other across sizes.
Logging is configured as shipped (`info`, JSON) into /dev/null, so the engine's own events
(`lease.ended`, `worker.release`) cost what they cost; the server's per-request line is not
part of this (see the throughput benchmark). Time is the real clock; the engine's loops run
but have nothing to do (reap_interval is a day). Every size's engine is built first, then the
calls go round the sizes one at a time, so a burst of outside load (the machine is shared)
falls on every size alike.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Awaitable, Sequence
from pathlib import Path
from typing import Any

import trio

from broker.adaptive import IdlePolicy
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
STATUS_SECONDS = 2.0  # STATUS is timed 3 to 20 times per size, within about this long each
NEW_LEASE_CALLS = 300  # new clients timed at the end of each size (each adds a lease)
CONTRAST_LEASES = 1000  # the lease count of the rows that vary the worker count
# The clients whose warm GET_WORKERs and PINGs are timed, in turn: as many in every row (the
# smallest has 10 leases), so no row's figure depends on how many clients' objects the loop
# cycles through (with 100 where there are 100, the CPU caches made those rows ~25 % slower).
HOLDERS = 10


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

    async def launched(self, tokens: Sequence[str]) -> dict[str, int]:
        await trio.lowlevel.checkpoint()
        return {}

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


def p(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _json_default(value: object) -> object:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return str(value)


def _render(document: object) -> str:
    """One STATUS line, as broker.server renders it."""
    return json.dumps(document, separators=(",", ":"), default=_json_default)


async def fill_through_pool(engine: Engine, leases: int, prefix: str = "") -> None:
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
        client, now = f"{prefix}c{n}", engine.clock.now()
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


class SizeBench:
    """One engine with `workers` workers and `leases` leases, and its timed requests."""

    def __init__(
        self,
        leases: int,
        workers: int,
        fill: str,
        prefix: str = "",
        idle_policy: IdlePolicy = IdlePolicy.FIXED,
    ) -> None:
        """`prefix`: before every client name (`127.0.0.1/` makes them the owners of
        `GET_WORKER client=cN` from loopback, for bench/request_cost.py)."""
        self.leases, self.workers, self.fill, self.prefix = leases, workers, fill, prefix
        self.idle_policy = idle_policy
        self.result: dict[str, Any] = {"leases": leases, "workers": workers}
        for name in (
            "get_worker",
            "ping",
            "release",
            "status",
            "status_all_build",
            "status_all_render",
            "new_lease",
        ):
            self.result[name] = []
        self.request = WorkerRequest()

    async def start(self, nursery: trio.Nursery) -> None:
        """Build the engine, let it adopt its workers, make the leases."""
        self.clock = clock = Clock()
        self.cloud = BenchCloud(self.workers, clock.now())
        settings = EngineSettings(
            default_spec=SPEC,
            limits=Limits(self.workers + 100, max_hourly_cost=None, idle_timeout=900.0),
            reap_interval=86400.0,
            idle_policy=self.idle_policy,
        )
        self.engine = engine = Engine(
            self.cloud, settings, clock, PriceTable.default(), MemoryRegistry(POOL)
        )
        await nursery.start(engine.run)
        assert len(engine.pool.workers) == self.workers, "the engine did not adopt the workers"
        rss_before = rss_kib()
        start = time.perf_counter()
        if self.fill == "engine":
            for n in range(self.leases):
                await engine.get_worker(self.request, f"{self.prefix}c{n}")
        else:
            await fill_through_pool(engine, self.leases, self.prefix)
        self.result["fill_seconds"] = round(time.perf_counter() - start, 2)
        grown = (rss_kib() - rss_before) * 1024
        self.result["rss_per_lease_bytes"] = round(grown / max(self.leases, 1))
        assert len(engine.pool.leases) == self.leases
        self.holders = spread_holders(engine, HOLDERS)
        self.ips = {}
        for client in self.holders:  # covers extended now, not in a timed call
            self.ips[client] = (await engine.get_worker(self.request, client)).ip
        handout = await engine.get_worker(self.request, self.holders[0])
        self.anchor = engine.pool.workers[handout.instance_id]  # RELEASE's worker: held

    async def _time(self, name: str, call: Awaitable[Any]) -> None:
        """Wall time, and this thread's CPU time (which a busy machine's other processes do
        not inflate: the machine is shared)."""
        cpu, start = time.thread_time(), time.perf_counter()
        await call
        self.result[name].append(time.perf_counter() - start)
        self.result.setdefault(f"{name}_cpu", []).append(time.thread_time() - cpu)

    async def time_get(self, i: int) -> None:
        """A warm GET_WORKER from a client that holds its worker."""
        await self._time(
            "get_worker", self.engine.get_worker(self.request, self.holders[i % len(self.holders)])
        )

    async def time_ping(self, i: int) -> None:
        client = self.holders[i % len(self.holders)]
        await self._time("ping", self.engine.ping(self.ips[client], client))

    async def time_release(self, i: int) -> None:
        """RELEASE of a fresh lease (made untimed) on a worker another client holds too."""
        engine, anchor, client = self.engine, self.anchor, f"r{i}"
        assert anchor.ip is not None
        now = self.clock.now()
        lease, _ = engine.pool.hand_out(anchor, client, now)
        engine.pool.note_persisted(lease, now)
        record = LeaseRecord.start(client, anchor.instance_id, anchor.ip, now, 900.0)
        assert await engine.registry.claim_lease(record, None)
        await self._time("release", engine.release(anchor.ip, client))
        assert not self.cloud.terminated, "a timed RELEASE terminated a worker"

    async def time_status(self) -> None:
        """STATUS as the server serves it: the document with the caller's own leases (a
        holder's), rendered as one JSON line; and STATUS all, every lease: the document
        (built on the event loop) and its rendering (in a thread past RENDER_IN_THREAD
        leases), timed apart."""
        start = time.perf_counter()
        document = await self.engine.report(self.holders[0])
        line = _render(document)
        self.result["status"].append(time.perf_counter() - start)
        self.result["status_bytes"] = len(line) + 1
        start = time.perf_counter()
        document = await self.engine.report(None)
        built = time.perf_counter()
        line = _render(document)
        self.result["status_all_build"].append(built - start)
        self.result["status_all_render"].append(time.perf_counter() - built)
        self.result["status_all_bytes"] = len(line) + 1

    async def time_new_lease(self, i: int) -> None:
        """A new client's first GET_WORKER (adds a lease)."""
        await self._time("new_lease", self.engine.get_worker(self.request, f"new{i}"))


async def measure_sizes(
    cases: Sequence[tuple[int, int]], calls: int, fill: str = "pool"
) -> list[dict[str, Any]]:
    """One engine per (leases, workers) case, all built first; then each request kind is
    timed in turn across the engines, call by call, so a burst of outside load (this machine
    is shared) falls on every size alike."""
    async with trio.open_nursery() as nursery:
        benches = []
        for leases, workers in cases:
            bench = SizeBench(leases, workers, fill)
            await bench.start(nursery)
            benches.append(bench)
        gc.collect()
        for i in range(calls):
            for bench in benches:
                await bench.time_get(i)
                await bench.time_ping(i)
                await bench.time_release(i)
        for bench in benches:
            assert len(bench.engine.pool.leases) == bench.leases, "RELEASE took other leases"
        deadline = time.perf_counter() + STATUS_SECONDS * len(benches)
        for n in range(20):
            if n >= 3 and time.perf_counter() > deadline:
                break
            for bench in benches:
                await bench.time_status()
        for i in range(min(calls, NEW_LEASE_CALLS)):  # last: it adds leases
            for bench in benches:
                await bench.time_new_lease(i)
        nursery.cancel_scope.cancel()
    return [bench.result for bench in benches]


async def measure_size(leases: int, workers: int, calls: int, fill: str = "pool") -> dict[str, Any]:
    """One size alone (tests, a quick look)."""
    return (await measure_sizes([(leases, workers)], calls, fill))[0]


def summarize(raw: dict[str, Any]) -> dict[str, Any]:
    """Microseconds (p50, p99) of each timed request; STATUS in ms and bytes."""
    out = {k: v for k, v in raw.items() if not isinstance(v, list)}
    for name in ("get_worker", "ping", "release", "new_lease"):
        out[f"{name}_p50_us"] = round(statistics.median(raw[name]) * 1e6, 1)
        out[f"{name}_p99_us"] = round(p(raw[name], 0.99) * 1e6, 1)
        out[f"{name}_cpu_p50_us"] = round(statistics.median(raw[f"{name}_cpu"]) * 1e6, 1)
    for name in ("status", "status_all_build", "status_all_render"):
        out[f"{name}_ms"] = round(statistics.median(raw[name]) * 1000, 2)
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
        return [summarize(raw) for raw in trio.run(measure_sizes, cases, calls, fill)]


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| leases | workers | GET_WORKER p50 (p99) / CPU us | PING p50 (p99) / CPU us "
        "| RELEASE p50 (p99) / CPU us | new lease p50 us | STATUS ms (bytes) "
        "| STATUS all: build ms + render ms (bytes) | RSS per lease B |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        # RSS moves in pages and arenas: per lease only means something over many leases.
        per_lease = f"{r['rss_per_lease_bytes']:,}" if r["leases"] >= 10_000 else "-"
        lines.append(
            f"| {r['leases']:,} | {r['workers']:,} "
            f"| {r['get_worker_p50_us']:.1f} ({r['get_worker_p99_us']:.0f}) "
            f"/ {r['get_worker_cpu_p50_us']:.1f} "
            f"| {r['ping_p50_us']:.1f} ({r['ping_p99_us']:.0f}) / {r['ping_cpu_p50_us']:.1f} "
            f"| {r['release_p50_us']:.1f} ({r['release_p99_us']:.0f}) "
            f"/ {r['release_cpu_p50_us']:.1f} "
            f"| {r['new_lease_p50_us']:.1f} "
            f"| {r['status_ms']:,.2f} ({r['status_bytes']:,}) "
            f"| {r['status_all_build_ms']:,.2f} + {r['status_all_render_ms']:,.2f} "
            f"({r['status_all_bytes']:,}) | {per_lease} |"
        )
    by_leases = [r for r in rows if r["workers"] == rows[0]["workers"]]
    by_workers = [r for r in rows if r["leases"] == CONTRAST_LEASES]
    for label, group in (
        (f"lease counts at {rows[0]['workers']:,} workers", by_leases),
        (f"worker counts at {CONTRAST_LEASES:,} leases", by_workers),
    ):
        if len(group) < 2:
            continue
        lines.append(
            f"\nspread across {label} (max/min - 1 of p50, wall / CPU; target <= 10 %): "
            + ", ".join(
                f"{name} {spread(group, f'{key}_p50_us') * 100:.0f} % / "
                f"{spread(group, f'{key}_cpu_p50_us') * 100:.0f} %"
                for name, key in (
                    ("GET_WORKER", "get_worker"),
                    ("PING", "ping"),
                    ("RELEASE", "release"),
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
