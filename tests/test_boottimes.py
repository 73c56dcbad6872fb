"""Hand-out at the speed of EC2: the describe schedule tightens around each type's learned boot
time, so a cold GET_WORKER answers within a fraction of a second of `running`, without more
DescribeInstances calls than polling every describe_interval; an EC2 `running` event wakes
the watcher at once."""

from __future__ import annotations

import json

import trio
from trio.testing import MockClock

from broker.boottimes import FAST, FIRST, GAP, LEAD, BootTimes, next_check
from broker.clock import Clock
from broker.cloud import LaunchSpec, Market, ReceivedEvent
from broker.engine import Engine, EngineSettings
from broker.memory_registry import MemoryRegistry
from broker.model import Limits, WorkerRequest
from broker.prices import PriceTable
from tests.fakes import FakeCloud

SPEC = LaunchSpec("c7i.8xlarge", Market.SPOT)
BOOT = 15.0  # seconds from launch to running, as on EC2
EPOCH = 1_795_000_000.0


def test_unlearned_types_are_polled_every_describe_interval() -> None:
    """Before any boot of the type was seen (and no hint): every describe_interval."""
    assert [next_check(t, None, 2.0) for t in (0.0, 1.9, 2.0, 5.5)] == [2.0, 2.0, 4.0, 6.0]


def test_the_schedule_tightens_around_the_expected_boot() -> None:
    """An early check, sparse checks while far off, fast ones from just before the expected
    boot time, then describe_interval again."""
    times, t = [], 0.0
    while t < BOOT + 6:
        t = next_check(t, BOOT, 2.0)
        times.append(round(t, 2))
    start = BOOT - LEAD
    assert times[0] == FIRST
    assert times[1] == FIRST + GAP
    assert start in times
    assert round(start + FAST, 2) in times
    assert times[-1] - times[-2] == 2.0
    assert len([x for x in times if x <= BOOT + 1]) <= BOOT / 2.0 + 1  # no more than polling


def test_boot_times_plan_for_a_low_quantile_of_what_was_seen() -> None:
    """The plan is the lower quartile of the boots seen (a fast check too many is cheap);
    the hint stands in until the first one."""
    times = BootTimes(hint=3.0)
    assert times.expected("c7i.8xlarge") == 3.0
    for seconds in (16.0, 15.2, 15.6, 30.0, 15.4):
        times.observe("c7i.8xlarge", seconds)
    assert times.expected("c7i.8xlarge") == 15.4
    assert times.expected("m7i.large") == 3.0


def make_engine(cloud: FakeCloud, clock: Clock, **settings: object) -> Engine:
    engine_settings = EngineSettings(
        default_spec=SPEC, limits=Limits(10, None, 900.0, 1), describe_interval=2.0, **settings
    )  # type: ignore[arg-type]
    return Engine(cloud, engine_settings, clock, PriceTable.default(), MemoryRegistry("test"))


async def test_a_learned_boot_is_handed_out_within_a_third_of_a_second_of_running(
    autojump_clock: MockClock,
) -> None:
    """First launch: learned. Then, for each next cold GET_WORKER, the answer comes at most
    0.3 s after the instance is running, with no more describes than polling every 2 s."""
    clock = Clock(epoch=EPOCH)
    cloud = FakeCloud(clock, boot_time=BOOT)
    engine = make_engine(cloud, clock)
    delays, calls = [], []
    async with trio.open_nursery() as nursery:
        await nursery.start(engine.run)
        await engine.get_worker(WorkerRequest(), "first")
        for n in range(4):
            before = len(cloud.describe_calls)
            started = trio.current_time()
            await engine.get_worker(WorkerRequest(), f"client-{n}")
            delays.append(trio.current_time() - started - BOOT)
            calls.append(len(cloud.describe_calls) - before)
        nursery.cancel_scope.cancel()
    assert all(0 <= delay <= 0.3 for delay in delays), delays
    assert all(n <= BOOT / 2.0 + 1 for n in calls), calls


class OneEvent:
    """An EventQueue port holding EC2 events until they are received once."""

    def __init__(self) -> None:
        self.bodies: list[str] = []

    async def receive(
        self, *, wait_seconds: int = 0, max_messages: int = 10
    ) -> list[ReceivedEvent]:
        await trio.sleep(0 if self.bodies else 0.05)
        bodies, self.bodies = self.bodies, []
        return [ReceivedEvent(str(n), body) for n, body in enumerate(bodies)]

    async def delete(self, receipt_handles: object) -> None:
        await trio.lowlevel.checkpoint()


async def test_an_ec2_running_event_hands_the_worker_out_at_once(
    autojump_clock: MockClock,
) -> None:
    """With the events queue, EC2's `running` state-change wakes the watcher: the first
    launch of a type (nothing learned, describe every 2 s) is handed out when the event comes,
    not at the next poll."""
    clock = Clock(epoch=EPOCH)
    cloud = FakeCloud(clock, boot_time=BOOT + 0.9)  # between two polls
    events = OneEvent()
    settings = EngineSettings(
        default_spec=SPEC, limits=Limits(10, None, 900.0), describe_interval=2.0
    )
    engine = Engine(
        cloud, settings, clock, PriceTable.default(), MemoryRegistry("t"), events=events
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(engine.run)

        async def announce() -> None:
            while not cloud.instances:
                await trio.sleep(0.01)
            (instance,) = cloud.instances.values()
            await trio.sleep(instance.running_at - clock.now())
            events.bodies.append(
                json.dumps(
                    {
                        "source": "aws.ec2",
                        "detail-type": "EC2 Instance State-change Notification",
                        "time": "2026-11-29T12:00:00Z",
                        "detail": {"instance-id": instance.instance_id, "state": "running"},
                    }
                )
            )

        nursery.start_soon(announce)
        started = trio.current_time()
        await engine.get_worker(WorkerRequest(), "a")
        delay = trio.current_time() - started - (BOOT + 0.9)
        nursery.cancel_scope.cancel()
    assert 0 <= delay <= 0.3, delay
