"""The hand-out room (broker/handout.py): GET_WORKER, PING and RELEASE; waiting, claiming,
refreshing and ending leases. On Trio's MockClock with an in-memory cloud."""

from __future__ import annotations

import pytest
import structlog
import trio
from trio.testing import MockClock

from broker.clock import Clock
from broker.engine import Engine, Refusal, WorkerNotFound
from broker.memory_registry import MemoryRegistry
from broker.model import LocalWorker, WorkerRequest
from broker.registry import LeaseRecord
from broker.schedule import WarmPoolSchedule
from tests.engines import BIG, SPEC, get_ip, make_engine, running
from tests.fakes import FakeCloud


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


async def test_wait_bounds_one_request_and_the_launch_carries_on(
    autojump_clock: MockClock, engine: Engine, cloud: FakeCloud
) -> None:
    """wait=5 gives up after 5 s; the worker it started is handed to the next request."""
    with pytest.raises(Refusal, match=r"^no worker ready after 5s$"):
        await get_ip(engine, WorkerRequest(wait=5), "a")
    ip = await get_ip(engine, WorkerRequest(), "b")
    assert ip
    assert len(cloud.launch_calls) == 1


async def test_shutdown_answers_waiting_requests(autojump_clock: MockClock, engine: Engine) -> None:
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


# --- PING ------------------------------------------------------------------------------------


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


class CountingRegistry(MemoryRegistry):
    """A MemoryRegistry that counts lease and activity writes."""

    writes = 0

    async def update_worker_activity(
        self, instance_id: str, now: float, *, expires_at: float | None = None
    ) -> bool:
        self.writes += 1
        return await super().update_worker_activity(instance_id, now, expires_at=expires_at)

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
    engine = make_engine(cloud, clock, registry)
    async with running(engine):
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


# --- RELEASE ---------------------------------------------------------------------------------


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


async def test_release_returns_a_worker_to_the_warm_pool_instead_of_terminating(
    autojump_clock: MockClock, cloud: FakeCloud, clock: Clock
) -> None:
    """The last holder's RELEASE keeps the worker when the warm pool is short of it."""
    engine = make_engine(cloud, clock, warm_pool=WarmPoolSchedule.from_dict({"min_idle": 1}))
    async with running(engine):
        await trio.sleep(30)
        ip = await get_ip(engine, WorkerRequest(), "a")
        await engine.release(ip, "a")  # the refill may be booting: this one stays warm
        assert ip in {w.ip for w in engine.pool.idle_ready(SPEC)}


async def test_replicas_release_on_one_keeps_a_worker_held_through_the_other(
    autojump_clock: MockClock, cloud: FakeCloud, clock: Clock
) -> None:
    """Shared mode: alice (via A) and bob (via B) hold one worker; alice's RELEASE on A does
    not terminate it, because the registry still counts bob."""
    registry = MemoryRegistry("test")
    a, b = make_engine(cloud, clock, registry), make_engine(cloud, clock, registry)
    async with running(a):
        ip = await get_ip(a, WorkerRequest(), "alice")
        async with running(b):  # B restores the worker from the registry
            assert await get_ip(b, WorkerRequest(), "bob") == ip
            await a.release(ip, "alice")
            assert len(cloud.alive()) == 1
            assert (await registry.get_worker(next(iter(a.pool.workers)))) is not None
            await b.release(ip, "bob")
            assert cloud.alive() == []


# --- exclusive mode (clients_per_worker) -----------------------------------------------------


async def test_exclusive_mode_gives_each_client_its_own_worker_up_to_max_workers(
    autojump_clock: MockClock, cloud: FakeCloud, clock: Clock
) -> None:
    """40 clients, one worker each, max_workers 10: 10 distinct workers, never shared, at
    most 10 instances; the other 30 get a clear ERROR after their wait."""
    engine = make_engine(cloud, clock, clients_per_worker=1, max_workers=10)
    got: dict[str, str] = {}
    errors: list[str] = []

    async def client(n: int) -> None:
        try:
            got[str(n)] = await get_ip(engine, WorkerRequest(wait=30), str(n))
        except Refusal as exc:
            errors.append(str(exc))

    async with running(engine), trio.open_nursery() as clients:
        for n in range(40):
            clients.start_soon(client, n)
    assert len(got) == 10
    assert len(set(got.values())) == 10
    assert len(cloud.instances) == 10
    assert errors == ["no worker free after 30s (max_workers reached (10))"] * 30


async def test_exclusive_holder_asking_again_gets_its_own_worker_back(
    autojump_clock: MockClock, cloud: FakeCloud, clock: Clock
) -> None:
    """A repeated GET_WORKER from a holder refreshes its lease instead of taking another."""
    engine = make_engine(cloud, clock, clients_per_worker=1)
    async with running(engine):
        first = await get_ip(engine, WorkerRequest(), "a")
        assert await get_ip(engine, WorkerRequest(), "a") == first
        assert len(cloud.instances) == 1


async def test_a_waiting_client_gets_a_worker_once_a_holder_releases(
    autojump_clock: MockClock, cloud: FakeCloud, clock: Clock
) -> None:
    """At max_workers, a waiter is served after a release frees room."""
    engine = make_engine(cloud, clock, clients_per_worker=1, max_workers=1)
    got: list[str] = []

    async def waiter() -> None:
        got.append(await get_ip(engine, WorkerRequest(wait=120), "b"))

    async with running(engine), trio.open_nursery() as nursery:
        ip = await get_ip(engine, WorkerRequest(), "a")
        nursery.start_soon(waiter)
        await trio.sleep(30)
        assert got == []
        await engine.release(ip, "a")
    assert len(got) == 1
    assert got[0] != ip


# --- local workers ---------------------------------------------------------------------------


async def test_a_local_worker_is_handed_out_first_and_never_terminated(
    autojump_clock: MockClock, cloud: FakeCloud, clock: Clock
) -> None:
    """A declared lab machine goes to the first default request, is not reaped when idle,
    stays after RELEASE, and a request naming a type still gets a cloud worker."""
    engine = make_engine(cloud, clock, local_workers=(LocalWorker("ws1", "10.1.2.3"),))
    async with running(engine):
        assert await get_ip(engine, WorkerRequest(), "a") == "10.1.2.3"
        await engine.release("10.1.2.3", "a")
        await trio.sleep(3000)
        assert await get_ip(engine, WorkerRequest(), "b") == "10.1.2.3"
        assert cloud.launch_calls == []
        cloud_ip = await get_ip(engine, WorkerRequest(instance_type="c7i.8xlarge"), "c")
        assert cloud_ip != "10.1.2.3"
        assert engine.status()["totals"]["workers"] == 2


async def test_prefer_local_off_hands_out_cloud_workers_first(
    autojump_clock: MockClock, cloud: FakeCloud, clock: Clock
) -> None:
    """With prefer_local false, a ready cloud worker wins over an idle local one."""
    cloud.add_running(SPEC)
    engine = make_engine(
        cloud, clock, local_workers=(LocalWorker("ws1", "10.1.2.3"),), prefer_local=False
    )
    async with running(engine):
        assert await get_ip(engine, WorkerRequest(), "a") != "10.1.2.3"


class SlowClaims(MemoryRegistry):
    """A MemoryRegistry whose lease claims take `seconds` (a slow DynamoDB write)."""

    def __init__(self, seconds: float) -> None:
        super().__init__("test")
        self.seconds = seconds

    async def claim_lease(self, lease: LeaseRecord, capacity: int | None) -> bool:
        await trio.sleep(self.seconds)
        return await super().claim_lease(lease, capacity)


async def test_a_waiter_claiming_a_worker_does_not_make_another_waiter_launch_again(
    autojump_clock: MockClock, cloud: FakeCloud, clock: Clock
) -> None:
    """Two clients wait for two launches (exclusive workers). The first launch's worker
    goes to one of them; while its lease is written, the other must keep waiting for the
    second launch, not count the first client as still waiting and launch a third."""
    engine = make_engine(cloud, clock, SlowClaims(1.0), clients_per_worker=1)
    got: dict[str, str] = {}

    async def client(name: str) -> None:
        got[name] = await get_ip(engine, WorkerRequest(), name)

    async with running(engine), trio.open_nursery() as clients:
        clients.start_soon(client, "a")
        await trio.sleep(1.0)
        clients.start_soon(client, "b")
    assert len(set(got.values())) == 2
    assert len(cloud.instances) == 2  # one launch per client, none wasted


async def test_a_worker_found_within_the_wait_is_claimed_to_the_end(
    autojump_clock: MockClock, cloud: FakeCloud, clock: Clock
) -> None:
    """wait=23 with a 20 s boot and 5 s lease claims: the worker is found within the wait, and
    the claim is not cut off halfway when the wait runs out (which left a lease the refused
    client never learned of, and made the next client launch again): the client gets it."""
    engine = make_engine(cloud, clock, SlowClaims(5.0), clients_per_worker=1)
    async with running(engine):
        start = trio.current_time()
        ip = await get_ip(engine, WorkerRequest(wait=23), "a")
        assert 23 < trio.current_time() - start < 26  # the claim's 5 s after the boot's 20
        [(client, instance_id)] = engine.pool.leases
        assert client == "a" and engine.pool.workers[instance_id].ip == ip
        assert len(cloud.instances) == 1
