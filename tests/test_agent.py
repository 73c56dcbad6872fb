"""`compute-broker agent` through a broker's own port: registration, heartbeats, expiry and
deregistration, with an agent token when access control is on; no registry access needed."""

from __future__ import annotations

import os
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio
from trio.testing import MockClock

from broker.access import AccessPolicy, TokenEntry
from broker.agent import AgentSettings, run_agent
from broker.clock import Clock
from broker.cloud import LaunchSpec, Market
from broker.engine import Engine, EngineSettings, Refusal
from broker.gate import Gate
from broker.limits import Limiter, Limits
from broker.local_workers import MISSED_BEATS
from broker.memory_registry import MemoryRegistry
from broker.model import Limits as PoolLimits
from broker.model import LocalWorker, WorkerRequest
from broker.prices import PriceTable
from broker.server import Server, ServerSettings
from tests.fakes import FakeCloud

WORKER = LocalWorker("lab-ws-1", "10.20.30.40")
INTERVAL = 30.0
AGENT_TOKEN = "agent-token-0123456789"


@asynccontextmanager
async def broker(policy: AccessPolicy | None = None) -> AsyncIterator[tuple[Engine, int]]:
    clock = Clock(epoch=1_700_000_000.0)
    settings = EngineSettings(
        default_spec=LaunchSpec("c7i.8xlarge", Market.SPOT),
        limits=PoolLimits(10, None, 900.0),
        reap_interval=10.0,
        agent_heartbeat=INTERVAL,
    )
    engine = Engine(FakeCloud(clock), settings, clock, PriceTable.default(), MemoryRegistry("p"))
    gate = Gate(policy or AccessPolicy.build(), Limiter(Limits(None, None, 1, None, None)))
    server = Server(engine, ServerSettings(host="127.0.0.1", port=0), gate)
    async with trio.open_nursery() as nursery:
        await nursery.start(engine.run)
        listeners = await nursery.start(server.run)
        yield engine, listeners[0].socket.getsockname()[1]
        nursery.cancel_scope.cancel()


async def test_agent_registers_heartbeats_and_deregisters_on_sigterm(
    autojump_clock: MockClock,
) -> None:
    """Registered through the broker at once (and handed out), kept alive by heartbeats
    past the expiry of one registration, deregistered on SIGTERM."""
    async with broker() as (engine, port):
        async with trio.open_nursery() as nursery:
            await nursery.start(run_agent, AgentSettings(WORKER, ("127.0.0.1", port)))
            (entry,) = await engine.registry.list_workers(engine.clock.now())
            assert (entry.instance_id, entry.ip, entry.provider) == (
                "local:lab-ws-1",
                WORKER.ip,
                "local",
            )
            handout = await engine.get_worker(WorkerRequest(), "a")
            assert handout.ip == WORKER.ip
            await engine.release(WORKER.ip, "a")
            await trio.sleep(MISSED_BEATS * INTERVAL * 4)
            assert "local:lab-ws-1" in engine.pool.workers
            os.kill(os.getpid(), signal.SIGTERM)  # the agent's signal receiver is open
        assert "local:lab-ws-1" not in engine.pool.workers
        assert await engine.registry.get_worker("local:lab-ws-1") is None


async def test_an_agent_that_stops_beating_expires(autojump_clock: MockClock) -> None:
    """An agent killed without deregistering: its entry expires after three intervals and
    the broker drops the worker at its next reconciliation."""
    async with broker() as (engine, port):
        async with trio.open_nursery() as nursery:
            await nursery.start(run_agent, AgentSettings(WORKER, ("127.0.0.1", port)))
            nursery.cancel_scope.cancel()  # killed: no signal, so no deregistration
        assert "local:lab-ws-1" in engine.pool.workers
        await trio.sleep(MISSED_BEATS * INTERVAL + 2 * 10.0)
        assert "local:lab-ws-1" not in engine.pool.workers
        assert await engine.registry.list_workers(engine.clock.now()) == []


async def test_with_access_control_the_agent_needs_the_agent_role(
    autojump_clock: MockClock,
) -> None:
    """With tokens, an agent token registers; without one the broker says auth required and
    the agent keeps retrying (registering nothing)."""
    policy = AccessPolicy.build(tokens=[TokenEntry.from_secret("lab", "agent", AGENT_TOKEN)])
    async with broker(policy) as (engine, port):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run_agent, AgentSettings(WORKER, ("127.0.0.1", port)))
            await trio.sleep(30)
            assert engine.pool.workers == {}
            nursery.cancel_scope.cancel()
        async with trio.open_nursery() as nursery:
            settings = AgentSettings(WORKER, ("127.0.0.1", port), AGENT_TOKEN)
            await nursery.start(run_agent, settings)
            assert "local:lab-ws-1" in engine.pool.workers
            nursery.cancel_scope.cancel()


async def test_a_new_address_replaces_the_old_and_declared_workers_are_not_an_agents(
    autojump_clock: MockClock,
) -> None:
    """REGISTER with a new IP (DHCP) moves the worker; a name the config declares cannot be
    registered or deregistered by an agent."""
    async with broker() as (engine, _):
        await engine.register_local("lab-ws-1", "10.20.30.40")
        await engine.register_local("lab-ws-1", "10.20.30.41")
        record = await engine.registry.get_worker("local:lab-ws-1")
        assert record is not None
        assert record.ip == "10.20.30.41"
        assert engine.pool.workers["local:lab-ws-1"].ip == "10.20.30.41"
    async with declared_broker() as engine:
        for call in (engine.register_local("bench", "10.0.0.9"), engine.deregister_local("bench")):
            with pytest.raises(Refusal, match="declared in the config"):
                await call


@asynccontextmanager
async def declared_broker() -> AsyncIterator[Engine]:
    clock = Clock(epoch=1_700_000_000.0)
    settings = EngineSettings(
        default_spec=LaunchSpec("c7i.8xlarge", Market.SPOT),
        limits=PoolLimits(10, None, 900.0),
        local_workers=(LocalWorker("bench", "10.0.0.8"),),
    )
    engine = Engine(FakeCloud(clock), settings, clock, PriceTable.default(), MemoryRegistry("p"))
    async with trio.open_nursery() as nursery:
        await nursery.start(engine.run)
        yield engine
        nursery.cancel_scope.cancel()
