"""AWS failures through the whole broker: the boto3 adapter against moto, faults injected
with botocore hooks, requests over TCP. Each becomes one `ERROR:` line, in bounded time."""

from __future__ import annotations

import threading
import uuid
from typing import Any

import pytest
import trio

from broker.aws import make_client
from broker.clock import Clock
from broker.cloud import LaunchSpec, Market
from broker.ec2 import Ec2Cloud
from broker.engine import Engine, EngineSettings
from broker.model import Limits
from broker.prices import PriceTable
from broker.sandbox import SandboxResources
from tests.aws_support import client_for, closed_loopback_port, ec2_error, inject
from tests.harness import LineClient, ask_once, running_broker

SPEC = LaunchSpec("c7i.8xlarge", Market.SPOT)

pytestmark = pytest.mark.usefixtures("instant_retries")


def make_engine(
    resources: SandboxResources, *, retries: int = 1, launch_timeout: float = 20
) -> Engine:
    settings = resources.ec2_settings(f"faults-{uuid.uuid4().hex[:8]}")
    client = make_client("ec2", region="us-east-1", max_attempts=retries, connect_timeout=1)
    # RunInstances is retried by the adapter (throttling, 5xx, unreachable): instantly here.
    cloud = Ec2Cloud(settings, trio.CapacityLimiter(4), client=client)
    engine_settings = EngineSettings(
        default_spec=SPEC,
        limits=Limits(10, None, 900.0),
        launch_timeout=launch_timeout,
        describe_interval=0.05,
    )
    return Engine(cloud, engine_settings, Clock(), PriceTable.default())


def cloud_of(engine: Engine) -> Ec2Cloud:
    assert isinstance(engine.cloud, Ec2Cloud)
    return engine.cloud


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
    engine = make_engine(resources)
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
    engine = make_engine(resources, retries=3)
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
    engine = make_engine(resources, launch_timeout=15)
    async with running_broker(engine) as broker:
        with trio.fail_after(15):
            reply = await ask_once(broker.port, "GET_WORKER")
    assert reply.startswith("ERROR: cloud unreachable: ")
    assert engine.pool.in_flight == {}


async def test_a_hanging_aws_call_is_cut_at_launch_timeout(resources: SandboxResources) -> None:
    """RunInstances that never answers: the waiter gets `ERROR: launch timed out` at
    launch_timeout, and other clients are served meanwhile."""
    engine = make_engine(resources, launch_timeout=1.5)
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
