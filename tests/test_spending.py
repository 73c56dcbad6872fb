"""The budget room (broker/spending.py): the dollar ledger at work. Caps on daily and monthly
spend, covers, refunds, restarts, periods rolling over in the budget's zone, on_cap:
terminate_idle. On Trio's MockClock with an in-memory cloud and registry;
tests/test_spending_aws.py has the same against moto's EC2 and DynamoDB."""

from __future__ import annotations

import datetime as dt
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import trio
from trio.testing import MockClock

from broker.clock import Clock
from broker.cloud import CloudError
from broker.engine import Engine, Refusal, WorkerInterrupted
from broker.ledger import Budget, CoverPolicy, OnCap, charge
from broker.memory_registry import MemoryRegistry
from broker.model import Market, WorkerRequest
from broker.prices import PriceTable
from broker.registry import Registry
from tests.engines import ask, make_engine, running
from tests.fakes import FakeCloud
from tests.harness import wait_for

BERLIN = ZoneInfo("Europe/Berlin")
PRICE = 1.0  # $/hour of the test type
PRICES = PriceTable({("c7i.8xlarge", "spot"): PRICE, ("c7i.8xlarge", "on-demand"): 3.0})
IDLE, REAP, LAUNCH = 600.0, 60.0, 300.0
POLICY = CoverPolicy(IDLE, REAP, LAUNCH)
# One launch commits the price for launch_timeout + idle_timeout + two reaper passes:
# 1020 s, $0.2834 at $1/h.
PER_LAUNCH = PRICE * (POLICY.initial(0.0)) / 3600
NOON = dt.datetime(2026, 11, 23, 12, 0, tzinfo=BERLIN).timestamp()


def budget_engine(
    cloud: FakeCloud, clock: Clock, registry: Registry, *, shared: bool = False, **budget: Any
) -> Engine:
    """An engine with the caps in `budget` (`Budget` fields) counted in Berlin, PRICES,
    idle_timeout 600 s, and a worker per client unless `shared`."""
    return make_engine(
        cloud,
        clock,
        registry,
        prices=PRICES,
        max_workers=100,
        idle_timeout=IDLE,
        clients_per_worker=None if shared else 1,
        launch_timeout=LAUNCH,
        reap_interval=REAP,
        budget=Budget(timezone="Europe/Berlin", **budget),
    )


@pytest.fixture
async def clock() -> Clock:
    return Clock(epoch=NOON)


def test_per_launch_constant_matches_the_ledger() -> None:
    """The tests' arithmetic: one launch commits $0.2834 at $1/h (300 + 600 + 2 x 60 s)."""
    assert charge(PRICE, NOON, POLICY.initial(NOON), BERLIN) == {
        "day:2026-11-23": 283_334,
        "month:2026-11": 283_334,
    }


async def test_sixty_concurrent_requests_against_a_cap_that_fits_three_launch_three(
    autojump_clock: MockClock, cloud: FakeCloud, clock: Clock
) -> None:
    """A daily cap that fits three launches: exactly three instances, 57 budget errors naming
    the cap, the spend and the limit; the ledger never passes the cap."""
    registry = MemoryRegistry("test")
    cap = 3.5 * PER_LAUNCH
    engine = budget_engine(cloud, clock, registry, max_daily_cost=cap)
    replies: list[str] = []

    async def one(n: int) -> None:
        replies.append(await ask(engine, f"c{n}", wait=None))

    async with running(engine), trio.open_nursery() as clients:
        for n in range(60):
            clients.start_soon(one, n)
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
    first = budget_engine(cloud, clock, registry, max_daily_cost=1.5 * PER_LAUNCH)
    async with running(first):
        assert not (await ask(first, "a")).startswith("ERROR")
    second = budget_engine(cloud, clock, registry, max_daily_cost=1.5 * PER_LAUNCH)
    async with running(second):
        assert "budget: max_daily_cost" in await ask(second, "b", wait=5)
        await second.reap_once()
        day = second.status()["budget"]["day"]
        assert day["committed"] == pytest.approx(PER_LAUNCH, abs=1e-3)
        assert day["limit"] == pytest.approx(1.5 * PER_LAUNCH)


async def test_the_day_rolls_over_at_midnight_in_the_budget_zone(
    autojump_clock: MockClock,
) -> None:
    """Spend counts per local day: refused at 23:00 Berlin, admitted again after midnight."""
    clock = Clock(epoch=dt.datetime(2026, 11, 23, 23, 0, tzinfo=BERLIN).timestamp())
    cloud = FakeCloud(clock, boot_time=20.0)
    engine = budget_engine(cloud, clock, MemoryRegistry("test"), max_daily_cost=1.5 * PER_LAUNCH)
    async with running(engine):
        assert not (await ask(engine, "a")).startswith("ERROR")
        assert "budget: max_daily_cost" in await ask(engine, "b", wait=5)
        await trio.sleep(3600)  # past 00:00 Berlin: a new day (UTC is still on the 23rd)
        reply = await ask(engine, "b", wait=None)
        assert not reply.startswith("ERROR"), reply
        assert engine.status()["budget"]["day"]["period"] == "2026-11-24"


async def test_the_month_cap_rolls_over_at_month_end(autojump_clock: MockClock) -> None:
    """A monthly cap reached on 30 November frees up on 1 December (Berlin)."""
    clock = Clock(epoch=dt.datetime(2026, 11, 30, 23, 30, tzinfo=BERLIN).timestamp())
    cloud = FakeCloud(clock, boot_time=20.0)
    engine = budget_engine(cloud, clock, MemoryRegistry("test"), max_monthly_cost=0.4)
    async with running(engine):
        # A launch commits 17 minutes ($0.28), all in November: one fits, not two.
        assert not (await ask(engine, "a")).startswith("ERROR")
        assert "budget: max_monthly_cost $0.40 for 2026-11 reached" in await ask(
            engine, "b", wait=5
        )
        await trio.sleep(1800)
        assert not (await ask(engine, "b")).startswith("ERROR")
        assert engine.status()["budget"]["month"]["period"] == "2026-12"


async def test_the_hourly_cap_is_committed_in_the_registry_too(
    autojump_clock: MockClock, cloud: FakeCloud, clock: Clock
) -> None:
    """max_hourly_cost is committed in the registry like the dollar ledger (so it holds for
    the pool, not per replica): with $3/h of room and $1/h workers, the fourth concurrent
    exclusive request is refused by the cap, and the registry's run rate is exactly the three
    workers'."""
    registry = MemoryRegistry("test")
    engine = make_engine(
        cloud, clock, registry, prices=PRICES, max_hourly_cost=3.0, clients_per_worker=1
    )
    answers: list[str] = []

    async def one(n: int) -> None:
        answers.append(await ask(engine, f"c{n}", wait=30))

    async with running(engine):
        async with trio.open_nursery() as clients:
            for n in range(4):
                clients.start_soon(one, n)
        committed = await registry.spend(["rate"])
    refusals = [a for a in answers if a.startswith("ERROR")]
    assert len(answers) - len(refusals) == 3
    assert len(refusals) == 1
    assert "max_hourly_cost $3/h" in refusals[0]
    assert committed == {"rate": 3_000_000}


async def test_release_refunds_the_unused_cover(
    autojump_clock: MockClock, cloud: FakeCloud, clock: Clock
) -> None:
    """A worker released after a minute gives back the rest of its cover: the next launch
    fits under a cap that fits one at a time."""
    engine = budget_engine(cloud, clock, MemoryRegistry("test"), max_daily_cost=1.5 * PER_LAUNCH)
    async with running(engine):
        ip = await ask(engine, "a")
        await trio.sleep(60)
        await engine.release(ip, "a")
        assert not (await ask(engine, "b", wait=None)).startswith("ERROR")
        assert len(cloud.launch_calls) == 2
        spent = engine.status()["budget"]["day"]["spent"]
        assert spent == pytest.approx(PRICE * (80 + 20) / 3600, abs=2e-3)


async def test_a_held_worker_extends_its_cover_and_is_interrupted_at_the_cap(
    autojump_clock: MockClock, cloud: FakeCloud, clock: Clock
) -> None:
    """Pings keep a worker alive while the cap allows; then PING answers interrupted with
    the cover's end, and the worker is terminated before it runs past it."""
    registry = MemoryRegistry("test")
    engine = budget_engine(cloud, clock, registry, max_daily_cost=1.0)  # five covers' worth
    async with running(engine):
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
        await wait_for(lambda: not cloud.alive(), timeout=3600, poll=REAP)
        assert clock.now() <= deadline + 1
        committed = (await registry.spend(["day:2026-11-23"]))["day:2026-11-23"]
        assert committed <= 1_000_000


async def test_on_cap_terminate_idle_terminates_idle_workers_at_once(
    autojump_clock: MockClock, cloud: FakeCloud, clock: Clock
) -> None:
    """When a launch is refused for the cap, the idle workers are terminated right away (their
    unused cover is refunded); held ones stay."""
    engine = budget_engine(
        cloud,
        clock,
        MemoryRegistry("test"),
        shared=True,
        max_daily_cost=3.5 * PER_LAUNCH,
        on_cap=OnCap.TERMINATE_IDLE,
    )
    async with running(engine):
        assert len(await engine.burst(3)) == 3
        await trio.sleep(30)  # booted
        held = await ask(engine, "a")
        with pytest.raises(Refusal, match="budget: max_daily_cost"):
            await engine.burst(1)
        await wait_for(lambda: len(engine.pool.workers) == 1, timeout=5, poll=0.1)
        assert [w.ip for w in engine.pool.workers.values()] == [held]
        assert len(cloud.alive()) == 1
        assert engine.status()["budget"]["day"]["committed"] < 1.5 * PER_LAUNCH


async def test_a_launch_cut_off_at_launch_timeout_gives_its_charge_back_when_settled(
    autojump_clock: MockClock, cloud: FakeCloud, clock: Clock
) -> None:
    """RunInstances hangs past launch_timeout: the charge stays with the launch intent (the
    call might still launch) until the reconciler settles the intent; nothing came, so the
    whole charge is refunded."""
    registry = MemoryRegistry("test")
    engine = budget_engine(cloud, clock, registry, max_daily_cost=10.0)
    cloud.launch_delay = 10 * LAUNCH  # cancelled at launch_timeout: nothing is launched
    day = "day:2026-11-23"
    async with running(engine):
        assert "launch timed out" in await ask(engine, "a")
        assert (await registry.spend([day]))[day] > 0  # kept while the call may still land
        await trio.sleep(2 * LAUNCH + REAP)  # the intent is older than launch_timeout
        await engine.reap_once()
        assert (await registry.spend([day]))[day] <= 1  # refunds round down
        assert await registry.list_intents(clock.now()) == []


async def test_a_launch_the_counter_cuts_shrinks_its_intent_and_refunds_the_rest(
    autojump_clock: MockClock, cloud: FakeCloud, clock: Clock
) -> None:
    """The budget charged five workers but the pool-wide counter has room for two: the
    launch intent is lowered to two and three covers are refunded in the same write, so the
    ledger holds exactly what runs, during the launch and after."""
    registry = MemoryRegistry("test")
    await registry.reserve_instances(98, 100)  # other replicas' workers
    engine = budget_engine(cloud, clock, registry, max_daily_cost=10.0)
    cloud.launch_delay = 5.0
    day = "day:2026-11-23"
    async with running(engine), trio.open_nursery() as nursery:
        nursery.start_soon(engine.burst, 5)
        await wait_for(lambda: bool(cloud.launch_calls))
        [intent] = await registry.list_intents(clock.now())
        assert intent.count == 2
        assert cloud.launch_calls[0][1] == 2
        assert pytest.approx((await registry.spend([day]))[day] / 1e6, abs=1e-5) == 2 * PER_LAUNCH
    assert await registry.list_intents(clock.now()) == []
    assert pytest.approx((await registry.spend([day]))[day] / 1e6, abs=1e-5) == 2 * PER_LAUNCH


async def test_a_charge_left_by_a_crash_is_refunded_after_a_long_outage(
    autojump_clock: MockClock, cloud: FakeCloud, clock: Clock
) -> None:
    """A broker that dies with RunInstances in flight and restarts 20 minutes later (after
    twice launch_timeout): the launch's intent still holds its charge, and the reconciliation
    refunds it (an intent that expired at twice launch_timeout left the day charged)."""
    registry = MemoryRegistry("test")
    day = "day:2026-11-23"
    first = budget_engine(cloud, clock, registry, max_daily_cost=10.0)
    cloud.launch_delay = 10 * LAUNCH
    async with running(first), trio.open_nursery() as nursery:
        nursery.start_soon(first.burst, 1)
        await wait_for(lambda: bool(cloud.launch_calls))
        nursery.cancel_scope.cancel()  # the broker dies, RunInstances unanswered
    assert (await registry.spend([day]))[day] > 0
    await trio.sleep(1200)
    cloud.launch_delay = 0.0
    second = budget_engine(cloud, clock, registry, max_daily_cost=10.0)
    async with running(second):
        assert await registry.list_intents(clock.now()) == []
        assert (await registry.spend([day]))[day] <= 1  # refunds round down


async def test_a_refused_dearer_request_does_not_count_as_reaching_the_cap(
    autojump_clock: MockClock, cloud: FakeCloud, clock: Clock
) -> None:
    """With on_cap: terminate_idle, a market=on-demand request the cap cannot afford is
    refused, but the idle spot worker stays: default workers still fit."""
    engine = budget_engine(
        cloud,
        clock,
        MemoryRegistry("test"),
        shared=True,
        max_daily_cost=2.5 * PER_LAUNCH,
        on_cap=OnCap.TERMINATE_IDLE,
    )
    async with running(engine):
        assert len(await engine.burst(1)) == 1
        await trio.sleep(30)
        with pytest.raises(Refusal, match="budget: max_daily_cost"):
            await engine.get_worker(WorkerRequest(market=Market.ON_DEMAND, wait=1), "a")
        await trio.sleep(1)
        assert len(cloud.alive()) == 1
        assert engine.status()["budget"]["day"]["remaining"] > PER_LAUNCH


async def test_ec2_unreachable_during_a_launch_gives_its_charge_back_at_once(
    autojump_clock: MockClock, cloud: FakeCloud, clock: Clock
) -> None:
    """RunInstances fails as unreachable: the charge is refunded at once with its intent
    (kept until EC2 answers again, an outage's retries would fill the day's cap and refuse
    the first request after it); an instance that did launch is adopted and charged then."""
    registry = MemoryRegistry("test")
    engine = budget_engine(cloud, clock, registry, max_daily_cost=10.0)
    cloud.launch_errors = [CloudError("EndpointConnectionError", "no route", unreachable=True)]
    day = "day:2026-11-23"
    async with running(engine):
        assert "cloud unreachable" in await ask(engine, "a")
        assert await registry.list_intents(clock.now()) == []
        assert (await registry.spend([day]))[day] == 0
