"""Burst benchmark: the guide's three tuning profiles on a 1-hour queue-depth trace, simulated.

    .venv/bin/python bench/burst_trace.py

The trace is the queue depth a lab with 4 local workers sees without bursting: it rises from
0 to 500 messages over 15 minutes, holds 500 for 15, falls back to 0 by minute 45 and stays
empty for the last 15. The arrivals that produce it (1,800 jobs: 73 or 74 a minute while it
rises, 40 while it holds, 6 or 7 while it falls) are replayed unchanged under each profile, with
`broker.burst.decide` called once a check_interval (60 s) as the engine will. The model, as in
tests/test_burst.py: every worker, local or cloud, finishes jobs_per_worker (10) jobs a minute
whatever its type; a launched worker takes jobs one minute after its launch and is billed from
the launch; every ready worker counts as active during a minute in which the queue had work.

Columns: launches (cloud workers launched), peak cloud workers (running + launching), cloud
workers still up at minute 60 (those waiting out scale_down_delay, and the warm pool), their
instance-hours within the hour and those hours at the profile's spot price from
`PriceTable.default()`, and the minute the queue emptied for good. Instance types: the guide
names c5.9xlarge for High-Throughput and t3.large for Cost-Optimized; it names none for
Low-Latency, so c5.4xlarge (the guide's reference config) stands in. A plain loop, no sleeping.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import attrs

from broker.burst import PROFILES, BurstPolicy, WorkerView, decide
from broker.prices import PriceTable

MINUTES = 60
LOCAL_WORKERS = 4
PEAK_DEPTH = 500
RAMP_MINUTES = 15
BOOT_SECONDS = 60.0
QUEUE_URL = "https://sqs.us-east-1.amazonaws.com/123456789012/bench"
PROFILE_TYPES = {
    "high-throughput": "c5.9xlarge",
    "cost-optimized": "t3.large",
    "low-latency": "c5.4xlarge",  # the guide names no type for this profile
}


def depth_trace() -> list[int]:
    """Depth per minute, 0..MINUTES: ramp up, hold, ramp down, idle, RAMP_MINUTES each."""
    up = [round(PEAK_DEPTH * minute / RAMP_MINUTES) for minute in range(RAMP_MINUTES)]
    down = [
        round(PEAK_DEPTH * (RAMP_MINUTES - minute) / RAMP_MINUTES) for minute in range(RAMP_MINUTES)
    ]
    return [*up, *[PEAK_DEPTH] * RAMP_MINUTES, *down, *[0] * (RAMP_MINUTES + 1)]


def arrivals_for(trace: Sequence[int], local_jobs_per_minute: int) -> list[int]:
    """Jobs submitted each minute so that the local workers alone would see exactly `trace`."""
    arrivals = []
    for now, then in itertools.pairwise(trace):
        submitted = then - now + local_jobs_per_minute if now or then else 0
        if submitted < 0:
            raise ValueError("the trace falls faster than the local workers drain it")
        arrivals.append(submitted)
    return arrivals


@attrs.define
class SimWorker:
    """A simulated worker: billed from `launched_at`, takes jobs from `ready_at`."""

    instance_id: str
    local: bool
    launched_at: float
    ready_at: float
    last_activity: float


@attrs.frozen
class Row:
    """One line of the table."""

    profile: str
    instance_type: str
    launches: int
    peak_cloud: int
    cloud_at_end: int
    instance_hours: float
    dollars: float
    peak_depth: int
    drained_minute: float | None


def run(name: str, policy: BurstPolicy, instance_type: str | None, arrivals: list[int]) -> Row:
    """The trace under one policy; time is a float that the loop advances."""
    price = 0.0 if instance_type is None else PriceTable.default().price(instance_type, "spot")
    if price is None:
        raise ValueError(f"no spot price for {instance_type}")
    step = policy.check_interval
    workers = [SimWorker(f"local:lab{n}", True, 0.0, 0.0, 0.0) for n in range(LOCAL_WORKERS)]
    depth, launches, peak_cloud, instance_seconds = 0, 0, 0, 0.0
    depths: list[int] = []  # after each check interval's work
    now = 0.0
    while now < MINUTES * 60:
        ready = [worker for worker in workers if worker.ready_at <= now]
        cloud = [worker for worker in workers if not worker.local]
        decision = decide(
            policy,
            depth,
            [WorkerView(w.instance_id, w.local, False, w.last_activity, price) for w in ready],
            now,
            launching=len(workers) - len(ready),
            run_rate=len(cloud) * price,
            price_per_hour=price,
        )
        gone = set(decision.terminate)
        workers = [worker for worker in workers if worker.instance_id not in gone]
        ready = [worker for worker in ready if worker.instance_id not in gone]
        for _ in range(decision.launch):
            launches += 1
            ready_at = now + BOOT_SECONDS
            workers.append(SimWorker(f"i-{launches:04d}", False, now, ready_at, ready_at))
        cloud_count = sum(1 for worker in workers if not worker.local)
        peak_cloud = max(peak_cloud, cloud_count)
        instance_seconds += cloud_count * step
        minute = int(now // 60)
        depth += arrivals[minute] if minute < len(arrivals) else 0
        done = min(depth, int(len(ready) * policy.jobs_per_worker * step / 60))
        depth -= done
        depths.append(depth)
        if done:
            for worker in ready:
                worker.last_activity = now + step
        now += step
    hours = instance_seconds / 3600
    backlog = [index for index, left in enumerate(depths) if left]
    drained = (backlog[-1] + 2) * step / 60 if backlog else 0.0
    return Row(
        name,
        instance_type or "-",
        launches,
        peak_cloud,
        sum(1 for worker in workers if not worker.local),
        hours,
        hours * price,
        max(depths),
        None if depth else drained,
    )


def table(rows: Sequence[Row]) -> str:
    """The rows as a Markdown table."""
    lines = [
        "| profile | instance type (spot) | launches | peak cloud workers "
        "| cloud workers at 60 min | instance-hours | dollars | peak depth "
        "| queue drained at (min) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        drained = "never" if row.drained_minute is None else f"{row.drained_minute:g}"
        lines.append(
            f"| {row.profile} | {row.instance_type} | {row.launches} | {row.peak_cloud} "
            f"| {row.cloud_at_end} | {row.instance_hours:.2f} | ${row.dollars:.2f} "
            f"| {row.peak_depth} | {drained} |"
        )
    return "\n".join(lines)


def main() -> None:
    """Run the lab alone and the three profiles; print the table."""
    arrivals = arrivals_for(depth_trace(), LOCAL_WORKERS * BurstPolicy.default().jobs_per_worker)
    rows = [run("lab only (manual)", BurstPolicy.default(), None, arrivals)]
    for name, policy in PROFILES.items():
        auto = attrs.evolve(policy, queue_url=QUEUE_URL)
        rows.append(run(name, auto, PROFILE_TYPES[name], arrivals))
    print(
        f"{sum(arrivals)} jobs over {MINUTES} min, {LOCAL_WORKERS} local workers, "
        f"{BOOT_SECONDS:g} s boot, simulated\n"
    )
    print(table(rows))


if __name__ == "__main__":
    main()
