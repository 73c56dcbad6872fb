"""The reconcile room (broker/reconcile.py): restore from the registry at start, agree with
EC2 (adopt tagged strangers, drop what vanished, settle crash-left intents), learn what other
replicas did. On Trio's MockClock with an in-memory cloud; `Pool.merge` itself is unit-tested
in tests/test_pool_merge.py."""

from __future__ import annotations

import pytest
import trio
from trio.testing import MockClock

from broker.clock import Clock
from broker.cloud import Instance
from broker.engine import Engine, WorkerNotFound
from broker.memory_registry import MemoryRegistry
from broker.model import WorkerRequest
from broker.registry import LaunchIntent, LeaseRecord, WorkerRecord
from tests.engines import SPEC, get_ip, make_engine, running
from tests.fakes import FakeCloud


async def test_existing_pool_instances_are_adopted_at_start(
    autojump_clock: MockClock, cloud: FakeCloud, clock: Clock
) -> None:
    """After a restart the running tagged instance is handed out, not relaunched."""
    mine = cloud.add_running(SPEC)
    cloud.add_running(SPEC, pool="someone-else")
    engine = make_engine(cloud, clock)
    async with running(engine):
        assert list(engine.pool.workers) == [mine.instance_id]
        assert await get_ip(engine, WorkerRequest(), "a") == mine.ip
        assert cloud.launch_calls == []


async def test_a_ready_worker_that_dies_is_dropped_at_the_next_reaper_pass(
    autojump_clock: MockClock, engine: Engine, cloud: FakeCloud
) -> None:
    """Spot interruption or a manual terminate: the worker is no longer handed out or pinged."""
    ip = await get_ip(engine, WorkerRequest(), "a")
    (instance,) = cloud.instances.values()
    instance.state = "terminated"
    await trio.sleep(61)
    assert engine.pool.workers == {}
    assert engine.pool.leases == {}
    with pytest.raises(WorkerNotFound):
        await engine.ping(ip, "a")
    assert await get_ip(engine, WorkerRequest(), "a") != ip


async def test_an_unknown_tagged_instance_is_adopted_then_reaped_when_idle(
    autojump_clock: MockClock, engine: Engine, cloud: FakeCloud
) -> None:
    """An instance of this pool the broker does not know (a launch cut off at launch_timeout)
    is adopted by the reconciler and terminated after idle_timeout, not left billing."""
    stray = cloud.add_running(SPEC)
    await trio.sleep(61)
    assert list(engine.pool.workers) == [stray.instance_id]
    await trio.sleep(900)
    assert cloud.alive() == []


async def test_a_restarted_engine_has_the_same_workers_leases_and_idle_clocks(
    autojump_clock: MockClock, cloud: FakeCloud, clock: Clock
) -> None:
    """Everything that matters is in the registry: a new engine on it continues seamlessly."""
    registry = MemoryRegistry("test")
    first = make_engine(cloud, clock, registry)
    async with running(first):
        ip = await get_ip(first, WorkerRequest(), "a")
        await get_ip(first, WorkerRequest(), "b")
        await trio.sleep(100)
        await first.ping(ip, "b")
        await first.release(ip, "a")
        before = first.status()
    # The broker died; the registry and EC2 remain.
    await trio.sleep(50)
    second = make_engine(cloud, clock, registry)
    async with running(second):
        after = second.status()
        assert [w["instance_id"] for w in after["workers"]] == [
            w["instance_id"] for w in before["workers"]
        ]
        assert [(le["client"], le["started_at"]) for le in after["leases"]] == [
            (le["client"], le["started_at"]) for le in before["leases"]
        ]
        assert after["workers"][0]["idle_seconds"] == pytest.approx(50)
        assert len(cloud.launch_calls) == 1
        assert await get_ip(second, WorkerRequest(), "b") == ip


async def test_a_launch_interrupted_before_its_registry_write_is_adopted_after_restart(
    autojump_clock: MockClock, cloud: FakeCloud, clock: Clock
) -> None:
    """Crash between RunInstances and the registry write: the intent and the instance's
    launch-token tag let the next engine adopt the instance, and settle the intent once it is
    older than twice launch_timeout (a live replica's launch would have settled it by then)."""
    registry = MemoryRegistry("test")
    token = "crashed-launch"
    await registry.put_intent(LaunchIntent.begin(token, SPEC, 1, clock.now(), ttl=600))
    await cloud.launch(SPEC, 1, token)  # EC2 launched; the broker died before writing it
    engine = make_engine(cloud, clock, registry)
    async with running(engine):
        (worker,) = engine.pool.workers.values()
        assert worker.launch_token == token
        assert [r.instance_id for r in await registry.list_workers(clock.now())] == [
            worker.instance_id
        ]
        await get_ip(engine, WorkerRequest(), "a")
        assert len(cloud.launch_calls) == 1
        await trio.sleep(2 * engine.settings.launch_timeout)
        await engine.reconciler.reconcile()
        assert await registry.list_intents(clock.now()) == []


async def test_replicas_a_lease_kept_alive_through_the_other_replica_is_not_reaped(
    autojump_clock: MockClock, cloud: FakeCloud, clock: Clock
) -> None:
    """Alice gets a worker from A and pings only through B: A must not expire her lease or
    reap the worker, however idle it looks from A."""
    registry = MemoryRegistry("test")
    a, b = make_engine(cloud, clock, registry), make_engine(cloud, clock, registry)
    async with running(a, b):
        ip = await get_ip(a, WorkerRequest(), "alice")
        await trio.sleep(61)  # B learns the worker and the lease at its reconciliation
        for _ in range(30):
            await b.ping(ip, "alice")
            await trio.sleep(60)
        assert len(cloud.alive()) == 1
        assert [lease.client for lease in await registry.list_leases(clock.now())] == ["alice"]


class LeaseReadWaits(MemoryRegistry):
    """Once armed, `list_leases` waits for `go`: a reconciliation stays between its read of
    the workers and the rest of its registry reads."""

    def __init__(self) -> None:
        super().__init__("test")
        self.armed = False
        self.reading = trio.Event()
        self.go = trio.Event()

    async def list_leases(self, now: float) -> list[LeaseRecord]:
        if self.armed:
            self.armed = False
            self.reading.set()
            await self.go.wait()
        return await super().list_leases(now)


async def test_a_worker_launched_during_a_reconciliation_is_not_dropped_as_gone(
    autojump_clock: MockClock, cloud: FakeCloud, clock: Clock
) -> None:
    """The workers the reconciliation read do not have a worker launched and leased since:
    it stays, and its holder's PING answers (it was dropped as "gone elsewhere", its lease
    with it, until the next pass brought it back)."""
    registry = LeaseReadWaits()
    engine = make_engine(cloud, clock, registry)
    async with running(engine):
        registry.armed = True
        async with trio.open_nursery() as nursery:
            nursery.start_soon(engine.reconciler.reconcile)
            await registry.reading.wait()
            ip = await get_ip(engine, WorkerRequest(), "a")
            registry.go.set()
        await engine.ping(ip, "a")
        (worker,) = engine.pool.workers.values()
        assert [lease.client for lease in engine.pool.holders(worker.instance_id)] == ["a"]


class WorkerWrittenAfterRead(MemoryRegistry):
    """Once `other` is set, the next `list_workers` answers without it, then it is written
    and leased to alice: another replica's launch, seen by EC2 but not by that read."""

    def __init__(self) -> None:
        super().__init__("test")
        self.other: WorkerRecord | None = None

    async def list_workers(self, now: float) -> list[WorkerRecord]:
        read = await super().list_workers(now)
        if self.other is not None:
            other, self.other = self.other, None
            await self.put_worker(other)
            lease = LeaseRecord.start("alice", other.instance_id, other.ip or "", now, 900.0)
            assert await self.claim_lease(lease, 1)
        return read


async def test_an_instance_another_replica_wrote_meanwhile_is_not_overwritten_by_adoption(
    autojump_clock: MockClock, cloud: FakeCloud, clock: Clock
) -> None:
    """Adoption writes a worker only if the registry still has none: the other replica's
    record stands with alice's lease, so bob (exclusive workers) is not handed the same one."""
    registry = WorkerWrittenAfterRead()
    engine = make_engine(cloud, clock, registry, clients_per_worker=1)
    async with running(engine):
        theirs = cloud.add_running(SPEC)
        (instance,) = [i for i in await cloud.list_pool() if i.instance_id == theirs.instance_id]
        registry.other = WorkerRecord.from_instance(
            instance, clock.now(), price_per_hour=0.5, ready=True
        )
        await engine.reconciler.reconcile()
        record = await registry.get_worker(theirs.instance_id)
        assert record is not None
        assert (record.holders, record.price_per_hour) == (1, 0.5)
        assert await get_ip(engine, WorkerRequest(), "bob") != theirs.ip


class StaleSnapshot(FakeCloud):
    """`list_pool` answers the view it had when `freeze` was called."""

    frozen: list[Instance] | None = None

    async def freeze(self) -> None:
        self.frozen = await super().list_pool()

    async def list_pool(self) -> list[Instance]:
        if self.frozen is not None:
            await trio.lowlevel.checkpoint()
            return self.frozen
        return await super().list_pool()


async def test_an_instance_another_replica_terminated_meanwhile_is_not_adopted(
    autojump_clock: MockClock, clock: Clock
) -> None:
    """EC2's snapshot still lists a worker that another replica terminated (and removed from
    the registry) before this reconciliation read the registry: it is not adopted back."""
    cloud = StaleSnapshot(clock, boot_time=5.0)
    registry = MemoryRegistry("test")
    engine = make_engine(cloud, clock, registry)
    async with running(engine):
        theirs = cloud.add_running(SPEC)
        await cloud.freeze()  # the snapshot, taken before the other replica's reap
        await cloud.terminate([theirs.instance_id])
        await engine.reconciler.reconcile()
        assert theirs.instance_id not in engine.pool.workers
        assert await registry.get_worker(theirs.instance_id) is None


class IntentReadWaits(MemoryRegistry):
    """Once armed, `list_intents` waits for `go`: a reconciliation has read the leases and
    not yet merged them."""

    def __init__(self) -> None:
        super().__init__("test")
        self.armed = False
        self.reading = trio.Event()
        self.go = trio.Event()

    async def list_intents(self, now: float) -> list[LaunchIntent]:
        if self.armed:
            self.armed = False
            self.reading.set()
            await self.go.wait()
        return await super().list_intents(now)


async def test_a_lease_released_during_a_reconciliation_does_not_come_back(
    autojump_clock: MockClock, cloud: FakeCloud, clock: Clock
) -> None:
    """The leases the reconciliation read still have one released since: it stays ended (it
    came back from the stale read, so the worker looked held by a client that let go)."""
    registry = IntentReadWaits()
    engine = make_engine(cloud, clock, registry)
    async with running(engine):
        ip = await get_ip(engine, WorkerRequest(), "a")
        assert await get_ip(engine, WorkerRequest(), "b") == ip
        registry.armed = True
        async with trio.open_nursery() as nursery:
            nursery.start_soon(engine.reconciler.reconcile)
            await registry.reading.wait()
            await engine.release(ip, "a")
            registry.go.set()
        (worker,) = engine.pool.workers.values()
        assert [lease.client for lease in engine.pool.holders(worker.instance_id)] == ["b"]
