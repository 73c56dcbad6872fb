"""In-memory ports for engine tests on Trio's MockClock (no threads, no boto3): a `Cloud`, a
`JobQueue` and an `EventQueue`.

`FakeCloud`'s instances boot after `boot_time` virtual seconds. Every call is recorded so tests
can count RunInstances and DescribeInstances calls. Errors are injected per operation. IPs come
from TEST-NET-2 (never contacted) unless a test that probes workers asks for loopback ones.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import attrs
import trio

from broker.clock import Clock
from broker.cloud import CloudError, Instance, LaunchSpec, Market, ReceivedEvent


@attrs.define
class FakeInstance:
    instance_id: str
    spec: LaunchSpec
    ip: str
    launched_at: float
    running_at: float
    state: str = "pending"
    pool: str = "test"
    token: str = ""


class FakeCloud:
    """Implements `broker.cloud.Cloud` in memory."""

    def __init__(
        self,
        clock: Clock,
        *,
        boot_time: float = 20.0,
        pool: str = "test",
        ip_prefix: str = "198.51.100.",
    ) -> None:
        self.clock = clock
        self.ip_prefix = ip_prefix
        self.boot_time = boot_time
        self.pool = pool
        self.instances: dict[str, FakeInstance] = {}
        self.launch_calls: list[tuple[LaunchSpec, int, str]] = []
        self.subnets: list[str | None] = []  # the `subnet` of each launch call
        self.requested_by: list[str | None] = []  # the `requested_by` of each launch call
        self.describe_calls: list[list[str]] = []
        self.terminate_calls: list[list[str]] = []
        self.launch_errors: list[Exception] = []
        self.terminate_errors: list[CloudError] = []
        self.never_boot = False
        self.launch_delay = 0.0
        self._ids = itertools.count(1)

    def add_running(self, spec: LaunchSpec, *, pool: str | None = None) -> FakeInstance:
        """An instance that already exists (for adoption tests)."""
        n = next(self._ids)
        now = self.clock.now()
        instance = FakeInstance(
            f"i-{n:08x}", spec, f"{self.ip_prefix}{n}", now, now, "running", pool or self.pool
        )
        self.instances[instance.instance_id] = instance
        return instance

    async def launch(
        self,
        spec: LaunchSpec,
        count: int,
        client_token: str,
        *,
        subnet: str | None = None,
        requested_by: str | None = None,
    ) -> list[Instance]:
        self.launch_calls.append((spec, count, client_token))
        self.subnets.append(subnet)
        self.requested_by.append(requested_by)
        if self.launch_delay:
            await trio.sleep(self.launch_delay)
        else:
            await trio.lowlevel.checkpoint()
        if self.launch_errors:
            raise self.launch_errors.pop(0)
        now = self.clock.now()
        made = []
        for _ in range(count):
            n = next(self._ids)
            running_at = float("inf") if self.never_boot else now + self.boot_time
            instance = FakeInstance(
                f"i-{n:08x}", spec, f"{self.ip_prefix}{n}", now, running_at, token=client_token
            )
            self.instances[instance.instance_id] = instance
            made.append(self._view(instance))
        return made

    async def describe(self, instance_ids: Sequence[str]) -> list[Instance]:
        self.describe_calls.append(list(instance_ids))
        await trio.lowlevel.checkpoint()
        return [self._view(self.instances[i]) for i in instance_ids if i in self.instances]

    async def list_pool(self) -> list[Instance]:
        await trio.lowlevel.checkpoint()
        return [
            self._view(i)
            for i in self.instances.values()
            if i.pool == self.pool and self._state(i) in ("pending", "running")
        ]

    async def launched(self, tokens: Sequence[str]) -> dict[str, int]:
        await trio.lowlevel.checkpoint()
        counts: dict[str, int] = {}
        for instance in self.instances.values():
            if instance.pool == self.pool and instance.token in tokens:
                counts[instance.token] = counts.get(instance.token, 0) + 1
        return counts

    async def terminate(self, instance_ids: Sequence[str]) -> None:
        self.terminate_calls.append(list(instance_ids))
        await trio.lowlevel.checkpoint()
        if self.terminate_errors:
            raise self.terminate_errors.pop(0)
        for i in instance_ids:
            if i in self.instances:
                self.instances[i].state = "terminated"

    def alive(self) -> list[str]:
        """Ids of instances not terminated."""
        return [i for i, inst in self.instances.items() if self._state(inst) != "terminated"]

    def _state(self, instance: FakeInstance) -> str:
        if instance.state in ("pending", "running"):
            return "running" if self.clock.now() >= instance.running_at else "pending"
        return instance.state

    def _view(self, instance: FakeInstance) -> Instance:
        state = self._state(instance)
        return Instance(
            instance_id=instance.instance_id,
            instance_type=instance.spec.instance_type,
            market=Market(instance.spec.market),
            state=state,
            public_ip=instance.ip if state == "running" else None,
            launched_at=instance.launched_at,
            tags={
                "compute-broker:pool": instance.pool,
                "compute-broker:launch-token": instance.token,
            },
        )


class FakeQueue:
    """A job queue (`broker.cloud.JobQueue`) whose depth is `messages`."""

    def __init__(self, messages: int = 0) -> None:
        self.messages = messages

    async def depth(self) -> int:
        await trio.lowlevel.checkpoint()
        return self.messages


class FakeEvents:
    """An EC2 events queue (`broker.cloud.EventQueue`) in memory: what `put` adds, the next
    `receive` returns once (a receive waiting on an empty queue returns as soon as something is
    put, like SQS's long poll); deleted receipt handles are recorded."""

    def __init__(self) -> None:
        self.waiting: list[ReceivedEvent] = []
        self.deleted: list[str] = []
        self._put = 0
        self._arrived = trio.Event()

    def put(self, body: str) -> None:
        self.waiting.append(ReceivedEvent(f"receipt-{self._put}", body))
        self._put += 1
        self._arrived.set()

    async def receive(
        self, *, wait_seconds: int = 0, max_messages: int = 10
    ) -> list[ReceivedEvent]:
        with trio.move_on_after(wait_seconds):
            await self._arrived.wait()
        await trio.lowlevel.checkpoint()
        taken, self.waiting = self.waiting[:max_messages], self.waiting[max_messages:]
        if not self.waiting:
            self._arrived = trio.Event()
        return taken

    async def delete(self, receipt_handles: Sequence[str]) -> None:
        await trio.lowlevel.checkpoint()
        self.deleted += receipt_handles
