"""Shared fixtures: the engine on Trio's MockClock with an in-memory cloud (`clock`, `cloud`,
`engine`), and the sandbox cloud (an embedded moto server) for tests that use AWS.

Every test that uses the moto server is marked `slow` here, by its fixtures; tests that start
a process (the broker, tclsh, nc, sh) carry the mark themselves. `pytest -m "not slow"` runs
the rest: the unit suite.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable, Iterator
from typing import TYPE_CHECKING

import pytest

from broker.clock import Clock
from broker.engine import Engine
from tests.engines import T0, make_engine, running
from tests.fakes import FakeCloud

if TYPE_CHECKING:
    from broker.sandbox import MotoHandle, SandboxResources


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark `slow` every test that needs the moto server (directly or through a fixture)."""
    for item in items:
        if "moto_server" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)


@pytest.fixture
async def clock() -> Clock:
    """The broker's clock, starting at T0 (Unix seconds) and following Trio's clock."""
    return Clock(epoch=T0)


@pytest.fixture
async def cloud(clock: Clock) -> FakeCloud:
    """An in-memory cloud whose instances boot in 20 s."""
    return FakeCloud(clock, boot_time=20.0)


@pytest.fixture
async def engine(cloud: FakeCloud, clock: Clock) -> AsyncIterator[Engine]:
    """A running engine with the default settings (`tests.engines.make_settings`)."""
    engine = make_engine(cloud, clock)
    async with running(engine):
        yield engine


@pytest.fixture(scope="session")
def moto_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoHandle]:
    """An embedded moto server for the whole session, with boto3 pointed at it.

    Sets the sandbox environment (endpoint, fake credentials, us-east-1) and isolates boto3
    from the developer's AWS config files and endpoint overrides, so no call can leave the
    machine. Workers get unique loopback IPs; the boot delay is 0 (tests that change it put
    it back). Tests share the server: use a fresh pool name per test.
    """
    from broker import sandbox  # moto is an optional extra: import it only when needed

    handle = sandbox.start_moto()
    with pytest.MonkeyPatch.context() as monkeypatch:
        for name in list(os.environ):
            if name.startswith("AWS_"):
                monkeypatch.delenv(name)
        for name, value in sandbox.sandbox_environment(handle.endpoint_url).items():
            monkeypatch.setenv(name, value)
        no_config = tmp_path_factory.mktemp("aws") / "absent"
        monkeypatch.setenv("AWS_CONFIG_FILE", str(no_config))
        monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(no_config))
        sandbox.install_unique_ips()
        sandbox.install_boot_delay(0)
        _warm_up_ec2()
        try:
            yield handle
        finally:
            handle.stop()


def _warm_up_ec2() -> None:
    """moto's first EC2 call loads its AMI and instance-type data (1.5-3.5 s): pay it once
    here so tests' deadlines measure the tests."""
    from broker.aws import make_client

    make_client("ec2", region=None).describe_vpcs()


@pytest.fixture
def boot_delay(moto_server: MotoHandle) -> Iterator[Callable[[float], None]]:
    """Set the sandbox boot delay (seconds) for instances launched afterwards; reset to 0."""
    from broker import sandbox

    try:
        yield sandbox.install_boot_delay
    finally:
        sandbox.install_boot_delay(0)


@pytest.fixture(scope="session")
def resources(moto_server: MotoHandle) -> SandboxResources:
    """The sandbox's AMI, security group, key pair and subnet (created once; a test module
    may override this fixture to prepare more)."""
    from broker.sandbox import prepare_resources

    return prepare_resources()


@pytest.fixture
def instant_retries() -> Iterator[None]:
    """The adapters' retries (`broker.retry`) run without waiting: same attempts, no sleep."""
    from broker import retry

    with retry.instantly():
        yield


@pytest.fixture
def aws_env(moto_server: MotoHandle) -> dict[str, str]:
    """The environment variables a subprocess needs to use the session's sandbox cloud."""
    from broker import sandbox

    return sandbox.sandbox_environment(moto_server.endpoint_url)
