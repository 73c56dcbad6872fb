"""The SQS adapters of the `broker.cloud` queue ports: `SqsQueue` (`JobQueue`), the job queue's
depth, for bursting (the broker only reads it; job runners on the workers receive and delete
the messages), and `SqsEventQueue` (`EventQueue`), the EC2 event queue that EventBridge fills
for spot interruptions (the broker receives and deletes; `broker.interruptions` parses). Also
`ensure_events_queue`, which creates that queue. boto3 runs off the event loop like every AWS
call."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, Final

import botocore.exceptions
import structlog
import trio

from broker.aws import call, cloud_error, make_client
from broker.cloud import EventQueue, JobQueue, ReceivedEvent

DEPTH_ATTRIBUTES = ("ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible")

# SQS's limits: messages per ReceiveMessage and entries per DeleteMessageBatch; long poll.
MAX_BATCH: Final = 10
MAX_WAIT_SECONDS: Final = 20
# An interruption warning is stale after its two minutes: keep unread events 5 minutes, as
# aws-node-termination-handler's queue does.
EVENTS_RETENTION_SECONDS: Final = 300
EVENTS_POLICY_SID: Final = "compute-broker-eventbridge"

_log = structlog.get_logger("broker.sqs")


class SqsQueue:
    """`JobQueue` on an SQS queue URL, with one GetQueueAttributes call per check."""

    def __init__(
        self,
        queue_url: str,
        limiter: trio.CapacityLimiter,
        client: Any = None,
        *,
        region: str | None = None,
    ) -> None:
        self.queue_url = queue_url
        self.limiter = limiter
        self.client: Any = client if client is not None else make_client("sqs", region=region)

    async def depth(self) -> int:
        response = await call(
            self.limiter,
            self.client.get_queue_attributes,
            QueueUrl=self.queue_url,
            AttributeNames=list(DEPTH_ATTRIBUTES),
        )
        attributes = response.get("Attributes", {})
        return sum(int(attributes.get(name, 0)) for name in DEPTH_ATTRIBUTES)


class SqsEventQueue:
    """`EventQueue` on an SQS queue URL (EventBridge -> SQS): receive message bodies, delete
    handled ones.

    A long poll holds a thread and a `limiter` token for up to `wait_seconds`: give the queue a
    limiter of its own. The client this makes reads for longer than the longest poll.
    """

    def __init__(
        self,
        queue_url: str,
        limiter: trio.CapacityLimiter,
        client: Any = None,
        *,
        region: str | None = None,
    ) -> None:
        self.queue_url = queue_url
        self.limiter = limiter
        self.client: Any = (
            client
            if client is not None
            else make_client("sqs", region=region, read_timeout=MAX_WAIT_SECONDS + 10)
        )

    async def receive(
        self, *, wait_seconds: int = 0, max_messages: int = MAX_BATCH
    ) -> list[ReceivedEvent]:
        """Up to `max_messages` (1-10) messages, waiting up to `wait_seconds` (0-20) for one.

        Received messages stay invisible to other receivers for the queue's visibility timeout;
        delete them once handled, or they come back.
        """
        if not 1 <= max_messages <= MAX_BATCH:
            raise ValueError(f"max_messages must be 1 to {MAX_BATCH} (got {max_messages})")
        if not 0 <= wait_seconds <= MAX_WAIT_SECONDS:
            raise ValueError(f"wait_seconds must be 0 to {MAX_WAIT_SECONDS} (got {wait_seconds})")
        response = await call(
            self.limiter,
            self.client.receive_message,
            QueueUrl=self.queue_url,
            MaxNumberOfMessages=max_messages,
            WaitTimeSeconds=wait_seconds,
        )
        return [
            ReceivedEvent(message["ReceiptHandle"], message["Body"])
            for message in response.get("Messages", [])
        ]

    async def delete(self, receipt_handles: Sequence[str]) -> None:
        """Delete these messages, 10 a call. A handle SQS refuses (expired, say) is logged and
        skipped: its message comes back and is handled again."""
        for start in range(0, len(receipt_handles), MAX_BATCH):
            chunk = receipt_handles[start : start + MAX_BATCH]
            response = await call(
                self.limiter,
                self.client.delete_message_batch,
                QueueUrl=self.queue_url,
                Entries=[{"Id": str(n), "ReceiptHandle": handle} for n, handle in enumerate(chunk)],
            )
            failed = response.get("Failed", [])
            if failed:
                _log.warning(
                    "event_queue.delete_failed",
                    failed=len(failed),
                    codes=sorted({entry.get("Code", "?") for entry in failed}),
                )


def ensure_events_queue(client: Any, name: str, *, rule_arn: str | None = None) -> str:
    """Blocking: create the EC2 event queue `name` if absent and allow EventBridge to send to
    it; return its URL. Idempotent.

    A new queue keeps messages `EVENTS_RETENTION_SECONDS` and is encrypted with SQS-managed keys
    (EventBridge cannot publish to a queue under the AWS-managed KMS key). The policy statement
    `EVENTS_POLICY_SID` lets `events.amazonaws.com` SendMessage from rules of this account and
    region, or only from `rule_arn`; it is added to an existing policy, other statements kept.
    Raises `CloudError`.
    """
    try:
        url = _create_queue(client, name)
        queue_arn, policy = _queue_arn_and_policy(client, url)
        others = [s for s in policy["Statement"] if s.get("Sid") != EVENTS_POLICY_SID]
        statements = [*others, _eventbridge_statement(queue_arn, rule_arn)]
        if statements != policy["Statement"]:
            policy = {"Version": "2012-10-17", **policy, "Statement": statements}
            client.set_queue_attributes(QueueUrl=url, Attributes={"Policy": json.dumps(policy)})
    except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as exc:
        raise cloud_error(exc) from exc
    return url


def _create_queue(client: Any, name: str) -> str:
    try:
        url: str = client.get_queue_url(QueueName=name)["QueueUrl"]
        return url
    except client.exceptions.QueueDoesNotExist:
        pass
    try:
        url = client.create_queue(
            QueueName=name,
            Attributes={
                "MessageRetentionPeriod": str(EVENTS_RETENTION_SECONDS),
                "SqsManagedSseEnabled": "true",
            },
        )["QueueUrl"]
    except client.exceptions.QueueNameExists:  # another setup created it since we looked
        url = client.get_queue_url(QueueName=name)["QueueUrl"]
    return url


def _queue_arn_and_policy(client: Any, url: str) -> tuple[str, dict[str, Any]]:
    response = client.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn", "Policy"])
    attributes = response["Attributes"]
    policy = json.loads(attributes["Policy"]) if attributes.get("Policy") else {}
    statements = policy.get("Statement", [])
    # IAM allows a lone statement object instead of a list.
    policy["Statement"] = [statements] if isinstance(statements, dict) else list(statements)
    return attributes["QueueArn"], policy


def _eventbridge_statement(queue_arn: str, rule_arn: str | None) -> dict[str, Any]:
    # arn:<partition>:sqs:<region>:<account>:<name>
    _, partition, _, region, account, _ = queue_arn.split(":", 5)
    if rule_arn is not None:
        condition = {"ArnEquals": {"aws:SourceArn": rule_arn}}
    else:
        condition = {
            "ArnLike": {"aws:SourceArn": f"arn:{partition}:events:{region}:{account}:rule/*"}
        }
    return {
        "Sid": EVENTS_POLICY_SID,
        "Effect": "Allow",
        "Principal": {"Service": "events.amazonaws.com"},
        "Action": "sqs:SendMessage",
        "Resource": queue_arn,
        "Condition": condition,
    }


def _implements_ports(jobs: SqsQueue, events: SqsEventQueue) -> tuple[JobQueue, EventQueue]:
    """mypy checks here that the adapters implement the ports."""
    return jobs, events
