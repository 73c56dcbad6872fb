"""The scaling room (broker/scaling.py) on moto's SQS: the burst loop reads the job queue's depth
through the real adapter. (tests/test_scaling.py has the MockClock versions.)"""

from __future__ import annotations

import uuid

import trio

from broker.burst import BurstPolicy
from broker.clock import Clock
from broker.sandbox import MotoHandle
from broker.sqs import SqsQueue
from tests.aws_support import full_client
from tests.engines import make_engine, running
from tests.fakes import FakeCloud
from tests.harness import wait_for


async def test_messages_in_sqs_drive_launches_through_the_real_adapter(
    moto_server: MotoHandle,
) -> None:
    """150 messages in a (moto) SQS queue, threshold 20, 10 jobs a worker: the burst loop
    launches 10 workers, the per-check cap, once."""
    sqs = full_client("sqs")
    name = f"compute-broker-jobs-{uuid.uuid4().hex[:8]}"
    queue_url: str = sqs.create_queue(QueueName=name)["QueueUrl"]
    for start in range(0, 150, 10):
        sqs.send_message_batch(
            QueueUrl=queue_url,
            Entries=[{"Id": str(n), "MessageBody": f"job {n}"} for n in range(start, start + 10)],
        )
    cloud = FakeCloud(Clock(), boot_time=0.05)
    policy = {
        "mode": "auto",
        "queue_url": queue_url,
        "queue_depth_threshold": 20,
        "max_cloud_instances": 10,
        "scale_down_delay": "5m",
        "check_interval": 0.2,
    }
    engine = make_engine(
        cloud,
        queue=SqsQueue(queue_url, trio.CapacityLimiter(2), region="us-east-1"),
        max_workers=20,
        idle_timeout=3600.0,
        describe_interval=0.05,
        burst=BurstPolicy.from_dict(policy),
    )
    with trio.fail_after(20):
        async with running(engine):
            await wait_for(lambda: sum(c for _, c, _ in cloud.launch_calls) >= 10)
            await trio.sleep(0.5)  # the scenario: two more checks, which must launch nothing
            assert sum(c for _, c, _ in cloud.launch_calls) == 10
