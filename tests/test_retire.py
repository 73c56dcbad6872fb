"""The retire room (broker/retire.py): the one path by which a worker leaves the pool: the
reaper, failed terminations retried. On Trio's MockClock with an in-memory cloud."""

from __future__ import annotations

import pytest
import trio
from trio.testing import MockClock

from broker.cloud import CloudError
from broker.engine import Engine, Refusal
from broker.model import WorkerRequest
from tests.engines import get_ip
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
