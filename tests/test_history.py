"""Lease history (broker/history.py): every lease that ends leaves one record in the registry,
whatever ended it, best effort. On Trio's MockClock with an in-memory cloud and registry."""

from __future__ import annotations

import pytest
import structlog
import trio
from trio.testing import MockClock

from broker.clock import Clock
from broker.cloud import CloudError
from broker.engine import Engine
from broker.memory_registry import MemoryRegistry
from broker.model import WorkerRequest
from broker.registry import LeaseHistoryRecord
from tests.engines import get_ip, make_engine, running
from tests.fakes import FakeCloud
from tests.harness import wait_for

PRICE = 0.5  # $/h of the default spec (c7i.8xlarge spot) in the built-in table
DAY = 86400.0


async def test_release_keeps_who_held_which_worker_how_long_and_the_cost(
    autojump_clock: MockClock, engine: Engine
) -> None:
    """A RELEASE after ten minutes keeps one record: the owner and its identity, the worker's
    type and market, start and end, price, and cost = price x hours; kept 90 days."""
    ip = await get_ip(engine, WorkerRequest(), "token:alice/job-1")
    [lease] = engine.pool.leases.values()
    await trio.sleep(600)
    await engine.release(ip, "token:alice/job-1")

    [record] = await wait_for(lambda: engine.registry.lease_history(0.0))
    assert record.client == "token:alice/job-1"
    assert record.identity == "token:alice"
    assert (record.instance_id, record.instance_type, record.market) == (
        lease.instance_id,
        "c7i.8xlarge",
        "spot",
    )
    assert record.started_at == lease.started_at
    assert record.ended_at - record.started_at == pytest.approx(600)
    assert (record.price_per_hour, record.reason) == (PRICE, "released")
    assert record.cost == pytest.approx(PRICE / 6)
    assert record.expires_at == pytest.approx(record.ended_at + 90 * DAY)


async def test_an_idle_lease_that_expires_is_kept_as_expired(
    autojump_clock: MockClock, engine: Engine
) -> None:
    """A lease nobody releases ends at the reaper pass after idle_timeout: one record."""
    await get_ip(engine, WorkerRequest(), "quiet")
    await trio.sleep(900 + 61)
    [record] = await wait_for(lambda: engine.registry.lease_history(0.0))
    assert record.reason == "expired"


async def test_a_lease_that_expired_while_the_broker_was_down_ends_at_its_expiry(
    autojump_clock: MockClock, cloud: FakeCloud, clock: Clock
) -> None:
    """The broker stops with a lease open and restarts three hours later: the lease is
    recorded as ending when it expired, not at the restart (the client is not billed for the
    outage)."""
    registry = MemoryRegistry("test")
    first = make_engine(cloud, clock, registry)
    async with running(first):
        await get_ip(first, WorkerRequest(), "quiet")
        [lease] = first.pool.leases.values()
    await trio.sleep(3 * 3600)
    second = make_engine(cloud, clock, registry)
    async with running(second):
        await trio.sleep(61)  # the first reaper pass
        [record] = await wait_for(lambda: registry.lease_history(0.0))
    assert record.reason == "expired"
    assert record.ended_at == pytest.approx(lease.last_activity + 900)


async def test_a_lease_on_a_worker_that_vanished_is_kept_as_lost(
    autojump_clock: MockClock, engine: Engine, cloud: FakeCloud
) -> None:
    """A worker terminated behind the broker's back (spot interruption): its lease's record
    says worker_lost, with the worker's type and price (the pool no longer has it)."""
    await get_ip(engine, WorkerRequest(), "a")
    (instance,) = cloud.instances.values()
    instance.state = "terminated"
    await trio.sleep(61)
    [record] = await wait_for(lambda: engine.registry.lease_history(0.0))
    assert (record.reason, record.instance_type, record.price_per_hour) == (
        "worker_lost",
        "c7i.8xlarge",
        PRICE,
    )


async def test_lease_history_days_0_keeps_nothing(
    autojump_clock: MockClock, cloud: FakeCloud, clock: Clock
) -> None:
    """lease_history_days: 0 writes no history (decided before any is written)."""
    engine = make_engine(cloud, clock, lease_history_days=0)
    async with running(engine):
        ip = await get_ip(engine, WorkerRequest(), "a")
        await engine.release(ip, "a")
        assert await engine.registry.lease_history(0.0) == []


class NoHistoryRegistry(MemoryRegistry):
    """A MemoryRegistry whose history writes fail."""

    async def put_lease_history(self, record: LeaseHistoryRecord) -> None:
        raise CloudError("ProvisionedThroughputExceededException", "slow down")


async def test_a_failed_history_write_is_logged_and_the_release_still_succeeds(
    autojump_clock: MockClock, cloud: FakeCloud, clock: Clock
) -> None:
    """History is best effort: the RELEASE ends the lease; the failure is one log line."""
    engine = make_engine(cloud, clock, NoHistoryRegistry("test"))
    async with running(engine):
        ip = await get_ip(engine, WorkerRequest(), "a")
        with structlog.testing.capture_logs() as logs:
            await engine.release(ip, "a")
            assert engine.pool.leases == {}
            assert await engine.registry.list_leases(clock.now()) == []
            failed = await wait_for(
                lambda: [e["op"] for e in logs if e["event"] == "registry.write_failed"]
            )
    assert failed == ["put_lease_history"]


async def test_two_replicas_keep_one_record_of_a_lease_both_see_expire(
    autojump_clock: MockClock, cloud: FakeCloud, clock: Clock
) -> None:
    """Replicas sharing a registry both end an expired lease; the one whose end_lease got it
    keeps the record, so the history counts the lease once."""
    registry = MemoryRegistry("test")
    first = make_engine(cloud, clock, registry)
    second = make_engine(cloud, clock, registry)
    async with running(first, second):
        await get_ip(first, WorkerRequest(), "a")
        await trio.sleep(900 + 61)
        kept = await wait_for(lambda: registry.lease_history(0.0))
        await trio.sleep(120)  # two more reaper passes of each replica: no second record
        assert (
            [r.client for r in kept]
            == ["a"]
            == [r.client for r in await registry.lease_history(0.0)]
        )
