"""Boot times (broker/boottimes.py): the describe schedule tightens around each type's learned
boot time, as plain code. (The boot watcher using it, on MockClock: tests/test_bootwatch.py.)"""

from __future__ import annotations

from broker.boottimes import FAST, GAP, LEAD, BootTimes, next_check

BOOT = 15.0  # seconds from launch to running, as on EC2


def test_unlearned_types_are_polled_every_describe_interval() -> None:
    """Before any boot of the type was seen (and no hint): every describe_interval."""
    assert [next_check(t, None, 2.0) for t in (0.0, 1.9, 2.0, 5.5)] == [2.0, 2.0, 4.0, 6.0]


def test_the_schedule_tightens_around_the_expected_boot() -> None:
    """Sparse checks while far off, fast ones from just before the expected boot time, then
    doubling gaps up to describe_interval."""
    times, t = [], 0.0
    while t < BOOT + 6:
        t = next_check(t, BOOT, 2.0)
        times.append(round(t, 2))
    start = BOOT - LEAD
    assert times[0] == GAP
    assert times[1] == 2 * GAP
    assert start in times
    assert round(start + FAST, 2) in times
    assert times[-1] - times[-2] == 2.0
    seen = min(x for x in times if x >= BOOT)
    assert seen - BOOT <= FAST
    assert len([x for x in times if x <= seen]) <= BOOT / 2.0 + 1  # no more than polling


def test_boot_times_plan_for_a_low_quantile_of_what_was_seen() -> None:
    """The plan is the lower quartile of the boots seen (a fast check too many is cheap);
    the hint stands in until the first one."""
    times = BootTimes(hint=3.0)
    assert times.expected("c7i.8xlarge") == 3.0
    for seconds in (16.0, 15.2, 15.6, 30.0, 15.4):
        times.observe("c7i.8xlarge", seconds)
    assert times.expected("c7i.8xlarge") == 15.4
    assert times.expected("m7i.large") == 3.0


def test_a_boot_later_than_planned_is_seen_within_a_doubling_gap() -> None:
    """Planned for 59 s, booted at 60 s (just after the fast window): the next checks come
    at doubling gaps, so it is seen within half a second, not at the next 2 s poll."""
    times, t = [], 0.0
    while t < 64:
        t = next_check(t, 59.0, 2.0)
        times.append(round(t, 2))
    seen = min(x for x in times if x >= 60.0)
    assert seen - 60.0 <= 0.5
    assert times[-1] - times[-2] == 2.0  # back to describe_interval
