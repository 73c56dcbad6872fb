"""The job queue's depth from SQS, for bursting (the broker only reads it; job runners on the
workers receive and delete the messages). boto3 runs off the event loop like every AWS call."""

from __future__ import annotations

from typing import Any, Protocol

import trio

from broker.aws import call, make_client

DEPTH_ATTRIBUTES = ("ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible")


class JobQueue(Protocol):
    """Where the jobs wait. `depth()` may raise `broker.cloud.CloudError`."""

    async def depth(self) -> int:
        """Messages visible plus in flight (received, not yet deleted)."""
        ...


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
