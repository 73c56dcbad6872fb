"""The broker's side of the workers' dead-man's switch (docs/worker-watchdog.md): `ALIVE
<instance-id>` answers OK while the pool (registry included) may want the worker, costs no
registry write and no lease effect; every launch carries the shutdown behaviour and the
watchdog's user data; and the real watchdog script, run against a live broker, keeps its
worker while the broker answers and powers it off once every broker is gone."""

from __future__ import annotations

import base64
import shutil
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
from trio.testing import MockClock

from broker.clock import Clock
from broker.cloud import LaunchSpec, Market
from broker.config_validate import Config, ConfigError
from broker.ec2 import Ec2Cloud
from broker.memory_registry import MemoryRegistry
from broker.model import WorkerRequest
from broker.protocol import Alive, BadRequest, parse
from broker.registry import LaunchIntent, WorkerRecord
from broker.sandbox import SandboxResources
from broker.userdata import WATCHDOG_FILENAME
from broker.wiring import watchdog_brokers, worker_user_data
from tests.aws_support import full_client
from tests.engines import make_engine
from tests.fakes import FakeCloud
from tests.harness import ask_once, running_broker
from tests.test_worker_watchdog import ORPHAN_TIMEOUT, SLACK, running_watchdog, settings

SPEC = LaunchSpec("c7i.8xlarge", Market.SPOT)
EPOCH = 1_795_000_000.0
UNKNOWN = "i-0fffffffffffffff0"

needs_sh = pytest.mark.skipif(shutil.which("sh") is None, reason="the watchdog needs a POSIX sh")


class CountingRegistry(MemoryRegistry):
    """The in-memory registry, counting every call made to it."""

    calls: int = 0

    def __getattribute__(self, name: str) -> Any:
        attribute = super().__getattribute__(name)
        if callable(attribute) and not name.startswith("_"):
            object.__setattr__(self, "calls", object.__getattribute__(self, "calls") + 1)
        return attribute


def test_alive_takes_one_ec2_instance_id() -> None:
    """`ALIVE <instance-id>` parses; anything else is a usage error."""
    assert parse(b"ALIVE i-0123456789abcdef0") == Alive("i-0123456789abcdef0")
    assert parse(b"alive i-0123456789abcdef0") == Alive("i-0123456789abcdef0")
    for bad in (b"ALIVE", b"ALIVE 10.0.0.1", b"ALIVE i-XYZ", b"ALIVE i-0123456789abcdef0 x"):
        reply = parse(bad)
        assert isinstance(reply, BadRequest), bad
        assert reply.reply.text.startswith("ERROR: usage: "), bad


async def test_alive_of_a_known_worker_costs_no_registry_call_and_no_activity(
    autojump_clock: MockClock,
) -> None:
    """A worker of the pool: OK, a hundred times, with no registry call and its idle clock
    and lease untouched (ALIVE keeps nothing alive but the worker's own watchdog)."""
    clock = Clock(epoch=EPOCH)
    cloud = FakeCloud(clock, boot_time=5.0)
    registry = CountingRegistry("test")
    engine = make_engine(cloud, clock, registry)
    async with trio.open_nursery() as nursery:
        await nursery.start(engine.run)
        handout = await engine.get_worker(WorkerRequest(), "a")
        await trio.sleep(100)
        worker = engine.pool.workers[handout.instance_id]
        lease = engine.pool.leases[("a", handout.instance_id)]
        before = (registry.calls, worker.last_activity, lease.last_activity)
        answers = [await engine.alive(handout.instance_id) for _ in range(100)]
        after = (registry.calls, worker.last_activity, lease.last_activity)
        nursery.cancel_scope.cancel()
    assert answers == [True] * 100
    assert before == after


async def test_alive_asks_the_registry_before_condemning_a_worker(
    autojump_clock: MockClock,
) -> None:
    """Unknown here: OK if the registry has its record (another replica's worker) or any
    launch not answered yet (another replica's fresh instance); else not wanted."""
    clock = Clock(epoch=EPOCH)
    registry = MemoryRegistry("test")
    engine = make_engine(FakeCloud(clock), clock, registry)
    async with trio.open_nursery() as nursery:
        await nursery.start(engine.run)
        assert not await engine.alive(UNKNOWN)
        other = "i-0eeeeeeeeeeeeeee0"
        record = WorkerRecord(
            other, "ec2", None, "c7i.8xlarge", "spot", "launching", EPOCH, EPOCH, 0.5, None
        )
        await registry.put_worker(record)
        assert await engine.alive(other)
        await registry.put_intent(LaunchIntent.begin("t-1", SPEC, 1, clock.now(), 600.0))
        await trio.sleep(1.1)  # the intents are read at most once a second
        assert await engine.alive(UNKNOWN)
        nursery.cancel_scope.cancel()


async def test_alive_over_tcp_answers_ok_or_not_wanted(autojump_clock: MockClock) -> None:
    """The wire: `OK` for a worker of the pool, `ERROR: Worker not wanted` for a stranger."""
    clock = Clock(epoch=EPOCH)
    cloud = FakeCloud(clock, boot_time=5.0)
    engine = make_engine(cloud, clock, MemoryRegistry("test"))
    async with running_broker(engine) as broker:
        handout = await engine.get_worker(WorkerRequest(), "a")
        assert await ask_once(broker.port, f"ALIVE {handout.instance_id}") == "OK"
        assert await ask_once(broker.port, f"ALIVE {UNKNOWN}") == "ERROR: Worker not wanted"


def test_the_watchdog_needs_an_address_workers_can_reach() -> None:
    """With listen_host 0.0.0.0 the broker cannot know its own address: a clear config error
    unless broker_addresses says it (or the watchdog is off); a specific host is used as is."""
    with pytest.raises(ConfigError, match="broker_addresses"):
        worker_user_data(Config.from_dict({}), 9000)
    assert worker_user_data(Config.from_dict({"worker_watchdog": False}), 9000) is None
    given = Config.from_dict({"broker_addresses": ["broker.lab.example:9000", "[::1]:9001"]})
    assert watchdog_brokers(given, 1) == (("broker.lab.example", 9000), ("::1", 9001))
    own = Config.from_dict({"listen_host": "203.0.113.7"})
    assert watchdog_brokers(own, 9100) == (("203.0.113.7", 9100),)
    script = worker_user_data(own, 9100)
    assert script is not None and "203.0.113.7" in script


async def test_every_launch_carries_the_shutdown_behaviour_and_the_user_data(
    resources: SandboxResources,
) -> None:
    """RunInstances is sent with InstanceInitiatedShutdownBehavior=terminate and the composed
    user data (the operator's part and the watchdog), as moto's DescribeInstanceAttribute
    reads them back."""
    config = Config.from_dict(
        {"listen_host": "127.0.0.1", "user_data": "#!/bin/sh\necho operator was here\n"}
    )
    user_data = worker_user_data(config, 9000)
    assert user_data is not None
    ec2 = attrs.evolve(resources.ec2_settings("alive-test"), user_data=user_data)
    cloud = Ec2Cloud(ec2, trio.CapacityLimiter(2))
    with trio.fail_after(30):
        [instance] = await cloud.launch(SPEC, 1, "token-alive")
        await cloud.terminate([instance.instance_id])
    client = full_client("ec2")
    attribute = client.describe_instance_attribute(
        InstanceId=instance.instance_id, Attribute="userData"
    )
    sent = base64.b64decode(attribute["UserData"]["Value"]).decode()
    assert sent == user_data
    assert "echo operator was here" in sent
    assert WATCHDOG_FILENAME in sent
    behaviour = client.describe_instance_attribute(
        InstanceId=instance.instance_id, Attribute="instanceInitiatedShutdownBehavior"
    )
    assert behaviour["InstanceInitiatedShutdownBehavior"]["Value"] == "terminate"


@pytest.mark.slow  # runs the watchdog script under sh
@needs_sh
async def test_the_watchdog_lives_while_a_broker_wants_it_and_dies_once_all_are_gone(
    tmp_path: Path,
) -> None:
    """The real script against a live broker: a worker of the pool is kept past several
    orphan_timeouts; once the broker is gone it powers off within orphan_timeout (plus
    scheduling slack), reason `orphaned`; a stranger is told twice and powers off at once."""
    clock = Clock()
    cloud = FakeCloud(clock, boot_time=0.05)
    engine = make_engine(cloud, clock, MemoryRegistry("test"), describe_interval=0.05)
    (tmp_path / "stranger").mkdir()
    (tmp_path / "worker").mkdir()
    with trio.fail_after(30):
        async with running_broker(engine) as broker:
            handout = await engine.get_worker(WorkerRequest(), "a")
            wanted = settings(broker.port)
            async with (
                running_watchdog(
                    tmp_path / "stranger", settings(broker.port), CB_WATCHDOG_INSTANCE_ID=UNKNOWN
                ) as stranger,
                running_watchdog(
                    tmp_path / "worker", wanted, CB_WATCHDOG_INSTANCE_ID=handout.instance_id
                ) as worker,
            ):
                await stranger.exited(SLACK)
                await trio.sleep(3 * ORPHAN_TIMEOUT)  # the scenario: well past orphan_timeout
                assert worker.process.returncode is None, worker.log
                await broker.server.shutdown()  # stops listening: nothing answers any more
                stopped = trio.current_time()
                await worker.process.wait()
                gone_after = trio.current_time() - stopped
    assert stranger.reasons == ["not wanted"], stranger.log
    assert worker.reasons == ["orphaned"], worker.log
    assert gone_after <= ORPHAN_TIMEOUT + SLACK
