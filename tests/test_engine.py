"""The engine on Trio's MockClock with an in-memory cloud: minutes of pool life in milliseconds."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime

import attrs
import pytest
import structlog
import trio
import trio.testing
from trio.testing import MockClock

from broker.clock import Clock
from broker.cloud import CloudError, LaunchSpec, Market
from broker.engine import WAIT_SLACK, Engine, EngineSettings, Refusal, WorkerNotFound
from broker.memory_registry import MemoryRegistry
from broker.model import Limits, LocalWorker, WorkerRequest
from broker.prices import PriceTable
from broker.registry import LaunchIntent, LeaseRecord
from broker.schedule import WarmPoolSchedule
from tests.fakes import FakeCloud

SPEC = LaunchSpec("c7i.8xlarge", Market.SPOT)
BIG = LaunchSpec("c7i.16xlarge", Market.SPOT)


def make_engine(
    cloud: FakeCloud,
    clock: Clock,
    *,
    max_workers: int = 10,
    max_hourly_cost: float | None = None,
    idle_timeout: float = 900.0,
    launch_timeout: float = 300.0,
) -> Engine:
    settings = EngineSettings(
        default_spec=SPEC,
        limits=Limits(max_workers, max_hourly_cost, idle_timeout),
        launch_timeout=launch_timeout,
        describe_interval=2.0,
        reap_interval=60.0,
    )
    return Engine(cloud, settings, clock, PriceTable.default())


@pytest.fixture
async def clock() -> Clock:
    return Clock(epoch=1_700_000_000.0)


@pytest.fixture
async def cloud(clock: Clock) -> FakeCloud:
    return FakeCloud(clock, boot_time=20.0)


@pytest.fixture
async def engine(cloud: FakeCloud, clock: Clock) -> AsyncIterator[Engine]:
    engine = make_engine(cloud, clock)
    async with trio.open_nursery() as nursery:
        await nursery.start(engine.run)
        yield engine
        nursery.cancel_scope.cancel()


async def get_ip(engine: Engine, request: WorkerRequest, client: str) -> str:
    """GET_WORKER through the engine; the IP handed out."""
    return (await engine.get_worker(request, client)).ip


async def test_fifty_concurrent_requests_on_an_empty_pool_cause_one_launch(
    autojump_clock: MockClock, engine: Engine, cloud: FakeCloud
) -> None:
    """Launch coalescing: every request waits for the one launch in flight."""
    ips: list[str] = []

    async def ask(n: int) -> None:
        ips.append(await get_ip(engine, WorkerRequest(), f"10.0.0.{n}"))

    async with trio.open_nursery() as nursery:
        for n in range(50):
            nursery.start_soon(ask, n)
    assert len(cloud.launch_calls) == 1
    assert len(ips) == 50
    assert len(set(ips)) == 1
    assert len(engine.pool.leases) == 50


async def test_a_ready_worker_is_reused_without_launching(
    autojump_clock: MockClock, engine: Engine, cloud: FakeCloud
) -> None:
    """The second request gets the same worker at once."""
    first = await get_ip(engine, WorkerRequest(), "a")
    before = trio.current_time()
    second = await get_ip(engine, WorkerRequest(), "b")
    assert second == first
    assert trio.current_time() - before < 0.01
    assert len(cloud.launch_calls) == 1


async def test_requests_for_another_type_launch_that_type(
    autojump_clock: MockClock, engine: Engine, cloud: FakeCloud
) -> None:
    """type= picks the instance type; a worker of another type is not handed out."""
    small = await get_ip(engine, WorkerRequest(), "a")
    big = await get_ip(engine, WorkerRequest(instance_type="c7i.16xlarge"), "a")
    assert small != big
    assert [call[0] for call in cloud.launch_calls] == [SPEC, BIG]


async def test_pending_launches_are_polled_in_one_batched_describe(
    autojump_clock: MockClock, engine: Engine, cloud: FakeCloud
) -> None:
    """Five launching workers cost one DescribeInstances per poll, not five."""
    ids = await engine.burst(5)
    assert len(ids) == 5
    assert len(cloud.launch_calls) == 1
    assert cloud.launch_calls[0][1] == 5
    with trio.fail_after(60):
        while engine.pool.launching():
            await trio.sleep(1)
    assert all(sorted(call) == sorted(ids) for call in cloud.describe_calls)
    assert len(cloud.describe_calls) <= 20 / 2.0 + 2


async def test_idle_worker_is_reaped_after_idle_timeout(
    autojump_clock: MockClock, engine: Engine, cloud: FakeCloud
) -> None:
    """A worker nobody uses for 900 s is terminated by the next reaper pass."""
    await get_ip(engine, WorkerRequest(), "a")
    await trio.sleep(899)
    assert len(cloud.alive()) == 1
    await trio.sleep(61)
    assert cloud.alive() == []
    assert engine.pool.workers == {}
    assert engine.pool.leases == {}


async def test_ping_keeps_a_worker_alive_past_the_idle_timeout(
    autojump_clock: MockClock, engine: Engine, cloud: FakeCloud
) -> None:
    """PING restarts the idle clock: a pinged worker outlives idle_timeout."""
    ip = await get_ip(engine, WorkerRequest(), "a")
    for _ in range(5):
        await trio.sleep(600)
        await engine.ping(ip, "a")
    assert len(cloud.alive()) == 1
    assert len(engine.pool.leases) == 1


async def test_release_keeps_a_worker_another_client_holds(
    autojump_clock: MockClock, engine: Engine, cloud: FakeCloud
) -> None:
    """RELEASE by one holder ends only its lease; the last holder's RELEASE terminates."""
    ip = await get_ip(engine, WorkerRequest(), "a")
    assert await get_ip(engine, WorkerRequest(), "b") == ip
    await engine.release(ip, "a")
    assert len(cloud.alive()) == 1
    assert [lease.client for lease in engine.pool.leases.values()] == ["b"]
    await engine.release(ip, "b")
    assert cloud.alive() == []


async def test_release_of_a_stranger_does_not_terminate_a_held_worker(
    autojump_clock: MockClock, engine: Engine, cloud: FakeCloud
) -> None:
    """A client without a lease cannot take a worker from its holder."""
    ip = await get_ip(engine, WorkerRequest(), "a")
    await engine.release(ip, "mallory")
    assert len(cloud.alive()) == 1


async def test_release_is_idempotent_and_unknown_ips_are_not_found(
    autojump_clock: MockClock, engine: Engine
) -> None:
    """Releasing a gone worker is fine; an IP never seen is WorkerNotFound."""
    ip = await get_ip(engine, WorkerRequest(), "a")
    await engine.release(ip, "a")
    await engine.release(ip, "a")
    with pytest.raises(WorkerNotFound):
        await engine.release("203.0.113.9", "a")
    with pytest.raises(WorkerNotFound):
        await engine.ping(ip, "a")


async def test_lease_expires_after_idle_timeout_while_others_keep_the_worker(
    autojump_clock: MockClock, engine: Engine, cloud: FakeCloud
) -> None:
    """An idle lease ends; the worker stays for the client that keeps pinging."""
    ip = await get_ip(engine, WorkerRequest(), "quiet")
    await get_ip(engine, WorkerRequest(), "busy")
    for _ in range(4):
        await trio.sleep(300)
        await engine.ping(ip, "busy")
    assert [lease.client for lease in engine.pool.leases.values()] == ["busy"]
    assert len(cloud.alive()) == 1


async def test_launch_error_is_answered_once_to_every_waiter(
    autojump_clock: MockClock, engine: Engine, cloud: FakeCloud
) -> None:
    """A capacity error reaches all coalesced waiters; nobody retries in a loop."""
    cloud.launch_delay = 1.0
    cloud.launch_errors.append(CloudError("InsufficientInstanceCapacity", "no c7i here"))
    errors: list[str] = []

    async def ask(n: int) -> None:
        try:
            await get_ip(engine, WorkerRequest(), str(n))
        except Refusal as exc:
            errors.append(str(exc))

    async with trio.open_nursery() as nursery:
        for n in range(10):
            nursery.start_soon(ask, n)
    assert len(cloud.launch_calls) == 1
    assert errors == ["launch failed: InsufficientInstanceCapacity: no c7i here"] * 10
    assert engine.pool.in_flight == {}


async def test_unreachable_cloud_is_a_clear_error(
    autojump_clock: MockClock, engine: Engine, cloud: FakeCloud
) -> None:
    """Endpoint down becomes `cloud unreachable: ...`."""
    cloud.launch_errors.append(
        CloudError("EndpointUnreachable", "connect refused", unreachable=True)
    )
    with pytest.raises(Refusal, match=r"^cloud unreachable: connect refused$"):
        await get_ip(engine, WorkerRequest(), "a")


async def test_instance_that_never_boots_is_terminated_at_launch_timeout(
    autojump_clock: MockClock, cloud: FakeCloud, clock: Clock
) -> None:
    """No worker past launch_timeout: the waiter gets an error and the instance is terminated."""
    cloud.never_boot = True
    engine = make_engine(cloud, clock, launch_timeout=120)
    async with trio.open_nursery() as nursery:
        await nursery.start(engine.run)
        start = trio.current_time()
        with pytest.raises(Refusal, match=r"^launch timed out after 120s$"):
            await get_ip(engine, WorkerRequest(), "a")
        assert trio.current_time() - start <= 120 + 2.0 + WAIT_SLACK
        with trio.fail_after(10):
            while cloud.alive():
                await trio.sleep(1)
        assert engine.pool.workers == {}
        nursery.cancel_scope.cancel()


async def test_wait_bounds_one_request_and_the_launch_carries_on(
    autojump_clock: MockClock, engine: Engine, cloud: FakeCloud
) -> None:
    """wait=5 gives up after 5 s; the worker it started is handed to the next request."""
    with pytest.raises(Refusal, match=r"^no worker ready after 5s$"):
        await get_ip(engine, WorkerRequest(wait=5), "a")
    ip = await get_ip(engine, WorkerRequest(), "b")
    assert ip
    assert len(cloud.launch_calls) == 1


async def test_budget_refuses_a_launch_over_max_hourly_cost(
    autojump_clock: MockClock, cloud: FakeCloud, clock: Clock
) -> None:
    """A launch that would lift the run rate over the cap is refused, naming the numbers."""
    engine = make_engine(cloud, clock, max_hourly_cost=1.2)
    async with trio.open_nursery() as nursery:
        await nursery.start(engine.run)
        await get_ip(engine, WorkerRequest(), "a")  # $0.50/h
        with pytest.raises(Refusal) as info:
            await get_ip(engine, WorkerRequest(instance_type="c7i.16xlarge"), "a")  # +$1.00/h
        assert str(info.value).startswith("budget: ")
        assert "$1.2/h" in str(info.value)
        assert len(cloud.launch_calls) == 1
        nursery.cancel_scope.cancel()


async def test_burst_is_cut_to_max_workers_and_refused_when_full(
    autojump_clock: MockClock, cloud: FakeCloud, clock: Clock
) -> None:
    """BURST never takes the pool past max_workers."""
    engine = make_engine(cloud, clock, max_workers=3)
    async with trio.open_nursery() as nursery:
        await nursery.start(engine.run)
        assert len(await engine.burst(5)) == 3
        assert [count for _, count, _ in cloud.launch_calls] == [3]  # one RunInstances call
        with pytest.raises(Refusal, match=r"^max_workers reached \(3\)$"):
            await engine.burst(1)
        nursery.cancel_scope.cancel()


async def test_existing_pool_instances_are_adopted_at_start(
    autojump_clock: MockClock, cloud: FakeCloud, clock: Clock
) -> None:
    """After a restart the running tagged instance is handed out, not relaunched."""
    mine = cloud.add_running(SPEC)
    cloud.add_running(SPEC, pool="someone-else")
    engine = make_engine(cloud, clock)
    async with trio.open_nursery() as nursery:
        await nursery.start(engine.run)
        assert list(engine.pool.workers) == [mine.instance_id]
        assert await get_ip(engine, WorkerRequest(), "a") == mine.ip
        assert cloud.launch_calls == []
        nursery.cancel_scope.cancel()


async def test_shutdown_answers_waiting_requests(
    autojump_clock: MockClock, engine: Engine, cloud: FakeCloud
) -> None:
    """Requests waiting for a launch get `broker shutting down` when the broker stops."""
    result: list[str] = []

    async def ask() -> None:
        try:
            await get_ip(engine, WorkerRequest(), "a")
        except Refusal as exc:
            result.append(str(exc))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(ask)
        await trio.sleep(5)
        engine.stop_handing_out()
    assert result == ["broker shutting down"]


async def test_failed_termination_is_retried_by_the_reaper(
    autojump_clock: MockClock, engine: Engine, cloud: FakeCloud
) -> None:
    """If TerminateInstances fails, RELEASE says so and the next reaper pass retries."""
    ip = await get_ip(engine, WorkerRequest(), "a")
    cloud.terminate_errors.append(CloudError("RequestLimitExceeded", "slow down"))
    with pytest.raises(Refusal, match=r"^terminate failed: RequestLimitExceeded"):
        await engine.release(ip, "a")
    assert len(cloud.alive()) == 1
    await trio.sleep(61)
    assert cloud.alive() == []


async def test_status_reports_workers_leases_and_totals(
    autojump_clock: MockClock, engine: Engine
) -> None:
    """STATUS carries each worker, each lease and the run rate."""
    ip = await get_ip(engine, WorkerRequest(), "a")
    await trio.sleep(12)
    status = engine.status()
    (worker,) = status["workers"]
    assert worker["ip"] == ip
    assert worker["state"] == "ready"
    assert worker["clients"] == 1
    assert worker["idle_seconds"] == pytest.approx(12, abs=0.01)
    assert worker["price_per_hour"] == 0.5
    assert status["leases"][0]["client"] == "a"
    assert status["totals"]["run_rate_per_hour"] == 0.5
    assert status["totals"]["by_state"]["ready"] == 1


async def test_an_unexpected_error_in_a_launch_is_an_error_reply_not_a_crash(
    autojump_clock: MockClock, engine: Engine, cloud: FakeCloud
) -> None:
    """A bug below the cloud port (here a KeyError) fails that launch only."""
    cloud.launch_errors.append(KeyError("LaunchTime"))
    with pytest.raises(Refusal, match=r"^launch failed: internal error \(logged by the broker\)$"):
        await get_ip(engine, WorkerRequest(), "a")
    assert engine.pool.in_flight == {}
    assert await get_ip(engine, WorkerRequest(), "a")  # the engine still works


async def test_a_ready_worker_that_dies_is_dropped_at_the_next_reaper_pass(
    autojump_clock: MockClock, engine: Engine, cloud: FakeCloud
) -> None:
    """Spot interruption or a manual terminate: the worker is no longer handed out or pinged."""
    ip = await get_ip(engine, WorkerRequest(), "a")
    (instance,) = cloud.instances.values()
    instance.state = "terminated"
    await trio.sleep(61)
    assert engine.pool.workers == {}
    assert engine.pool.leases == {}
    with pytest.raises(WorkerNotFound):
        await engine.ping(ip, "a")
    assert await get_ip(engine, WorkerRequest(), "a") != ip


async def test_an_unknown_tagged_instance_is_adopted_then_reaped_when_idle(
    autojump_clock: MockClock, engine: Engine, cloud: FakeCloud
) -> None:
    """An instance of this pool the broker does not know (a launch cut off at launch_timeout)
    is adopted by the reconciler and terminated after idle_timeout, not left billing."""
    stray = cloud.add_running(SPEC)
    await trio.sleep(61)
    assert list(engine.pool.workers) == [stray.instance_id]
    await trio.sleep(900)
    assert cloud.alive() == []


def exclusive_engine(
    cloud: FakeCloud, clock: Clock, *, per_worker: int, max_workers: int
) -> Engine:
    settings = EngineSettings(
        default_spec=SPEC,
        limits=Limits(max_workers, None, 900.0, clients_per_worker=per_worker),
        describe_interval=2.0,
    )
    return Engine(cloud, settings, clock, PriceTable.default())


async def test_exclusive_mode_gives_each_client_its_own_worker_up_to_max_workers(
    autojump_clock: MockClock, cloud: FakeCloud, clock: Clock
) -> None:
    """40 clients, one worker each, max_workers 10: 10 distinct workers, never shared, at
    most 10 instances; the other 30 get a clear ERROR after their wait."""
    engine = exclusive_engine(cloud, clock, per_worker=1, max_workers=10)
    got: dict[str, str] = {}
    errors: list[str] = []

    async def client(n: int) -> None:
        try:
            got[str(n)] = await get_ip(engine, WorkerRequest(wait=30), str(n))
        except Refusal as exc:
            errors.append(str(exc))

    async with trio.open_nursery() as nursery:
        await nursery.start(engine.run)
        async with trio.open_nursery() as clients:
            for n in range(40):
                clients.start_soon(client, n)
        nursery.cancel_scope.cancel()
    assert len(got) == 10
    assert len(set(got.values())) == 10
    assert len(cloud.instances) == 10
    assert errors == ["no worker free after 30s (max_workers reached (10))"] * 30


async def test_exclusive_mode_launches_enough_for_everyone_waiting(
    autojump_clock: MockClock, cloud: FakeCloud, clock: Clock
) -> None:
    """Three clients per worker: seven clients at once get three workers, spread evenly."""
    engine = exclusive_engine(cloud, clock, per_worker=3, max_workers=10)
    got: list[str] = []

    async def client(n: int) -> None:
        got.append(await get_ip(engine, WorkerRequest(), str(n)))

    async with trio.open_nursery() as nursery:
        await nursery.start(engine.run)
        async with trio.open_nursery() as clients:
            for n in range(7):
                clients.start_soon(client, n)
        nursery.cancel_scope.cancel()
    assert len(cloud.instances) == 3
    assert sorted(got.count(ip) for ip in set(got)) == [2, 2, 3]


async def test_exclusive_holder_asking_again_gets_its_own_worker_back(
    autojump_clock: MockClock, cloud: FakeCloud, clock: Clock
) -> None:
    """A repeated GET_WORKER from a holder refreshes its lease instead of taking another."""
    engine = exclusive_engine(cloud, clock, per_worker=1, max_workers=10)
    async with trio.open_nursery() as nursery:
        await nursery.start(engine.run)
        first = await get_ip(engine, WorkerRequest(), "a")
        assert await get_ip(engine, WorkerRequest(), "a") == first
        assert len(cloud.instances) == 1
        nursery.cancel_scope.cancel()


async def test_a_waiting_client_gets_a_worker_once_a_holder_releases(
    autojump_clock: MockClock, cloud: FakeCloud, clock: Clock
) -> None:
    """At max_workers, a waiter is served after a release frees room."""
    engine = exclusive_engine(cloud, clock, per_worker=1, max_workers=1)
    async with trio.open_nursery() as nursery:
        await nursery.start(engine.run)
        ip = await get_ip(engine, WorkerRequest(), "a")
        got: list[str] = []

        async def waiter() -> None:
            got.append(await get_ip(engine, WorkerRequest(wait=120), "b"))

        nursery.start_soon(waiter)
        await trio.sleep(30)
        assert got == []
        await engine.release(ip, "a")
        with trio.fail_after(60):
            while not got:
                await trio.sleep(1)
        assert got[0] != ip
        nursery.cancel_scope.cancel()


async def test_ended_lease_logs_its_cost(autojump_clock: MockClock, engine: Engine) -> None:
    """lease.ended carries the lease's cost: $0.50/h for two hours is $1."""
    ip = await get_ip(engine, WorkerRequest(), "a")
    for _ in range(12):
        await trio.sleep(600)
        await engine.ping(ip, "a")
    assert engine.status()["leases"][0]["cost_usd"] == pytest.approx(1.0, abs=0.01)
    with structlog.testing.capture_logs() as logs:
        await engine.release(ip, "a")
    (ended,) = [e for e in logs if e["event"] == "lease.ended"]
    assert ended["cost_usd"] == pytest.approx(1.0, abs=0.01)
    assert ended["duration_seconds"] == pytest.approx(7200, abs=60)


def warm_engine(cloud: FakeCloud, clock: Clock, warm: dict[str, object]) -> Engine:
    settings = EngineSettings(
        default_spec=SPEC,
        limits=Limits(10, None, 900.0),
        describe_interval=2.0,
        warm_pool=WarmPoolSchedule.from_dict(warm),
    )
    return Engine(cloud, settings, clock, PriceTable.default())


async def test_warm_pool_is_filled_in_the_background_and_answers_at_once(
    autojump_clock: MockClock, cloud: FakeCloud, clock: Clock
) -> None:
    """min_idle 2: two workers boot before anyone asks; a GET_WORKER then waits 0 s, and the
    pool is refilled to two idle workers, never overshooting."""
    engine = warm_engine(cloud, clock, {"min_idle": 2})
    async with trio.open_nursery() as nursery:
        await nursery.start(engine.run)
        await trio.sleep(30)
        assert [count for _, count, _ in cloud.launch_calls] == [2]
        assert len(engine.pool.idle_ready(SPEC)) == 2
        start = trio.current_time()
        await get_ip(engine, WorkerRequest(), "a")
        assert trio.current_time() == start
        await trio.sleep(30)
        assert [count for _, count, _ in cloud.launch_calls] == [2, 1]
        assert len(engine.pool.idle_ready(SPEC)) == 2
        await trio.sleep(3000)  # idle reaping keeps the warm ones
        assert len(cloud.alive()) == 2
        nursery.cancel_scope.cancel()


async def test_release_returns_a_worker_to_the_warm_pool_instead_of_terminating(
    autojump_clock: MockClock, cloud: FakeCloud, clock: Clock
) -> None:
    """The last holder's RELEASE keeps the worker when the warm pool is short of it."""
    engine = warm_engine(cloud, clock, {"min_idle": 1})
    async with trio.open_nursery() as nursery:
        await nursery.start(engine.run)
        await trio.sleep(30)
        ip = await get_ip(engine, WorkerRequest(), "a")
        await engine.release(ip, "a")  # the refill may be booting: this one stays warm
        assert ip in {w.ip for w in engine.pool.idle_ready(SPEC)}
        nursery.cancel_scope.cancel()


async def test_warm_pool_schedule_switches_at_the_stated_local_times(
    autojump_clock: MockClock, cloud: FakeCloud
) -> None:
    """Weekdays 09:00-18:00 Berlin: 2 warm workers launched at 09:00 local, reaped after
    18:00 + idle_timeout; over a day the refill launches exactly once."""
    # 2026-11-23 is a Monday; start at 08:00 Berlin (07:00 UTC).
    clock = Clock(epoch=datetime(2026, 11, 23, 7, 0, tzinfo=UTC).timestamp())
    cloud.clock = clock
    warm = {
        "timezone": "Europe/Berlin",
        "windows": [{"days": "mon-fri", "from": "09:00", "to": "18:00", "min_idle": 2}],
    }
    engine = warm_engine(cloud, clock, warm)
    async with trio.open_nursery() as nursery:
        await nursery.start(engine.run)
        await trio.sleep(3599)
        assert cloud.launch_calls == []
        await trio.sleep(2)
        assert [count for _, count, _ in cloud.launch_calls] == [2]
        launched_at = min(i.launched_at for i in cloud.instances.values())
        assert datetime.fromtimestamp(launched_at, UTC).strftime("%H:%M") == "08:00"  # 09 local
        await trio.sleep(9 * 3600)  # 18:00 local and past idle_timeout
        assert cloud.alive() == []
        assert len(cloud.launch_calls) == 1
        nursery.cancel_scope.cancel()


async def test_a_restarted_engine_has_the_same_workers_leases_and_idle_clocks(
    autojump_clock: MockClock, cloud: FakeCloud, clock: Clock
) -> None:
    """Everything that matters is in the registry: a new engine on it continues seamlessly."""
    registry = MemoryRegistry("test")
    first = Engine(cloud, make_engine(cloud, clock).settings, clock, PriceTable.default(), registry)
    async with trio.open_nursery() as nursery:
        await nursery.start(first.run)
        ip = await get_ip(first, WorkerRequest(), "a")
        await get_ip(first, WorkerRequest(), "b")
        await trio.sleep(100)
        await first.ping(ip, "b")
        await first.release(ip, "a")
        before = first.status()
        nursery.cancel_scope.cancel()  # the broker dies; the registry and EC2 remain
    await trio.sleep(50)
    second = Engine(cloud, first.settings, clock, PriceTable.default(), registry)
    async with trio.open_nursery() as nursery:
        await nursery.start(second.run)
        after = second.status()
        assert [w["instance_id"] for w in after["workers"]] == [
            w["instance_id"] for w in before["workers"]
        ]
        assert [(le["client"], le["started_at"]) for le in after["leases"]] == [
            (le["client"], le["started_at"]) for le in before["leases"]
        ]
        assert after["workers"][0]["idle_seconds"] == pytest.approx(50)
        assert len(cloud.launch_calls) == 1
        assert await get_ip(second, WorkerRequest(), "b") == ip
        nursery.cancel_scope.cancel()


async def test_a_launch_interrupted_before_its_registry_write_is_adopted_after_restart(
    autojump_clock: MockClock, cloud: FakeCloud, clock: Clock
) -> None:
    """Crash between RunInstances and the registry write: the intent and the instance's
    launch-token tag let the next engine adopt the instance and settle the intent."""
    registry = MemoryRegistry("test")
    token = "crashed-launch"
    await registry.put_intent(LaunchIntent.begin(token, SPEC, 1, clock.now(), ttl=600))
    await cloud.launch(SPEC, 1, token)  # EC2 launched; the broker died before writing it
    engine = Engine(
        cloud, make_engine(cloud, clock).settings, clock, PriceTable.default(), registry
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(engine.run)
        (worker,) = engine.pool.workers.values()
        assert worker.launch_token == token
        assert [r.instance_id for r in await registry.list_workers(clock.now())] == [
            worker.instance_id
        ]
        assert await registry.list_intents(clock.now()) == []
        await get_ip(engine, WorkerRequest(), "a")
        assert len(cloud.launch_calls) == 1
        nursery.cancel_scope.cancel()


class CountingRegistry(MemoryRegistry):
    """A MemoryRegistry that counts lease writes."""

    writes = 0

    async def claim_lease(self, lease: LeaseRecord, capacity: int | None) -> bool:
        self.writes += 1
        return await super().claim_lease(lease, capacity)

    async def touch_lease(
        self, client: str, instance_id: str, now: float, idle_timeout: float
    ) -> bool:
        self.writes += 1
        return await super().touch_lease(client, instance_id, now, idle_timeout)


async def test_a_client_asking_again_and_again_costs_one_write_per_interval(
    autojump_clock: MockClock, cloud: FakeCloud, clock: Clock
) -> None:
    """Warm path: the first GET_WORKER writes the lease; repeats and PINGs within 30 s write
    nothing more; the next one after 30 s writes once."""
    registry = CountingRegistry("test")
    engine = Engine(
        cloud, make_engine(cloud, clock).settings, clock, PriceTable.default(), registry
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(engine.run)
        ip = await get_ip(engine, WorkerRequest(), "a")
        assert registry.writes == 1
        for _ in range(100):
            await get_ip(engine, WorkerRequest(), "a")
            await engine.ping(ip, "a")
            await trio.sleep(0.1)
        assert registry.writes == 1
        await trio.sleep(30)
        await get_ip(engine, WorkerRequest(), "a")
        assert registry.writes == 2
        nursery.cancel_scope.cancel()


async def test_a_local_worker_is_handed_out_first_and_never_terminated(
    autojump_clock: MockClock, cloud: FakeCloud, clock: Clock
) -> None:
    """A declared lab machine goes to the first default request, is not reaped when idle,
    stays after RELEASE, and a request naming a type still gets a cloud worker."""
    settings = attrs.evolve(
        make_engine(cloud, clock).settings, local_workers=(LocalWorker("ws1", "10.1.2.3"),)
    )
    engine = Engine(cloud, settings, clock, PriceTable.default())
    async with trio.open_nursery() as nursery:
        await nursery.start(engine.run)
        assert await get_ip(engine, WorkerRequest(), "a") == "10.1.2.3"
        await engine.release("10.1.2.3", "a")
        await trio.sleep(3000)
        assert await get_ip(engine, WorkerRequest(), "b") == "10.1.2.3"
        assert cloud.launch_calls == []
        cloud_ip = await get_ip(engine, WorkerRequest(instance_type="c7i.8xlarge"), "c")
        assert cloud_ip != "10.1.2.3"
        assert engine.status()["totals"]["workers"] == 2
        nursery.cancel_scope.cancel()


async def test_prefer_local_off_hands_out_cloud_workers_first(
    autojump_clock: MockClock, cloud: FakeCloud, clock: Clock
) -> None:
    """With prefer_local false, a ready cloud worker wins over an idle local one."""
    cloud.add_running(SPEC)
    settings = attrs.evolve(
        make_engine(cloud, clock).settings,
        local_workers=(LocalWorker("ws1", "10.1.2.3"),),
        prefer_local=False,
    )
    engine = Engine(cloud, settings, clock, PriceTable.default())
    async with trio.open_nursery() as nursery:
        await nursery.start(engine.run)
        assert await get_ip(engine, WorkerRequest(), "a") != "10.1.2.3"
        nursery.cancel_scope.cancel()


def replicas(
    cloud: FakeCloud, clock: Clock, settings: EngineSettings, count: int = 2
) -> tuple[MemoryRegistry, list[Engine]]:
    """`count` engines sharing one registry and one cloud, as replicas share DynamoDB and EC2."""
    registry = MemoryRegistry("test")
    engines = [Engine(cloud, settings, clock, PriceTable.default(), registry) for _ in range(count)]
    return registry, engines


async def test_replicas_a_lease_kept_alive_through_the_other_replica_is_not_reaped(
    autojump_clock: MockClock, cloud: FakeCloud, clock: Clock
) -> None:
    """Alice gets a worker from A and pings only through B: A must not expire her lease or
    reap the worker, however idle it looks from A."""
    registry, (a, b) = replicas(cloud, clock, make_engine(cloud, clock).settings)
    async with trio.open_nursery() as nursery:
        await nursery.start(a.run)
        await nursery.start(b.run)
        ip = await get_ip(a, WorkerRequest(), "alice")
        await trio.sleep(61)  # B learns the worker and the lease at its reconciliation
        for _ in range(30):
            await b.ping(ip, "alice")
            await trio.sleep(60)
        assert len(cloud.alive()) == 1
        assert [lease.client for lease in await registry.list_leases(clock.now())] == ["alice"]
        nursery.cancel_scope.cancel()


async def test_replicas_release_on_one_keeps_a_worker_held_through_the_other(
    autojump_clock: MockClock, cloud: FakeCloud, clock: Clock
) -> None:
    """Shared mode: alice (via A) and bob (via B) hold one worker; alice's RELEASE on A does
    not terminate it, because the registry still counts bob."""
    registry, (a, b) = replicas(cloud, clock, make_engine(cloud, clock).settings)
    async with trio.open_nursery() as nursery:
        await nursery.start(a.run)
        ip = await get_ip(a, WorkerRequest(), "alice")
        await nursery.start(b.run)  # B restores the worker from the registry
        assert await get_ip(b, WorkerRequest(), "bob") == ip
        await a.release(ip, "alice")
        assert len(cloud.alive()) == 1
        assert (await registry.get_worker(next(iter(a.pool.workers)))) is not None
        await b.release(ip, "bob")
        assert cloud.alive() == []
        nursery.cancel_scope.cancel()


async def test_replicas_together_never_exceed_max_workers(
    autojump_clock: MockClock, cloud: FakeCloud, clock: Clock
) -> None:
    """Exclusive mode, max_workers 3, two engines, 10 clients each: 3 instances at most."""
    settings = exclusive_engine(cloud, clock, per_worker=1, max_workers=3).settings
    _, engines = replicas(cloud, clock, settings)
    served: list[str] = []

    async def client(engine: Engine, n: int) -> None:
        try:
            served.append(await get_ip(engine, WorkerRequest(wait=60), f"c{n}"))
        except Refusal:
            pass

    async with trio.open_nursery() as nursery:
        for engine in engines:
            await nursery.start(engine.run)
        async with trio.open_nursery() as clients:
            for n in range(20):
                clients.start_soon(client, engines[n % 2], n)
        nursery.cancel_scope.cancel()
    assert len(cloud.instances) <= 3
    assert len(served) == len(set(served)) == 3


async def test_replicas_do_not_both_fill_the_warm_pool(
    autojump_clock: MockClock, cloud: FakeCloud, clock: Clock
) -> None:
    """min_idle 2 on two replicas: the second one counts the first's launch and idle
    workers in the registry and launches nothing."""
    _, (a, b) = replicas(cloud, clock, warm_engine(cloud, clock, {"min_idle": 2}).settings)
    async with trio.open_nursery() as nursery:
        await nursery.start(a.run)
        await trio.sleep(1)  # A's launch intent is in the registry
        await nursery.start(b.run)
        await trio.sleep(120)
        assert sum(count for _, count, _ in cloud.launch_calls) == 2
        await trio.sleep(3000)
        assert len(cloud.alive()) == 2
        nursery.cancel_scope.cancel()
