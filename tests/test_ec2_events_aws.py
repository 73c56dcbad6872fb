"""The EC2 events room (broker/ec2_events.py) end to end: EventBridge-shaped EC2 events on a
(moto) SQS queue reach the engine, which stops handing the worker out, launches a replacement
for its holders, answers their PING with the deadline, and drops workers EC2 stopped outside
the broker; and what the Python and Tcl clients make of it. Requests over TCP, real time."""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio

from broker.aws import make_client
from broker.clock import Clock
from broker.engine import Engine
from broker.interruptions import format_deadline
from broker.sandbox import MotoHandle
from broker.sqs import SqsEventQueue, ensure_events_queue
from compute_broker_client import BrokerClient, WorkerInterrupted
from tests.aws_support import full_client
from tests.engines import make_engine
from tests.fakes import FakeCloud
from tests.harness import LineClient, ask_once, running_broker, wait_for


@pytest.fixture
def events_url(moto_server: MotoHandle) -> str:
    sqs = make_client("sqs", region="us-east-1")
    return ensure_events_queue(sqs, f"compute-broker-events-{uuid.uuid4().hex[:8]}")


def ec2_event(detail_type: str, detail: dict[str, Any], at: float) -> str:
    """One message body as the EventBridge rule delivers it to SQS."""
    return json.dumps(
        {
            "version": "0",
            "id": str(uuid.uuid4()),
            "detail-type": detail_type,
            "source": "aws.ec2",
            "account": "123456789012",
            "time": datetime.fromtimestamp(int(at), UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "region": "us-east-1",
            "resources": [f"arn:aws:ec2:us-east-1:123456789012:instance/{detail['instance-id']}"],
            "detail": detail,
        }
    )


def send(url: str, body: str) -> None:
    full_client("sqs").send_message(QueueUrl=url, MessageBody=body)


def events_engine(url: str) -> tuple[Engine, FakeCloud]:
    """An engine reading EC2 events from the queue at `url`, a worker per client, on an
    in-memory cloud whose workers boot in 0.05 s."""
    cloud = FakeCloud(Clock(), boot_time=0.05)
    events = SqsEventQueue(url, trio.CapacityLimiter(1), region="us-east-1")
    engine = make_engine(
        cloud, events=events, idle_timeout=600.0, clients_per_worker=1, describe_interval=0.05
    )
    return engine, cloud


async def test_an_interruption_warning_stops_hand_out_replaces_and_answers_ping(
    events_url: str,
) -> None:
    """A warning for a held worker: it is handed out no more, one replacement is launched, its
    holder's PING answers `ERROR: Worker interrupted <deadline>`, STATUS marks it, and a new
    GET_WORKER gets the replacement. The message is deleted from the queue."""
    with trio.fail_after(30):
        async with interrupted_worker(events_url) as interrupted:
            ip, deadline, cloud = interrupted.ip, interrupted.deadline, interrupted.cloud
            client = await LineClient.connect(interrupted.port)
            assert await client.ask(f"PING {ip} client=job-1") == (
                f"ERROR: Worker interrupted {format_deadline(deadline)}"
            )
            await wait_for(lambda: len(cloud.launch_calls) == 2)
            status = json.loads(await client.ask("STATUS"))
            marked = [w for w in status["workers"] if w["interrupted"]]
            assert [
                (w["ip"], w["interrupted"]["reason"], w["interrupted"]["deadline"]) for w in marked
            ] == [(ip, "spot_interruption", deadline)]
            replacement = await client.ask("GET_WORKER client=job-1")
            assert replacement != ip
            assert replacement.count(".") == 3
            assert await client.ask(f"RELEASE {ip} client=job-1") == "OK"
            await client.aclose()
    attributes = make_client("sqs", region="us-east-1").get_queue_attributes(
        QueueUrl=events_url, AttributeNames=["ApproximateNumberOfMessages"]
    )
    assert attributes["Attributes"]["ApproximateNumberOfMessages"] == "0"


async def test_an_interrupted_idle_worker_is_terminated_and_not_replaced(
    events_url: str,
) -> None:
    """A rebalance recommendation for a worker nobody holds: terminated at once, no
    replacement (nobody needs one); events about other instances are ignored."""
    engine, cloud = events_engine(events_url)
    with trio.fail_after(30):
        async with running_broker(engine) as broker:
            assert len(await engine.burst(1)) == 1
            [worker] = engine.pool.workers.values()
            send(
                events_url,
                ec2_event(
                    "EC2 Instance Rebalance Recommendation",
                    {"instance-id": "i-0other"},
                    time.time(),
                ),
            )
            send(
                events_url,
                ec2_event(
                    "EC2 Instance Rebalance Recommendation",
                    {"instance-id": worker.instance_id},
                    time.time(),
                ),
            )
            await wait_for(lambda: worker.instance_id not in cloud.alive(), timeout=25)
            assert len(cloud.launch_calls) == 1
            assert broker.engine.pool.workers == {}


async def test_a_state_change_to_terminated_drops_the_worker_and_its_leases(
    events_url: str,
) -> None:
    """EC2 terminated a worker outside the broker: it and its lease go at once, without
    waiting for the reaper's next poll; PING of it is then `ERROR: Worker not found`."""
    engine, cloud = events_engine(events_url)
    with trio.fail_after(30):
        async with running_broker(engine) as broker:
            client = await LineClient.connect(broker.port)
            ip = await client.ask("GET_WORKER client=job-1")
            worker = engine.pool.by_ip(ip)
            assert worker is not None
            cloud.instances[worker.instance_id].state = "terminated"
            send(
                events_url,
                ec2_event(
                    "EC2 Instance State-change Notification",
                    {"instance-id": worker.instance_id, "state": "terminated"},
                    time.time(),
                ),
            )
            await wait_for(lambda: not engine.pool.leases, timeout=25)
            assert engine.pool.workers == {}
            assert await client.ask(f"PING {ip} client=job-1") == "ERROR: Worker not found"
            await client.aclose()


# --- the clients' view of an interrupted worker, against the real broker -----------------------

TCL_DIR = Path(__file__).resolve().parent.parent / "clients" / "tcl"
TCLSH = shutil.which("tclsh")


@attrs.frozen
class Interrupted:
    """A broker whose worker `ip`, held by client `job-1`, was announced interrupted at
    `deadline` (Unix seconds), and the broker has handled the warning."""

    port: int
    ip: str
    deadline: int
    cloud: FakeCloud


@asynccontextmanager
async def interrupted_worker(events_url: str) -> AsyncIterator[Interrupted]:
    """Run a broker, get a worker for `job-1`, send a spot interruption warning for it and
    wait until the engine has handled it."""
    engine, cloud = events_engine(events_url)
    async with running_broker(engine) as broker:
        ip = await ask_once(broker.port, "GET_WORKER client=job-1")
        worker = engine.pool.by_ip(ip)
        assert worker is not None
        sent_at = time.time()
        body = ec2_event(
            "EC2 Spot Instance Interruption Warning",
            {"instance-id": worker.instance_id, "instance-action": "terminate"},
            sent_at,
        )
        send(events_url, body)
        await wait_for(lambda: worker.interruption is not None, timeout=25)
        assert worker.interruption is not None
        assert worker.interruption.deadline == int(sent_at) + 120
        yield Interrupted(broker.port, ip, int(sent_at) + 120, cloud)


async def test_the_python_client_raises_worker_interrupted_with_the_deadline(
    events_url: str,
) -> None:
    """The Python client's PING raises WorkerInterrupted with the IP and announced deadline."""
    with trio.fail_after(30):
        async with interrupted_worker(events_url) as interrupted:
            client = BrokerClient("127.0.0.1", interrupted.port, timeout=5, client_id="job-1")
            with pytest.raises(WorkerInterrupted) as caught:
                await trio.to_thread.run_sync(client.ping, interrupted.ip)
    assert caught.value.ip == interrupted.ip
    assert caught.value.deadline == datetime.fromtimestamp(interrupted.deadline, UTC)


@pytest.mark.slow  # starts tclsh
@pytest.mark.skipif(
    TCLSH is None and not os.environ.get("CI"),
    reason="tclsh not found (install Tcl 8.6, e.g. apt-get install tcl); in CI it is required",
)
async def test_the_tcl_client_raises_interrupted_with_the_deadline(events_url: str) -> None:
    """The Tcl client's ping raises {COMPUTE_BROKER INTERRUPTED <ip> <deadline>}."""
    assert TCLSH is not None, "CI installs tclsh (.ci/run)"
    env = {k: v for k, v in os.environ.items() if not k.startswith("COMPUTE_BROKER_")}
    with trio.fail_after(30):
        async with interrupted_worker(events_url) as interrupted:
            script = f"""
                lappend auto_path {{{TCL_DIR}}}
                package require compute_broker
                compute_broker::configure -host 127.0.0.1 -port {interrupted.port} -client job-1
                catch {{compute_broker::ping {interrupted.ip}}} message options
                puts [dict get $options -errorcode]
                puts $message
            """
            result = await trio.run_process(
                [TCLSH], stdin=script.encode(), capture_stdout=True, capture_stderr=True, env=env
            )
    errorcode, message = result.stdout.decode().splitlines()
    deadline = format_deadline(interrupted.deadline)
    assert errorcode == f"COMPUTE_BROKER INTERRUPTED {interrupted.ip} {deadline}"
    assert message == (
        f"compute_broker: worker {interrupted.ip} interrupted: it goes away at {deadline}"
    )
