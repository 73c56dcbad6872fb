"""SQS bursting as plain code: the scale-up and scale-down formulas, caps, parsing, profiles."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import attrs
import pytest
import trio
from trio.testing import MockClock

from broker.burst import (
    BURST_POLICY_EXAMPLE,
    PROFILES,
    BurstDecision,
    BurstPolicy,
    BurstPolicyError,
    WorkerView,
    decide,
    workers_needed,
)
from broker.clock import Clock
from broker.values import parse_duration

NOW = 1_800_000_000.0
QUEUE = "https://sqs.us-east-1.amazonaws.com/123456789012/lab-jobs"
AUTO = BurstPolicy(mode="auto", queue_url=QUEUE)


def cloud(
    count: int, *, idle_for: float = 3600.0, held: bool = False, prefix: str = "i-"
) -> list[WorkerView]:
    """`count` cloud workers whose last activity was `idle_for` seconds before NOW."""
    return [
        WorkerView(f"{prefix}{index:03d}", False, held, NOW - idle_for, 0.20)
        for index in range(count)
    ]


def local(count: int) -> list[WorkerView]:
    """`count` local lab workers, idle for a day."""
    return [
        WorkerView(f"local:lab{index}", True, False, NOW - 86400.0, None) for index in range(count)
    ]


# --- scale up ---------------------------------------------------------------------------------


def test_needed_is_depth_over_jobs_per_worker_plus_one() -> None:
    """The guide's needed_total = depth / 10 + 1, and an empty queue needs none."""
    assert [workers_needed(depth, 10) for depth in (0, 1, 9, 10, 150, 500)] == [0, 1, 1, 2, 16, 51]
    assert workers_needed(150, 25) == 7


def test_guide_log_example_launches_per_the_formula() -> None:
    """Depth 150 with 2 local and 5 cloud: needed 16, so 16 - 7 = 9 launch (the guide's log
    line says 8, its formula 9; the formula wins)."""
    decision = decide(AUTO, 150, local(2) + cloud(5), NOW)
    assert decision.launch == 9
    assert decision.terminate == ()
    assert "needs 16" in decision.reason
    assert "launching 9" in decision.reason


def test_launching_workers_count_against_the_need() -> None:
    """Workers already launching are not launched again on the next check."""
    assert decide(AUTO, 150, local(2) + cloud(5), NOW, launching=9).launch == 0
    assert decide(AUTO, 150, local(2) + cloud(5), NOW, launching=4).launch == 5


def test_jobs_per_worker_changes_the_need() -> None:
    """With 25 jobs per worker, depth 150 needs 7 in all."""
    policy = attrs.evolve(AUTO, jobs_per_worker=25)
    assert decide(policy, 150, local(2) + cloud(2), NOW).launch == 3


def test_scale_up_is_capped_per_check() -> None:
    """Depth 500 on an empty pool needs 51 but launches max_launch_per_check (10) at a time."""
    decision = decide(AUTO, 500, [], NOW)
    assert decision.launch == 10
    assert "max_launch_per_check 10" in decision.reason
    assert decide(attrs.evolve(AUTO, max_launch_per_check=3), 500, [], NOW).launch == 3


def test_scale_up_never_passes_max_cloud_instances() -> None:
    """Cloud plus launching workers stay within max_cloud_instances; local ones do not count."""
    policy = attrs.evolve(AUTO, max_cloud_instances=20)
    decision = decide(policy, 500, local(3) + cloud(15), NOW, launching=3)
    assert decision.launch == 2
    assert "max_cloud_instances 20" in decision.reason
    assert decide(policy, 500, cloud(20), NOW).launch == 0


def test_scale_up_never_passes_the_cost_budget() -> None:
    """The guide's example: $5/h at $0.20/h each fits 25 workers; 20 running leave room for 5."""
    policy = attrs.evolve(AUTO, cost_budget=5.0, max_cloud_instances=100)
    decision = decide(policy, 500, cloud(20), NOW, run_rate=4.0, price_per_hour=0.20)
    assert decision.launch == 5
    assert "cost_budget $5/h" in decision.reason
    assert decide(policy, 500, [], NOW, run_rate=0.0, price_per_hour=0.20).launch == 10
    assert decide(policy, 500, cloud(25), NOW, run_rate=5.0, price_per_hour=0.20).launch == 0


def test_budget_over_float_prices_is_exact() -> None:
    """Thirty workers at $0.1/h fit a $3/h budget exactly; float rounding does not drop one."""
    policy = attrs.evolve(AUTO, cost_budget=3.0, max_launch_per_check=50)
    assert decide(policy, 500, [], NOW, run_rate=0.0, price_per_hour=0.1).launch == 30
    assert decide(policy, 500, [], NOW, run_rate=0.3, price_per_hour=0.1).launch == 27


def test_budget_with_unknown_price_launches_nothing() -> None:
    """With a cost_budget, a new worker of unknown price is not launched, and the log says why."""
    policy = attrs.evolve(AUTO, cost_budget=10.0)
    decision = decide(policy, 500, [], NOW, price_per_hour=None)
    assert decision == BurstDecision(0, (), decision.reason)
    assert "price unknown" in decision.reason
    assert decide(AUTO, 500, [], NOW, price_per_hour=None).launch == 10  # no budget, no need


def test_depth_at_the_threshold_does_not_scale_up() -> None:
    """Scale-up needs depth strictly above queue_depth_threshold."""
    assert decide(AUTO, 100, [], NOW).launch == 0
    assert decide(AUTO, 101, [], NOW).launch == 10


# --- scale down -------------------------------------------------------------------------------


def test_guide_log_example_scales_down_five_per_check() -> None:
    """Depth 20 with 13 idle cloud workers: needed 3, excess 10, at most 5 terminated."""
    decision = decide(AUTO, 20, local(2) + cloud(13), NOW)
    assert decision.launch == 0
    assert len(decision.terminate) == 5
    assert "10 excess" in decision.reason


def test_scale_down_waits_for_scale_down_delay_since_last_activity() -> None:
    """Workers idle for less than scale_down_delay stay; at exactly the delay they may go."""
    assert decide(AUTO, 0, cloud(3, idle_for=299.0), NOW).terminate == ()
    assert len(decide(AUTO, 0, cloud(3, idle_for=300.0), NOW).terminate) == 3


def test_old_worker_active_recently_is_kept() -> None:
    """The delay counts from last activity, not launch: a day-old worker used a minute ago stays."""
    old_but_busy = WorkerView("i-old", False, False, NOW - 60.0, 0.20)
    young_but_idle = WorkerView("i-young", False, False, NOW - 400.0, 0.20)
    decision = decide(AUTO, 0, [old_but_busy, young_but_idle], NOW)
    assert decision.terminate == ("i-young",)


def test_held_workers_are_never_terminated() -> None:
    """A worker someone holds stays however long it has been idle."""
    held = cloud(3, held=True, idle_for=86400.0, prefix="i-held")
    free = cloud(1, prefix="i-free")
    assert decide(AUTO, 0, held + free, NOW).terminate == ("i-free000",)
    assert decide(AUTO, 0, held, NOW).terminate == ()


def test_local_workers_are_never_terminated() -> None:
    """Local workers count as capacity but are never chosen for termination."""
    assert decide(AUTO, 0, local(4), NOW).terminate == ()


def test_longest_idle_goes_first() -> None:
    """With room for two, the two workers idle longest are terminated."""
    workers = [
        WorkerView("i-a", False, False, NOW - 400.0, 0.2),
        WorkerView("i-b", False, False, NOW - 9000.0, 0.2),
        WorkerView("i-c", False, False, NOW - 700.0, 0.2),
    ]
    policy = attrs.evolve(AUTO, max_terminate_per_check=2)
    assert decide(policy, 0, workers, NOW).terminate == ("i-b", "i-c")


def test_scale_down_keeps_min_cloud_instances() -> None:
    """Never below min_cloud_instances, however idle the workers are."""
    policy = attrs.evolve(AUTO, min_cloud_instances=5)
    assert len(decide(policy, 0, cloud(6), NOW).terminate) == 1
    assert decide(policy, 0, cloud(5), NOW).terminate == ()


def test_scale_down_keeps_the_needed_workers() -> None:
    """Depth 40 (< 50) needs 5: of 7 idle cloud workers only 2 go."""
    assert len(decide(AUTO, 40, cloud(7), NOW).terminate) == 2


def test_empty_queue_scales_to_zero() -> None:
    """With min_cloud_instances 0 and an empty queue, every idle cloud worker may go."""
    assert len(decide(AUTO, 0, cloud(4), NOW).terminate) == 4


def test_between_the_thresholds_nothing_happens() -> None:
    """From threshold / 2 up to the threshold the pool holds, idle workers included."""
    for depth in (50, 75, 100):
        decision = decide(AUTO, depth, cloud(12), NOW)
        assert (decision.launch, decision.terminate) == (0, ())
        assert "holding" in decision.reason


def test_min_cloud_instances_are_launched_in_any_band() -> None:
    """Auto mode tops the cloud workers up to min_cloud_instances, launching ones included."""
    policy = attrs.evolve(AUTO, min_cloud_instances=5)
    assert decide(policy, 0, cloud(2), NOW).launch == 3
    assert decide(policy, 75, cloud(2), NOW, launching=1).launch == 2
    decision = decide(policy, 0, [], NOW)
    assert decision.launch == 5
    assert "min_cloud_instances 5" in decision.reason


def test_manual_mode_never_acts() -> None:
    """Manual mode launches and terminates nothing, whatever the depth."""
    policy = attrs.evolve(AUTO, mode="manual", min_cloud_instances=3)
    for depth in (0, 500):
        decision = decide(policy, depth, cloud(4), NOW)
        assert (decision.launch, decision.terminate) == (0, ())
        assert "manual" in decision.reason


# --- parsing ----------------------------------------------------------------------------------


def test_default_is_manual_with_the_guides_numbers() -> None:
    """The default policy is manual, with the guide's reference values."""
    assert BurstPolicy.from_dict({}) == BurstPolicy.default()
    assert BurstPolicy.default() == BurstPolicy(
        "manual", None, 100, 0, 50, 10, None, 300.0, 60.0, 10, 5
    )


def test_documented_example_parses() -> None:
    """The example mapping parses with durations as seconds."""
    policy = BurstPolicy.from_dict(BURST_POLICY_EXAMPLE)
    assert policy == BurstPolicy(
        mode="auto",
        queue_url=BURST_POLICY_EXAMPLE["queue_url"],
        max_cloud_instances=20,
        cost_budget=10.0,
        scale_down_delay=300.0,
        check_interval=60.0,
    )


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("5m", 300.0), ("2m", 120.0), ("30s", 30.0), ("1h", 3600.0), (90, 90.0), ("1.5h", 5400.0)],
)
def test_durations_accept_numbers_and_units(text: Any, seconds: float) -> None:
    """Durations are numbers of seconds or strings with s, m, h or d."""
    assert parse_duration(text) == seconds
    policy = BurstPolicy.from_dict({"scale_down_delay": text, "check_interval": text})
    assert (policy.scale_down_delay, policy.check_interval) == (seconds, seconds)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"mode": "automatic"}, "mode: must be manual or auto (got 'automatic')"),
        ({"mode": "auto"}, "queue_url: required when mode is auto"),
        ({"queue_url": ""}, "queue_url: must be an SQS queue URL (got '')"),
        (
            {"queue_depth_treshold": 5},
            "queue_depth_treshold: unknown key (did you mean queue_depth_threshold?)",
        ),
        ({"queue_depth_threshold": 0}, "queue_depth_threshold: must be an integer >= 1 (got 0)"),
        ({"max_cloud_instances": -1}, "max_cloud_instances: must be an integer >= 0 (got -1)"),
        ({"min_cloud_instances": True}, "min_cloud_instances: must be an integer >= 0 (got true)"),
        ({"jobs_per_worker": 2.5}, "jobs_per_worker: must be an integer >= 1 (got 2.5)"),
        (
            {"min_cloud_instances": 6, "max_cloud_instances": 5},
            "min_cloud_instances: must be <= max_cloud_instances (5) (got 6)",
        ),
        (
            {"cost_budget": 0},
            "cost_budget: must be a cost in $/hour > 0, or null for no budget (got 0)",
        ),
        (
            {"cost_budget": "10$"},
            "cost_budget: must be a cost in $/hour > 0, or null for no budget (got '10$')",
        ),
        (
            {"scale_down_delay": "5 minutes"},
            "scale_down_delay: must be a duration >= 0 like 5m or 300 (got '5 minutes')",
        ),
        ({"check_interval": 0}, "check_interval: must be a duration > 0 like 5m or 300 (got 0)"),
        (
            {"max_launch_per_check": 0},
            "max_launch_per_check: must be an integer >= 1 (got 0)",
        ),
        ([], "must be a mapping with mode, queue_url, thresholds and caps (got [])"),
    ],
)
def test_bad_values_name_their_key(data: Any, message: str) -> None:
    """Every rejected value names its key and shows what was given."""
    with pytest.raises(BurstPolicyError) as caught:
        BurstPolicy.from_dict(data)
    assert str(caught.value) == message
    assert isinstance(caught.value, ValueError)


def test_error_has_path_and_problem() -> None:
    """The error's path and problem are separate, for the config layer to prefix."""
    with pytest.raises(BurstPolicyError) as caught:
        BurstPolicy.from_dict({"mode": "auto", "queue_url": QUEUE, "scale_down_delay": -5})
    assert caught.value.path == ("scale_down_delay",)
    assert caught.value.problem == "must be a duration >= 0 like 5m or 300 (got -5)"


def test_guide_launch_keys_point_at_the_pool_settings() -> None:
    """The guide's instance_type under burst_policy is refused with where it belongs instead."""
    with pytest.raises(BurstPolicyError) as caught:
        BurstPolicy.from_dict({"instance_type": "c5.4xlarge"})
    assert caught.value.path == ("instance_type",)
    assert "pool's launch settings" in caught.value.problem


def test_profiles_carry_the_guides_tuning_parameters() -> None:
    """The three tuning profiles hold the guide's values and defaults elsewhere."""
    assert sorted(PROFILES) == ["cost-optimized", "high-throughput", "low-latency"]
    high, cheap, warm = (
        PROFILES["high-throughput"],
        PROFILES["cost-optimized"],
        PROFILES["low-latency"],
    )
    assert (high.queue_depth_threshold, high.max_cloud_instances, high.scale_down_delay) == (
        200,
        100,
        120.0,
    )
    assert (cheap.queue_depth_threshold, cheap.max_cloud_instances) == (50, 10)
    assert (cheap.scale_down_delay, cheap.min_cloud_instances) == (600.0, 0)
    assert (warm.min_cloud_instances, warm.queue_depth_threshold) == (5, 10)
    assert warm.scale_down_delay == 1800.0
    for policy in PROFILES.values():
        assert policy.mode == "auto"
        assert (policy.check_interval, policy.jobs_per_worker, policy.cost_budget) == (
            60.0,
            10,
            None,
        )


# --- simulated on Trio's MockClock ------------------------------------------------------------

BOOT_SECONDS = 60.0  # a launched worker takes jobs one minute after the launch
LOCAL_WORKERS = 4


def depth_trace(peak: int, ramp_minutes: int) -> list[int]:
    """Queue depth per minute: 0 to `peak`, hold, back to 0, each over `ramp_minutes`, then 0."""
    up = [round(peak * minute / ramp_minutes) for minute in range(ramp_minutes)]
    down = [round(peak * (ramp_minutes - minute) / ramp_minutes) for minute in range(ramp_minutes)]
    return [*up, *[peak] * ramp_minutes, *down, *[0] * (ramp_minutes + 1)]


def arrivals_for(trace: Sequence[int], local_jobs_per_minute: int) -> list[int]:
    """Jobs submitted per minute so that the local workers alone would see exactly `trace`."""
    arrivals = []
    for now, then in itertools.pairwise(trace):
        submitted = then - now + local_jobs_per_minute if now or then else 0
        assert submitted >= 0, "the trace falls faster than the local workers drain it"
        arrivals.append(submitted)
    return arrivals


@attrs.define
class SimWorker:
    """A simulated worker: ready (takes jobs) from `ready_at`, last busy at `last_activity`."""

    instance_id: str
    local: bool
    ready_at: float
    last_activity: float


@attrs.define
class SimResult:
    """What a simulated run saw."""

    drained_at: float | None = None
    peak_cloud: int = 0
    final_depth: int = -1
    final_cloud: int = -1
    depths: list[int] = attrs.field(factory=list)  # after each check interval
    over_cap: list[tuple[float, int]] = attrs.field(factory=list)
    # (time of the termination, seconds since the worker last had work)
    terminations: list[tuple[float, float]] = attrs.field(factory=list)


async def simulate(policy: BurstPolicy, arrivals: Sequence[int], minutes: int) -> SimResult:
    """Check every check_interval on MockClock; workers do jobs_per_worker jobs a minute each."""
    clock = Clock(epoch=NOW)
    step = policy.check_interval
    workers = [SimWorker(f"local:lab{n}", True, NOW, NOW) for n in range(LOCAL_WORKERS)]
    result, depth, launched = SimResult(), 0, 0
    for index in range(int(minutes * 60 / step)):
        now = clock.now()
        ready = [worker for worker in workers if worker.ready_at <= now]
        views = [WorkerView(w.instance_id, w.local, False, w.last_activity, 0.2) for w in ready]
        launching = len(workers) - len(ready)
        decision = decide(policy, depth, views, now, launching=launching)
        for instance_id in decision.terminate:
            (gone,) = [worker for worker in ready if worker.instance_id == instance_id]
            assert not gone.local
            result.terminations.append((now, now - gone.last_activity))
            workers.remove(gone)
            ready.remove(gone)
        for _ in range(decision.launch):
            launched += 1
            ready_at = now + BOOT_SECONDS
            workers.append(SimWorker(f"i-{launched:04d}", False, ready_at, ready_at))
        cloud_count = sum(1 for worker in workers if not worker.local)
        result.peak_cloud = max(result.peak_cloud, cloud_count)
        if cloud_count > policy.max_cloud_instances:
            result.over_cap.append((now, cloud_count))
        minute = int(index * step // 60)
        depth += arrivals[minute] if minute < len(arrivals) else 0
        capacity = int(len(ready) * policy.jobs_per_worker * step / 60)
        done = min(depth, capacity)
        depth -= done
        result.depths.append(depth)
        if done:  # every ready worker takes jobs while the queue has work
            for worker in ready:
                worker.last_activity = now + step
            if depth == 0:
                result.drained_at = now + step
        await trio.sleep(step)
    result.final_depth = depth
    result.final_cloud = sum(1 for worker in workers if not worker.local)
    return result


@pytest.mark.parametrize("profile", sorted(PROFILES))
async def test_profile_drains_the_queue_and_scales_down_after_the_delay(
    profile: str, autojump_clock: MockClock
) -> None:
    """20 minutes of 200 jobs/min (more than the lab and the warm pool do) drain, stay under
    max_cloud_instances, and only workers idle for scale_down_delay are terminated."""
    policy = attrs.evolve(PROFILES[profile], queue_url=QUEUE)
    arrivals = [200] * 20
    minutes = 60 + int(policy.scale_down_delay // 60) + 15
    start = trio.current_time()
    result = await simulate(policy, arrivals, minutes)
    assert trio.current_time() - start == minutes * 60  # simulated, on the mock clock
    assert result.final_depth == 0
    assert result.drained_at is not None
    assert result.drained_at < NOW + 60 * 60
    assert result.over_cap == []
    assert result.peak_cloud > policy.min_cloud_instances  # it did burst
    assert result.terminations, "it scaled down"
    assert all(idle >= policy.scale_down_delay for _, idle in result.terminations)
    first_termination = min(when for when, _ in result.terminations)
    assert first_termination >= result.drained_at + policy.scale_down_delay
    assert result.final_cloud == policy.min_cloud_instances


async def test_trace_model_reproduces_the_trace_for_the_lab_alone(
    autojump_clock: MockClock,
) -> None:
    """In manual mode the local workers alone see the depth trace minute by minute."""
    trace = depth_trace(500, 15)
    arrivals = arrivals_for(trace, LOCAL_WORKERS * 10)
    assert sum(arrivals) == 1800
    result = await simulate(BurstPolicy.default(), arrivals, len(arrivals))
    assert [0, *result.depths] == trace


async def test_busy_workers_outlive_the_delay(autojump_clock: MockClock) -> None:
    """Workers kept busy for longer than scale_down_delay are not terminated while busy."""
    policy = attrs.evolve(PROFILES["high-throughput"], queue_url=QUEUE)
    # 30 minutes of steady load above the threshold, then nothing.
    arrivals = [300] + [150] * 30
    result = await simulate(policy, arrivals, 50)
    assert result.drained_at is not None
    assert all(
        when >= result.drained_at + policy.scale_down_delay for when, _ in result.terminations
    )
    assert result.final_cloud == 0
