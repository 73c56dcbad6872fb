"""Every refusal names the limit that bound, in the documented `ERROR: budget: ...` form, on
MockClock with an in-memory cloud and registry (tests/test_refusals_aws.py has the two-replica
versions on moto)."""

from __future__ import annotations

import trio
from trio.testing import MockClock

from broker.clock import Clock
from broker.cloud import CloudError, LaunchSpec, Market
from broker.engine import Engine, EngineSettings, Refusal
from broker.ledger import Budget
from broker.memory_registry import MemoryRegistry
from broker.model import Limits, WorkerRequest
from broker.prices import PriceTable
from tests.fakes import FakeCloud

EPOCH = 1_795_000_000.0
PRICES = PriceTable({("c7i.8xlarge", "spot"): 0.5, ("c7i.8xlarge", "on-demand"): 1.5})
FALLBACK = LaunchSpec("c7i.8xlarge", Market.SPOT, on_demand_fallback=True)
NO_CAPACITY = CloudError("InsufficientInstanceCapacity", "no spot capacity")


def engine_with(cloud: FakeCloud, clock: Clock, *, hourly: float | None) -> Engine:
    settings = EngineSettings(
        default_spec=FALLBACK,
        limits=Limits(50, hourly, 900.0),
        describe_interval=1.0,
        budget=Budget(),
    )
    return Engine(cloud, settings, clock, PRICES, MemoryRegistry("test"))


async def reply(engine: Engine, client: str) -> str:
    try:
        return (await engine.get_worker(WorkerRequest(wait=30), client)).ip
    except Refusal as exc:
        return f"ERROR: {exc}"


async def test_a_fallback_the_hourly_cap_forbids_is_a_budget_refusal(
    autojump_clock: MockClock,
) -> None:
    """No spot capacity, and the on-demand fallback ($1.5/h) would pass max_hourly_cost $1/h:
    the reply is the hourly cap's budget refusal, not a capacity failure."""
    clock = Clock(epoch=EPOCH)
    cloud = FakeCloud(clock, boot_time=5.0)
    cloud.launch_errors = [NO_CAPACITY]
    engine = engine_with(cloud, clock, hourly=1.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(engine.run)
        answer = await reply(engine, "z")
        nursery.cancel_scope.cancel()
    assert answer == (
        "ERROR: budget: launching one c7i.8xlarge on-demand ($1.5/h) would raise the run rate "
        "from $0/h to $1.5/h, above max_hourly_cost $1/h"
    )
    assert [spec.market for spec, _, _ in cloud.launch_calls] == [Market.SPOT]


async def test_the_hourly_cap_refuses_in_the_registry_too(autojump_clock: MockClock) -> None:
    """max_hourly_cost is committed in the registry like the dollar ledger: with $1.5/h of
    room and $0.5/h workers, the fourth concurrent exclusive request is refused by the cap,
    and the registry's run rate is exactly the three workers'."""
    clock = Clock(epoch=EPOCH)
    cloud = FakeCloud(clock, boot_time=5.0)
    settings = EngineSettings(
        default_spec=LaunchSpec("c7i.8xlarge", Market.SPOT),
        limits=Limits(50, 1.5, 900.0, 1),
        describe_interval=1.0,
    )
    engine = Engine(cloud, settings, clock, PRICES, MemoryRegistry("test"))
    answers: list[str] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(engine.run)
        async with trio.open_nursery() as clients:
            for n in range(4):
                clients.start_soon(lambda n=n: _append(answers, reply(engine, f"c{n}")))
        committed = await engine.registry.spend(["rate"])
        nursery.cancel_scope.cancel()
    refusals = [a for a in answers if a.startswith("ERROR")]
    assert len(answers) - len(refusals) == 3
    assert len(refusals) == 1
    assert "max_hourly_cost $1.5/h" in refusals[0]
    assert committed == {"rate": 1_500_000}


async def _append(answers: list[str], answer: object) -> None:
    answers.append(await answer)  # type: ignore[misc]
