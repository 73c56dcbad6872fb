"""The launch room (broker/launcher.py): coalesced launch attempts, the caps on launching,
capacity fallback and launch errors. On Trio's MockClock with an in-memory cloud;
tests/test_launcher_aws.py has the same against moto's EC2 through the boto3 adapter."""

from __future__ import annotations

from collections.abc import Mapping

import pytest
import trio
from trio.testing import MockClock

from broker.clock import Clock
from broker.cloud import CloudError, LaunchSpec, Market
from broker.engine import Engine, Refusal
from broker.ledger import Budget
from broker.memory_registry import MemoryRegistry
from broker.model import WorkerRequest, WorkerState
from broker.prices import PriceTable
from broker.registry import LaunchIntent, WorkerRecord
from tests.engines import T0, ask, get_ip, make_engine, running
from tests.fakes import FakeCloud

FALLBACK_PRICES = PriceTable(
    {
        ("c7i.8xlarge", "spot"): 1.0,
        ("c7i.8xlarge", "on-demand"): 3.0,
        ("c6i.8xlarge", "spot"): 0.8,
    }
)
NO_CAPACITY = CloudError("InsufficientInstanceCapacity", "no spot capacity")


async def test_fifty_concurrent_requests_on_an_empty_pool_cause_one_launch(
    autojump_clock: MockClock, engine: Engine, cloud: FakeCloud
) -> None:
    """Launch coalescing: every request waits for the one launch in flight."""
    ips: list[str] = []

    async def ask_for_one(n: int) -> None:
        ips.append(await get_ip(engine, WorkerRequest(), f"10.0.0.{n}"))

    async with trio.open_nursery() as nursery:
        for n in range(50):
            nursery.start_soon(ask_for_one, n)
    assert len(cloud.launch_calls) == 1
    assert len(ips) == 50
    assert len(set(ips)) == 1
    assert len(engine.pool.leases) == 50


async def test_exclusive_mode_launches_enough_for_everyone_waiting(
    autojump_clock: MockClock, cloud: FakeCloud, clock: Clock
) -> None:
    """Three clients per worker: seven clients at once get three workers, spread evenly."""
    engine = make_engine(cloud, clock, clients_per_worker=3)
    got: list[str] = []

    async def client(n: int) -> None:
        got.append(await get_ip(engine, WorkerRequest(), str(n)))

    async with running(engine), trio.open_nursery() as clients:
        for n in range(7):
            clients.start_soon(client, n)
    assert len(cloud.instances) == 3
    assert sorted(got.count(ip) for ip in set(got)) == [2, 2, 3]


async def test_a_launch_names_the_client_that_caused_it_or_burst(
    autojump_clock: MockClock, cloud: FakeCloud, clock: Clock
) -> None:
    """The cloud learns who caused each launch (tagged for cost allocation): the owner of the
    GET_WORKER that found no worker, or `burst` for BURST."""
    engine = make_engine(cloud, clock)
    async with running(engine):
        await get_ip(engine, WorkerRequest(), "token:alice/job-1")
        await engine.burst(1)
    assert cloud.requested_by == ["token:alice/job-1", "burst"]


# --- caps on launching -----------------------------------------------------------------------


async def test_max_hourly_cost_refuses_a_launch_that_would_pass_it(
    autojump_clock: MockClock, cloud: FakeCloud, clock: Clock
) -> None:
    """A launch that would lift the run rate over the cap is refused, naming the numbers."""
    engine = make_engine(cloud, clock, max_hourly_cost=1.2)
    async with running(engine):
        await get_ip(engine, WorkerRequest(), "a")  # $0.50/h
        with pytest.raises(Refusal) as info:
            await get_ip(engine, WorkerRequest(instance_type="c7i.16xlarge"), "a")  # +$1.00/h
        assert str(info.value).startswith("budget: ")
        assert "$1.2/h" in str(info.value)
        assert len(cloud.launch_calls) == 1


async def test_burst_is_cut_to_max_workers_and_refused_when_full(
    autojump_clock: MockClock, cloud: FakeCloud, clock: Clock
) -> None:
    """BURST never takes the pool past max_workers."""
    engine = make_engine(cloud, clock, max_workers=3)
    async with running(engine):
        assert len(await engine.burst(5)) == 3
        assert [count for _, count, _ in cloud.launch_calls] == [3]  # one RunInstances call
        with pytest.raises(Refusal, match=r"^max_workers reached \(3\)$"):
            await engine.burst(1)


async def test_replicas_together_never_exceed_max_workers(
    autojump_clock: MockClock, cloud: FakeCloud, clock: Clock
) -> None:
    """Exclusive mode, max_workers 3, two engines on one registry, 10 clients each: 3
    instances at most (the pool-wide counter in the registry)."""
    registry = MemoryRegistry("test")
    engines = [
        make_engine(cloud, clock, registry, clients_per_worker=1, max_workers=3) for _ in "ab"
    ]
    served: list[str] = []

    async def client(engine: Engine, n: int) -> None:
        try:
            served.append(await get_ip(engine, WorkerRequest(wait=60), f"c{n}"))
        except Refusal:
            pass

    async with running(*engines), trio.open_nursery() as clients:
        for n in range(20):
            clients.start_soon(client, engines[n % 2], n)
    assert len(cloud.instances) <= 3
    assert len(served) == len(set(served)) == 3


# --- launch errors ---------------------------------------------------------------------------


async def test_launch_error_is_answered_once_to_every_waiter(
    autojump_clock: MockClock, engine: Engine, cloud: FakeCloud
) -> None:
    """A capacity error reaches all coalesced waiters; nobody retries in a loop."""
    cloud.launch_delay = 1.0
    cloud.launch_errors.append(CloudError("InsufficientInstanceCapacity", "no c7i here"))
    errors: list[str] = []

    async def ask_for_one(n: int) -> None:
        try:
            await get_ip(engine, WorkerRequest(), str(n))
        except Refusal as exc:
            errors.append(str(exc))

    async with trio.open_nursery() as nursery:
        for n in range(10):
            nursery.start_soon(ask_for_one, n)
    assert len(cloud.launch_calls) == 1
    assert errors == ["launch failed: InsufficientInstanceCapacity: no c7i here"] * 10
    assert engine.pool.in_flight == {}


async def test_unreachable_cloud_is_a_clear_error(
    autojump_clock: MockClock, engine: Engine, cloud: FakeCloud
) -> None:
    """Endpoint down becomes `cloud unreachable: ...`."""
    cloud.launch_errors.append(
        CloudError("EndpointUnreachable", "connect refused", unreachable=True)
    )
    with pytest.raises(Refusal, match=r"^cloud unreachable: connect refused$"):
        await get_ip(engine, WorkerRequest(), "a")


async def test_an_unexpected_error_in_a_launch_is_an_error_reply_not_a_crash(
    autojump_clock: MockClock, engine: Engine, cloud: FakeCloud
) -> None:
    """A bug below the cloud port (here a KeyError) fails that launch only."""
    cloud.launch_errors.append(KeyError("LaunchTime"))
    with pytest.raises(Refusal, match=r"^launch failed: internal error \(logged by the broker\)$"):
        await get_ip(engine, WorkerRequest(), "a")
    assert engine.pool.in_flight == {}
    assert await get_ip(engine, WorkerRequest(), "a")  # the engine still works


# --- capacity fallback -----------------------------------------------------------------------


async def test_capacity_errors_fall_back_to_the_next_type_then_on_demand(
    autojump_clock: MockClock, cloud: FakeCloud, clock: Clock
) -> None:
    """Exclusive mode. No spot capacity for the first type: the second type; none for any
    spot offering: on-demand, priced as on-demand. Failed offerings are skipped by the next
    launch and listed in STATUS."""
    spec = LaunchSpec("c7i.8xlarge", Market.SPOT, ("c6i.8xlarge",), on_demand_fallback=True)
    engine = make_engine(
        cloud, clock, prices=FALLBACK_PRICES, default_spec=spec, clients_per_worker=1
    )
    async with running(engine):
        cloud.launch_errors = [NO_CAPACITY]
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


async def test_no_on_demand_fallback_gives_a_clear_error(
    autojump_clock: MockClock, cloud: FakeCloud, clock: Clock
) -> None:
    """Without on_demand_fallback, no spot capacity anywhere is one ERROR naming each try."""
    spec = LaunchSpec("c7i.8xlarge", Market.SPOT, ("c6i.8xlarge",))
    engine = make_engine(
        cloud,
        clock,
        prices=FALLBACK_PRICES,
        default_spec=spec,
        clients_per_worker=1,
        subnets=("subnet-a", "subnet-b"),
    )
    async with running(engine):
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


async def test_a_fallback_the_hourly_cap_forbids_is_a_budget_refusal(
    autojump_clock: MockClock, cloud: FakeCloud, clock: Clock
) -> None:
    """No spot capacity, and the on-demand fallback ($3/h) would pass max_hourly_cost $2/h:
    the reply is the hourly cap's budget refusal, not a capacity failure."""
    spec = LaunchSpec("c7i.8xlarge", Market.SPOT, on_demand_fallback=True)
    engine = make_engine(
        cloud, clock, prices=FALLBACK_PRICES, default_spec=spec, max_hourly_cost=2.0
    )
    cloud.launch_errors = [NO_CAPACITY]
    async with running(engine):
        answer = await ask(engine, "z", wait=30)
    assert answer == (
        "ERROR: budget: launching one c7i.8xlarge on-demand ($3/h) would raise the run rate "
        "from $0/h to $3/h, above max_hourly_cost $2/h"
    )
    assert [spec.market for spec, _, _ in cloud.launch_calls] == [Market.SPOT]


class SettleIntentFailsOnce(MemoryRegistry):
    """The registry refuses the first intent settlement (its delete with the refund)."""

    failed = False

    async def settle_intent(
        self, intent: LaunchIntent, refund: Mapping[str, int], *, keep: int = 0
    ) -> bool:
        if not self.failed:
            self.failed = True
            raise CloudError("ProvisionedThroughputExceededException", "slow down")
        return await super().settle_intent(intent, refund, keep=keep)


async def test_a_failed_offerings_charge_is_refunded_once_even_if_its_intent_lingers(
    autojump_clock: MockClock,
) -> None:
    """No capacity for the first offering and its intent cannot be deleted: the reconciler
    refunds its charge when it settles the intent, and the launcher does not refund it too,
    so the day's committed spend ends as it does when nothing fails (to the micro-dollar the
    two refund paths round differently, on the safe side)."""

    async def committed(registry: MemoryRegistry) -> int:
        clock = Clock(epoch=T0)
        cloud = FakeCloud(clock, boot_time=5.0)
        cloud.launch_errors = [CloudError("InsufficientInstanceCapacity", "none")]
        spec = LaunchSpec("c7i.8xlarge", Market.SPOT, ("c6i.8xlarge",))
        engine = make_engine(
            cloud, clock, registry, default_spec=spec, budget=Budget(max_daily_cost=100.0)
        )
        async with running(engine):
            await get_ip(engine, WorkerRequest(), "a")
            await trio.sleep(700)  # past twice launch_timeout: the leftover intent is settled
            await engine.reap_once()
            assert await registry.list_intents(clock.now()) == []
            keys = engine.settings.budget.current_keys(clock.now())
            return (await registry.spend(keys))[keys[0]]

    failing = SettleIntentFailsOnce("test")
    lingered, clean = await committed(failing), await committed(MemoryRegistry("test"))
    assert clean <= lingered <= clean + 2
    assert failing.failed


async def test_a_lingering_intent_refunds_only_the_workers_that_never_came(
    autojump_clock: MockClock,
) -> None:
    """Two workers launched, the settle of their intent fails, one worker is released (and
    terminated, its unused cover refunded) before the reconciler settles the intent: the
    reconciler counts it as launched (EC2 still describes terminated instances), so the day's
    spend ends as it does when nothing fails (it was refunded a second time)."""

    async def committed(registry: MemoryRegistry) -> int:
        clock = Clock(epoch=T0)
        cloud = FakeCloud(clock, boot_time=20.0)
        engine = make_engine(cloud, clock, registry, budget=Budget(max_daily_cost=100.0))
        async with running(engine):
            await engine.burst(2)
            await trio.sleep(30)
            ip = await get_ip(engine, WorkerRequest(), "a")
            await trio.sleep(5)
            await engine.release(ip, "a")
            await trio.sleep(2 * engine.settings.launch_timeout)
            await engine.reap_once()
            assert await registry.list_intents(clock.now()) == []
            keys = engine.settings.budget.current_keys(clock.now())
            return (await registry.spend(keys))[keys[0]]

    failing = SettleIntentFailsOnce("test")
    lingered, clean = await committed(failing), await committed(MemoryRegistry("test"))
    assert failing.failed
    assert clean - 2 <= lingered <= clean + 2


class PutWorkerFailsOnce(MemoryRegistry):
    """The registry refuses the first worker record."""

    failed = False

    async def put_worker(self, worker: WorkerRecord) -> None:
        if not self.failed:
            self.failed = True
            raise CloudError("ProvisionedThroughputExceededException", "slow down")
        await super().put_worker(worker)


async def test_a_worker_whose_record_failed_is_still_handed_out_and_recorded(
    autojump_clock: MockClock,
) -> None:
    """RunInstances answered but the new worker's record could not be written (throttled):
    when EC2 says it runs, the boot watcher writes it, ready, and the waiting GET_WORKER gets
    it (it timed out after launch_timeout and the worker was terminated); one launch, and the
    day's spend ends as it does when nothing fails."""

    async def run(registry: MemoryRegistry) -> tuple[int, int]:
        clock = Clock(epoch=T0)
        cloud = FakeCloud(clock, boot_time=20.0)
        engine = make_engine(cloud, clock, registry, budget=Budget(max_daily_cost=100.0))
        async with running(engine):
            ip = await get_ip(engine, WorkerRequest(), "a")
            [record] = await registry.list_workers(clock.now())
            assert (record.ip, record.state) == (ip, WorkerState.READY)
            keys = engine.settings.budget.current_keys(clock.now())
            return (await registry.spend(keys))[keys[0]], len(cloud.launch_calls)

    failing = PutWorkerFailsOnce("test")
    (spent, launches), (clean, _) = await run(failing), await run(MemoryRegistry("test"))
    assert failing.failed
    assert launches == 1
    assert spent == clean
