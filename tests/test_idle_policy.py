"""The idle policy at work in the engine (broker/adaptive.py through RELEASE and the reaper):
exclusive workers, 20 s boots, $0.50/h, $50/h of waiting (break-even: 2000 s idle). On Trio's
MockClock with an in-memory cloud."""

from __future__ import annotations

from typing import Any

import pytest
import trio
from trio.testing import MockClock

from broker.adaptive import IdlePolicy
from broker.clock import Clock
from broker.engine import Engine
from broker.ledger import Budget
from broker.memory_registry import MemoryRegistry
from broker.model import WorkerRequest
from broker.registry import LeaseHistoryRecord
from tests.engines import get_ip, make_engine, running
from tests.fakes import FakeCloud

ADAPTIVE: dict[str, Any] = {"idle_policy": IdlePolicy.ADAPTIVE, "clients_per_worker": 1}


async def steady_clients(engine: Engine, count: int, every: float, use: float) -> list[str]:
    """`count` clients, one every `every` s, each using its worker `use` s then releasing it;
    the IPs they got."""
    ips = []
    for n in range(count):
        ip = await get_ip(engine, WorkerRequest(), f"c{n}")
        ips.append(ip)
        await trio.sleep(use)
        await engine.release(ip, f"c{n}")
        await trio.sleep(every - use)
    return ips


async def test_adaptive_keeps_a_released_worker_under_steady_arrivals(
    autojump_clock: MockClock, cloud: FakeCloud, clock: Clock
) -> None:
    """A client every 10 minutes: once a few have come, each finds the last one's worker."""
    engine = make_engine(cloud, clock, **ADAPTIVE)
    async with running(engine):
        ips = await steady_clients(engine, 8, every=600, use=120)
    assert len(set(ips)) < 8
    assert len(set(ips[3:])) == 1  # from the fourth on, one worker serves them all
    assert len(cloud.launch_calls) == 3


async def test_fixed_terminates_every_released_worker(
    autojump_clock: MockClock, cloud: FakeCloud, clock: Clock
) -> None:
    """The same clients under the default policy: a launch each, as the broker always did."""
    engine = make_engine(cloud, clock, clients_per_worker=1)
    async with running(engine):
        await steady_clients(engine, 8, every=600, use=120)
        assert cloud.alive() == []
    assert len(cloud.launch_calls) == 8


async def test_adaptive_reaps_a_worker_nobody_asked_for_after_one_reap_interval(
    autojump_clock: MockClock, cloud: FakeCloud, clock: Clock
) -> None:
    """No arrivals at all: a worker launched by BURST goes at the first pass after 60 s idle,
    not after the 900 s idle timeout."""
    engine = make_engine(cloud, clock, **ADAPTIVE)
    async with running(engine):
        await engine.burst(1)
        await trio.sleep(30)  # booted (20 s); idle from then
        assert len(cloud.alive()) == 1
        await trio.sleep(100)  # two reaper passes: the second sees it idle for 60 s or more
        assert cloud.alive() == []


async def test_adaptive_keeps_until_the_idle_timeout_at_most_then_reaps(
    autojump_clock: MockClock, cloud: FakeCloud, clock: Clock
) -> None:
    """After a busy spell the last released worker stays, but never beyond idle_timeout."""
    engine = make_engine(cloud, clock, **ADAPTIVE)
    async with running(engine):
        await steady_clients(engine, 6, every=300, use=60)
        assert len(cloud.alive()) == 1  # kept after its release 240 s ago
        await trio.sleep(900 - 240 - 60)
        assert len(cloud.alive()) == 1
        await trio.sleep(120)
        assert cloud.alive() == []


async def test_a_restarted_engine_learns_from_the_leases_in_the_registry(
    autojump_clock: MockClock, cloud: FakeCloud, clock: Clock
) -> None:
    """The arrival history is seeded at start-up from the registry's leases: after a restart,
    a worker released while three others are held is kept, as before the restart."""
    registry = MemoryRegistry("test")
    first = make_engine(cloud, clock, registry, **ADAPTIVE)
    async with running(first):
        ips = []
        for n in range(4):
            ips.append(await get_ip(first, WorkerRequest(), f"c{n}"))
            await trio.sleep(120)
    second = make_engine(cloud, clock, registry, **ADAPTIVE)
    async with running(second):
        assert second.ctx.arrivals.rate(clock.now()) > 0
        await second.release(ips[-1], "c3")
        assert len(cloud.alive()) == 4
    fresh = make_engine(cloud, clock, MemoryRegistry("other"), **ADAPTIVE)
    assert fresh.ctx.arrivals.rate(clock.now()) == 0


async def test_a_restarted_engine_learns_from_the_ended_leases_in_the_registry(
    autojump_clock: MockClock, cloud: FakeCloud, clock: Clock
) -> None:
    """With no lease open, the arrival history still starts from the lease history: the
    leases that ended in the last week count as arrivals at their starts."""
    registry = MemoryRegistry("test")
    first = make_engine(cloud, clock, registry, **ADAPTIVE)
    async with running(first):
        for n in range(3):
            ip = await get_ip(first, WorkerRequest(), f"c{n}")
            await first.release(ip, f"c{n}")
    assert await registry.lease_history(0.0)  # three ended leases, no open one
    second = make_engine(cloud, clock, registry, **ADAPTIVE)
    async with running(second):
        assert second.ctx.arrivals.rate(clock.now()) > 0


async def test_a_released_worker_keeps_its_idle_clock_across_a_restart(
    autojump_clock: MockClock, cloud: FakeCloud, clock: Clock
) -> None:
    """idle_policy: linger, a worker PINGed for two hours then released: a broker restarted
    at once keeps it (its record's activity is the last PING's, written with the lease's),
    rather than reaping it at the first pass as idle since its hand-out."""
    linger: dict[str, Any] = {"idle_policy": IdlePolicy.LINGER, "clients_per_worker": 1}
    registry = MemoryRegistry("test")
    first = make_engine(cloud, clock, registry, **linger)
    async with running(first):
        ip = await get_ip(first, WorkerRequest(), "c0")
        for _ in range(120):
            await trio.sleep(60)
            await first.ping(ip, "c0")
        await first.release(ip, "c0")
        assert len(cloud.alive()) == 1
    second = make_engine(cloud, clock, registry, **linger)
    async with running(second):
        await trio.sleep(130)  # two reaper passes
        assert len(cloud.alive()) == 1


async def test_a_lab_machines_ended_leases_are_not_arrivals(
    autojump_clock: MockClock, cloud: FakeCloud, clock: Clock
) -> None:
    """Leases on local workers ended before the restart do not seed the arrival history (a
    hand-out of a lab machine is no arrival when it happens either)."""
    registry = MemoryRegistry("test")
    now = clock.now()
    record = LeaseHistoryRecord(
        "c0", "lab-1", "workstation", "local", now - 600, now - 60, None, "released"
    )
    await registry.put_lease_history(record)
    engine = make_engine(cloud, clock, registry, **ADAPTIVE)
    async with running(engine):
        assert engine.ctx.arrivals.rate(clock.now()) == 0


async def test_the_engine_learns_lease_lengths_and_counts_held_workers_as_coming_supply(
    autojump_clock: MockClock, cloud: FakeCloud, clock: Clock
) -> None:
    """RELEASEs teach the rule how long leases last; the rule counts the workers held now, so
    one due back soon stands in for an idle worker."""
    engine = make_engine(cloud, clock, **ADAPTIVE)
    async with running(engine):
        await steady_clients(engine, 6, every=300, use=120)
        assert pytest.approx(120.0) == engine.ctx.lease_lengths.per_release()
        held = await get_ip(engine, WorkerRequest(), "holder")
        rule = engine.ctx.idle_rule()
        worker = engine.ctx.pool.by_ip(held)
        assert worker is not None
        assert rule.held == {(worker.instance_type, str(worker.market)): 1}
        assert pytest.approx(1 / 120.0) == rule.release_rate(worker)


async def test_the_arrival_history_counts_days_in_the_budget_time_zone(
    cloud: FakeCloud, clock: Clock
) -> None:
    """The lab's calendar is budget_timezone's: the day profile counts its days, also after
    seeding at start-up."""
    engine = make_engine(cloud, clock, budget=Budget(timezone="Europe/Berlin"), **ADAPTIVE)
    assert engine.ctx.arrivals.profile.zone == "Europe/Berlin"
    engine.ctx.seed_arrivals([clock.now()])
    assert engine.ctx.arrivals.profile.zone == "Europe/Berlin"


async def test_an_expired_lease_counts_as_holding_without_giving_the_worker_back(
    autojump_clock: MockClock, cloud: FakeCloud, clock: Clock
) -> None:
    """A client that never RELEASEs: its lease expires after idle_timeout and the engine
    learns that holding does not always give a worker back."""
    engine = make_engine(cloud, clock, **ADAPTIVE)
    async with running(engine):
        await steady_clients(engine, 2, every=300, use=120)
        await get_ip(engine, WorkerRequest(), "gone")
        await trio.sleep(900 + 2 * 60)
        lengths = engine.ctx.lease_lengths
        assert lengths.released < lengths.weight
        assert lengths.per_release() is not None
        assert lengths.mean() is not None
        assert lengths.per_release() > lengths.mean()


async def test_a_restarted_engine_knows_how_long_leases_last(
    autojump_clock: MockClock, cloud: FakeCloud, clock: Clock
) -> None:
    """The lease history also seeds how long leases last (when held workers come back)."""
    registry = MemoryRegistry("test")
    first = make_engine(cloud, clock, registry, **ADAPTIVE)
    async with running(first):
        ip = await get_ip(first, WorkerRequest(), "c0")
        await trio.sleep(600)
        await first.release(ip, "c0")
    second = make_engine(cloud, clock, registry, **ADAPTIVE)
    async with running(second):
        assert second.ctx.lease_lengths.mean() == pytest.approx(600, rel=0.01)


async def test_a_release_through_the_other_replica_keeps_a_worker_in_use(
    autojump_clock: MockClock, cloud: FakeCloud, clock: Clock
) -> None:
    """idle_policy: linger, two replicas: a worker used for half an hour through A and then
    released through B (the client's connection moved) is kept for idle_timeout: B follows
    its activity through the registry, rather than judging it idle since B learned it."""
    linger: dict[str, Any] = {"idle_policy": IdlePolicy.LINGER, "clients_per_worker": 1}
    registry = MemoryRegistry("test")
    a = make_engine(cloud, clock, registry, **linger)
    b = make_engine(cloud, clock, registry, **linger)
    async with running(a, b):
        ip = await get_ip(a, WorkerRequest(), "c0")
        for _ in range(30):
            await trio.sleep(60)
            await a.ping(ip, "c0")
        await b.release(ip, "c0")
        assert len(cloud.alive()) == 1
