"""Spot interruptions across replicas, on Trio's MockClock: the event reaches one replica (SQS
delivers each message once); the other stops handing the worker out too, through the
registry."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, datetime

import pytest
import trio
from trio.testing import MockClock

from broker.clock import Clock
from broker.cloud import LaunchSpec, Market, ReceivedEvent
from broker.engine import Engine, EngineSettings, WorkerInterrupted
from broker.memory_registry import MemoryRegistry
from broker.model import Limits, WorkerRequest
from broker.prices import PriceTable
from tests.fakes import FakeCloud

SPEC = LaunchSpec("c7i.8xlarge", Market.SPOT)


class FakeEvents:
    """An events queue in memory: what `put` adds, the next `receive` returns once."""

    def __init__(self) -> None:
        self.waiting: list[ReceivedEvent] = []
        self.deleted: list[str] = []

    def put(self, body: str) -> None:
        self.waiting.append(ReceivedEvent(f"receipt-{len(self.waiting)}", body))

    async def receive(
        self, *, wait_seconds: int = 0, max_messages: int = 10
    ) -> list[ReceivedEvent]:
        await trio.sleep(min(wait_seconds, 1))
        taken, self.waiting = self.waiting[:max_messages], self.waiting[max_messages:]
        return taken

    async def delete(self, receipt_handles: Sequence[str]) -> None:
        await trio.lowlevel.checkpoint()
        self.deleted += receipt_handles


def warning(instance_id: str) -> str:
    return json.dumps(
        {
            "detail-type": "EC2 Spot Instance Interruption Warning",
            "source": "aws.ec2",
            "time": "2026-11-23T12:00:00Z",
            "detail": {"instance-id": instance_id, "instance-action": "terminate"},
        }
    )


async def test_the_replica_without_the_event_stops_handing_the_worker_out(
    autojump_clock: MockClock,
) -> None:
    """A gets the warning for a worker alice holds through B: B's next hand-out skips it (the
    registry refuses the claim) and, after B's next reconciliation, alice's PING through B
    answers interrupted."""
    clock = Clock(epoch=1_700_000_000.0)
    cloud = FakeCloud(clock, boot_time=20.0)
    registry = MemoryRegistry("test")
    settings = EngineSettings(default_spec=SPEC, limits=Limits(10, None, 900.0), reap_interval=60.0)
    events = FakeEvents()
    a = Engine(cloud, settings, clock, PriceTable.default(), registry, events=events)  # type: ignore[arg-type]
    b = Engine(cloud, settings, clock, PriceTable.default(), registry)
    async with trio.open_nursery() as nursery:
        await nursery.start(a.run)
        ip = (await a.get_worker(WorkerRequest(), "alice")).ip
        await nursery.start(b.run)  # B restores the worker from the registry
        assert (await b.get_worker(WorkerRequest(), "alice")).ip == ip
        [instance_id] = a.pool.workers
        events.put(warning(instance_id))
        with trio.fail_after(10):
            while not events.deleted:
                await trio.sleep(0.5)
        assert events.deleted == ["receipt-0"]
        assert a.pool.workers[instance_id].interruption is not None
        assert (await b.get_worker(WorkerRequest(), "bob")).ip != ip
        await trio.sleep(61)  # B reconciles with the registry
        with pytest.raises(WorkerInterrupted) as interrupted:
            await b.ping(ip, "alice")
        noon = datetime(2026, 11, 23, 12, 0, tzinfo=UTC).timestamp()
        assert interrupted.value.interruption.reason == "spot_interruption"
        assert interrupted.value.interruption.deadline == noon + 120
        nursery.cancel_scope.cancel()
