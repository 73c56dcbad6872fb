"""The budget room (broker/spending.py) against real parts: `Ec2Cloud` and `DynamoRegistry` on
the session's moto server, requests over TCP. Two replicas share one table and pool, a restart
keeps the spend, and STATUS shows the budget. (tests/test_spending.py has the MockClock
versions.)"""

from __future__ import annotations

import datetime as dt
import json
import re
import uuid
from zoneinfo import ZoneInfo

import pytest
import trio

from broker.aws import make_client
from broker.clock import Clock
from broker.dynamo import DynamoRegistry
from broker.dynamo_table import ensure_table
from broker.ec2 import POOL_TAG, Ec2Cloud
from broker.engine import Engine
from broker.ledger import MICROS, Budget, CoverPolicy, Period, charge, period_key
from broker.prices import PriceTable
from broker.sandbox import MotoHandle, SandboxResources, prepare_resources
from tests.engines import make_engine
from tests.harness import LineClient, ask_once, running_broker

TABLE = "compute-broker-budget-aws"
PRICE = 1.0  # $/hour of the test type: set here, never read from EC2
PRICES = PriceTable({("c7i.8xlarge", "spot"): PRICE})
IDLE, REAP, LAUNCH = 600.0, 60.0, 30.0  # the reaper never runs during a test
POLICY = CoverPolicy(IDLE, REAP, LAUNCH)
SPENT = re.compile(r"\(spent \$(\d+\.\d\d), ")  # the spend a budget refusal quotes
EVERY_STATE = ("pending", "running", "shutting-down", "terminated", "stopping", "stopped")

pytestmark = pytest.mark.usefixtures("instant_retries")


@pytest.fixture(scope="module")
def resources(moto_server: MotoHandle) -> SandboxResources:
    ensure_table(make_client("dynamodb", region="us-east-1"), TABLE)
    return prepare_resources()


@pytest.fixture
def pool_name() -> str:
    return f"budget-{uuid.uuid4().hex[:10]}"


def noon_zone() -> str:
    """A fixed-offset zone in which it is about noon now: no launch's cover (about 12 minutes)
    crosses a local midnight, so each launch is charged to one day, today."""
    offset = 12 - dt.datetime.now(dt.UTC).hour  # hours east of UTC, -11..12
    if offset == 0:
        return "Etc/GMT"
    return f"Etc/GMT{'-' if offset > 0 else '+'}{abs(offset)}"  # POSIX signs are inverted


def today(zone: str) -> str:
    """The ledger key of the current day in `zone`."""
    return period_key(Period.DAY, Clock().now(), ZoneInfo(zone))


def per_launch(zone: str) -> int:
    """Micro-dollars one launch commits to today's total (launch + idle timeout + slack)."""
    now = Clock().now()
    return charge(PRICE, now, POLICY.initial(now), ZoneInfo(zone))[today(zone)]


def budget_engine(
    resources: SandboxResources,
    pool_name: str,
    zone: str,
    *,
    daily: float | None = None,
    monthly: float | None = None,
    hourly: float | None = None,
    max_workers: int = 200,
) -> Engine:
    """An engine (a replica) on moto EC2 and the shared DynamoDB table, exclusive mode (a
    worker per client), spot prices from PRICES only."""
    cloud = Ec2Cloud(resources.ec2_settings(pool_name), trio.CapacityLimiter(4))
    registry = DynamoRegistry(TABLE, pool_name, trio.CapacityLimiter(4), region="us-east-1")
    return make_engine(
        cloud,
        Clock(),
        registry,
        prices=PRICES,
        max_workers=max_workers,
        max_hourly_cost=hourly,
        idle_timeout=IDLE,
        clients_per_worker=1,
        launch_timeout=LAUNCH,
        describe_interval=0.1,
        reap_interval=REAP,
        budget=Budget(daily, monthly, zone),
    )


def pool_instances(pool_name: str) -> list[dict[str, str]]:
    """Every instance moto has for this pool, whatever its state: id, type, state."""
    client = make_client("ec2", region="us-east-1")
    pages = client.get_paginator("describe_instances").paginate(
        Filters=[
            {"Name": f"tag:{POOL_TAG}", "Values": [pool_name]},
            {"Name": "instance-state-name", "Values": list(EVERY_STATE)},
        ]
    )
    return [
        {"id": i["InstanceId"], "type": i["InstanceType"], "state": i["State"]["Name"]}
        for page in pages
        for reservation in page["Reservations"]
        for i in reservation["Instances"]
    ]


async def storm(first: Engine, second: Engine, clients: int, wait: float) -> list[str]:
    """`clients` concurrent one-shot GET_WORKERs over TCP, alternating between two replicas;
    the replies, once both brokers have stopped."""
    replies: list[str] = []
    async with running_broker(first) as one, running_broker(second) as two:

        async def client(n: int) -> None:
            port = (one, two)[n % 2].port
            replies.append(await ask_once(port, f"GET_WORKER wait={wait:g} client=c{n}"))

        async with trio.open_nursery() as nursery:
            for n in range(clients):
                nursery.start_soon(client, n)
    return replies


async def test_sixty_requests_across_two_replicas_launch_exactly_what_the_cap_fits(
    resources: SandboxResources, pool_name: str
) -> None:
    """Two replicas, 60 clients, a cap fitting 3 launches: 3 instances, 57 budget errors."""
    zone = noon_zone()
    per = per_launch(zone)
    cap = 3.5 * per / MICROS
    assert int(cap * MICROS) // per == 3
    # 60 launches contend for the registry (moto serialises DynamoDB): the three that are
    # charged take 2-3 s to launch; refused requests wait (a release could free money).
    first = budget_engine(resources, pool_name, zone, daily=cap)
    second = budget_engine(resources, pool_name, zone, daily=cap)
    with trio.fail_after(60):
        replies = await storm(first, second, 60, wait=10)
        spend = await first.registry.spend([today(zone)])
    ips = [r for r in replies if not r.startswith("ERROR")]
    errors = [r for r in replies if r.startswith("ERROR")]
    assert len(ips) == 3, replies
    assert len(set(ips)) == 3
    assert len(errors) == 57
    assert all("budget: max_daily_cost" in e for e in errors), errors
    assert len(pool_instances(pool_name)) == 3
    assert spend[today(zone)] <= round(cap * MICROS)
    assert spend[today(zone)] == pytest.approx(3 * per, abs=3)  # refused charges refunded


async def test_a_restart_keeps_the_spend(resources: SandboxResources, pool_name: str) -> None:
    """An engine restarted on the same table refuses past the cap and shows the spend."""
    zone = noon_zone()
    per = per_launch(zone)
    cap = 1.5 * per / MICROS
    with trio.fail_after(30):
        async with running_broker(budget_engine(resources, pool_name, zone, daily=cap)) as broker:
            ip = await ask_once(broker.port, "GET_WORKER client=a")
        assert ip.startswith("127.77.")
        async with running_broker(budget_engine(resources, pool_name, zone, daily=cap)) as broker:
            client = await LineClient.connect(broker.port)
            refused = await client.ask("GET_WORKER wait=1 client=b")
            status = json.loads(await client.ask("STATUS"))
            await client.aclose()
    assert "budget: max_daily_cost" in refused
    assert [w["ip"] for w in status["workers"]] == [ip]
    day = status["budget"]["day"]
    assert day["committed"] == pytest.approx(per / MICROS, abs=1e-4)
    assert day["limit"] == pytest.approx(cap)
    assert len(pool_instances(pool_name)) == 1


async def test_status_shows_the_budget_over_tcp(
    resources: SandboxResources, pool_name: str
) -> None:
    """STATUS over TCP shows the day's and month's spend, time zone, on_cap and run rate."""
    zone = noon_zone()
    per = per_launch(zone)
    engine = budget_engine(resources, pool_name, zone, daily=5.0, monthly=50.0)
    with trio.fail_after(30):
        async with running_broker(engine) as broker:
            client = await LineClient.connect(broker.port)
            ip = await client.ask("GET_WORKER client=a")
            status = json.loads(await client.ask("STATUS"))
            await client.aclose()
    assert ip.startswith("127.77.")
    budget = status["budget"]
    local = dt.datetime.now(ZoneInfo(zone))
    committed = per / MICROS
    day, month = budget["day"], budget["month"]
    assert set(day) == {"period", "spent", "committed", "limit", "remaining"}
    assert set(month) == set(day)
    assert day["period"] == local.date().isoformat()
    assert month["period"] == f"{local.year:04d}-{local.month:02d}"
    assert (day["limit"], month["limit"]) == (5.0, 50.0)
    for period, limit in ((day, 5.0), (month, 50.0)):
        assert period["committed"] == pytest.approx(committed, abs=1e-4)
        assert period["remaining"] == pytest.approx(limit - committed, abs=1e-4)
        assert 0 <= period["spent"] <= period["committed"]
    assert budget["timezone"] == zone
    assert budget["on_cap"] == "refuse"
    assert budget["run_rate_per_hour"] == PRICE


async def test_a_replica_does_not_count_another_replicas_unused_cover_as_spent(
    resources: SandboxResources, pool_name: str
) -> None:
    """Another replica's fresh worker counts as committed, not spent, in refusals and STATUS."""
    zone = noon_zone()
    per = per_launch(zone)
    cap = 1.5 * per / MICROS
    first = budget_engine(resources, pool_name, zone, daily=cap)
    second = budget_engine(resources, pool_name, zone, daily=cap)
    with trio.fail_after(30):
        async with running_broker(first) as one, running_broker(second) as two:
            ip = await ask_once(one.port, "GET_WORKER client=a")
            client = await LineClient.connect(two.port)
            refused = await client.ask("GET_WORKER wait=1 client=b")
            status = json.loads(await client.ask("STATUS"))
            await client.aclose()
    assert ip.startswith("127.77.")
    assert "budget: max_daily_cost" in refused
    day = status["budget"]["day"]
    assert day["committed"] == pytest.approx(per / MICROS, abs=1e-4)
    assert "(spent $0.00, " in refused
    assert day["spent"] == pytest.approx(0.0, abs=1e-3)


async def test_a_budget_storm_across_replicas_names_the_daily_cap_with_true_figures(
    resources: SandboxResources, pool_name: str
) -> None:
    """Two replicas, max_workers 50, a daily cap that fits 4 covers, 60 clients: 4 instances;
    every refusal names max_daily_cost (none max_workers: a refused launch never held a slot
    on the pool-wide counter), and no refusal's `spent` exceeds what the ledger says was
    spent once the storm is over."""
    zone = noon_zone()
    cap = 4.5 * per_launch(zone) / MICROS
    first = budget_engine(resources, pool_name, zone, daily=cap, max_workers=50)
    second = budget_engine(resources, pool_name, zone, daily=cap, max_workers=50)
    with trio.fail_after(90):
        replies = await storm(first, second, 60, wait=10)
        status = await first.report()
        counter = await first.registry.reserved_instances()
    errors = [r for r in replies if r.startswith("ERROR")]
    assert len(pool_instances(pool_name)) == 4, replies
    assert len(errors) == 56
    assert all("budget: max_daily_cost" in e for e in errors), errors
    assert not any("max_workers" in e for e in errors)
    assert counter == 4  # the pool-wide counter holds exactly the launched workers
    ledger_spent = status["budget"]["day"]["spent"]
    quoted = [float(m.group(1)) for e in errors if (m := SPENT.search(e))]
    assert len(quoted) == len(errors)
    assert max(quoted) <= ledger_spent + 0.01  # whole cents in refusals


async def test_two_replicas_never_pass_max_hourly_cost_together(
    resources: SandboxResources, pool_name: str
) -> None:
    """max_hourly_cost $3/h with $1/h workers, two replicas, 10 clients: 3 instances in all
    (each replica alone would have launched 3), every refusal names max_hourly_cost."""
    first = budget_engine(resources, pool_name, "UTC", hourly=3.0, max_workers=50)
    second = budget_engine(resources, pool_name, "UTC", hourly=3.0, max_workers=50)
    with trio.fail_after(60):
        replies = await storm(first, second, 10, wait=10)
        rate = await first.registry.spend(["rate"])
    errors = [r for r in replies if r.startswith("ERROR")]
    assert len(pool_instances(pool_name)) == 3, replies
    assert len(errors) == 7, replies
    assert all("max_hourly_cost $3/h" in e for e in errors), errors
    assert rate == {"rate": 3 * MICROS}
