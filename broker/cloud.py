"""The cloud ports: what the broker needs from AWS, as small interfaces and their errors.

`Cloud` is EC2; `JobQueue` is the queue whose depth drives bursting; `EventQueue` is the queue
EventBridge fills with EC2 events (spot interruptions). The values they speak in (`Instance`,
`LaunchSpec`, `Market`) live in `broker.model` and are re-exported here. The core imports this
module, never boto3. `broker.ec2` and `broker.sqs` are the adapters that implement them with
boto3; tests of pure logic use in-memory fakes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final, Protocol

import attrs

from broker.model import Instance, LaunchSpec, Market

__all__ = [
    "CAPACITY_ERRORS",
    "THROTTLING_ERRORS",
    "Cloud",
    "CloudError",
    "EventQueue",
    "Instance",
    "JobQueue",
    "LaunchSpec",
    "Market",
    "ReceivedEvent",
]

# The offering (instance type, Availability Zone, market) cannot be had now: try another one
# rather than the same one again. The codes AWS ParallelCluster fails over on, from EC2's
# error-code reference; MaxSpotInstanceCountExceeded is per market (spot) and Unsupported is
# a type not offered in the zone.
CAPACITY_ERRORS: Final = frozenset(
    {
        "InsufficientInstanceCapacity",
        "SpotMaxPriceTooLow",
        "MaxSpotInstanceCountExceeded",
        "Unsupported",
        "InsufficientHostCapacity",
        "InsufficientReservedInstanceCapacity",
        "InsufficientCapacity",
        "UnfulfillableCapacity",
    }
)

# The request was refused for its rate: the same request may succeed after a pause. EC2 says
# RequestLimitExceeded; the others are what other AWS services say (botocore's list).
THROTTLING_ERRORS: Final = frozenset(
    {
        "RequestLimitExceeded",
        "Throttling",
        "ThrottlingException",
        "ThrottledException",
        "RequestThrottled",
        "RequestThrottledException",
        "TooManyRequestsException",
        "ProvisionedThroughputExceededException",
        "BandwidthLimitExceeded",
        "SlowDown",
        "EC2ThrottledException",
    }
)


class CloudError(Exception):
    """An AWS call failed. `code` is AWS's error code (or a name of ours for transport errors).

    `str(error)` is a one-line reason fit for an `ERROR:` reply.
    """

    def __init__(self, code: str, message: str, *, unreachable: bool = False) -> None:
        super().__init__(f"{code}: {message}" if message else code)
        self.code = code
        self.message = message
        self.unreachable = unreachable

    @property
    def capacity(self) -> bool:
        """True when the offering (type, zone, market) cannot be had now: try another."""
        return self.code in CAPACITY_ERRORS

    @property
    def throttled(self) -> bool:
        """True when AWS refused the request for its rate: retry it after a pause."""
        return self.code in THROTTLING_ERRORS


@attrs.frozen
class ReceivedEvent:
    """One message from the event queue: its body, and the handle that deletes it."""

    receipt_handle: str
    body: str


class Cloud(Protocol):
    """The EC2 operations the broker uses. Every method may raise `CloudError`.

    Implementations run blocking calls off the event loop; all methods are cancellable
    (a cancelled call may still complete in its thread).
    """

    async def launch(
        self,
        spec: LaunchSpec,
        count: int,
        client_token: str,
        *,
        subnet: str | None = None,
        requested_by: str | None = None,
    ) -> list[Instance]:
        """Launch up to `count` (at least 1) tagged instances in one RunInstances call.

        The same `client_token` must be passed when a launch is retried, so EC2 launches once.
        `subnet` picks the subnet (and so the Availability Zone); None means the adapter's
        configured default. `requested_by` names who caused the launch (a lease owner,
        `warm-pool`, `burst`, ...), tagged on the instances for cost allocation. A `CloudError`
        whose `capacity` is True means this offering cannot be had now: another type, zone or
        market may be.
        """
        ...

    async def describe(self, instance_ids: Sequence[str]) -> list[Instance]:
        """Describe these instances (one batched call). Unknown ids are left out."""
        ...

    async def list_pool(self) -> list[Instance]:
        """All pending or running instances tagged as this pool's."""
        ...

    async def launched(self, tokens: Sequence[str]) -> dict[str, int]:
        """How many of this pool's instances each launch token produced, in any state
        (EC2 still describes a terminated instance for about an hour)."""
        ...

    async def terminate(self, instance_ids: Sequence[str]) -> None:
        """Terminate these instances (idempotent)."""
        ...


class JobQueue(Protocol):
    """Where the jobs wait. `depth()` may raise `CloudError`."""

    async def depth(self) -> int:
        """Messages visible plus in flight (received, not yet deleted)."""
        ...


class EventQueue(Protocol):
    """The EC2 event queue (EventBridge -> SQS): receive message bodies, delete handled ones.
    Both methods may raise `CloudError`."""

    async def receive(
        self, *, wait_seconds: int = 0, max_messages: int = 10
    ) -> list[ReceivedEvent]:
        """Up to `max_messages` (1-10) messages, waiting up to `wait_seconds` (0-20) for one.

        Received messages stay invisible to other receivers for the queue's visibility timeout;
        delete them once handled, or they come back.
        """
        ...

    async def delete(self, receipt_handles: Sequence[str]) -> None:
        """Delete these messages (any number). A handle the queue refuses (expired, say) is
        skipped: its message comes back and is handled again."""
        ...
