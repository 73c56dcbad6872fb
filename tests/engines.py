"""The one way engine tests build an engine: `make_settings` and `make_engine`.

Defaults: the default spec is c7i.8xlarge spot, max_workers 10, no max_hourly_cost,
idle_timeout 900 s, EngineSettings' own defaults for the rest (launch_timeout 300 s, describe
every 2 s, reaper every 60 s), the built-in price table, an in-memory cloud and registry. A test
names only what it changes. The fixtures `clock`, `cloud` and `engine` (tests/conftest.py) give
the defaults on Trio's MockClock.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import attrs
import trio

from broker.clock import Clock
from broker.cloud import Cloud, EventQueue, JobQueue
from broker.engine import Engine, EngineSettings, Refusal
from broker.model import LaunchSpec, Limits, Market, WorkerRequest
from broker.prices import PriceTable
from broker.registry import Registry
from broker.scaling import SpotPriceSource
from tests.fakes import FakeCloud

SPEC = LaunchSpec("c7i.8xlarge", Market.SPOT)  # the default spec: $0.50/h in the built-in table
BIG = LaunchSpec("c7i.16xlarge", Market.SPOT)  # $1.00/h
T0 = 1_700_000_000.0  # the Unix time engine tests start at (a Tuesday, 22:13 UTC)

_LIMITS = {f.name for f in attrs.fields(Limits)}


def make_settings(**overrides: Any) -> EngineSettings:
    """The tests' engine settings with `overrides`: any `EngineSettings` field, or a `Limits`
    field by name (`max_workers`, `max_hourly_cost`, `idle_timeout`, `clients_per_worker`)."""
    limits = Limits(10, None, 900.0)
    limit_changes = {name: overrides.pop(name) for name in list(overrides) if name in _LIMITS}
    overrides.setdefault("default_spec", SPEC)
    overrides.setdefault("limits", attrs.evolve(limits, **limit_changes))
    return EngineSettings(**overrides)


def make_engine(
    cloud: Cloud | None = None,
    clock: Clock | None = None,
    registry: Registry | None = None,
    *,
    prices: PriceTable | None = None,
    queue: JobQueue | None = None,
    events: EventQueue | None = None,
    spot_prices: SpotPriceSource | None = None,
    **settings: Any,
) -> Engine:
    """An engine on `cloud` (default: a `FakeCloud` on `clock`), with `make_settings(**settings)`.

    Call it inside Trio (a `Clock` reads Trio's clock). Without `clock`, a `FakeCloud`'s own
    clock is used, else a new `Clock()` (now). Without `registry`, a fresh `MemoryRegistry`."""
    if clock is None:
        clock = cloud.clock if isinstance(cloud, FakeCloud) else Clock()
    if cloud is None:
        cloud = FakeCloud(clock)
    return Engine(
        cloud,
        make_settings(**settings),
        clock,
        prices if prices is not None else PriceTable.default(),
        registry,
        queue,
        events=events,
        spot_prices=spot_prices,
    )


@asynccontextmanager
async def running(*engines: Engine) -> AsyncIterator[None]:
    """Run `engines` for the block (each started, i.e. restored and reconciled, before the
    next), then cancel them: the broker dies, the registry and the cloud remain."""
    async with trio.open_nursery() as nursery:
        for engine in engines:
            await nursery.start(engine.run)
        yield
        nursery.cancel_scope.cancel()


async def get_ip(engine: Engine, request: WorkerRequest, client: str) -> str:
    """GET_WORKER through the engine; the IP handed out (raises `Refusal` as the engine does)."""
    return (await engine.get_worker(request, client)).ip


async def ask(engine: Engine, client: str, wait: float | None = None) -> str:
    """GET_WORKER through the engine; the reply line's text: the IP, or `ERROR: <reason>`."""
    try:
        return await get_ip(engine, WorkerRequest(wait=wait), client)
    except Refusal as exc:
        return f"ERROR: {exc}"
