"""Refusals across two replicas on one DynamoDB table (moto, serialised as the sandbox does):
the cap that bound is the one named, with figures that are true, and max_hourly_cost holds
for the pool, not per replica."""

from __future__ import annotations

import datetime as dt
import re
import uuid

import pytest
import trio

from broker.aws import make_client
from broker.clock import Clock
from broker.cloud import LaunchSpec, Market
from broker.dynamo import DynamoRegistry, ensure_table
from broker.ec2 import POOL_TAG, Ec2Cloud
from broker.engine import Engine, EngineSettings
from broker.ledger import MICROS, Budget, CoverPolicy, Period, charge, period_key
from broker.model import Limits
from broker.prices import PriceTable
from broker.sandbox import MotoHandle, SandboxResources, prepare_resources
from tests.harness import ask_once, running_broker

TABLE = "compute-broker-refusals-aws"
PRICE = 1.0
SPEC = LaunchSpec("c7i.8xlarge", Market.SPOT)
PRICES = PriceTable({("c7i.8xlarge", "spot"): PRICE})
IDLE, REAP, LAUNCH = 600.0, 60.0, 30.0  # the reaper never runs during a test
POLICY = CoverPolicy(IDLE, REAP, LAUNCH)
SPENT = re.compile(r"\(spent \$(\d+\.\d\d), ")

pytestmark = pytest.mark.usefixtures("instant_retries")


@pytest.fixture(scope="module")
def resources(moto_server: MotoHandle) -> SandboxResources:
    ensure_table(make_client("dynamodb", region="us-east-1"), TABLE)
    return prepare_resources()


@pytest.fixture
def pool_name() -> str:
    return f"refusals-{uuid.uuid4().hex[:10]}"


def noon_zone() -> str:
    """A fixed-offset zone in which it is about noon now: each launch is charged to today."""
    offset = 12 - dt.datetime.now(dt.UTC).hour
    if offset == 0:
        return "Etc/GMT"
    return f"Etc/GMT{'-' if offset > 0 else '+'}{abs(offset)}"  # POSIX signs are inverted


def replica(
    resources: SandboxResources,
    pool_name: str,
    *,
    max_workers: int = 50,
    hourly: float | None = None,
    daily: float | None = None,
    zone: str = "UTC",
) -> Engine:
    """One replica: moto EC2 and the shared table, exclusive mode (a worker per client)."""
    cloud = Ec2Cloud(resources.ec2_settings(pool_name), trio.CapacityLimiter(4))
    registry = DynamoRegistry(TABLE, pool_name, trio.CapacityLimiter(4), region="us-east-1")
    settings = EngineSettings(
        default_spec=SPEC,
        limits=Limits(max_workers, hourly, IDLE, 1),
        launch_timeout=LAUNCH,
        describe_interval=0.1,
        reap_interval=REAP,
        budget=Budget(daily, None, zone),
    )
    return Engine(cloud, settings, Clock(), PRICES, registry, spot_prices=None)


def instances(pool_name: str) -> list[str]:
    client = make_client("ec2", region="us-east-1")
    pages = client.get_paginator("describe_instances").paginate(
        Filters=[
            {"Name": f"tag:{POOL_TAG}", "Values": [pool_name]},
            {"Name": "instance-state-name", "Values": ["pending", "running"]},
        ]
    )
    return [i["InstanceId"] for p in pages for r in p["Reservations"] for i in r["Instances"]]


async def storm(first: Engine, second: Engine, clients: int, wait: float) -> list[str]:
    """`clients` concurrent one-shot GET_WORKERs, alternating between the two replicas."""
    replies: list[str] = []
    async with running_broker(first) as one, running_broker(second) as two:

        async def client(n: int) -> None:
            port = (one, two)[n % 2].port
            replies.append(await ask_once(port, f"GET_WORKER wait={wait:g} client=c{n}"))

        async with trio.open_nursery() as nursery:
            for n in range(clients):
                nursery.start_soon(client, n)
    return replies


async def test_two_replicas_never_pass_max_hourly_cost_together(
    resources: SandboxResources, pool_name: str
) -> None:
    """max_hourly_cost $3/h with $1/h workers, two replicas, 10 clients: 3 instances in all
    (each replica alone would have launched 3), every refusal names max_hourly_cost."""
    first = replica(resources, pool_name, hourly=3.0)
    second = replica(resources, pool_name, hourly=3.0)
    with trio.fail_after(60):
        replies = await storm(first, second, 10, wait=10)
        rate = await first.registry.spend(["rate"])
    errors = [r for r in replies if r.startswith("ERROR")]
    assert len(instances(pool_name)) == 3, replies
    assert len(errors) == 7, replies
    assert all("max_hourly_cost $3/h" in e for e in errors), errors
    assert rate == {"rate": 3 * MICROS}


async def test_a_budget_storm_across_replicas_names_the_daily_cap_with_true_figures(
    resources: SandboxResources, pool_name: str
) -> None:
    """Two replicas, max_workers 50, a daily cap that fits 4 covers, 60 clients: 4 instances;
    every refusal names max_daily_cost (none max_workers: a refused launch never held a slot
    on the pool-wide counter), and no refusal's `spent` exceeds what the ledger says was
    spent once the storm is over."""
    zone = noon_zone()
    now = Clock().now()
    today = period_key(Period.DAY, now, dt.UTC if zone == "UTC" else _zone(zone))
    per = charge(PRICE, now, POLICY.initial(now), _zone(zone))[today]
    cap = 4.5 * per / MICROS
    first = replica(resources, pool_name, daily=cap, zone=zone)
    second = replica(resources, pool_name, daily=cap, zone=zone)
    with trio.fail_after(90):
        replies = await storm(first, second, 60, wait=10)
        status = await first.report()
        counter = await first.registry.reserved_instances()
    errors = [r for r in replies if r.startswith("ERROR")]
    assert len(instances(pool_name)) == 4, replies
    assert len(errors) == 56
    assert all("budget: max_daily_cost" in e for e in errors), errors
    assert not any("max_workers" in e for e in errors)
    assert counter == 4  # the pool-wide counter holds exactly the launched workers
    ledger_spent = status["budget"]["day"]["spent"]
    quoted = [float(m.group(1)) for e in errors if (m := SPENT.search(e))]
    assert len(quoted) == len(errors)
    assert max(quoted) <= ledger_spent + 0.01  # whole cents in refusals


def _zone(name: str) -> dt.tzinfo:
    from zoneinfo import ZoneInfo

    return ZoneInfo(name)
