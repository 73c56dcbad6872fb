"""The cloud port: what the broker needs from EC2, as values and one small interface.

The core (pool, engine) imports this module, never boto3. `broker.ec2` is the adapter that
implements `Cloud` with boto3; tests of pure logic use an in-memory fake.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from typing import Protocol

import attrs


class Market(enum.StrEnum):
    """How an instance is bought."""

    SPOT = "spot"
    ON_DEMAND = "on-demand"


@attrs.frozen
class LaunchSpec:
    """What to launch: the parts of RunInstances that vary per request."""

    instance_type: str
    market: Market


@attrs.frozen
class Instance:
    """One EC2 instance as the cloud reports it.

    `state` is EC2's state name (pending, running, shutting-down, terminated, stopping,
    stopped). `launched_at` is Unix seconds.
    """

    instance_id: str
    instance_type: str
    market: Market
    state: str
    public_ip: str | None
    launched_at: float
    tags: Mapping[str, str] = attrs.field(factory=dict)

    @property
    def is_alive(self) -> bool:
        """True while the instance can still become (or is) a usable worker."""
        return self.state in ("pending", "running")


class CloudError(Exception):
    """An AWS call failed. `code` is AWS's error code (or a name of ours for transport errors).

    `str(error)` is a one-line reason fit for an `ERROR:` reply.
    """

    def __init__(self, code: str, message: str, *, unreachable: bool = False) -> None:
        super().__init__(f"{code}: {message}" if message else code)
        self.code = code
        self.message = message
        self.unreachable = unreachable


class Cloud(Protocol):
    """The EC2 operations the broker uses. Every method may raise `CloudError`.

    Implementations run blocking calls off the event loop; all methods are cancellable
    (a cancelled call may still complete in its thread).
    """

    async def launch(self, spec: LaunchSpec, count: int, client_token: str) -> list[Instance]:
        """Launch up to `count` (at least 1) tagged instances in one RunInstances call.

        The same `client_token` must be passed when a launch is retried, so EC2 launches once.
        """
        ...

    async def describe(self, instance_ids: Sequence[str]) -> list[Instance]:
        """Describe these instances (one batched call). Unknown ids are left out."""
        ...

    async def list_pool(self) -> list[Instance]:
        """All pending or running instances tagged as this pool's."""
        ...

    async def terminate(self, instance_ids: Sequence[str]) -> None:
        """Terminate these instances (idempotent)."""
        ...
