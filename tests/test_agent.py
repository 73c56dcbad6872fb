"""`compute-broker agent`: registration, heartbeats, expiry and deregistration."""

from __future__ import annotations

import os
import signal

import trio
from trio.testing import MockClock

from broker.agent import MISSED_BEATS, AgentSettings, run_agent
from broker.clock import Clock
from broker.memory_registry import MemoryRegistry
from broker.model import LocalWorker

WORKER = LocalWorker("lab-ws-1", "10.20.30.40")


async def test_agent_heartbeats_keep_the_entry_and_sigterm_removes_it(
    autojump_clock: MockClock,
) -> None:
    """Registered at once, kept alive by heartbeats past the expiry of one registration,
    deregistered on SIGTERM."""
    registry = MemoryRegistry("p")
    clock = Clock(epoch=1_700_000_000.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(run_agent, registry, AgentSettings(WORKER, 30.0), clock)
        (entry,) = await registry.list_workers(clock.now())
        assert (entry.instance_id, entry.ip, entry.provider) == (
            "local:lab-ws-1",
            WORKER.ip,
            "local",
        )
        await trio.sleep(MISSED_BEATS * 30 * 4)
        assert [w.instance_id for w in await registry.list_workers(clock.now())] == [
            "local:lab-ws-1"
        ]
        os.kill(os.getpid(), signal.SIGTERM)  # the agent's signal receiver is open
    assert await registry.get_worker("local:lab-ws-1") is None


async def test_entry_expires_after_three_missed_heartbeats(autojump_clock: MockClock) -> None:
    """An agent that stops beating (crashed) is no longer listed after 3 intervals."""
    registry = MemoryRegistry("p")
    clock = Clock(epoch=1_700_000_000.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(run_agent, registry, AgentSettings(WORKER, 30.0), clock)
        nursery.cancel_scope.cancel()  # killed: no signal, so no deregistration
    assert await registry.list_workers(clock.now()) != []
    await trio.sleep(MISSED_BEATS * 30 + 1)
    assert await registry.list_workers(clock.now()) == []
