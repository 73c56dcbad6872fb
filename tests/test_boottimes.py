"""Boot times (broker/boottimes.py): the describe schedule spends its checks where the learned
boots say `running` is likely, as plain code. (The boot watcher using it, on MockClock:
tests/test_bootwatch.py.)"""

from __future__ import annotations

import itertools
import math
import random
import statistics

from broker.boottimes import FAST, GAP, BootPlan, BootTimes, next_check

BOOT = 15.0  # seconds from launch to running, as on EC2
INTERVAL = 2.0  # the shipped describe_interval


def checks_until(plan: BootPlan | None, until: float) -> list[float]:
    """Every planned check up to `until` seconds after launch."""
    times, t = [], 0.0
    while t < until:
        t = next_check(t, plan, INTERVAL)
        times.append(t)
    return times


def simulate(boots: list[float], offset: float = 0.1) -> tuple[list[float], list[int]]:
    """Launches one after another, each learning from those before as the boot watcher does;
    each one's wait after running and its checks. `offset`: the instance starts booting this
    long after the broker's RunInstances answer."""
    times = BootTimes()
    waits, calls = [], []
    for boot in boots:
        running = boot + offset
        plan = times.plan("c7i.8xlarge")
        t = pending = 0.0
        n = 0
        while t < running:
            pending = t
            t = next_check(t, plan, INTERVAL)
            n += 1
        times.observe("c7i.8xlarge", times.estimate("c7i.8xlarge", pending, t))
        waits.append(t - running)
        calls.append(n)
    return waits, calls


def polls(running: float) -> int:
    """The checks polling every describe_interval from the launch makes up to `running`."""
    return math.floor(running / INTERVAL) + 1


def test_unseen_types_are_polled_a_little_faster_than_every_half_describe_interval() -> None:
    """Before any boot of the type was seen (and no hint): every 0.45 describe_interval, so
    even the first boot is seen within 0.9 s of running (shipped interval: 2 s)."""
    checks = [round(next_check(t, None, 2.0), 3) for t in (0.0, 0.85, 0.9, 5.5)]
    assert checks == [0.9, 0.9, 1.8, 6.3]


def test_the_hint_is_planned_for_until_a_boot_is_seen() -> None:
    """The sandbox's hint stands in for the boots of a type never seen."""
    times = BootTimes(hint=3.0)
    assert BootPlan(3.0, 3.0, 3.0, 1) == times.plan("c7i.8xlarge")
    times.observe("c7i.8xlarge", 15.0)
    assert BootPlan(15.0, 15.0, 15.0, 1) == times.plan("c7i.8xlarge")
    assert BootPlan(3.0, 3.0, 3.0, 1) == times.plan("m7i.large")


def test_the_plan_spans_quantiles_so_one_outlier_does_not_stretch_it() -> None:
    """Twenty boots, 14.0 to 15.8 s, then a 60 s one: the window opens and turns dense near
    the recent boots and ends at the third-slowest; the 60 s boot does not widen it."""
    times = BootTimes()
    for seconds in [14.0 + 0.1 * i for i in range(19)] + [60.0]:
        times.observe("c7i.8xlarge", seconds)
    plan = times.plan("c7i.8xlarge")
    assert plan is not None
    assert (round(plan.early, 2), round(plan.likely, 2), round(plan.late, 2)) == (14.8, 15.4, 15.8)


def test_the_window_opens_where_the_recent_boots_are() -> None:
    """Nineteen boots of 16 s, then one of 12 s: the next window opens at 12 s (the recent
    boot weighs a sixth), though the dense part stays at 16 s."""
    times = BootTimes()
    for seconds in [16.0] * 19 + [12.0]:
        times.observe("c7i.8xlarge", seconds)
    plan = times.plan("c7i.8xlarge")
    assert plan is not None
    assert (plan.early, plan.likely) == (12.0, 16.0)


def test_checks_are_sparse_far_off_and_dense_where_boots_are_likely() -> None:
    """A check every GAP long before the window, at most 2 FAST apart from its start, FAST
    apart from the likely quantile, then doubling gaps back to describe_interval."""
    plan = BootPlan(early=14.0, likely=15.0, late=16.0, samples=10)
    times = checks_until(plan, 30.0)
    assert [t for t in times if t < plan.early] == [GAP]
    gaps = {a: round(b - a, 3) for a, b in itertools.pairwise(times)}
    early = [gap for t, gap in gaps.items() if plan.early <= t < plan.likely]
    assert max(early) <= 2 * FAST
    assert len(early) < (plan.likely - plan.early) / FAST
    assert {gap for t, gap in gaps.items() if plan.likely <= t < plan.late} == {FAST}
    after = [gap for t, gap in gaps.items() if t >= plan.late + FAST]
    assert after == sorted(after)
    assert after[-1] == INTERVAL


def test_a_boot_in_the_window_is_seen_within_fast_and_one_after_within_a_doubling_gap() -> None:
    """Planned 14-16 s: a boot at 15.3 s is seen within FAST; at 17 s, past the window, within
    2 FAST."""
    plan = BootPlan(early=14.0, likely=15.0, late=16.0, samples=10)
    times = checks_until(plan, 20.0)
    assert min(t for t in times if t >= 15.3) - 15.3 <= FAST
    end = 16.0 + FAST + 2.0 / 10
    assert min(t for t in times if t >= end + 0.01) - end <= 2 * FAST + 1e-9


def test_a_wide_spread_widens_the_gaps_not_the_calls() -> None:
    """Boots planned anywhere from 5 s to 40 s: the window holds no more than twice what
    polling every describe_interval spends on a boot at its center."""
    plan = BootPlan(early=5.0, likely=10.0, late=40.0, samples=20)
    window = plan.window(INTERVAL)
    assert len(window) <= 2 * (5.0 + 40.0) / 2 / INTERVAL + 3


def test_ec2_like_boots_cost_fewer_describes_than_polling_and_wait_under_a_third() -> None:
    """Ten brokers, forty launches each booting in 16 s (sd 1.5 s), each learning from those
    before: median wait after running <= 0.3 s (one broker's may be a little above), and
    fewer checks than polling every 2 s."""
    waits, calls, polling = [], [], []
    for seed in range(10):
        rng = random.Random(seed)
        boots = [max(8.0, rng.gauss(16.0, 1.5)) for _ in range(40)]
        more_waits, more_calls = simulate(boots)
        waits += more_waits
        calls += more_calls
        polling += [polls(b + 0.1) for b in boots]
    assert statistics.median(waits) <= 0.3
    assert statistics.mean(calls) < 0.85 * statistics.mean(polling)


def test_the_cold_benchmarks_boots_are_seen_soon_with_fewer_describes_than_polling() -> None:
    """bench/cold.py's eight launches (5 to 6.75 s, each later than all before: the hardest
    order for a learned plan): median <= 0.3 s, max <= 1 s, fewer checks than the seed's
    polling (one describe at once, then every 2 s)."""
    boots = [5.0 + 2.0 * i / 8 for i in range(8)]
    waits, calls = simulate(boots, offset=0.02)
    assert statistics.median(waits) <= 0.3
    assert max(waits) <= 1.0
    assert statistics.mean(calls) < statistics.mean(polls(b + 0.02) + 1 for b in boots)
