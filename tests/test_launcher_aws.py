"""The launch room (broker/launcher.py) against real parts: the engine with `Ec2Cloud` on the
session's moto server, faults injected as AWS returns them over HTTP (botocore `before-send`
hooks), requests over TCP. Launch errors, throttling, an unreachable or hanging endpoint, and
capacity fallback each become a worker or one `ERROR:` line, in bounded time.
(tests/test_launcher.py has the MockClock versions.)"""

from __future__ import annotations

import json
import random
import threading
import uuid
from collections.abc import Sequence
from typing import Any
from urllib.parse import parse_qsl

import botocore.exceptions
import pytest
import trio
from botocore.awsrequest import AWSResponse

from broker.aws import make_client
from broker.cloud import LaunchSpec, Market
from broker.ec2 import LAUNCH_RETRY, POOL_TAG, Ec2Cloud
from broker.engine import Engine
from broker.prices import PriceTable
from broker.sandbox import SandboxResources
from tests.aws_support import client_for, closed_loopback_port, ec2_error, full_client, inject
from tests.engines import SPEC, make_engine
from tests.harness import LineClient, ask_once, running_broker

PRICES = PriceTable(
    {
        ("c7i.8xlarge", "spot"): 1.0,
        ("c7i.8xlarge", "on-demand"): 3.0,
        ("c6i.8xlarge", "spot"): 0.8,
        ("c6i.8xlarge", "on-demand"): 2.5,
    }
)
ICE = "InsufficientInstanceCapacity"

pytestmark = pytest.mark.usefixtures("instant_retries")


def no_capacity() -> AWSResponse:
    """EC2's answer when an offering has no capacity (HTTP 500, as AWS sends it)."""
    return ec2_error(
        500, ICE, "We currently do not have sufficient capacity in the Availability Zone."
    )


def throttled() -> AWSResponse:
    """EC2's answer to a request over the account's rate (HTTP 503)."""
    return ec2_error(503, "RequestLimitExceeded", "Request limit exceeded.")


@pytest.fixture(scope="module")
def two_subnets(resources: SandboxResources) -> tuple[str, str]:
    """Two new subnets of moto's default VPC, in two Availability Zones, assigning public
    IPs on launch."""
    client = full_client("ec2")
    vpc = client.describe_vpcs(Filters=[{"Name": "isDefault", "Values": ["true"]}])["Vpcs"][0]
    zones = [z["ZoneName"] for z in client.describe_availability_zones()["AvailabilityZones"]]
    # The default subnets take 172.31.0.0/20 to 172.31.80.0/20; pick /24s above them.
    blocks = random.sample(range(128, 255), 20)
    subnets: list[str] = []
    for zone in zones[:2]:
        while True:
            cidr = f"172.31.{blocks.pop()}.0/24"
            try:
                subnet = client.create_subnet(
                    VpcId=vpc["VpcId"], CidrBlock=cidr, AvailabilityZone=zone
                )
            except botocore.exceptions.ClientError as exc:
                if exc.response["Error"]["Code"] != "InvalidSubnet.Conflict":
                    raise
                continue  # another module took that block
            subnet_id = subnet["Subnet"]["SubnetId"]
            # Workers need a public IP; only default subnets assign one unasked.
            client.modify_subnet_attribute(SubnetId=subnet_id, MapPublicIpOnLaunch={"Value": True})
            subnets.append(subnet_id)
            break
    return subnets[0], subnets[1]


def aws_engine(
    resources: SandboxResources,
    spec: LaunchSpec = SPEC,
    *,
    attempts: int | None = None,
    subnets: tuple[str | None, ...] = (),
    launch_timeout: float = 20.0,
) -> Engine:
    """An engine on moto EC2 with its own pool and the prices above. RunInstances is retried
    by the adapter (instantly here); other calls by botocore, or, with `attempts`, by a client
    making that many attempts with a 1 s connect timeout."""
    settings = resources.ec2_settings(f"launcher-{uuid.uuid4().hex[:10]}")
    client = (
        None
        if attempts is None
        else make_client("ec2", region="us-east-1", max_attempts=attempts, connect_timeout=1)
    )
    cloud = Ec2Cloud(settings, trio.CapacityLimiter(4), client=client)
    return make_engine(
        cloud,
        prices=PRICES,
        default_spec=spec,
        launch_timeout=launch_timeout,
        describe_interval=0.05,
        subnets=subnets,
    )


def cloud_of(engine: Engine) -> Ec2Cloud:
    assert isinstance(engine.cloud, Ec2Cloud)
    return engine.cloud


def refuse_spot(cloud: Ec2Cloud) -> list[dict[str, str]]:
    """Answer every spot RunInstances with no capacity; let on-demand ones through. Returns
    the form parameters of every RunInstances request, as `inject` does."""
    attempts: list[dict[str, str]] = []

    def hook(request: Any, **_: Any) -> AWSResponse | None:
        body = request.body or b""
        params = dict(parse_qsl(body.decode() if isinstance(body, bytes) else str(body)))
        attempts.append(params)
        return no_capacity() if params.get("InstanceMarketOptions.MarketType") == "spot" else None

    client_for(cloud, "RunInstances").meta.events.register("before-send.ec2.RunInstances", hook)
    return attempts


def pool_instances(engine: Engine) -> list[dict[str, Any]]:
    """moto's descriptions of the engine's pool's instances, in any state."""
    client = make_client("ec2", region="us-east-1")
    pool = cloud_of(engine).settings.pool_name
    reply = client.describe_instances(Filters=[{"Name": f"tag:{POOL_TAG}", "Values": [pool]}])
    return [i for r in reply["Reservations"] for i in r["Instances"]]


def offerings_tried(attempts: Sequence[dict[str, str]]) -> list[tuple[str, str]]:
    """(type, market) of each RunInstances request sent."""
    return [
        (a["InstanceType"], a.get("InstanceMarketOptions.MarketType", "on-demand"))
        for a in attempts
    ]


async def get_worker_and_status(port: int) -> tuple[str, dict[str, Any]]:
    client = await LineClient.connect(port)
    try:
        reply = await client.ask("GET_WORKER")
        return reply, json.loads(await client.ask("STATUS"))
    finally:
        await client.aclose()


async def test_no_capacity_for_the_first_type_gives_a_worker_of_the_second(
    resources: SandboxResources,
) -> None:
    """No capacity for the first type: a worker of the second, both listed in STATUS."""
    spec = LaunchSpec("c7i.8xlarge", Market.SPOT, fallback_types=("c6i.8xlarge",))
    engine = aws_engine(resources, spec)
    attempts = inject(cloud_of(engine), "RunInstances", [no_capacity()])
    with trio.fail_after(20):
        async with running_broker(engine) as broker:
            ip, status = await get_worker_and_status(broker.port)
    assert offerings_tried(attempts) == [("c7i.8xlarge", "spot"), ("c6i.8xlarge", "spot")]
    [instance] = pool_instances(engine)
    assert (instance["InstanceType"], instance["PublicIpAddress"]) == ("c6i.8xlarge", ip)
    assert instance["InstanceLifecycle"] == "spot"
    [worker] = status["workers"]
    assert (worker["type"], worker["market"], worker["price_per_hour"]) == (
        "c6i.8xlarge",
        "spot",
        0.8,
    )
    capacity = status["capacity"]
    assert [(f["offering"], f["code"]) for f in capacity["failed_offerings"]] == [
        ("c7i.8xlarge spot", ICE)
    ]
    [fallback] = capacity["fallbacks"]
    assert (fallback["wanted"], fallback["got"], fallback["after"]) == (
        "c7i.8xlarge spot",
        "c6i.8xlarge spot",
        [f"c7i.8xlarge spot: {ICE}"],
    )


async def test_no_spot_capacity_anywhere_falls_back_to_on_demand(
    resources: SandboxResources,
) -> None:
    """No spot capacity anywhere, on_demand_fallback: an on-demand worker at its price."""
    spec = LaunchSpec(
        "c7i.8xlarge", Market.SPOT, fallback_types=("c6i.8xlarge",), on_demand_fallback=True
    )
    engine = aws_engine(resources, spec)
    attempts = refuse_spot(cloud_of(engine))
    with trio.fail_after(20):
        async with running_broker(engine) as broker:
            ip, status = await get_worker_and_status(broker.port)
    assert offerings_tried(attempts) == [
        ("c7i.8xlarge", "spot"),
        ("c6i.8xlarge", "spot"),
        ("c7i.8xlarge", "on-demand"),
    ]
    [instance] = pool_instances(engine)
    assert (instance["InstanceType"], instance["PublicIpAddress"]) == ("c7i.8xlarge", ip)
    assert "InstanceLifecycle" not in instance
    [worker] = status["workers"]
    assert (worker["market"], worker["price_per_hour"]) == ("on-demand", 3.0)
    assert status["capacity"]["fallbacks"][-1]["got"] == "c7i.8xlarge on-demand"


async def test_no_spot_capacity_without_on_demand_fallback_is_one_clear_error(
    resources: SandboxResources,
) -> None:
    """No spot capacity anywhere, no on-demand fallback: one ERROR naming every offering."""
    spec = LaunchSpec("c7i.8xlarge", Market.SPOT, fallback_types=("c6i.8xlarge",))
    engine = aws_engine(resources, spec)
    attempts = refuse_spot(cloud_of(engine))
    with trio.fail_after(20):
        async with running_broker(engine) as broker:
            reply = await ask_once(broker.port, "GET_WORKER")
            assert engine.pool.in_flight == {}
    assert reply == (
        f"ERROR: launch failed: {ICE}: no offering had capacity: "
        f"c7i.8xlarge spot: {ICE}; c6i.8xlarge spot: {ICE}"
    )
    assert offerings_tried(attempts) == [("c7i.8xlarge", "spot"), ("c6i.8xlarge", "spot")]
    assert pool_instances(engine) == []


async def test_no_capacity_in_one_subnet_falls_to_the_next(
    resources: SandboxResources, two_subnets: tuple[str, str]
) -> None:
    """No capacity in subnet A: the instance is launched in subnet B."""
    first, second = two_subnets
    engine = aws_engine(resources, subnets=two_subnets)
    attempts = inject(cloud_of(engine), "RunInstances", [no_capacity()])
    with trio.fail_after(20):
        async with running_broker(engine) as broker:
            ip, status = await get_worker_and_status(broker.port)
    assert [a["SubnetId"] for a in attempts] == [first, second]
    [instance] = pool_instances(engine)
    assert (instance["SubnetId"], instance["PublicIpAddress"]) == (second, ip)
    assert [f["offering"] for f in status["capacity"]["failed_offerings"]] == [
        f"c7i.8xlarge spot in {first}"
    ]
    assert status["capacity"]["fallbacks"][-1]["got"] == f"c7i.8xlarge spot in {second}"


async def test_throttled_twice_then_the_request_succeeds_in_bounded_time(
    resources: SandboxResources,
) -> None:
    """Throttled twice: retried with the same ClientToken, the worker comes within seconds."""
    engine = aws_engine(resources)
    attempts = inject(cloud_of(engine), "RunInstances", [throttled(), throttled()])
    async with running_broker(engine) as broker:
        started = trio.current_time()
        with trio.fail_after(10):
            reply = await ask_once(broker.port, "GET_WORKER")
        elapsed = trio.current_time() - started
    assert reply.startswith("127.77.")
    assert len(attempts) == 3
    assert len({a["ClientToken"] for a in attempts}) == 1
    assert len(pool_instances(engine)) == 1
    assert elapsed < 5


async def test_throttled_forever_is_an_error_line_not_a_hang(
    resources: SandboxResources,
) -> None:
    """Throttled on every request: one ERROR line after the retries, never a hang."""
    engine = aws_engine(resources, launch_timeout=30)
    attempts = inject(cloud_of(engine), "RunInstances", [throttled() for _ in range(50)])
    async with running_broker(engine) as broker:
        started = trio.current_time()
        with trio.fail_after(10):
            reply = await ask_once(broker.port, "GET_WORKER")
        elapsed = trio.current_time() - started
        assert engine.pool.in_flight == {}
    assert reply == "ERROR: launch failed: RequestLimitExceeded: Request limit exceeded."
    assert len(attempts) == LAUNCH_RETRY.attempts
    assert elapsed < 5
    assert pool_instances(engine) == []


async def test_a_fallback_launch_leaves_no_launch_intent_behind(
    resources: SandboxResources,
) -> None:
    """A launch that fell back to another offering leaves no launch intent in the registry."""
    spec = LaunchSpec("c7i.8xlarge", Market.SPOT, fallback_types=("c6i.8xlarge",))
    engine = aws_engine(resources, spec)
    inject(cloud_of(engine), "RunInstances", [no_capacity()])
    with trio.fail_after(20):
        async with running_broker(engine) as broker:
            ip = await ask_once(broker.port, "GET_WORKER")
            intents = await engine.registry.list_intents(engine.clock.now())
    assert ip.startswith("127.77.")
    assert [i.token for i in intents] == []


# --- launch errors, throttling, unreachable and hanging endpoints ----------------------------


@pytest.mark.parametrize(
    ("status", "code", "message"),
    [
        (500, "InsufficientInstanceCapacity", "We currently do not have sufficient capacity."),
        (400, "SpotMaxPriceTooLow", "Your Spot request price is lower than the minimum."),
        (400, "MaxSpotInstanceCountExceeded", "Max spot instance count exceeded"),
        (403, "UnauthorizedOperation", "You are not authorized to perform this operation."),
    ],
)
async def test_ec2_launch_errors_become_one_error_line(
    resources: SandboxResources, status: int, code: str, message: str
) -> None:
    """A launch EC2 refuses answers `ERROR: launch failed: <code>: <message>`; the broker
    stays up and nothing is left counted in flight."""
    engine = aws_engine(resources, attempts=1)
    attempts = inject(cloud_of(engine), "RunInstances", [ec2_error(status, code, message)] * 2)
    async with running_broker(engine) as broker:
        with trio.fail_after(20):
            reply = await ask_once(broker.port, "GET_WORKER")
            assert reply == f"ERROR: launch failed: {code}: {message}"
            assert await ask_once(broker.port, "HELP") != ""
        assert engine.pool.in_flight == {}
        assert 1 <= len(attempts) <= 2


async def test_throttling_is_retried_and_the_request_then_succeeds(
    resources: SandboxResources,
) -> None:
    """RequestLimitExceeded once: the adapter retries, the client just gets its worker."""
    engine = aws_engine(resources, attempts=3)
    attempts = inject(
        cloud_of(engine), "RunInstances", [ec2_error(503, "RequestLimitExceeded", "Slow down")]
    )
    async with running_broker(engine) as broker:
        with trio.fail_after(30):
            reply = await ask_once(broker.port, "GET_WORKER")
    assert reply.startswith("127.77.")
    assert len(attempts) == 2


async def test_unreachable_endpoint_is_an_error_not_a_hang(
    resources: SandboxResources, monkeypatch: pytest.MonkeyPatch
) -> None:
    """AWS endpoint down: `ERROR: cloud unreachable: ...` well within launch_timeout."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{closed_loopback_port()}")
    engine = aws_engine(resources, attempts=1, launch_timeout=15)
    async with running_broker(engine) as broker:
        with trio.fail_after(15):
            reply = await ask_once(broker.port, "GET_WORKER")
    assert reply.startswith("ERROR: cloud unreachable: ")
    assert engine.pool.in_flight == {}


async def test_a_hanging_aws_call_is_cut_at_launch_timeout(resources: SandboxResources) -> None:
    """RunInstances that never answers: the waiter gets `ERROR: launch timed out` at
    launch_timeout, and other clients are served meanwhile."""
    engine = aws_engine(resources, attempts=1, launch_timeout=1.5)
    release = threading.Event()

    def hang(**_: Any) -> None:
        release.wait(10)

    client_for(cloud_of(engine), "RunInstances").meta.events.register(
        "before-send.ec2.RunInstances", hang
    )
    try:
        async with running_broker(engine) as broker:
            waiting = await LineClient.connect(broker.port)
            await waiting.send(b"GET_WORKER\n")
            with trio.fail_after(1):
                assert (await ask_once(broker.port, "HELP")).startswith("OK commands:")
            with trio.fail_after(5):
                reply = (await waiting.readline()).decode()
            assert reply == "ERROR: launch timed out after 1.5s"
            assert engine.pool.in_flight == {}
    finally:
        release.set()
