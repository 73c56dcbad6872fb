"""The SQS adapters (broker/sqs.py) against the sandbox's SQS (and EventBridge): the job
queue's depth; the EC2 event queue, which setup creates once with EventBridge's permission,
and whose messages are received, parsed and deleted in batches."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest
import structlog
import trio

from broker.cloud import CloudError
from broker.interruptions import (
    EVENT_PATTERN,
    InterruptionWarning,
    StateChange,
    parse_event,
)
from broker.sandbox import MotoHandle
from broker.sqs import EVENTS_POLICY_SID, SqsEventQueue, SqsQueue, ensure_events_queue
from tests.aws_support import full_client

INSTANCE = "i-0b662ef9931388ba0"
SPOT_WARNING = {
    "version": "0",
    "id": "1e5527d7-bb36-4607-3370-4164db56a40e",
    "detail-type": "EC2 Spot Instance Interruption Warning",
    "source": "aws.ec2",
    "account": "123456789012",
    "time": "2026-11-23T12:32:56Z",
    "region": "us-east-1",
    "resources": [f"arn:aws:ec2:us-east-1b:instance/{INSTANCE}"],
    "detail": {"instance-id": INSTANCE, "instance-action": "terminate"},
}


@pytest.fixture
def sqs(moto_server: MotoHandle) -> Any:
    return full_client("sqs")


def queue_name() -> str:
    return f"compute-broker-events-{uuid.uuid4().hex[:8]}"


def attributes(sqs: Any, url: str) -> dict[str, str]:
    response = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["All"])
    result: dict[str, str] = response["Attributes"]
    return result


def statements(sqs: Any, url: str) -> list[dict[str, Any]]:
    result: list[dict[str, Any]] = json.loads(attributes(sqs, url)["Policy"])["Statement"]
    return result


async def depth(url: str) -> int:
    """Visible plus in-flight messages."""
    return await SqsQueue(url, trio.CapacityLimiter(1), region="us-east-1").depth()


async def test_job_queue_depth_counts_visible_and_in_flight_messages(sqs: Any) -> None:
    """Depth is visible plus in-flight (received, not deleted) messages."""
    name = f"compute-broker-jobs-{uuid.uuid4().hex[:8]}"
    url: str = sqs.create_queue(QueueName=name)["QueueUrl"]
    for n in range(7):
        sqs.send_message(QueueUrl=url, MessageBody=f"job {n}")
    sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=2, VisibilityTimeout=60)
    with trio.fail_after(10):
        assert await depth(url) == 7


def test_setup_creates_the_queue_once_with_eventbridge_allowed(sqs: Any) -> None:
    """The second call finds the queue and returns the same URL; 5-minute retention; one
    statement lets events.amazonaws.com SendMessage from this account's rules."""
    name = queue_name()
    url = ensure_events_queue(sqs, name)
    assert url == ensure_events_queue(sqs, name)
    assert [url] == [u for u in sqs.list_queues(QueueNamePrefix=name).get("QueueUrls", [])]
    queue = attributes(sqs, url)
    assert queue["MessageRetentionPeriod"] == "300"
    expected = {
        "Sid": EVENTS_POLICY_SID,
        "Effect": "Allow",
        "Principal": {"Service": "events.amazonaws.com"},
        "Action": "sqs:SendMessage",
        "Resource": queue["QueueArn"],
        "Condition": {"ArnLike": {"aws:SourceArn": "arn:aws:events:us-east-1:123456789012:rule/*"}},
    }
    assert [expected] == statements(sqs, url)


def test_setup_keeps_an_existing_queue_and_the_policy_s_other_statements(sqs: Any) -> None:
    """An operator's queue keeps its retention and statements; ours is added once, and
    replaced (not duplicated) when narrowed to one rule."""
    name = queue_name()
    url = sqs.create_queue(QueueName=name, Attributes={"MessageRetentionPeriod": "600"})["QueueUrl"]
    theirs = {
        "Sid": "theirs",
        "Effect": "Allow",
        "Principal": {"Service": "sns.amazonaws.com"},
        "Action": "sqs:SendMessage",
        "Resource": attributes(sqs, url)["QueueArn"],
    }
    sqs.set_queue_attributes(
        QueueUrl=url,
        Attributes={"Policy": json.dumps({"Version": "2012-10-17", "Statement": theirs})},
    )
    assert url == ensure_events_queue(sqs, name)
    rule = "arn:aws:events:us-east-1:123456789012:rule/compute-broker-ec2"
    assert url == ensure_events_queue(sqs, name, rule_arn=rule)
    assert attributes(sqs, url)["MessageRetentionPeriod"] == "600"
    after = statements(sqs, url)
    assert [s["Sid"] for s in after] == ["theirs", EVENTS_POLICY_SID]
    assert theirs == after[0]
    assert {"ArnEquals": {"aws:SourceArn": rule}} == after[1]["Condition"]


def test_setup_failure_is_a_cloud_error(sqs: Any) -> None:
    """AWS's refusal (here a bad queue name) comes back as CloudError with AWS's code."""
    with pytest.raises(CloudError) as caught:
        ensure_events_queue(sqs, "not a queue name!")
    assert caught.value.code == "InvalidParameterValue"


async def test_a_warning_is_received_parsed_and_deleted(sqs: Any) -> None:
    """A spot interruption warning put on the queue comes back as its body, parses, and is gone
    once deleted."""
    url = ensure_events_queue(sqs, queue_name())
    sqs.send_message(QueueUrl=url, MessageBody=json.dumps(SPOT_WARNING))
    queue = SqsEventQueue(url, trio.CapacityLimiter(1), region="us-east-1")
    with trio.fail_after(10):
        received = await queue.receive(wait_seconds=1)
        assert len(received) == 1
        event = parse_event(received[0].body)
        assert isinstance(event, InterruptionWarning)
        assert event.instance_id == INSTANCE
        assert json.loads(received[0].body) == SPOT_WARNING
        await queue.delete([message.receipt_handle for message in received])
        assert await queue.receive() == []
        assert await depth(url) == 0


async def test_delete_takes_any_number_of_handles_in_batches_of_ten(sqs: Any) -> None:
    """23 received messages go in one delete (three DeleteMessageBatch calls); an empty
    delete is a no-op."""
    url = ensure_events_queue(sqs, queue_name())
    for start in range(0, 23, 10):
        sqs.send_message_batch(
            QueueUrl=url,
            Entries=[
                {"Id": str(n), "MessageBody": f"message {n}"}
                for n in range(start, min(start + 10, 23))
            ],
        )
    queue = SqsEventQueue(url, trio.CapacityLimiter(1), region="us-east-1")
    received = []
    with trio.fail_after(10):
        while len(received) < 23:
            batch = await queue.receive(max_messages=10)
            assert len(batch) <= 10
            received.extend(batch)
        assert {f"message {n}" for n in range(23)} == {message.body for message in received}
        await queue.delete([])
        await queue.delete([message.receipt_handle for message in received])
        assert await depth(url) == 0


async def test_a_handle_sqs_refuses_is_logged_not_raised(sqs: Any) -> None:
    """A stale or bogus receipt handle fails alone: the rest are deleted, the failure logged."""
    url = ensure_events_queue(sqs, queue_name())
    sqs.send_message(QueueUrl=url, MessageBody=json.dumps(SPOT_WARNING))
    queue = SqsEventQueue(url, trio.CapacityLimiter(1), region="us-east-1")
    with trio.fail_after(10):
        (message,) = await queue.receive(wait_seconds=1)
        with structlog.testing.capture_logs() as logs:
            await queue.delete(["bogus", message.receipt_handle])
        assert await depth(url) == 0
    expected = {
        "event": "event_queue.delete_failed",
        "log_level": "warning",
        "failed": 1,
        "codes": ["ReceiptHandleIsInvalid"],
    }
    assert [expected] == logs


async def test_receive_rejects_limits_sqs_would_refuse() -> None:
    """SQS takes 1-10 messages a call and long polls of 0-20 s."""
    queue = SqsEventQueue("https://sqs.example/q", trio.CapacityLimiter(1), client=object())
    for kwargs in ({"max_messages": 0}, {"max_messages": 11}, {"wait_seconds": 21}):
        with pytest.raises(ValueError):
            await queue.receive(**kwargs)


async def test_eventbridge_rule_with_the_pattern_feeds_the_queue(sqs: Any) -> None:
    """Through (moto's) EventBridge with EVENT_PATTERN: the warning, the recommendation, the
    running and the terminated states arrive; a state change to pending is filtered out."""
    url = ensure_events_queue(sqs, queue_name())
    events = full_client("events")
    rule = f"compute-broker-ec2-{uuid.uuid4().hex[:8]}"
    events.put_rule(Name=rule, EventPattern=json.dumps(EVENT_PATTERN))
    arn = attributes(sqs, url)["QueueArn"]
    events.put_targets(Rule=rule, Targets=[{"Id": "broker", "Arn": arn}])
    for detail_type, detail in [
        ("EC2 Spot Instance Interruption Warning", {"instance-action": "terminate"}),
        ("EC2 Instance State-change Notification", {"state": "pending"}),
        ("EC2 Instance State-change Notification", {"state": "running"}),
        ("EC2 Instance Rebalance Recommendation", {}),
        ("EC2 Instance State-change Notification", {"state": "terminated"}),
    ]:
        entry = {
            "Source": "aws.ec2",
            "DetailType": detail_type,
            "Detail": json.dumps({"instance-id": INSTANCE, **detail}),
        }
        assert events.put_events(Entries=[entry])["FailedEntryCount"] == 0
    queue = SqsEventQueue(url, trio.CapacityLimiter(1), region="us-east-1")
    parsed = []
    with trio.fail_after(10):
        while len(parsed) < 4:
            received = await queue.receive(wait_seconds=1)
            parsed.extend(parse_event(message.body) for message in received)
            await queue.delete([message.receipt_handle for message in received])
        assert await queue.receive() == []
    kinds = sorted(type(event).__name__ for event in parsed)
    assert kinds == ["InterruptionWarning", "RebalanceRecommendation", "StateChange", "StateChange"]
    assert {INSTANCE} == {getattr(event, "instance_id", None) for event in parsed}
    states = sorted(event.state for event in parsed if isinstance(event, StateChange))
    assert states == ["running", "terminated"]
