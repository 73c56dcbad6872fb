"""The boot room (broker/bootwatch.py): one batched DescribeInstances for every launching
worker, scheduled around each type's learned boot time (broker/boottimes.py; its schedule is
in tests/test_boottimes.py) or woken by EC2's `running` event, readiness probes, launch
timeouts. On Trio's MockClock with an in-memory cloud; the probe tests on real loopback
sockets and real (short) time."""

from __future__ import annotations

import json
from typing import Any

import pytest
import trio
from trio.testing import MockClock

from broker.boottimes import UNSEEN
from broker.clock import Clock
from broker.cloud import CloudError
from broker.engine import WAIT_SLACK, Engine, Refusal
from broker.ledger import Budget
from broker.memory_registry import MemoryRegistry
from broker.model import WorkerRequest, WorkerState
from tests.engines import get_ip, make_engine, running
from tests.fakes import FakeCloud, FakeEvents
from tests.harness import LineClient, ask_once, running_broker, wait_for


async def test_pending_launches_are_polled_in_one_batched_describe(
    autojump_clock: MockClock, engine: Engine, cloud: FakeCloud
) -> None:
    """Five launching workers cost one DescribeInstances per poll, not five."""
    ids = await engine.burst(5)
    assert len(ids) == 5
    assert len(cloud.launch_calls) == 1
    assert cloud.launch_calls[0][1] == 5
    await wait_for(lambda: not engine.pool.launching(), timeout=60, poll=1)
    assert all(sorted(call) == sorted(ids) for call in cloud.describe_calls)
    assert len(cloud.describe_calls) <= 20 / (2.0 * UNSEEN) + 2  # nothing learned: every 0.9 s


async def test_instance_that_never_boots_is_terminated_at_launch_timeout(
    autojump_clock: MockClock, cloud: FakeCloud, clock: Clock
) -> None:
    """No worker past launch_timeout: the waiter gets an error and the instance is terminated."""
    cloud.never_boot = True
    engine = make_engine(cloud, clock, launch_timeout=120)
    async with running(engine):
        start = trio.current_time()
        with pytest.raises(Refusal, match=r"^launch timed out after 120s$"):
            await get_ip(engine, WorkerRequest(), "a")
        assert trio.current_time() - start <= 120 + 2.0 + WAIT_SLACK
        await wait_for(lambda: not cloud.alive(), timeout=10, poll=1)
        assert engine.pool.workers == {}


# --- hand-out at the speed of EC2 -----------------------------------------------------------

BOOT = 15.0  # seconds from launch to running, as on EC2


async def test_a_learned_boot_is_handed_out_within_a_third_of_a_second_of_running(
    autojump_clock: MockClock, clock: Clock
) -> None:
    """First launch: learned. Then, for each next cold GET_WORKER, the answer comes at most
    0.3 s after the instance is running, with no more describes than polling every 2 s."""
    cloud = FakeCloud(clock, boot_time=BOOT)
    engine = make_engine(cloud, clock, clients_per_worker=1)
    delays, calls = [], []
    async with running(engine):
        await engine.get_worker(WorkerRequest(), "first")
        for n in range(4):
            before = len(cloud.describe_calls)
            started = trio.current_time()
            await engine.get_worker(WorkerRequest(), f"client-{n}")
            delays.append(trio.current_time() - started - BOOT)
            calls.append(len(cloud.describe_calls) - before)
    assert all(-1e-6 <= delay <= 0.3 + 1e-6 for delay in delays), delays  # float rounding
    assert all(n <= BOOT / 2.0 + 1 for n in calls), calls


async def test_a_launch_is_first_described_when_its_schedule_says_not_at_once(
    autojump_clock: MockClock, clock: Clock
) -> None:
    """A launch only reschedules the watcher: nothing learned, a 15.5 s boot is described at
    0.9, 1.8, ... 16.2 s (18 calls), none at the launch, where it cannot be running."""
    cloud = FakeCloud(clock, boot_time=BOOT + 0.5)
    engine = make_engine(cloud, clock)
    async with running(engine):
        started = trio.current_time()
        await engine.get_worker(WorkerRequest(), "a")
        waited = trio.current_time() - started
    assert len(cloud.describe_calls) == 18
    assert 16.2 <= waited <= 16.3


async def test_launches_a_moment_apart_share_every_describe(
    autojump_clock: MockClock, clock: Clock
) -> None:
    """Two launches 0.05 s apart, nothing learned: their checks fall within COALESCE of each
    other, so each describe covers both and there are as many as for one launch (18)."""
    cloud = FakeCloud(clock, boot_time=BOOT + 0.5)
    engine = make_engine(cloud, clock, clients_per_worker=1)
    async with running(engine), trio.open_nursery() as nursery:
        nursery.start_soon(get_ip, engine, WorkerRequest(), "a")
        await trio.sleep(0.05)
        nursery.start_soon(get_ip, engine, WorkerRequest(), "b")
    assert len(cloud.launch_calls) == 2
    assert [len(ids) for ids in cloud.describe_calls] == [2] * 18


async def test_an_ec2_running_event_hands_the_worker_out_at_once(
    autojump_clock: MockClock, clock: Clock
) -> None:
    """With the events queue, EC2's `running` state-change wakes the watcher: the first
    launch of a type (nothing learned, described every 0.9 s) is handed out when the event
    comes, not at the next poll."""
    boot = BOOT + 1.25  # just after a poll (every 0.9 s from the launch): the next is 0.85 s on
    cloud = FakeCloud(clock, boot_time=boot)
    events = FakeEvents()
    engine = make_engine(cloud, clock, events=events)

    async def announce() -> None:
        await wait_for(lambda: cloud.instances)
        (instance,) = cloud.instances.values()
        await trio.sleep(instance.running_at - clock.now())
        events.put(
            json.dumps(
                {
                    "source": "aws.ec2",
                    "detail-type": "EC2 Instance State-change Notification",
                    "time": "2026-11-29T12:00:00Z",
                    "detail": {"instance-id": instance.instance_id, "state": "running"},
                }
            )
        )

    async with running(engine), trio.open_nursery() as nursery:
        nursery.start_soon(announce)
        started = trio.current_time()
        await engine.get_worker(WorkerRequest(), "a")
        delay = trio.current_time() - started - boot
    assert -1e-6 <= delay <= 0.3, delay  # float rounding of Unix-second times


# --- readiness probes, over loopback ---------------------------------------------------------


async def probing_engine(*, launch_timeout: float) -> tuple[Engine, FakeCloud, int]:
    """An engine with the readiness probe on, loopback workers, and a worker port on which
    nobody listens yet (tests may open it)."""
    cloud = FakeCloud(Clock(), boot_time=0.05, ip_prefix="127.0.0.")  # loopback workers only
    with trio.socket.socket() as reserve:
        await reserve.bind(("127.0.0.1", 0))
        worker_port: int = reserve.getsockname()[1]
    engine = make_engine(
        cloud,
        launch_timeout=launch_timeout,
        describe_interval=0.02,
        worker_port=worker_port,
        probe=True,
        probe_timeout=0.2,
    )
    return engine, cloud, worker_port


async def test_probe_hands_out_a_worker_only_once_its_port_accepts() -> None:
    """With probe on, a running worker stays launching until worker_port accepts TCP."""
    engine, cloud, worker_port = await probing_engine(launch_timeout=20.0)
    with trio.fail_after(20):
        async with running_broker(engine) as broker:
            client = await LineClient.connect(broker.port)
            await client.send(b"GET_WORKER\n")
            await wait_for(lambda: len(cloud.describe_calls) >= 10)
            assert [w.state for w in engine.pool.workers.values()] == ["launching"]
            listener = (await trio.open_tcp_listeners(worker_port, host="127.0.0.1"))[0]
            async with listener:
                assert await client.readline() == b"127.0.0.1"


async def test_probe_that_never_succeeds_ends_in_a_timeout_and_a_termination() -> None:
    """A worker whose port never opens is terminated at launch_timeout; the type is not
    blocked: the next request launches again."""
    engine, cloud, _ = await probing_engine(launch_timeout=1.0)
    with trio.fail_after(20):
        async with running_broker(engine) as broker:
            assert await ask_once(broker.port, "GET_WORKER") == "ERROR: launch timed out after 1s"
            await wait_for(lambda: cloud.alive() == [])
            assert await ask_once(broker.port, "GET_WORKER wait=0.3") == (
                "ERROR: no worker ready after 0.3s"
            )
            assert len(cloud.launch_calls) == 2


class ReadyWriteFailsOnce(MemoryRegistry):
    """The registry refuses the first `ready` write (a DynamoDB throttle, say)."""

    failed = False

    async def set_worker_state(self, instance_id: str, state: WorkerState, **kwargs: Any) -> bool:
        if state is WorkerState.READY and not self.failed:
            self.failed = True
            raise CloudError("ProvisionedThroughputExceededException", "slow down")
        return await super().set_worker_state(instance_id, state, **kwargs)


async def test_a_worker_the_registry_was_not_told_is_ready_stays_launching_and_is_retried(
    autojump_clock: MockClock, clock: Clock, cloud: FakeCloud
) -> None:
    """The ready write fails once: the worker is not ready here either (it could be neither
    leased nor reaped), and the next describe pass makes it ready in both; it is handed out."""
    registry = ReadyWriteFailsOnce("test")
    engine = make_engine(cloud, clock, registry)
    async with running(engine):
        ip = await get_ip(engine, WorkerRequest(), "a")
        (record,) = await registry.list_workers(clock.now())
    assert registry.failed
    assert record.state is WorkerState.READY
    assert record.ip == ip


class EndedElsewhereBeforeReady(MemoryRegistry):
    """Just before the boot watcher marks a worker ready, another replica ends it: the
    instance is terminated, its record deleted and its unused cover refunded."""

    def __init__(self, cloud: FakeCloud) -> None:
        super().__init__("test")
        self.cloud = cloud
        self.engine: Engine | None = None
        self.spent_after: int | None = None

    async def set_worker_state(
        self,
        instance_id: str,
        state: WorkerState,
        *,
        expect: WorkerState | None = None,
        ip: str | None = None,
        unheld: bool = False,
    ) -> bool:
        if state is WorkerState.READY and self.engine is not None and self.spent_after is None:
            now = self.engine.ctx.clock.now()
            await self.cloud.terminate([instance_id])
            record = await self.delete_worker(instance_id)
            assert record is not None
            await self.release_instances(1)
            await self.engine.spending.refund_cover(record, now)
            keys = self.engine.settings.budget.current_keys(now)
            self.spent_after = (await self.spend(keys))[keys[0]]
        return await super().set_worker_state(
            instance_id, state, expect=expect, ip=ip, unheld=unheld
        )


async def test_a_worker_ended_elsewhere_while_booting_is_not_brought_back(
    autojump_clock: MockClock, cloud: FakeCloud, clock: Clock
) -> None:
    """A worker another replica ended while it booted stays ended: its record is not written
    back as ready, and its cover is not refunded a second time when it is found gone."""
    registry = EndedElsewhereBeforeReady(cloud)
    engine = make_engine(cloud, clock, registry, budget=Budget(max_daily_cost=100.0))
    registry.engine = engine
    async with running(engine):
        await engine.burst(1)
        await trio.sleep(60)  # booted (20 s), ended elsewhere just before it was ready
        assert registry.spent_after is not None
        await trio.sleep(600)  # reconciliations find it gone
        assert await registry.list_workers(clock.now()) == []
        keys = engine.settings.budget.current_keys(clock.now())
        assert (await registry.spend(keys))[keys[0]] == registry.spent_after
