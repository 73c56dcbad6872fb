"""The sandbox cloud: moto patched to boot slowly, hand out loopback IPs, launch like EC2, and
serve each worker's port while it runs."""

from __future__ import annotations

import importlib
import ipaddress
import sys
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import trio

from broker import sandbox
from broker.aws import call, make_client
from broker.cloud import Instance, LaunchSpec, Market
from broker.ec2 import Ec2Cloud
from broker.sandbox import MotoHandle, SandboxResources
from tests.harness import wait_for
from tests.test_sandbox_workers import echo, refused

SPEC = LaunchSpec("t3.micro", Market.SPOT)
DEADLINE = 10


@pytest.fixture
def cloud(resources: SandboxResources) -> Ec2Cloud:
    settings = resources.ec2_settings(f"sandbox-{uuid.uuid4().hex[:8]}")
    return Ec2Cloud(settings, trio.CapacityLimiter(8))


async def test_boot_delay_keeps_an_instance_pending_then_running(
    cloud: Ec2Cloud, boot_delay: Callable[[float], None]
) -> None:
    """With a boot delay an instance is pending (also to the state filter), then running."""
    boot_delay(2.0)  # long enough for three calls on a loaded machine
    with trio.fail_after(DEADLINE):
        [launched] = await cloud.launch(SPEC, 1, "token-boot")
        [described] = await cloud.describe([launched.instance_id])
        [listed] = await cloud.list_pool()
        pending_ids = await _ids_in_state(cloud, "pending")

        async def running() -> Instance | None:
            [instance] = await cloud.describe([launched.instance_id])
            return instance if instance.state == "running" else None

        booted = await wait_for(running, poll=0.05, what="the instance to run")
        running_ids = await _ids_in_state(cloud, "running")

    assert (described.state, listed.state) == ("pending", "pending")
    assert launched.instance_id in pending_ids
    assert booted.public_ip == described.public_ip
    assert launched.instance_id in running_ids


async def test_terminate_wins_over_the_boot_delay(
    cloud: Ec2Cloud, boot_delay: Callable[[float], None]
) -> None:
    """A pending sandbox instance can be terminated, and then stays terminated."""
    boot_delay(60)
    with trio.fail_after(DEADLINE):
        [launched] = await cloud.launch(SPEC, 1, "token-boot-terminate")
        await cloud.terminate([launched.instance_id])
        [described] = await cloud.describe([launched.instance_id])
        pool = await cloud.list_pool()

    assert described.state == "terminated"
    assert pool == []


async def test_boot_delay_applies_to_instances_created_after_it_is_set(
    cloud: Ec2Cloud, boot_delay: Callable[[float], None]
) -> None:
    """Changing the delay does not change instances that already exist."""
    boot_delay(60)
    with trio.fail_after(DEADLINE):
        slow = await cloud.launch(SPEC, 1, "token-slow")
        boot_delay(0)
        fast = await cloud.launch(SPEC, 1, "token-fast")
        described = await cloud.describe([slow[0].instance_id, fast[0].instance_id])

    states = {i.instance_id: i.state for i in described}
    assert states == {slow[0].instance_id: "pending", fast[0].instance_id: "running"}


@pytest.fixture
def worker_port(moto_server: MotoHandle) -> Iterator[int]:
    """Workers launched during the test answer on the default worker port."""
    sandbox.install_worker_services(sandbox.WORKER_PORT)
    try:
        yield sandbox.WORKER_PORT
    finally:
        sandbox.install_worker_services(None)


async def test_a_worker_answers_on_its_port_exactly_while_ec2_says_running(
    cloud: Ec2Cloud, boot_delay: Callable[[float], None], worker_port: int
) -> None:
    """Pending: connections refused; running: each line echoed; terminated: refused again."""
    boot_delay(2.0)  # long enough for three calls on a loaded machine
    with trio.fail_after(DEADLINE):
        [launched] = await cloud.launch(SPEC, 1, "token-worker-port")
        [pending] = await cloud.describe([launched.instance_id])
        assert pending.public_ip is not None
        ip = pending.public_ip
        refused_while_pending = await refused(ip, worker_port)

        async def running() -> Instance | None:
            [instance] = await cloud.describe([launched.instance_id])
            return instance if instance.state == "running" else None

        await wait_for(running, poll=0.05, what="the instance to run")
        reply = await echo(ip, worker_port, b"hello\n")
        await cloud.terminate([launched.instance_id])
        refused_once_terminated = await refused(ip, worker_port)

    assert pending.state == "pending"
    assert refused_while_pending
    assert reply == b"hello\n"
    assert refused_once_terminated


async def test_300_workers_get_300_distinct_loopback_ips(cloud: Ec2Cloud) -> None:
    """Concurrent launches of 300 workers give 300 distinct 127.77.x.y addresses."""
    launched: list[Instance] = []

    async def launch(n: int) -> None:
        launched.extend(await cloud.launch(SPEC, 100, f"token-ips-{n}"))

    with trio.fail_after(DEADLINE):
        async with trio.open_nursery() as nursery:
            for n in range(3):
                nursery.start_soon(launch, n)
        ips = [i.public_ip for i in launched]
        await cloud.terminate([i.instance_id for i in launched])

    assert len(set(ips)) == 300
    for ip in ips:
        assert ip is not None
        address = ipaddress.ip_address(ip)
        assert address.is_loopback
        assert ip.startswith("127.77.")
        assert ip.rsplit(".", 1)[1] not in ("0", "255")


def test_unique_ips_refuse_a_non_loopback_prefix() -> None:
    """The sandbox never hands out an address that could leave the machine."""
    with pytest.raises(ValueError, match="loopback"):
        sandbox.install_unique_ips("10.77")


async def test_launch_honours_max_count_and_client_token(cloud: Ec2Cloud) -> None:
    """Like EC2, moto launches MaxCount instances and a repeated token launches nothing."""
    with trio.fail_after(DEADLINE):
        first = await cloud.launch(SPEC, 3, "token-idempotent")
        again = await cloud.launch(SPEC, 3, "token-idempotent")
        pool = await cloud.list_pool()

    assert len(first) == 3
    assert [i.instance_id for i in again] == [i.instance_id for i in first]
    assert sorted(i.instance_id for i in pool) == sorted(i.instance_id for i in first)


async def test_prepare_resources_twice_returns_the_same_ids(moto_server: MotoHandle) -> None:
    """prepare_resources finds what it created before: same AMI, group, key and subnet."""
    with trio.fail_after(DEADLINE):
        first = await trio.to_thread.run_sync(sandbox.prepare_resources)
        second = await trio.to_thread.run_sync(sandbox.prepare_resources)
        client = make_client("ec2", region=None)
        limiter = trio.CapacityLimiter(1)
        groups = await call(
            limiter, client.describe_security_groups, GroupIds=[first.security_group_id]
        )
        images = await call(limiter, client.describe_images, ImageIds=[first.ami_id])

    assert second == first
    assert first.key_name == "compute-broker-sandbox"
    [group] = groups["SecurityGroups"]
    assert group["GroupName"] == "compute-broker-workers"
    assert [(p["IpProtocol"], p["FromPort"], p["ToPort"]) for p in group["IpPermissions"]] == [
        ("tcp", 2560, 2560)
    ]
    assert [i["Name"] for i in images["Images"]] == ["compute-broker-sandbox-worker"]


def test_importing_without_moto_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without moto, importing the sandbox fails with the pip command that installs it."""
    for name in [n for n in sys.modules if n == "moto" or n.startswith("moto.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.delitem(sys.modules, "broker.sandbox")

    with pytest.raises(ImportError, match=r"pip install 'compute-broker\[sandbox\]'"):
        importlib.import_module("broker.sandbox")


def test_sandbox_environment_has_fake_credentials_only() -> None:
    """The sandbox environment points boto3 at the endpoint with fake credentials."""
    environment = sandbox.sandbox_environment("http://127.0.0.1:5555")

    assert environment["AWS_ENDPOINT_URL"] == "http://127.0.0.1:5555"
    assert environment["AWS_ACCESS_KEY_ID"] == "testing"
    assert environment["AWS_SECRET_ACCESS_KEY"] == "testing"
    assert environment["AWS_DEFAULT_REGION"] == "us-east-1"


@pytest.mark.slow  # starts a second moto server
async def test_start_moto_listens_on_loopback_until_stopped() -> None:
    """A second sandbox server starts on a free loopback port and stops cleanly."""
    handle = await trio.to_thread.run_sync(sandbox.start_moto)
    host, port = handle.endpoint_url.removeprefix("http://").rsplit(":", 1)
    with trio.fail_after(DEADLINE):
        stream = await trio.open_tcp_stream(host, int(port))
        await stream.aclose()
        await trio.to_thread.run_sync(handle.stop)
        with pytest.raises(OSError):
            await trio.open_tcp_stream(host, int(port))

    assert host == "127.0.0.1"


async def _ids_in_state(cloud: Ec2Cloud, state: str) -> set[str]:
    """Ids of this pool's instances that the `instance-state-name` filter puts in `state`."""
    response: Any = await call(
        cloud.limiter,
        cloud.client.describe_instances,
        Filters=[
            {"Name": "tag:compute-broker:pool", "Values": [cloud.settings.pool_name]},
            {"Name": "instance-state-name", "Values": [state]},
        ],
    )
    return {i["InstanceId"] for r in response["Reservations"] for i in r["Instances"]}
