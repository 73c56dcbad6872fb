"""RunInstances retries in `Ec2Cloud`, against moto: botocore sends each launch request once,
the adapter retries throttling and transient failures with the same ClientToken, and capacity
errors reach the caller after one request so it can try another offering at once. The retries
are the production ones (`LAUNCH_RETRY`), run without waiting (`instant_retries`)."""

from __future__ import annotations

import uuid

import pytest
import structlog
import trio

from broker.aws import call
from broker.cloud import CloudError, LaunchSpec, Market
from broker.ec2 import LAUNCH_RETRY, Ec2Cloud, Ec2Settings
from broker.sandbox import SandboxResources
from tests.aws_support import closed_loopback_port, ec2_error, inject

SPOT = LaunchSpec("c7i.large", Market.SPOT)
DEADLINE = 10

pytestmark = pytest.mark.usefixtures("instant_retries")


@pytest.fixture
def settings(resources: SandboxResources) -> Ec2Settings:
    return resources.ec2_settings(f"retries-{uuid.uuid4().hex[:8]}")


@pytest.fixture
def cloud(settings: Ec2Settings) -> Ec2Cloud:
    return Ec2Cloud(settings, trio.CapacityLimiter(4))


def test_a_launch_is_tried_five_times_with_full_jitter_waits_below_0_5_1_2_4_s() -> None:
    """The documented launch retries: at most 5 requests; the wait before retry n is drawn
    from [0, 0.5 * 2 ** (n - 1)) seconds, 7.5 s at most in all."""
    assert LAUNCH_RETRY.attempts == 5
    assert [LAUNCH_RETRY.wait(n, 1.0) for n in range(1, 5)] == [0.5, 1.0, 2.0, 4.0]
    assert [LAUNCH_RETRY.wait(n, 0.0) for n in range(1, 5)] == [0.0] * 4


@pytest.mark.parametrize(
    ("status", "code"),
    [
        (500, "InsufficientInstanceCapacity"),
        (400, "SpotMaxPriceTooLow"),
        (400, "MaxSpotInstanceCountExceeded"),
        (400, "Unsupported"),
    ],
)
async def test_a_capacity_error_surfaces_after_exactly_one_request(
    cloud: Ec2Cloud, status: int, code: str
) -> None:
    """A capacity error, even an HTTP 500, is raised at once: one request, no retry."""
    attempts = inject(cloud, "RunInstances", [ec2_error(status, code, "Not now.")] * 3)
    with trio.fail_after(DEADLINE), pytest.raises(CloudError) as caught:
        await cloud.launch(SPOT, 1, "token-capacity")

    assert len(attempts) == 1
    assert caught.value.code == code
    assert caught.value.capacity
    assert not caught.value.throttled


async def test_throttling_is_retried_with_the_same_client_token(cloud: Ec2Cloud) -> None:
    """RequestLimitExceeded twice, then success: three requests, one ClientToken, one launch."""
    throttled = ec2_error(503, "RequestLimitExceeded", "Request limit exceeded.")
    attempts = inject(cloud, "RunInstances", [throttled, throttled])
    with structlog.testing.capture_logs() as logs, trio.fail_after(DEADLINE):
        launched = await cloud.launch(SPOT, 1, "token-throttled-twice")

    assert [a["ClientToken"] for a in attempts] == ["token-throttled-twice"] * 3
    assert len(launched) == 1
    retries = [e for e in logs if e["event"] == "launch.retry"]
    assert [(e["code"], e["attempt"]) for e in retries] == [
        ("RequestLimitExceeded", 1),
        ("RequestLimitExceeded", 2),
    ]
    assert all(0 <= e["delay"] <= LAUNCH_RETRY.wait(e["attempt"], 1.0) for e in retries)


@pytest.mark.parametrize(
    ("status", "code"),
    [(500, "InternalError"), (503, "Unavailable"), (503, "ServiceUnavailable")],
)
async def test_transient_server_errors_are_retried(cloud: Ec2Cloud, status: int, code: str) -> None:
    """A transient 5xx is retried like throttling; the launch then succeeds."""
    attempts = inject(cloud, "RunInstances", [ec2_error(status, code, "Try again.")])
    with trio.fail_after(DEADLINE):
        launched = await cloud.launch(SPOT, 1, f"token-{code}")

    assert len(attempts) == 2
    assert len(launched) == 1


async def test_throttling_forever_gives_up_after_the_attempt_limit(cloud: Ec2Cloud) -> None:
    """Endless throttling: `attempts` requests, then a throttled CloudError."""
    throttled = ec2_error(503, "RequestLimitExceeded", "Request limit exceeded.")
    attempts = inject(cloud, "RunInstances", [throttled] * 100)
    with trio.fail_after(DEADLINE), pytest.raises(CloudError) as caught:
        await cloud.launch(SPOT, 1, "token-throttled-forever")

    assert len(attempts) == LAUNCH_RETRY.attempts
    assert {a["ClientToken"] for a in attempts} == {"token-throttled-forever"}
    assert caught.value.throttled
    assert caught.value.code == "RequestLimitExceeded"


async def test_other_client_errors_are_not_retried(cloud: Ec2Cloud) -> None:
    """UnauthorizedOperation is neither capacity nor transient: one request, raised as is."""
    denied = ec2_error(403, "UnauthorizedOperation", "You are not authorized.")
    attempts = inject(cloud, "RunInstances", [denied] * 3)
    with trio.fail_after(DEADLINE), pytest.raises(CloudError) as caught:
        await cloud.launch(SPOT, 1, "token-denied")

    assert len(attempts) == 1
    assert caught.value.code == "UnauthorizedOperation"
    assert not caught.value.capacity
    assert not caught.value.throttled


async def test_an_unreachable_endpoint_is_retried_then_reported(
    settings: Ec2Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Connection refused on every attempt: `attempts` tries, then CloudError(unreachable)."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{closed_loopback_port()}")
    cloud = Ec2Cloud(settings, trio.CapacityLimiter(4))
    attempts = inject(cloud, "RunInstances", [])
    with trio.fail_after(DEADLINE), pytest.raises(CloudError) as caught:
        await cloud.launch(SPOT, 1, "token-unreachable")

    assert len(attempts) == LAUNCH_RETRY.attempts
    assert caught.value.unreachable
    assert caught.value.code == "EndpointUnreachable"


async def test_launch_client_sends_exactly_one_request_per_call(cloud: Ec2Cloud) -> None:
    """The default launch client has botocore's retries off: max_attempts=0 is one request."""
    throttled = ec2_error(503, "RequestLimitExceeded", "Request limit exceeded.")
    attempts = inject(cloud, "RunInstances", [throttled] * 3)
    with trio.fail_after(DEADLINE), pytest.raises(CloudError):
        await call(
            cloud.limiter,
            cloud.launch_client.run_instances,
            ImageId=cloud.settings.ami_id,
            MinCount=1,
            MaxCount=1,
        )

    assert len(attempts) == 1


async def test_launch_with_a_subnet_launches_into_that_subnet(
    cloud: Ec2Cloud, settings: Ec2Settings
) -> None:
    """`subnet=` overrides the configured subnet; without it the configured one is used."""
    with trio.fail_after(DEADLINE):
        answer = await call(
            cloud.limiter,
            cloud.client.describe_subnets,
            Filters=[{"Name": "default-for-az", "Values": ["true"]}],
        )
        other = next(s for s in answer["Subnets"] if s["SubnetId"] != settings.subnet_id)
        [elsewhere] = await cloud.launch(SPOT, 1, "token-subnet", subnet=other["SubnetId"])
        [default] = await cloud.launch(SPOT, 1, "token-default-subnet")
        described = await call(
            cloud.limiter,
            cloud.client.describe_instances,
            InstanceIds=[elsewhere.instance_id, default.instance_id],
        )

    raw = {i["InstanceId"]: i for r in described["Reservations"] for i in r["Instances"]}
    placed = raw[elsewhere.instance_id]
    assert (placed["SubnetId"], placed["Placement"]["AvailabilityZone"]) == (
        other["SubnetId"],
        other["AvailabilityZone"],
    )
    assert raw[default.instance_id]["SubnetId"] == settings.subnet_id
