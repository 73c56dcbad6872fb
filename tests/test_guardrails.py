"""Spending guardrails (docs/security.md): only the configured types and markets, never a type
without a price, and a pool without any dollar cap says so."""

from __future__ import annotations

import pytest
import trio
from trio.testing import MockClock

from broker.clock import Clock
from broker.cloud import LaunchSpec, Market
from broker.config_validate import Config
from broker.engine import Engine, EngineSettings, Refusal
from broker.memory_registry import MemoryRegistry
from broker.model import Limits, WorkerRequest
from broker.prices import PriceTable
from broker.wiring import build_engine
from tests.fakes import FakeCloud

SPEC = LaunchSpec("c7i.8xlarge", Market.SPOT)
PRICES = PriceTable({("c7i.8xlarge", "spot"): 0.5, ("c7i.8xlarge", "on-demand"): 1.5})


def engine_with(cloud: FakeCloud, clock: Clock, **settings: object) -> Engine:
    values: dict[str, object] = {"limits": Limits(10, None, 900.0), **settings}
    engine_settings = EngineSettings(default_spec=SPEC, describe_interval=1.0, **values)  # type: ignore[arg-type]
    return Engine(cloud, engine_settings, clock, PRICES, MemoryRegistry("test"))


async def refusal(engine: Engine, request: WorkerRequest) -> str:
    with pytest.raises(Refusal) as raised:
        await engine.get_worker(request, "a")
    return str(raised.value)


async def test_only_allowed_types_and_markets_are_launched(autojump_clock: MockClock) -> None:
    """type= outside allowed_instance_types, and market=on-demand without allow_on_demand,
    are refused before anything is launched."""
    clock = Clock(epoch=1_795_000_000.0)
    cloud = FakeCloud(clock, boot_time=1.0)
    engine = engine_with(
        cloud, clock, allowed_types=frozenset({"c7i.8xlarge"}), allow_on_demand=False
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(engine.run)
        big = await refusal(engine, WorkerRequest(instance_type="p5.48xlarge"))
        on_demand = await refusal(engine, WorkerRequest(market=Market.ON_DEMAND))
        nursery.cancel_scope.cancel()
    assert big == "not allowed: type p5.48xlarge (allowed_instance_types: c7i.8xlarge)"
    assert on_demand == "not allowed: market=on-demand (allow_on_demand is off)"
    assert cloud.launch_calls == []


async def test_a_type_without_a_price_is_never_launched(autojump_clock: MockClock) -> None:
    """No cap set, a type the price table does not know: refused, not launched uncharged."""
    clock = Clock(epoch=1_795_000_000.0)
    cloud = FakeCloud(clock, boot_time=1.0)
    engine = engine_with(cloud, clock)
    async with trio.open_nursery() as nursery:
        await nursery.start(engine.run)
        answer = await refusal(engine, WorkerRequest(instance_type="m7i.large"))
        nursery.cancel_scope.cancel()
    assert answer == (
        "budget: no price known for m7i.large spot; add it under prices in the config"
    )
    assert cloud.launch_calls == []


async def test_the_config_allows_the_default_types_and_markets_only() -> None:
    """allowed_instance_types defaults to instance_type plus instance_types; on-demand only
    with market on-demand or on_demand_fallback (or allow_on_demand: true)."""
    config = Config.from_dict(
        {"instance_type": "c7i.8xlarge", "instance_types": ["c6i.8xlarge"], "registry": "memory"}
    )
    settings = build_engine(config, Clock()).settings
    assert settings.allowed_types == frozenset({"c7i.8xlarge", "c6i.8xlarge"})
    assert not settings.allow_on_demand
    fallback = Config.from_dict({"on_demand_fallback": True, "registry": "memory"})
    assert build_engine(fallback, Clock()).settings.allow_on_demand


async def test_status_says_when_no_dollar_cap_bounds_the_pool(autojump_clock: MockClock) -> None:
    """budget.uncapped is true with no dollar cap at all, false with any."""
    clock = Clock(epoch=1_795_000_000.0)
    uncapped = engine_with(FakeCloud(clock), clock)
    capped = engine_with(FakeCloud(clock), clock, limits=Limits(10, 5.0, 900.0))
    assert uncapped.status()["budget"]["uncapped"] is True
    assert capped.status()["budget"]["uncapped"] is False
