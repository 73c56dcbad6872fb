"""SQS bursting in the engine: the depth drives launches per the formula, idleness measured
from last activity drives scale-down, held workers stay. The SQS adapter runs against moto."""

from __future__ import annotations

import uuid

import pytest
import trio
from trio.testing import MockClock

from broker.aws import make_client
from broker.burst import BurstPolicy
from broker.clock import Clock
from broker.cloud import LaunchSpec, Market
from broker.engine import Engine, EngineSettings
from broker.model import Limits, WorkerRequest
from broker.prices import PriceTable
from broker.sandbox import MotoHandle
from broker.sqs import SqsQueue
from tests.fakes import FakeCloud
from tests.harness import wait_for

SPEC = LaunchSpec("c7i.8xlarge", Market.SPOT)
POLICY = {
    "mode": "auto",
    "queue_url": "https://sqs.example/queue",
    "queue_depth_threshold": 20,
    "max_cloud_instances": 10,
    "scale_down_delay": "5m",
    "check_interval": "1m",
}


class FakeQueue:
    def __init__(self) -> None:
        self.messages = 0

    async def depth(self) -> int:
        await trio.lowlevel.checkpoint()
        return self.messages


def burst_engine(
    cloud: FakeCloud, clock: Clock, queue: object, describe_interval: float = 2.0, **policy: object
) -> Engine:
    settings = EngineSettings(
        default_spec=SPEC,
        limits=Limits(20, None, 3600.0),
        describe_interval=describe_interval,
        burst=BurstPolicy.from_dict({**POLICY, **policy}),
    )
    return Engine(cloud, settings, clock, PriceTable.default(), queue=queue)  # type: ignore[arg-type]


async def test_queue_depth_drives_launches_and_idleness_drives_scale_down(
    autojump_clock: MockClock,
) -> None:
    """Depth 150 (threshold 20, 10 jobs a worker): 10 workers in one launch (the per-check
    cap); after the queue drains, unheld workers go 5 a check once idle for 5 minutes since
    their last activity; a worker someone holds is never terminated."""
    clock = Clock(epoch=1_700_000_000.0)
    cloud = FakeCloud(clock, boot_time=20)
    queue = FakeQueue()
    engine = burst_engine(cloud, clock, queue)
    queue.messages = 150
    async with trio.open_nursery() as nursery:
        await nursery.start(engine.run)  # first check at once: launch at t=0, ready at ~t=20
        await trio.sleep(61)
        assert [count for _, count, _ in cloud.launch_calls] == [10]
        await trio.sleep(60)
        held = (await engine.get_worker(WorkerRequest(), "alice")).ip
        queue.messages = 0
        await trio.sleep(2 * 60)  # t=241: idle ~220 s < scale_down_delay: nothing yet
        assert len(cloud.alive()) == 10
        await trio.sleep(150)  # t=391: the check at t=360 took the first 5 (5 a check)
        assert len(cloud.alive()) == 5
        await trio.sleep(5 * 60)
        alive = [i for i in cloud.instances.values() if i.state != "terminated"]
        assert [i.ip for i in alive] == [held]
        nursery.cancel_scope.cancel()


async def test_manual_mode_never_bursts(autojump_clock: MockClock) -> None:
    """mode: manual reads no depth and launches nothing, however deep the queue."""
    clock = Clock(epoch=1_700_000_000.0)
    cloud = FakeCloud(clock)
    queue = FakeQueue()
    queue.messages = 10_000
    engine = burst_engine(cloud, clock, queue, mode="manual")
    async with trio.open_nursery() as nursery:
        await nursery.start(engine.run)
        await trio.sleep(600)
        assert cloud.launch_calls == []
        nursery.cancel_scope.cancel()


@pytest.fixture
def queue_url(moto_server: MotoHandle) -> str:
    sqs = make_client("sqs", region="us-east-1")
    name = f"compute-broker-jobs-{uuid.uuid4().hex[:8]}"
    url: str = sqs.create_queue(QueueName=name)["QueueUrl"]
    return url


async def test_sqs_depth_counts_visible_and_in_flight_messages(queue_url: str) -> None:
    """Depth is visible plus in-flight (received, not deleted) messages, from moto's SQS."""
    sqs = make_client("sqs", region="us-east-1")
    for n in range(7):
        sqs.send_message(QueueUrl=queue_url, MessageBody=f"job {n}")
    sqs.receive_message(QueueUrl=queue_url, MaxNumberOfMessages=2, VisibilityTimeout=60)
    queue = SqsQueue(queue_url, trio.CapacityLimiter(2), region="us-east-1")
    with trio.fail_after(10):
        assert await queue.depth() == 7


async def test_messages_in_sqs_drive_launches_through_the_real_adapter(queue_url: str) -> None:
    """150 messages in a (moto) SQS queue: the engine's burst loop launches per the formula."""
    sqs = make_client("sqs", region="us-east-1")
    for start in range(0, 150, 10):
        sqs.send_message_batch(
            QueueUrl=queue_url,
            Entries=[{"Id": str(n), "MessageBody": f"job {n}"} for n in range(start, start + 10)],
        )
    clock = Clock()
    cloud = FakeCloud(clock, boot_time=0.05)
    queue = SqsQueue(queue_url, trio.CapacityLimiter(2), region="us-east-1")
    engine = burst_engine(
        cloud, clock, queue, describe_interval=0.05, queue_url=queue_url, check_interval=0.2
    )
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await nursery.start(engine.run)
            await wait_for(lambda: sum(c for _, c, _ in cloud.launch_calls) >= 10)
            await trio.sleep(0.5)
            assert sum(c for _, c, _ in cloud.launch_calls) == 10  # capped, not repeated
            nursery.cancel_scope.cancel()
