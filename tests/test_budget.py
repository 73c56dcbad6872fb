"""The dollar ledger through the engine, on Trio's MockClock with an in-memory cloud: caps on
daily and monthly spend, covers, refunds, restarts, periods rolling over in the budget's zone,
on_cap: terminate_idle, and capacity fallback."""

from __future__ import annotations

import datetime as dt
from zoneinfo import ZoneInfo

import pytest
import trio
from trio.testing import MockClock

from broker.clock import Clock
from broker.cloud import CloudError, LaunchSpec, Market
from broker.engine import Engine, EngineSettings, Refusal, WorkerInterrupted
from broker.ledger import Budget, CoverPolicy, OnCap, charge
from broker.memory_registry import MemoryRegistry
from broker.model import Limits, WorkerRequest
from broker.prices import PriceTable
from broker.registry import Registry
from tests.fakes import FakeCloud

BERLIN = ZoneInfo("Europe/Berlin")
PRICE = 1.0  # $/hour of the test type
SPEC = LaunchSpec("c7i.8xlarge", Market.SPOT)
PRICES = PriceTable(
    {
        ("c7i.8xlarge", "spot"): PRICE,
        ("c7i.8xlarge", "on-demand"): 3.0,
        ("c6i.8xlarge", "spot"): 0.8,
    }
)
IDLE, REAP, LAUNCH = 600.0, 60.0, 300.0
POLICY = CoverPolicy(IDLE, REAP, LAUNCH)
# One launch commits the price for launch_timeout + idle_timeout + two reaper passes:
# 1020 s, $0.2834 at $1/h.
PER_LAUNCH = PRICE * (POLICY.initial(0.0)) / 3600
NOON = dt.datetime(2026, 11, 23, 12, 0, tzinfo=BERLIN).timestamp()


def settings(
    *,
    daily: float | None = None,
    monthly: float | None = None,
    on_cap: OnCap = OnCap.REFUSE,
    exclusive: bool = True,
    spec: LaunchSpec = SPEC,
    subnets: tuple[str | None, ...] = (),
) -> EngineSettings:
    return EngineSettings(
        default_spec=spec,
        limits=Limits(100, None, IDLE, 1 if exclusive else None),
        launch_timeout=LAUNCH,
        describe_interval=2.0,
        reap_interval=REAP,
        budget=Budget(daily, monthly, "Europe/Berlin", on_cap),
        subnets=subnets,
    )


def make(cloud: FakeCloud, clock: Clock, registry: Registry, **kwargs: object) -> Engine:
    return Engine(cloud, settings(**kwargs), clock, PRICES, registry)  # type: ignore[arg-type]


@pytest.fixture
async def clock() -> Clock:
    return Clock(epoch=NOON)


@pytest.fixture
async def cloud(clock: Clock) -> FakeCloud:
    return FakeCloud(clock, boot_time=20.0)


async def ask(engine: Engine, client: str, wait: float | None = None) -> str:
    """GET_WORKER's reply line: the IP, or the ERROR reason."""
    try:
        return (await engine.get_worker(WorkerRequest(wait=wait), client)).ip
    except Refusal as exc:
        return f"ERROR: {exc}"


async def test_sixty_concurrent_requests_against_a_cap_that_fits_three_launch_three(
    autojump_clock: MockClock, cloud: FakeCloud, clock: Clock
) -> None:
    """A daily cap that fits three launches: exactly three instances, 57 budget errors naming
    the cap, the spend and the limit; the ledger never passes the cap."""
    registry = MemoryRegistry("test")
    cap = 3.5 * PER_LAUNCH
    engine = make(cloud, clock, registry, daily=cap)
    replies: list[str] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(engine.run)

        async def one(n: int) -> None:
            replies.append(await ask(engine, f"c{n}", wait=None))

        async with trio.open_nursery() as clients:
            for n in range(60):
                clients.start_soon(one, n)
        nursery.cancel_scope.cancel()
    assert sum(count for _, count, _ in cloud.launch_calls) == 3
    errors = [r for r in replies if r.startswith("ERROR")]
    assert len(errors) == 57
    # Refused at once, or (exclusive mode: a release could free money) after waiting.
    assert all("budget: max_daily_cost $0.99 for 2026-11-23 reached" in e for e in errors)
    committed = (await registry.spend(["day:2026-11-23"]))["day:2026-11-23"]
    assert committed <= round(cap * 1_000_000)


async def test_a_restart_keeps_the_spend(
    autojump_clock: MockClock, cloud: FakeCloud, clock: Clock
) -> None:
    """A new engine on the same registry sees the day's spend and refuses past the cap."""
    registry = MemoryRegistry("test")
    async with trio.open_nursery() as nursery:
        first = make(cloud, clock, registry, daily=1.5 * PER_LAUNCH)
        await nursery.start(first.run)
        assert not (await ask(first, "a")).startswith("ERROR")
        nursery.cancel_scope.cancel()
    async with trio.open_nursery() as nursery:
        second = make(cloud, clock, registry, daily=1.5 * PER_LAUNCH)
        await nursery.start(second.run)
        assert "budget: max_daily_cost" in await ask(second, "b", wait=5)
        await second.reap_once()
        day = second.status()["budget"]["day"]
        assert pytest.approx(day["committed"], abs=1e-3) == PER_LAUNCH
        assert pytest.approx(day["limit"]) == 1.5 * PER_LAUNCH
        nursery.cancel_scope.cancel()


async def test_the_day_rolls_over_at_midnight_in_the_budget_zone(
    autojump_clock: MockClock, cloud: FakeCloud
) -> None:
    """Spend counts per local day: refused at 23:00 Berlin, admitted again after midnight."""
    late = dt.datetime(2026, 11, 23, 23, 0, tzinfo=BERLIN).timestamp()
    clock = Clock(epoch=late)
    cloud = FakeCloud(clock, boot_time=20.0)
    registry = MemoryRegistry("test")
    engine = make(cloud, clock, registry, daily=1.5 * PER_LAUNCH, exclusive=True)
    async with trio.open_nursery() as nursery:
        await nursery.start(engine.run)
        assert not (await ask(engine, "a")).startswith("ERROR")
        assert "budget: max_daily_cost" in await ask(engine, "b", wait=5)
        await trio.sleep(3600)  # past 00:00 Berlin: a new day (UTC is still on the 23rd)
        reply = await ask(engine, "b", wait=None)
        assert not reply.startswith("ERROR"), reply
        assert engine.status()["budget"]["day"]["period"] == "2026-11-24"
        nursery.cancel_scope.cancel()


async def test_the_month_cap_rolls_over_at_month_end(
    autojump_clock: MockClock, cloud: FakeCloud
) -> None:
    """A monthly cap reached on 30 November frees up on 1 December (Berlin)."""
    late = dt.datetime(2026, 11, 30, 23, 30, tzinfo=BERLIN).timestamp()
    clock = Clock(epoch=late)
    cloud = FakeCloud(clock, boot_time=20.0)
    engine = make(cloud, clock, MemoryRegistry("test"), monthly=0.4)
    async with trio.open_nursery() as nursery:
        await nursery.start(engine.run)
        # A launch commits 17 minutes ($0.28), all in November: one fits, not two.
        assert not (await ask(engine, "a")).startswith("ERROR")
        assert "budget: max_monthly_cost $0.40 for 2026-11 reached" in await ask(
            engine, "b", wait=5
        )
        await trio.sleep(1800)
        assert not (await ask(engine, "b")).startswith("ERROR")
        assert engine.status()["budget"]["month"]["period"] == "2026-12"
        nursery.cancel_scope.cancel()


async def test_release_refunds_the_unused_cover(
    autojump_clock: MockClock, cloud: FakeCloud, clock: Clock
) -> None:
    """A worker released after a minute gives back the rest of its cover: the next launch
    fits under a cap that fits one at a time."""
    registry = MemoryRegistry("test")
    engine = make(cloud, clock, registry, daily=1.5 * PER_LAUNCH)
    async with trio.open_nursery() as nursery:
        await nursery.start(engine.run)
        ip = await ask(engine, "a")
        await trio.sleep(60)
        await engine.release(ip, "a")
        assert not (await ask(engine, "b", wait=None)).startswith("ERROR")
        assert len(cloud.launch_calls) == 2
        spent = engine.status()["budget"]["day"]["spent"]
        assert spent == pytest.approx(PRICE * (80 + 20) / 3600, abs=2e-3)
        nursery.cancel_scope.cancel()


async def test_a_held_worker_extends_its_cover_and_is_interrupted_at_the_cap(
    autojump_clock: MockClock, cloud: FakeCloud, clock: Clock
) -> None:
    """Pings keep a worker alive while the cap allows; then PING answers interrupted with
    the cover's end, and the worker is terminated before it runs past it."""
    registry = MemoryRegistry("test")
    engine = make(cloud, clock, registry, daily=1.0)  # five covers' worth
    async with trio.open_nursery() as nursery:
        await nursery.start(engine.run)
        ip = await ask(engine, "a")
        interrupted: WorkerInterrupted | None = None
        for _ in range(200):
            await trio.sleep(60)
            try:
                await engine.ping(ip, "a")
            except WorkerInterrupted as exc:
                interrupted = exc
                break
        assert interrupted is not None
        assert interrupted.interruption.reason == "budget"
        deadline = interrupted.interruption.deadline
        assert deadline is not None
        while cloud.alive():
            await trio.sleep(REAP)
        assert clock.now() <= deadline + 1
        committed = (await registry.spend(["day:2026-11-23"]))["day:2026-11-23"]
        assert committed <= 1_000_000
        nursery.cancel_scope.cancel()


async def test_on_cap_terminate_idle_terminates_idle_workers_at_once(
    autojump_clock: MockClock, cloud: FakeCloud, clock: Clock
) -> None:
    """When a launch is refused for the cap, the idle workers are terminated right away (their
    unused cover is refunded); held ones stay."""
    engine = make(
        cloud,
        clock,
        MemoryRegistry("test"),
        daily=3.5 * PER_LAUNCH,
        on_cap=OnCap.TERMINATE_IDLE,
        exclusive=False,
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(engine.run)
        assert len(await engine.burst(3)) == 3
        await trio.sleep(30)  # booted
        held = await ask(engine, "a")
        with pytest.raises(Refusal, match="budget: max_daily_cost"):
            await engine.burst(1)
        with trio.fail_after(5):
            while len(engine.pool.workers) > 1:
                await trio.sleep(0.1)
        assert [held] == [w.ip for w in engine.pool.workers.values()]
        assert len(cloud.alive()) == 1
        assert engine.status()["budget"]["day"]["committed"] < 1.5 * PER_LAUNCH
        nursery.cancel_scope.cancel()


async def test_capacity_errors_fall_back_to_the_next_type_then_on_demand(
    autojump_clock: MockClock, cloud: FakeCloud, clock: Clock
) -> None:
    """No spot capacity for the first type: the second type; none for any spot offering:
    on-demand, priced as on-demand. Failed offerings are skipped by the next launch and
    listed in STATUS."""
    spec = LaunchSpec("c7i.8xlarge", Market.SPOT, ("c6i.8xlarge",), on_demand_fallback=True)
    engine = make(cloud, clock, MemoryRegistry("test"), spec=spec)
    capacity = CloudError("InsufficientInstanceCapacity", "no capacity")
    async with trio.open_nursery() as nursery:
        await nursery.start(engine.run)
        cloud.launch_errors = [capacity]
        await ask(engine, "a")
        assert [s.instance_type for s, _, _ in cloud.launch_calls] == ["c7i.8xlarge", "c6i.8xlarge"]
        status = engine.status()
        assert [f["offering"] for f in status["capacity"]["failed_offerings"]] == [
            "c7i.8xlarge spot"
        ]
        assert status["capacity"]["fallbacks"][-1]["got"] == "c6i.8xlarge spot"
        cloud.launch_errors = [CloudError("SpotMaxPriceTooLow", "too low")]
        await ask(engine, "b")  # skips c7i (remembered), c6i fails: on-demand c7i
        tried = [(s.instance_type, str(s.market)) for s, _, _ in cloud.launch_calls[2:]]
        assert tried == [("c6i.8xlarge", "spot"), ("c7i.8xlarge", "on-demand")]
        worker = next(w for w in engine.pool.workers.values() if w.market is Market.ON_DEMAND)
        assert worker.price_per_hour == 3.0
        nursery.cancel_scope.cancel()


async def test_no_on_demand_fallback_gives_a_clear_error(
    autojump_clock: MockClock, cloud: FakeCloud, clock: Clock
) -> None:
    """Without on_demand_fallback, no spot capacity anywhere is one ERROR naming each try."""
    spec = LaunchSpec("c7i.8xlarge", Market.SPOT, ("c6i.8xlarge",))
    engine = make(cloud, clock, MemoryRegistry("test"), spec=spec, subnets=("subnet-a", "subnet-b"))
    async with trio.open_nursery() as nursery:
        await nursery.start(engine.run)
        cloud.launch_errors = [CloudError("InsufficientInstanceCapacity", "none")] * 4
        reply = await ask(engine, "a")
        assert reply == (
            "ERROR: launch failed: InsufficientInstanceCapacity: no offering had capacity: "
            "c7i.8xlarge spot in subnet-a: InsufficientInstanceCapacity; "
            "c7i.8xlarge spot in subnet-b: InsufficientInstanceCapacity; "
            "c6i.8xlarge spot in subnet-a: InsufficientInstanceCapacity; "
            "c6i.8xlarge spot in subnet-b: InsufficientInstanceCapacity"
        )
        assert cloud.subnets == ["subnet-a", "subnet-b", "subnet-a", "subnet-b"]
        nursery.cancel_scope.cancel()


def test_per_launch_constant_matches_the_ledger() -> None:
    """The tests' arithmetic: one launch commits $0.2834 at $1/h (300 + 600 + 2 x 60 s)."""
    assert charge(PRICE, NOON, POLICY.initial(NOON), BERLIN) == {
        "day:2026-11-23": 283_334,
        "month:2026-11": 283_334,
    }


async def test_a_launch_cut_off_at_launch_timeout_gives_its_charge_back_when_settled(
    autojump_clock: MockClock, cloud: FakeCloud, clock: Clock
) -> None:
    """RunInstances hangs past launch_timeout: the charge stays with the launch intent (the
    call might still launch) until the reconciler settles the intent; nothing came, so the
    whole charge is refunded."""
    registry = MemoryRegistry("test")
    engine = make(cloud, clock, registry, daily=10.0)
    cloud.launch_delay = 10 * LAUNCH  # cancelled at launch_timeout: nothing is launched
    async with trio.open_nursery() as nursery:
        await nursery.start(engine.run)
        assert "launch timed out" in await ask(engine, "a")
        day = "day:2026-11-23"
        assert (await registry.spend([day]))[day] > 0  # kept while the call may still land
        await trio.sleep(2 * LAUNCH + REAP)  # the intent is older than launch_timeout
        await engine.reap_once()
        assert (await registry.spend([day]))[day] <= 1  # refunds round down
        assert await registry.list_intents(clock.now()) == []
        nursery.cancel_scope.cancel()


async def test_a_refused_dearer_request_does_not_count_as_reaching_the_cap(
    autojump_clock: MockClock, cloud: FakeCloud, clock: Clock
) -> None:
    """With on_cap: terminate_idle, a market=on-demand request the cap cannot afford is
    refused, but the idle spot worker stays: default workers still fit."""
    engine = make(
        cloud,
        clock,
        MemoryRegistry("test"),
        daily=2.5 * PER_LAUNCH,
        on_cap=OnCap.TERMINATE_IDLE,
        exclusive=False,
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(engine.run)
        assert len(await engine.burst(1)) == 1
        await trio.sleep(30)
        with pytest.raises(Refusal, match="budget: max_daily_cost"):
            await engine.get_worker(WorkerRequest(market=Market.ON_DEMAND, wait=1), "a")
        await trio.sleep(1)
        assert len(cloud.alive()) == 1
        assert engine.status()["budget"]["day"]["remaining"] > PER_LAUNCH
        nursery.cancel_scope.cancel()
