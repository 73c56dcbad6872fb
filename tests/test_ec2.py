"""`Ec2Cloud` and `broker.aws` over the embedded moto server: the production boto3 path.

Faults are injected with botocore event hooks on the adapter's clients: `before-send` returning
an `AWSResponse` is parsed like a real AWS error (and retried by botocore, except RunInstances,
which the adapter retries itself: see tests/test_ec2_retries.py).
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import attrs
import botocore.exceptions
import pytest
import structlog
import trio

from broker import sandbox
from broker.aws import call, make_client
from broker.cloud import CloudError, LaunchSpec, Market
from broker.config_validate import Config, ConfigError
from broker.ec2 import Ec2Cloud, Ec2Settings
from broker.prices import PriceTable
from broker.ratelimit import TokenBucket
from broker.sandbox import SandboxResources
from tests.aws_support import client_for, closed_loopback_port, ec2_error, ec2_reply, inject
from tests.harness import wait_for

SPOT = LaunchSpec("c7i.large", Market.SPOT)
ON_DEMAND = LaunchSpec("t3.micro", Market.ON_DEMAND)
UNKNOWN_ID = "i-0123456789abcdef0"
DEADLINE = 10


@pytest.fixture
def settings(resources: SandboxResources) -> Ec2Settings:
    """Settings for a pool of this test's own, so tests sharing moto do not see each other."""
    return resources.ec2_settings(f"test-{uuid.uuid4().hex[:8]}")


@pytest.fixture
def limiter() -> trio.CapacityLimiter:
    return trio.CapacityLimiter(4)


@pytest.fixture
def cloud(settings: Ec2Settings, limiter: trio.CapacityLimiter) -> Ec2Cloud:
    return Ec2Cloud(settings, limiter)


def fast_cloud(settings: Ec2Settings, limiter: trio.CapacityLimiter, retries: int) -> Ec2Cloud:
    """A cloud whose client retries a failed call at most `retries` times.

    botocore's `max_attempts` counts retries: the first attempt is not included.
    """
    client = make_client("ec2", region=settings.region, max_attempts=retries)
    return Ec2Cloud(settings, limiter, client=client)


def record_params(cloud: Ec2Cloud, operation: str) -> list[dict[str, Any]]:
    """The parameters of every `operation` call the cloud's client makes, as passed."""
    calls: list[dict[str, Any]] = []

    def hook(params: dict[str, Any], **_: Any) -> None:
        calls.append(dict(params))

    client_for(cloud, operation).meta.events.register(
        f"provide-client-params.ec2.{operation}", hook
    )
    return calls


def worker_tags(pool: str, token: str) -> dict[str, str]:
    return {
        "Name": "compute-broker-worker",
        "compute-broker:pool": pool,
        "compute-broker:managed": "true",
        "compute-broker:launch-token": token,
    }


async def test_launch_sets_tags_spot_options_and_client_token(
    cloud: Ec2Cloud, settings: Ec2Settings, limiter: trio.CapacityLimiter
) -> None:
    """A spot launch is one tagged RunInstances with MinCount 1, MaxCount n and the token."""
    sent = record_params(cloud, "RunInstances")
    with trio.fail_after(DEADLINE):
        launched = await cloud.launch(SPOT, 2, "token-launch-1")
        described = await call(
            limiter,
            cloud.client.describe_instances,
            InstanceIds=[i.instance_id for i in launched],
        )

    assert len(sent) == 1
    params = sent[0]
    assert (params["MinCount"], params["MaxCount"]) == (1, 2)
    assert params["ClientToken"] == "token-launch-1"
    assert params["ImageId"] == settings.ami_id
    assert params["InstanceType"] == "c7i.large"
    assert params["SecurityGroupIds"] == list(settings.security_group_ids)
    assert (params["KeyName"], params["SubnetId"]) == (settings.key_name, settings.subnet_id)
    assert params["InstanceMarketOptions"] == {
        "MarketType": "spot",
        "SpotOptions": {
            "SpotInstanceType": "one-time",
            "InstanceInterruptionBehavior": "terminate",
        },
    }
    assert len(launched) == 2
    raw = {i["InstanceId"]: i for r in described["Reservations"] for i in r["Instances"]}
    for instance in launched:
        assert instance.market is Market.SPOT
        assert instance.instance_type == "c7i.large"
        assert instance.tags == worker_tags(settings.pool_name, "token-launch-1")
        assert instance.launched_at == raw[instance.instance_id]["LaunchTime"].timestamp()
        assert raw[instance.instance_id]["InstanceLifecycle"] == "spot"


async def test_launch_tags_instances_with_the_config_tags_and_the_client(
    settings: Ec2Settings, limiter: trio.CapacityLimiter
) -> None:
    """The config's instance_tags and who caused the launch land on the instance in EC2 (a
    character EC2 refuses in a tag, such as an IPv6 zone's %, becomes _)."""
    tagged = attrs.evolve(settings, tags=(("project", "lab-a"), ("cost-center", "4711")))
    cloud = Ec2Cloud(tagged, limiter)
    with trio.fail_after(DEADLINE):
        [launched] = await cloud.launch(SPOT, 1, "token-tags", requested_by="token:alice/job-1")
        [relaunched] = await cloud.launch(SPOT, 1, "token-tags-2", requested_by="fe80::1%eth0")
        described = await call(
            limiter,
            cloud.client.describe_instances,
            InstanceIds=[launched.instance_id, relaunched.instance_id],
        )
    tags = {
        i["InstanceId"]: {t["Key"]: t["Value"] for t in i["Tags"]}
        for r in described["Reservations"]
        for i in r["Instances"]
    }
    assert tags[launched.instance_id] == {
        **worker_tags(settings.pool_name, "token-tags"),
        "project": "lab-a",
        "cost-center": "4711",
        "compute-broker:client": "token:alice/job-1",
    }
    assert tags[relaunched.instance_id]["compute-broker:client"] == "fe80::1_eth0"


def test_the_broker_s_own_tags_are_the_ones_the_config_refuses() -> None:
    """No tag the EC2 adapter sets itself can come from instance_tags."""
    own = [*worker_tags("p", "t"), "compute-broker:client"]
    for key in own:
        with pytest.raises(ConfigError):
            Config.from_dict({"instance_tags": {key: "x"}})


async def test_on_demand_launch_has_no_market_options_nor_unset_key_and_subnet(
    settings: Ec2Settings, limiter: trio.CapacityLimiter
) -> None:
    """On-demand sends no InstanceMarketOptions; KeyName and SubnetId only when configured."""
    bare = Ec2Settings(
        ami_id=settings.ami_id,
        security_group_ids=settings.security_group_ids,
        key_name=None,
        subnet_id=None,
        pool_name=settings.pool_name,
        region=settings.region,
    )
    cloud = Ec2Cloud(bare, limiter)
    sent = record_params(cloud, "RunInstances")
    with trio.fail_after(DEADLINE):
        launched = await cloud.launch(ON_DEMAND, 1, "token-on-demand")
        described = await cloud.describe([launched[0].instance_id])

    assert not {"InstanceMarketOptions", "KeyName", "SubnetId"} & sent[0].keys()
    assert [i.market for i in launched] == [Market.ON_DEMAND]
    assert [i.market for i in described] == [Market.ON_DEMAND]


async def test_describe_of_pending_ids_is_one_call_and_omits_unknown_ids(
    cloud: Ec2Cloud, boot_delay: Callable[[float], None]
) -> None:
    """Describing n pending instances and an unknown id makes one DescribeInstances call."""
    boot_delay(60)
    with trio.fail_after(DEADLINE):
        launched = await cloud.launch(SPOT, 5, "token-describe")
        sent = record_params(cloud, "DescribeInstances")
        described = await cloud.describe([UNKNOWN_ID, *(i.instance_id for i in launched)])

    assert len(sent) == 1
    assert sorted(i.instance_id for i in described) == sorted(i.instance_id for i in launched)
    assert {i.state for i in described} == {"pending"}
    assert all(i.public_ip and i.public_ip.startswith("127.77.") for i in described)


async def test_describe_batches_200_ids_per_call(cloud: Ec2Cloud) -> None:
    """450 ids take three DescribeInstances calls; no ids take none."""
    ids = [f"i-{n:017x}" for n in range(450)]
    sent = record_params(cloud, "DescribeInstances")
    with trio.fail_after(DEADLINE):
        assert await cloud.describe(ids) == []
        assert await cloud.describe([]) == []

    assert [len(p["Filters"][0]["Values"]) for p in sent] == [200, 200, 50]


async def test_describe_requests_beyond_the_burst_are_spread_out(
    settings: Ec2Settings, limiter: trio.CapacityLimiter
) -> None:
    """Six concurrent describes, a bucket of 2 at 20/s: past the burst, one per 50 ms."""
    cloud = Ec2Cloud(settings, limiter, describe_bucket=TokenBucket(capacity=2, rate=20))
    sent_at: list[float] = []

    def stamp(**_: Any) -> None:
        sent_at.append(time.perf_counter())

    cloud.client.meta.events.register("before-send.ec2.DescribeInstances", stamp)
    started = time.perf_counter()
    with trio.fail_after(DEADLINE):
        async with trio.open_nursery() as nursery:
            for _ in range(6):
                nursery.start_soon(cloud.describe, [UNKNOWN_ID])

    offsets = sorted(t - started for t in sent_at)
    # The k-th request past the burst may not leave before k refills (1/20 s each).
    earliest = [0, 0, 0.05, 0.10, 0.15, 0.20]
    assert len(offsets) == 6
    assert all(offset >= floor - 0.005 for offset, floor in zip(offsets, earliest, strict=True))
    assert offsets[-1] < 1.0


async def test_list_pool_returns_only_this_pools_live_instances(
    cloud: Ec2Cloud, settings: Ec2Settings, limiter: trio.CapacityLimiter
) -> None:
    """Untagged, other-pool and terminated instances are not in the pool."""
    with trio.fail_after(DEADLINE):
        ours = await cloud.launch(SPOT, 3, "token-pool")
        for tags in ([], [{"Key": "compute-broker:pool", "Value": "someone-else"}]):
            await call(
                limiter,
                cloud.client.run_instances,
                ImageId=settings.ami_id,
                MinCount=1,
                MaxCount=1,
                TagSpecifications=[{"ResourceType": "instance", "Tags": tags}] if tags else [],
            )
        await cloud.terminate([ours[0].instance_id])
        pool = await cloud.list_pool()

    assert sorted(i.instance_id for i in pool) == sorted(i.instance_id for i in ours[1:])
    assert all(i.is_alive and i.tags["compute-broker:pool"] == settings.pool_name for i in pool)
    assert all(i.tags["compute-broker:launch-token"] for i in pool)


async def test_terminate_is_idempotent(cloud: Ec2Cloud) -> None:
    """Terminating terminated or unknown instances again is not an error."""
    with trio.fail_after(DEADLINE):
        launched = await cloud.launch(SPOT, 2, "token-terminate")
        ids = [i.instance_id for i in launched]
        await cloud.terminate(ids)
        await cloud.terminate(ids)
        await cloud.terminate([UNKNOWN_ID])
        described = await cloud.describe(ids)

    assert {i.state for i in described} == {"terminated"}


async def test_launched_counts_each_tokens_instances_in_every_state(cloud: Ec2Cloud) -> None:
    """`launched` counts the instances a launch token produced, terminated ones included
    (a settled intent refunds only what never came); tokens with none are left out."""
    token = f"token-launched-{uuid.uuid4().hex[:8]}"
    with trio.fail_after(DEADLINE):
        made = await cloud.launch(SPOT, 2, token)
        await cloud.terminate([made[0].instance_id])
        counts = await cloud.launched([token, "token-never-used"])

    assert counts == {token: 2}


async def test_terminate_with_an_unknown_id_still_terminates_the_others(
    cloud: Ec2Cloud,
) -> None:
    """An unknown id in the batch is dropped and the known instances are terminated."""
    with trio.fail_after(DEADLINE):
        launched = await cloud.launch(SPOT, 2, "token-terminate-mixed")
        ids = [i.instance_id for i in launched]
        sent = record_params(cloud, "TerminateInstances")
        await cloud.terminate([ids[0], UNKNOWN_ID, ids[1]])
        await cloud.terminate([])
        described = await cloud.describe(ids)

    assert [p["InstanceIds"] for p in sent] == [[ids[0], UNKNOWN_ID, ids[1]], ids]
    assert {i.state for i in described} == {"terminated"}


async def test_insufficient_capacity_becomes_cloud_error(
    settings: Ec2Settings, limiter: trio.CapacityLimiter
) -> None:
    """An InsufficientInstanceCapacity reply is a CloudError with AWS's code and message."""
    cloud = fast_cloud(settings, limiter, retries=1)
    message = "We currently do not have sufficient c7i.large capacity."
    ice = [ec2_error(500, "InsufficientInstanceCapacity", message) for _ in range(2)]
    attempts = inject(cloud, "RunInstances", ice)
    with trio.fail_after(DEADLINE), pytest.raises(CloudError) as caught:
        await cloud.launch(SPOT, 1, "token-ice")

    assert len(attempts) == 1  # a 500, but a capacity error: not retried
    assert caught.value.code == "InsufficientInstanceCapacity"
    assert caught.value.message == message
    assert not caught.value.unreachable
    assert str(caught.value) == f"InsufficientInstanceCapacity: {message}"


async def test_throttling_is_retried_and_the_call_succeeds(
    settings: Ec2Settings, limiter: trio.CapacityLimiter
) -> None:
    """One RequestLimitExceeded (503) is retried by the adapter; the launch then succeeds."""
    cloud = fast_cloud(settings, limiter, retries=2)
    throttled = ec2_error(503, "RequestLimitExceeded", "Request limit exceeded.")
    attempts = inject(cloud, "RunInstances", [throttled])
    with trio.fail_after(DEADLINE):
        launched = await cloud.launch(SPOT, 1, "token-throttled")

    assert len(attempts) == 2
    assert len(launched) == 1


async def test_spot_prices_ask_for_the_linux_price_now_and_leave_out_unknown_types(
    cloud: Ec2Cloud,
) -> None:
    """One DescribeSpotPriceHistory for the Linux price now; unknown types are left out.

    The sandbox answers the built-in price table's spot prices (moto alone says $0.00001)."""
    sent = record_params(cloud, "DescribeSpotPriceHistory")
    with trio.fail_after(DEADLINE):
        prices = await cloud.spot_prices(["c7i.8xlarge", "t3.micro", "c7i.8xlarge", "x9.nope"])
        none = await cloud.spot_prices([])

    table = PriceTable.default()
    assert prices == {
        "c7i.8xlarge": table.price("c7i.8xlarge", "spot"),
        "t3.micro": table.price("t3.micro", "spot"),
    }
    assert none == {}
    assert len(sent) == 1
    assert sent[0]["InstanceTypes"] == ["c7i.8xlarge", "t3.micro", "x9.nope"]
    assert sent[0]["ProductDescriptions"] == ["Linux/UNIX"]
    assert abs(sent[0]["StartTime"].timestamp() - time.time()) < 60


async def test_a_spot_price_is_the_highest_across_zones(cloud: Ec2Cloud) -> None:
    """Zones priced differently: the type costs what its dearest zone costs."""
    items = "".join(
        f"<item><instanceType>{kind}</instanceType><productDescription>Linux/UNIX"
        f"</productDescription><spotPrice>{price}</spotPrice><timestamp>"
        f"2026-11-23T10:00:00.000Z</timestamp><availabilityZone>{zone}</availabilityZone></item>"
        for kind, zone, price in [
            ("c7i.large", "us-east-1a", "0.031"),
            ("c7i.large", "us-east-1b", "0.045"),
            ("c7i.large", "us-east-1c", "0.029"),
            ("t3.micro", "us-east-1a", "0.0031"),
        ]
    )
    history = ec2_reply(
        200,
        '<DescribeSpotPriceHistoryResponse xmlns="http://ec2.amazonaws.com/doc/2016-11-15/">'
        f"<requestId>injected</requestId><spotPriceHistorySet>{items}</spotPriceHistorySet>"
        "</DescribeSpotPriceHistoryResponse>",
    )
    inject(cloud, "DescribeSpotPriceHistory", [history])
    with trio.fail_after(DEADLINE):
        prices = await cloud.spot_prices(["c7i.large", "t3.micro"])

    assert prices == {"c7i.large": 0.045, "t3.micro": 0.0031}


async def test_sandbox_spot_prices_follow_the_installed_table(cloud: Ec2Cloud) -> None:
    """`install_spot_prices` swaps the table; types it does not price keep moto's figure."""
    try:
        sandbox.install_spot_prices(PriceTable({("m5.large", "spot"): 0.031}))
        with trio.fail_after(DEADLINE):
            prices = await cloud.spot_prices(["m5.large", "c7i.8xlarge"])
    finally:
        sandbox.install_spot_prices()

    assert prices == {"m5.large": 0.031, "c7i.8xlarge": 0.00001}


async def test_spot_prices_not_allowed_is_a_cloud_error(cloud: Ec2Cloud) -> None:
    """An account that may not read spot prices gets AWS's code as a CloudError."""
    denied = ec2_error(403, "UnauthorizedOperation", "You are not authorized.")
    inject(cloud, "DescribeSpotPriceHistory", [denied])
    with trio.fail_after(DEADLINE), pytest.raises(CloudError) as caught:
        await cloud.spot_prices(["c7i.8xlarge"])

    assert caught.value.code == "UnauthorizedOperation"


async def test_closed_endpoint_is_unreachable_quickly(
    settings: Ec2Settings, limiter: trio.CapacityLimiter, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A refused connection is CloudError(unreachable=True), raised within seconds."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{closed_loopback_port()}")
    cloud = fast_cloud(settings, limiter, retries=0)
    with trio.fail_after(3), pytest.raises(CloudError) as caught:
        await cloud.list_pool()

    assert caught.value.code == "EndpointUnreachable"
    assert caught.value.unreachable
    assert "\n" not in str(caught.value)


async def test_cancelled_call_returns_promptly(
    cloud: Ec2Cloud, limiter: trio.CapacityLimiter
) -> None:
    """Cancelling a call stuck in boto3 returns at once; the thread is abandoned."""
    release = threading.Event()

    def stuck(**_: Any) -> None:
        release.wait(DEADLINE)

    cloud.client.meta.events.register("before-send.ec2.DescribeInstances", stuck)
    try:
        with trio.fail_after(2):
            with trio.move_on_after(0.2) as scope:
                await cloud.list_pool()
        assert scope.cancelled_caught
    finally:
        release.set()
    # The abandoned thread keeps its token until it finishes, which it does once released.
    await wait_for(lambda: limiter.borrowed_tokens == 0, timeout=DEADLINE)


async def test_call_flattens_botocore_errors_to_one_line(limiter: trio.CapacityLimiter) -> None:
    """Multi-line botocore errors and missing credentials become one-line CloudErrors."""

    def invalid() -> None:
        raise botocore.exceptions.ParamValidationError(report="line one\n  line two")

    def no_credentials() -> None:
        raise botocore.exceptions.NoCredentialsError()

    with trio.fail_after(DEADLINE):
        with pytest.raises(CloudError) as invalid_error:
            await call(limiter, invalid)
        with pytest.raises(CloudError) as credentials_error:
            await call(limiter, no_credentials)

    assert invalid_error.value.code == "ParamValidationError"
    assert str(invalid_error.value) == (
        "ParamValidationError: Parameter validation failed: line one line two"
    )
    assert credentials_error.value.code == "NoCredentials"
    assert "\n" not in str(credentials_error.value)


async def test_terminate_leaves_instances_without_the_pool_tag_alone(
    cloud: Ec2Cloud, settings: Ec2Settings, limiter: trio.CapacityLimiter
) -> None:
    """Ids of an untagged and of another pool's instance are not terminated, and logged; the
    pool's own instance in the same call is."""
    with trio.fail_after(DEADLINE):
        (ours,) = await cloud.launch(SPOT, 1, "token-strangers")
        strangers = []
        for tags in ([], [{"Key": "compute-broker:pool", "Value": "someone-else"}]):
            launched = await call(
                limiter,
                cloud.client.run_instances,
                ImageId=settings.ami_id,
                MinCount=1,
                MaxCount=1,
                TagSpecifications=[{"ResourceType": "instance", "Tags": tags}] if tags else [],
            )
            strangers.append(launched["Instances"][0]["InstanceId"])
        sent = record_params(cloud, "TerminateInstances")
        with structlog.testing.capture_logs() as logs:
            await cloud.terminate([*strangers, ours.instance_id, UNKNOWN_ID])
        states = {
            i.instance_id: i.state for i in await cloud.describe([*strangers, ours.instance_id])
        }

    assert sent[0]["InstanceIds"] == [ours.instance_id, UNKNOWN_ID]
    assert states[ours.instance_id] in ("shutting-down", "terminated")
    assert all(states[s] in ("pending", "running") for s in strangers)
    refused = [e for e in logs if e["event"] == "terminate.refused"]
    assert [e["instance_ids"] for e in refused] == [sorted(strangers)]
