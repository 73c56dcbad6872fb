"""The retire room (broker/retire.py): the one path by which a worker leaves the pool: the
reaper, failed terminations retried, `compute-broker stop-all`. On Trio's MockClock with an
in-memory cloud."""

from __future__ import annotations

import pytest
import trio
from trio.testing import MockClock

from broker.clock import Clock
from broker.cloud import CloudError
from broker.engine import Engine, Refusal
from broker.memory_registry import MemoryRegistry
from broker.model import WorkerRequest
from tests.engines import get_ip, make_engine, running
from tests.fakes import FakeCloud


async def test_idle_worker_is_reaped_after_idle_timeout(
    autojump_clock: MockClock, engine: Engine, cloud: FakeCloud
) -> None:
    """A worker nobody uses for 900 s is terminated by the next reaper pass."""
    await get_ip(engine, WorkerRequest(), "a")
    await trio.sleep(899)
    assert len(cloud.alive()) == 1
    await trio.sleep(61)
    assert cloud.alive() == []
    assert engine.pool.workers == {}
    assert engine.pool.leases == {}


async def test_failed_termination_is_retried_by_the_reaper(
    autojump_clock: MockClock, engine: Engine, cloud: FakeCloud
) -> None:
    """If TerminateInstances fails, RELEASE says so and the next reaper pass retries."""
    ip = await get_ip(engine, WorkerRequest(), "a")
    cloud.terminate_errors.append(CloudError("RequestLimitExceeded", "slow down"))
    with pytest.raises(Refusal, match=r"^terminate failed: RequestLimitExceeded"):
        await engine.release(ip, "a")
    assert len(cloud.alive()) == 1
    await trio.sleep(61)
    assert cloud.alive() == []


async def test_stop_all_retires_every_instance_and_gives_back_the_counter_at_once(
    autojump_clock: MockClock, cloud: FakeCloud, clock: Clock
) -> None:
    """`stop-all` from an engine that is not running (as the CLI does): every listed instance
    is terminated, held or not, and the registry has no workers, no leases and no reserved
    slots right after, not a reconciliation later."""
    registry = MemoryRegistry("test")
    broker = make_engine(cloud, clock, registry)
    async with running(broker):
        await broker.burst(2)
        await get_ip(broker, WorkerRequest(), "alice")  # one of the two
    assert len(await registry.list_leases(clock.now())) == 1
    assert await registry.reserved_instances() == 2
    stopper = make_engine(cloud, clock, registry)
    stopped = await stopper.stop_all(await cloud.list_pool())
    assert sorted(stopped) == sorted(cloud.instances)
    assert cloud.alive() == []
    assert await registry.list_workers(clock.now()) == []
    assert await registry.list_leases(clock.now()) == []
    assert await registry.reserved_instances() == 0
