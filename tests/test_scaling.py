"""The scaling room (broker/scaling.py): the warm pool's refill and bursting on the job queue.
`warm_counts` as plain code; the loops on Trio's MockClock with an in-memory cloud and queue.
tests/test_scaling_aws.py has bursting on moto's SQS."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import trio
from trio.testing import MockClock

from broker.burst import BurstPolicy
from broker.clock import Clock
from broker.memory_registry import MemoryRegistry
from broker.model import LaunchSpec, Market, WorkerRequest, WorkerState
from broker.registry import LaunchIntent, Provider, WorkerRecord
from broker.scaling import warm_counts
from broker.schedule import WarmPoolSchedule
from tests.engines import BIG, SPEC, T0, get_ip, make_engine, running
from tests.fakes import FakeCloud, FakeQueue

# --- warm_counts: the warm pool across replicas, from the registry ---------------------------


def record(
    n: int,
    state: WorkerState = WorkerState.READY,
    *,
    holders: int = 0,
    spec: LaunchSpec = SPEC,
    provider: Provider = Provider.EC2,
) -> WorkerRecord:
    return WorkerRecord(
        instance_id=f"i-{n}",
        provider=provider,
        ip=f"192.0.2.{n}",
        instance_type=spec.instance_type,
        market=spec.market,
        state=state,
        launched_at=T0,
        last_activity=T0,
        price_per_hour=0.5,
        launch_token=None,
        holders=holders,
    )


def intent(token: str, count: int, spec: LaunchSpec = SPEC) -> LaunchIntent:
    return LaunchIntent.begin(token, spec, count, T0, ttl=600)


def test_warm_counts_counts_ready_cloud_workers_of_the_spec_nobody_holds_as_idle() -> None:
    """Idle across replicas: ready, unheld, EC2, and of a type and market the spec accepts;
    held, local, terminating and other offerings' workers are not."""
    records = [
        record(1),
        record(2),
        record(3, holders=1),
        record(4, provider=Provider.LOCAL),
        record(5, WorkerState.TERMINATING),
        record(6, spec=BIG),
        record(7, spec=LaunchSpec("c7i.8xlarge", Market.ON_DEMAND)),
    ]
    assert warm_counts(records, [], SPEC, idle=0, launching=0) == (2, 0)


def test_warm_counts_accepts_the_specs_fallback_types() -> None:
    """A worker of a fallback type counts for a spec that accepts it."""
    spec = LaunchSpec("c7i.8xlarge", Market.SPOT, fallback_types=("c6i.8xlarge",))
    records = [record(1, spec=LaunchSpec("c6i.8xlarge", Market.SPOT))]
    assert warm_counts(records, [], spec, idle=0, launching=0) == (1, 0)


def test_warm_counts_counts_booting_workers_and_unanswered_intents_as_launching() -> None:
    """Launching across replicas: workers still booting plus every instance an intent (written
    before RunInstances, deleted once it answers) still asks for, of the spec only."""
    records = [record(1, WorkerState.LAUNCHING), record(2, WorkerState.LAUNCHING, spec=BIG)]
    intents = [intent("a", 2), intent("b", 1), intent("c", 5, spec=BIG)]
    assert warm_counts(records, intents, SPEC, idle=0, launching=0) == (0, 4)


def test_warm_counts_never_count_less_than_the_local_view() -> None:
    """The registry may lag this replica (a launch answered, its record not written yet):
    each count is at least what the pool here sees."""
    assert warm_counts([], [], SPEC, idle=2, launching=3) == (2, 3)
    shared = warm_counts([record(1), record(2)], [intent("a", 1)], SPEC, idle=1, launching=0)
    assert shared == (2, 1)


# --- the warm pool ---------------------------------------------------------------------------


def warm(schedule: dict[str, Any]) -> WarmPoolSchedule:
    return WarmPoolSchedule.from_dict(schedule)


async def test_warm_pool_is_filled_in_the_background_and_answers_at_once(
    autojump_clock: MockClock, cloud: FakeCloud, clock: Clock
) -> None:
    """min_idle 2: two workers boot before anyone asks; a GET_WORKER then waits 0 s, and the
    pool is refilled to two idle workers, never overshooting."""
    engine = make_engine(cloud, clock, warm_pool=warm({"min_idle": 2}))
    async with running(engine):
        await trio.sleep(30)
        assert [count for _, count, _ in cloud.launch_calls] == [2]
        assert len(engine.pool.idle_ready(SPEC)) == 2
        start = trio.current_time()
        await get_ip(engine, WorkerRequest(), "a")
        assert trio.current_time() == start
        await trio.sleep(30)
        assert [count for _, count, _ in cloud.launch_calls] == [2, 1]
        assert cloud.requested_by == ["warm-pool", "warm-pool"]
        assert len(engine.pool.idle_ready(SPEC)) == 2
        await trio.sleep(3000)  # idle reaping keeps the warm ones
        assert len(cloud.alive()) == 2


async def test_warm_pool_schedule_switches_at_the_stated_local_times(
    autojump_clock: MockClock,
) -> None:
    """Weekdays 09:00-18:00 Berlin: 2 warm workers launched at 09:00 local, reaped after
    18:00 + idle_timeout; over a day the refill launches exactly once."""
    # 2026-11-23 is a Monday; start at 08:00 Berlin (07:00 UTC).
    clock = Clock(epoch=datetime(2026, 11, 23, 7, 0, tzinfo=UTC).timestamp())
    cloud = FakeCloud(clock, boot_time=20.0)
    schedule = {
        "timezone": "Europe/Berlin",
        "windows": [{"days": "mon-fri", "from": "09:00", "to": "18:00", "min_idle": 2}],
    }
    engine = make_engine(cloud, clock, warm_pool=warm(schedule))
    async with running(engine):
        await trio.sleep(3599)
        assert cloud.launch_calls == []
        await trio.sleep(2)
        assert [count for _, count, _ in cloud.launch_calls] == [2]
        launched_at = min(i.launched_at for i in cloud.instances.values())
        assert datetime.fromtimestamp(launched_at, UTC).strftime("%H:%M") == "08:00"  # 09 local
        await trio.sleep(9 * 3600)  # 18:00 local and past idle_timeout
        assert cloud.alive() == []
        assert len(cloud.launch_calls) == 1


async def test_replicas_do_not_both_fill_the_warm_pool(
    autojump_clock: MockClock, cloud: FakeCloud, clock: Clock
) -> None:
    """min_idle 2 on two replicas: the second one counts the first's launch and idle
    workers in the registry and launches nothing."""
    registry = MemoryRegistry("test")
    a, b = (make_engine(cloud, clock, registry, warm_pool=warm({"min_idle": 2})) for _ in "ab")
    async with running(a):
        await trio.sleep(1)  # A's launch intent is in the registry
        async with running(b):
            await trio.sleep(120)
            assert sum(count for _, count, _ in cloud.launch_calls) == 2
            await trio.sleep(3000)
            assert len(cloud.alive()) == 2


# --- bursting on the job queue ---------------------------------------------------------------

BURST = {
    "mode": "auto",
    "queue_url": "https://sqs.example/queue",
    "queue_depth_threshold": 20,
    "max_cloud_instances": 10,
    "scale_down_delay": "5m",
    "check_interval": "1m",
}


async def test_queue_depth_drives_launches_and_idleness_drives_scale_down(
    autojump_clock: MockClock, cloud: FakeCloud, clock: Clock
) -> None:
    """Depth 150 (threshold 20, 10 jobs a worker): 10 workers in one launch (the per-check
    cap); after the queue drains, unheld workers go 5 a check once idle for 5 minutes since
    their last activity; a worker someone holds is never terminated."""
    queue = FakeQueue(150)
    engine = make_engine(
        cloud,
        clock,
        queue=queue,
        max_workers=20,
        idle_timeout=3600.0,
        burst=BurstPolicy.from_dict(BURST),
    )
    async with running(engine):  # first check at once: launch at t=0, ready at ~t=20
        await trio.sleep(61)
        assert [count for _, count, _ in cloud.launch_calls] == [10]
        await trio.sleep(60)
        held = await get_ip(engine, WorkerRequest(), "alice")
        queue.messages = 0
        await trio.sleep(2 * 60)  # t=241: idle ~220 s < scale_down_delay: nothing yet
        assert len(cloud.alive()) == 10
        await trio.sleep(150)  # t=391: the check at t=360 took the first 5 (5 a check)
        assert len(cloud.alive()) == 5
        await trio.sleep(5 * 60)
        alive = [i for i in cloud.instances.values() if i.state != "terminated"]
        assert [i.ip for i in alive] == [held]


async def test_manual_mode_never_bursts(
    autojump_clock: MockClock, cloud: FakeCloud, clock: Clock
) -> None:
    """mode: manual reads no depth and launches nothing, however deep the queue."""
    engine = make_engine(
        cloud,
        clock,
        queue=FakeQueue(10_000),
        max_workers=20,
        idle_timeout=3600.0,
        burst=BurstPolicy.from_dict({**BURST, "mode": "manual"}),
    )
    async with running(engine):
        await trio.sleep(600)
        assert cloud.launch_calls == []
