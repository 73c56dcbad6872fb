"""The EC2 events room (broker/ec2_events.py): `next_interruption`'s de-duplication as plain
code, and an interruption across replicas on Trio's MockClock. tests/test_ec2_events_aws.py
has the events arriving through moto's SQS, and what clients see."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest
import trio
from trio.testing import MockClock

from broker.clock import Clock
from broker.ec2_events import next_interruption
from broker.engine import WorkerInterrupted
from broker.memory_registry import MemoryRegistry
from broker.model import Interruption, WorkerRequest
from tests.engines import T0, make_engine, running
from tests.fakes import FakeCloud, FakeEvents
from tests.harness import wait_for

SPOT, REBALANCE = "spot_interruption", "rebalance_recommendation"
NOW = T0 + 10


# --- next_interruption: what a warning adds --------------------------------------------------


def test_a_first_warning_interrupts_the_worker() -> None:
    """No interruption yet: the warning's reason and deadline, noticed now."""
    assert next_interruption(None, SPOT, T0 + 120, NOW) == Interruption(SPOT, T0 + 120, NOW)
    assert next_interruption(None, REBALANCE, None, NOW) == Interruption(REBALANCE, None, NOW)


def test_a_repeated_or_weaker_warning_adds_nothing() -> None:
    """SQS delivers at least once: the same warning again, or a rebalance recommendation
    after a spot warning (it says less), changes nothing."""
    spot = Interruption(SPOT, T0 + 120, T0)
    rebalance = Interruption(REBALANCE, None, T0)
    assert next_interruption(spot, SPOT, T0 + 120, NOW) is None
    assert next_interruption(spot, REBALANCE, None, NOW) is None
    assert next_interruption(rebalance, REBALANCE, None, NOW) is None


def test_a_spot_warning_after_a_rebalance_recommendation_brings_the_deadline() -> None:
    """A rebalance recommendation has no deadline; the spot warning after it has one."""
    rebalance = Interruption(REBALANCE, None, T0)
    assert next_interruption(rebalance, SPOT, T0 + 120, NOW) == Interruption(SPOT, T0 + 120, NOW)


def test_a_warning_replaces_a_budget_stop_keeping_the_sooner_deadline() -> None:
    """EC2's warning replaces a budget stop; the worker goes at whichever deadline is first."""
    soon = Interruption("budget", T0 + 60, T0)
    late = Interruption("budget", T0 + 600, T0)
    assert next_interruption(soon, SPOT, T0 + 120, NOW) == Interruption(SPOT, T0 + 60, NOW)
    assert next_interruption(late, SPOT, T0 + 120, NOW) == Interruption(SPOT, T0 + 120, NOW)


# --- across replicas -------------------------------------------------------------------------


def warning(instance_id: str) -> str:
    """A spot interruption warning as EventBridge delivers it (noon UTC, 2026-11-23)."""
    return json.dumps(
        {
            "detail-type": "EC2 Spot Instance Interruption Warning",
            "source": "aws.ec2",
            "time": "2026-11-23T12:00:00Z",
            "detail": {"instance-id": instance_id, "instance-action": "terminate"},
        }
    )


async def test_the_replica_without_the_event_stops_handing_the_worker_out(
    autojump_clock: MockClock, cloud: FakeCloud, clock: Clock
) -> None:
    """SQS delivers each message once: A gets the warning for a worker alice holds through
    B. B's next hand-out skips it (the registry refuses the claim) and, after B's next
    reconciliation, alice's PING through B answers interrupted."""
    registry = MemoryRegistry("test")
    events = FakeEvents()
    a = make_engine(cloud, clock, registry, events=events)
    b = make_engine(cloud, clock, registry)
    async with running(a):
        ip = (await a.get_worker(WorkerRequest(), "alice")).ip
        async with running(b):  # B restores the worker from the registry
            assert (await b.get_worker(WorkerRequest(), "alice")).ip == ip
            [instance_id] = a.pool.workers
            events.put(warning(instance_id))
            await wait_for(lambda: events.deleted, timeout=10, poll=0.5)
            assert events.deleted == ["receipt-0"]
            assert a.pool.workers[instance_id].interruption is not None
            assert (await b.get_worker(WorkerRequest(), "bob")).ip != ip
            await trio.sleep(61)  # B reconciles with the registry
            with pytest.raises(WorkerInterrupted) as interrupted:
                await b.ping(ip, "alice")
    noon = datetime(2026, 11, 23, 12, 0, tzinfo=UTC).timestamp()
    assert interrupted.value.interruption.reason == SPOT
    assert interrupted.value.interruption.deadline == noon + 120


def test_a_rebalance_recommendation_keeps_a_budget_stops_deadline() -> None:
    """A worker the budget stops at T, then recommended for rebalance (no deadline of its own):
    it still goes at T."""
    stop = Interruption("budget", 1_000.0, 10.0)
    after = next_interruption(stop, "rebalance_recommendation", None, 20.0)
    assert after is not None
    assert (after.reason, after.deadline) == ("rebalance_recommendation", 1_000.0)
