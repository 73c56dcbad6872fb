"""The warm pool schedule as plain code: parsing, windows, time zones, changes, refills."""

from __future__ import annotations

import datetime as dt
import random
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import trio
from trio.testing import MockClock

from broker.clock import Clock
from broker.schedule import (
    ALL_DAYS,
    WARM_POOL_EXAMPLE,
    ScheduleError,
    WarmPoolSchedule,
    Window,
    refill_count,
    warm_pool_kind_check,
)

UTC = dt.UTC
BERLIN = ZoneInfo("Europe/Berlin")
NEW_YORK = ZoneInfo("America/New_York")


def utc(text: str) -> float:
    """Unix seconds of an ISO time given in UTC."""
    return dt.datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


def local(text: str, zone: ZoneInfo, fold: int = 0) -> float:
    """Unix seconds of an ISO wall time in `zone`."""
    return dt.datetime.fromisoformat(text).replace(tzinfo=zone, fold=fold).timestamp()


def shown(now: float | None) -> str | None:
    """A Unix time as UTC ISO text, for readable asserts."""
    if now is None:
        return None
    return dt.datetime.fromtimestamp(now, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def schedule(
    *windows: dict[str, Any], timezone: str = "UTC", min_idle: int = 0
) -> WarmPoolSchedule:
    """A schedule from window mappings, through the config path."""
    data = {"timezone": timezone, "min_idle": min_idle, "windows": list(windows)}
    return WarmPoolSchedule.from_dict(data)


def window(days: Any, start: Any, end: Any, min_idle: int) -> dict[str, Any]:
    return {"days": days, "from": start, "to": end, "min_idle": min_idle}


# --- parsing ----------------------------------------------------------------------------------


def test_documented_example_parses_to_a_weekday_window() -> None:
    """The docstring's example is Berlin, weekdays 09:00-18:00 at 2, otherwise 0."""
    parsed = warm_pool_kind_check(WARM_POOL_EXAMPLE)
    assert parsed == WarmPoolSchedule(
        "Europe/Berlin", 0, (Window(frozenset(range(5)), dt.time(9), dt.time(18), 2),)
    )


def test_empty_mapping_is_the_default_schedule() -> None:
    """An empty warm_pool mapping means UTC, min_idle 0, no windows."""
    assert WarmPoolSchedule.from_dict({}) == WarmPoolSchedule.default()
    assert WarmPoolSchedule.default() == WarmPoolSchedule("UTC", 0, ())


def test_days_default_to_daily() -> None:
    """A window without days runs every day."""
    parsed = schedule({"from": "09:00", "to": "10:00", "min_idle": 1})
    assert parsed.windows[0].days == ALL_DAYS


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ([], "must be a mapping with timezone, min_idle, windows (got [])"),
        (None, "must be a mapping with timezone, min_idle, windows (got null)"),
        ({"windoes": []}, "windoes: unknown key (did you mean windows?)"),
        ({"zz": 1}, "zz: unknown key (known: timezone, min_idle, windows)"),
        (
            {"timezone": "Mars/Base"},
            "timezone: must be an IANA time zone name like Europe/Berlin or UTC (got 'Mars/Base')",
        ),
        (
            {"timezone": "../etc/passwd"},
            "timezone: must be an IANA time zone name like Europe/Berlin or UTC "
            "(got '../etc/passwd')",
        ),
        (
            {"timezone": ""},
            "timezone: must be an IANA time zone name like Europe/Berlin or UTC (got '')",
        ),
        ({"min_idle": -1}, "min_idle: must be an integer >= 0 (got -1)"),
        ({"min_idle": True}, "min_idle: must be an integer >= 0 (got true)"),
        ({"min_idle": "2"}, "min_idle: must be an integer >= 0 (got '2')"),
        ({"windows": "mon-fri"}, "windows: must be a list of windows (got 'mon-fri')"),
        (
            {"windows": ["mon-fri"]},
            "windows[0]: must be a mapping with days, from, to, min_idle (got 'mon-fri')",
        ),
        (
            {"windows": [window("sat", "09:00", "10:00", 1), {"form": "09:00"}]},
            "windows[1].form: unknown key (did you mean from?)",
        ),
        ({"windows": [{"from": "09:00", "min_idle": 1}]}, "windows[0].to: required"),
        ({"windows": [{"from": "09:00", "to": "10:00"}]}, "windows[0].min_idle: required"),
        (
            {"windows": [window("daily", "9am", "18:00", 2)]},
            "windows[0].from: must be HH:MM (got '9am')",
        ),
        (
            {"windows": [window("daily", "09:00", 1080, 2)]},
            "windows[0].to: must be HH:MM in quotes (got 1080: YAML reads an unquoted 18:00 as a "
            'number; write "18:00")',
        ),
        (
            {"windows": [window("daily", "09:00", 1440, 2)]},
            "windows[0].to: must be HH:MM in quotes (got 1440: YAML reads an unquoted 24:00 as a "
            'number; write "24:00")',
        ),
        (
            {"windows": [window("daily", "24:00", "18:00", 2)]},
            "windows[0].from: must be HH:MM (got '24:00')",
        ),
        (
            {"windows": [window("daily", "09:00", "24:01", 2)]},
            "windows[0].to: must be HH:MM (up to 24:00) (got '24:01')",
        ),
        (
            {"windows": [window("daily", "09:60", "18:00", 2)]},
            "windows[0].from: must be HH:MM (got '09:60')",
        ),
        (
            {"windows": [window("daily", "09:00:00", "18:00", 2)]},
            "windows[0].from: must be HH:MM (got '09:00:00')",
        ),
        (
            {"windows": [window("daily", None, "18:00", 2)]},
            "windows[0].from: must be HH:MM (got null)",
        ),
        (
            {"windows": [window("daily", "09:00", "18:00", -2)]},
            "windows[0].min_idle: must be an integer >= 0 (got -2)",
        ),
        (
            {"windows": [window("monday", "09:00", "18:00", 2)]},
            "windows[0].days: must be days like mon-fri, sat,sun or daily (got 'monday')",
        ),
        (
            {"windows": [window("mon-", "09:00", "18:00", 2)]},
            "windows[0].days: must be days like mon-fri, sat,sun or daily (got 'mon-')",
        ),
        (
            {"windows": [window("mon,,fri", "09:00", "18:00", 2)]},
            "windows[0].days: must be days like mon-fri, sat,sun or daily (got 'mon,,fri')",
        ),
        (
            {"windows": [window("", "09:00", "18:00", 2)]},
            "windows[0].days: must be days like mon-fri, sat,sun or daily (got '')",
        ),
        (
            {"windows": [window([], "09:00", "18:00", 2)]},
            "windows[0].days: must be days like mon-fri, sat,sun or daily (got [])",
        ),
        (
            {"windows": [window(["sat", 7], "09:00", "18:00", 2)]},
            "windows[0].days[1]: must be days like mon-fri, sat,sun or daily (got 7)",
        ),
    ],
)
def test_invalid_config_names_the_sub_key_path(data: Any, message: str) -> None:
    """Each invalid warm_pool config is one ValueError line naming the path below the key."""
    with pytest.raises(ValueError) as caught:
        warm_pool_kind_check(data)
    assert str(caught.value) == message


def test_error_carries_path_and_problem_for_the_config_schema() -> None:
    """A ScheduleError exposes the path steps and the problem, so config.py can prefix its key."""
    with pytest.raises(ScheduleError) as caught:
        warm_pool_kind_check({"windows": [window("daily", "9am", "18:00", 2)]})
    assert caught.value.path == ("windows", 0, "from")
    assert caught.value.problem == "must be HH:MM (got '9am')"


@pytest.mark.parametrize(
    ("days", "expected"),
    [
        ("mon-fri", {0, 1, 2, 3, 4}),
        ("sat,sun", {5, 6}),
        ("daily", set(range(7))),
        ("mon-sun", set(range(7))),
        ("sun", {6}),
        ("fri-mon", {4, 5, 6, 0}),
        ("Mon-Wed, Fri", {0, 1, 2, 4}),
        (["sat", "sun"], {5, 6}),
        (["mon-tue", "thu"], {0, 1, 3}),
    ],
)
def test_day_specs(days: Any, expected: set[int]) -> None:
    """Day names, ranges (wrapping past Sunday), lists and daily give Monday-0 weekdays."""
    assert schedule(window(days, "09:00", "10:00", 1)).windows[0].days == frozenset(expected)


# --- windows ----------------------------------------------------------------------------------


def test_start_is_inclusive_and_end_exclusive() -> None:
    """A 09:00-18:00 window holds at 09:00:00 and no longer at 18:00:00."""
    weekdays = schedule(window("mon-fri", "09:00", "18:00", 2), min_idle=1)
    # 2026-01-05 is a Monday.
    assert weekdays.min_idle_at(utc("2026-01-05T08:59:59")) == 1
    assert weekdays.min_idle_at(utc("2026-01-05T09:00:00")) == 2
    assert weekdays.min_idle_at(utc("2026-01-05T17:59:59.5")) == 2
    assert weekdays.min_idle_at(utc("2026-01-05T18:00:00")) == 1
    assert weekdays.min_idle_at(utc("2026-01-10T10:00:00")) == 1  # Saturday


def test_window_crossing_midnight_belongs_to_its_start_day() -> None:
    """fri 22:00-06:00 runs Friday night into Saturday morning, not Thursday into Friday."""
    night = schedule(window("fri", "22:00", "06:00", 3))
    # 2026-01-09 is a Friday.
    assert night.min_idle_at(utc("2026-01-09T21:59:59")) == 0
    assert night.min_idle_at(utc("2026-01-09T22:00:00")) == 3
    assert night.min_idle_at(utc("2026-01-10T05:59:59")) == 3
    assert night.min_idle_at(utc("2026-01-10T06:00:00")) == 0
    assert night.min_idle_at(utc("2026-01-09T05:00:00")) == 0  # Thursday's night is not in it
    assert night.min_idle_at(utc("2026-01-10T23:00:00")) == 0


def test_end_of_day_and_24_hour_windows() -> None:
    """to 24:00 ends at midnight; to equal to from is 24 hours."""
    evening = schedule(window("mon", "18:00", "24:00", 1))
    assert evening.min_idle_at(utc("2026-01-05T23:59:59")) == 1
    assert evening.min_idle_at(utc("2026-01-06T00:00:00")) == 0
    whole = schedule(window("mon", "09:00", "09:00", 1))
    assert whole.min_idle_at(utc("2026-01-06T08:59:59")) == 1
    assert whole.min_idle_at(utc("2026-01-06T09:00:00")) == 0


def test_first_matching_window_wins() -> None:
    """Overlapping windows: the earlier one in the list decides."""
    office = window("mon-fri", "09:00", "18:00", 2)
    always = window("daily", "00:00", "24:00", 1)
    office_first = schedule(office, always)
    assert office_first.min_idle_at(utc("2026-01-05T10:00")) == 2
    assert office_first.min_idle_at(utc("2026-01-05T20:00")) == 1
    assert office_first.min_idle_at(utc("2026-01-10T10:00")) == 1
    always_first = schedule(always, office)
    assert always_first.min_idle_at(utc("2026-01-05T10:00")) == 1


# --- time zones and clock changes -------------------------------------------------------------


def test_berlin_window_follows_local_time_in_winter_and_summer() -> None:
    """09:00 Berlin is 08:00 UTC in January and 07:00 UTC in July."""
    office = schedule(window("mon-fri", "09:00", "18:00", 2), timezone="Europe/Berlin")
    assert office.min_idle_at(utc("2026-01-05T07:59:59")) == 0
    assert office.min_idle_at(utc("2026-01-05T08:00:00")) == 2
    assert office.min_idle_at(utc("2026-01-05T17:00:00")) == 0
    assert office.min_idle_at(utc("2026-07-06T06:59:59")) == 0
    assert office.min_idle_at(utc("2026-07-06T07:00:00")) == 2
    assert office.min_idle_at(utc("2026-07-06T16:00:00")) == 0


@pytest.mark.parametrize(
    ("timezone", "before", "switch_day", "after", "changes"),
    [
        # Europe: 2026-03-29 02:00 CET -> 03:00 CEST; 2026-10-25 03:00 CEST -> 02:00 CET.
        (
            "Europe/Berlin",
            "2026-03-28T12:00",
            "sun",
            "spring",
            ["2026-03-29T07:00:00Z", "2026-03-29T16:00:00Z"],
        ),
        (
            "Europe/Berlin",
            "2026-10-24T12:00",
            "sun",
            "fall",
            ["2026-10-25T08:00:00Z", "2026-10-25T17:00:00Z"],
        ),
        # US: 2026-03-08 02:00 EST -> 03:00 EDT; 2026-11-01 02:00 EDT -> 01:00 EST.
        (
            "America/New_York",
            "2026-03-07T12:00",
            "sun",
            "spring",
            ["2026-03-08T13:00:00Z", "2026-03-08T22:00:00Z"],
        ),
        (
            "America/New_York",
            "2026-10-31T12:00",
            "sun",
            "fall",
            ["2026-11-01T14:00:00Z", "2026-11-01T23:00:00Z"],
        ),
    ],
)
def test_nine_to_six_on_the_day_clocks_change(
    timezone: str, before: str, switch_day: str, after: str, changes: list[str]
) -> None:
    """A 09:00-18:00 window on the day of a clock change runs 09:00-18:00 local."""
    office = schedule(window(switch_day, "09:00", "18:00", 2), timezone=timezone)
    first = office.next_change_after(utc(before))
    assert first is not None
    assert [shown(first), shown(office.next_change_after(first))] == changes


def test_berlin_night_window_across_the_switch_is_shorter_or_longer() -> None:
    """01:00-05:00 local is 3 real hours on the spring day and 5 on the fall day."""
    night = schedule(window("sun", "01:00", "05:00", 1), timezone="Europe/Berlin")
    spring = night.next_change_after(utc("2026-03-28T12:00"))
    assert shown(spring) == "2026-03-29T00:00:00Z"
    assert shown(night.next_change_after(spring or 0)) == "2026-03-29T03:00:00Z"
    fall = night.next_change_after(utc("2026-10-24T12:00"))
    assert shown(fall) == "2026-10-24T23:00:00Z"
    assert shown(night.next_change_after(fall or 0)) == "2026-10-25T04:00:00Z"


def test_start_in_the_spring_gap_is_the_first_instant_after_it() -> None:
    """02:30 does not exist on 2026-03-29 in Berlin: the window starts at 03:00 CEST."""
    gap = schedule(window("sun", "02:30", "04:00", 1), timezone="Europe/Berlin")
    assert gap.min_idle_at(utc("2026-03-29T00:59:59")) == 0
    assert gap.min_idle_at(utc("2026-03-29T01:00:00")) == 1  # 03:00 CEST
    assert gap.min_idle_at(utc("2026-03-29T02:00:00")) == 0  # 04:00 CEST
    assert shown(gap.next_change_after(utc("2026-03-28T12:00"))) == "2026-03-29T01:00:00Z"


def test_end_in_the_spring_gap_is_the_first_instant_after_it() -> None:
    """A window ending at 02:30 on the spring day in New York ends at 03:00 EDT."""
    gap = schedule(window("sun", "01:00", "02:30", 1), timezone="America/New_York")
    assert gap.min_idle_at(local("2026-03-08T01:59:59", NEW_YORK)) == 1
    assert gap.min_idle_at(utc("2026-03-08T07:00:00")) == 0  # 03:00 EDT
    assert shown(gap.next_change_after(utc("2026-03-08T06:30"))) == "2026-03-08T07:00:00Z"


def test_repeated_fall_time_means_its_first_occurrence() -> None:
    """On 2026-10-25 in Berlin 02:30 happens twice: a window from or to it uses the first."""
    starts = schedule(window("sun", "02:30", "04:00", 1), timezone="Europe/Berlin")
    assert starts.min_idle_at(utc("2026-10-25T00:29:59")) == 0
    assert starts.min_idle_at(utc("2026-10-25T00:30:00")) == 1  # 02:30 CEST
    assert starts.min_idle_at(utc("2026-10-25T02:59:59")) == 1  # 03:59:59 CET
    assert starts.min_idle_at(utc("2026-10-25T03:00:00")) == 0
    ends = schedule(window("sun", "01:00", "02:30", 1), timezone="Europe/Berlin")
    assert ends.min_idle_at(local("2026-10-25T02:29:59", BERLIN, fold=0)) == 1
    assert ends.min_idle_at(local("2026-10-25T02:00:00", BERLIN, fold=1)) == 0  # second pass


def test_new_york_fall_back_hour_counts_twice_inside_a_window() -> None:
    """01:30-02:30 New York on 2026-11-01 spans 01:30 EDT to 02:30 EST: two real hours."""
    fall = schedule(window("sun", "01:30", "02:30", 1), timezone="America/New_York")
    start = fall.next_change_after(utc("2026-10-31T12:00"))
    assert shown(start) == "2026-11-01T05:30:00Z"
    assert fall.min_idle_at(local("2026-11-01T01:30:00", NEW_YORK, fold=1)) == 1
    assert shown(fall.next_change_after(start or 0)) == "2026-11-01T07:30:00Z"


# --- next_change_after ------------------------------------------------------------------------


def test_schedules_that_never_change_have_no_next_change() -> None:
    """No windows, windows equal to the default, or a window that is always on: None."""
    now = utc("2026-05-01T12:00")
    assert WarmPoolSchedule.default().next_change_after(now) is None
    assert schedule(window("mon-fri", "09:00", "18:00", 0)).next_change_after(now) is None
    always = schedule(window("daily", "00:00", "24:00", 2), timezone="Europe/Berlin")
    assert always.next_change_after(now) is None
    assert always.min_idle_at(now) == 2


def test_adjacent_windows_with_equal_min_idle_are_one_stretch() -> None:
    """09:00-12:00 and 12:00-18:00 at 2 change at 18:00, not at noon."""
    split = schedule(window("mon-fri", "09:00", "12:00", 2), window("mon-fri", "12:00", "18:00", 2))
    assert shown(split.next_change_after(utc("2026-01-05T10:00"))) == "2026-01-05T18:00:00Z"


def test_next_change_a_week_away() -> None:
    """A Sunday-only window seen from just after it changes next Sunday."""
    sunday = schedule(window("sun", "10:00", "11:00", 1), timezone="Europe/Berlin")
    assert shown(sunday.next_change_after(utc("2026-01-04T10:00"))) == "2026-01-11T09:00:00Z"


PROPERTY_SCHEDULES = [
    schedule(
        window("mon-fri", "09:00", "18:00", 2),
        window("fri", "22:00", "06:00", 1),
        window("sun", "02:30", "04:00", 3),
        window("sun", "01:00", "02:30", 1),
        timezone="Europe/Berlin",
    ),
    schedule(
        window("mon-thu", "08:00", "12:00", 1),
        window("mon-thu", "11:00", "20:00", 4),
        window("sat,sun", "01:30", "02:15", 2),
        window("daily", "23:00", "01:45", 1),
        timezone="America/New_York",
        min_idle=1,
    ),
]
QUARTER_HOUR = 900.0  # every boundary above falls on one in these zones


@pytest.mark.parametrize("warm", PROPERTY_SCHEDULES)
def test_min_idle_is_constant_until_next_change_and_changes_there(warm: WarmPoolSchedule) -> None:
    """For random times in 2026: constant on [t, next_change_after(t)), different at it."""
    rng = random.Random(20260329)
    start, end = utc("2026-01-01T00:00"), utc("2027-01-01T00:00")
    times = [rng.uniform(start, end) for _ in range(120)]
    times += [
        utc(f"{day}T{hour}")
        for day in ("2026-03-29", "2026-10-25", "2026-03-08", "2026-11-01")
        for hour in ("00:00", "01:00", "05:30", "06:15", "07:00")
    ]
    for now in times:
        change = warm.next_change_after(now)
        assert change is not None and change > now
        value = warm.min_idle_at(now)
        assert warm.min_idle_at(change) != value, shown(now)
        assert warm.min_idle_at(change - 0.001) == value, shown(now)
        step = (now // QUARTER_HOUR + 1) * QUARTER_HOUR
        while step < change:
            assert warm.min_idle_at(step) == value, (shown(now), shown(step))
            step += QUARTER_HOUR


# --- refills ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("min_idle", "idle_ready", "launching", "room", "expected"),
    [
        (2, 0, 0, 10, 2),  # empty pool: launch the whole target
        (2, 1, 0, 10, 1),  # one is warm already
        (2, 0, 1, 10, 1),  # one is on its way
        (2, 3, 0, 10, 0),  # above target: never negative
        (0, 0, 0, 10, 0),  # no warm pool
        (5, 0, 0, 3, 3),  # max_workers / budget room caps it
        (5, 0, 0, 0, 0),
        (5, 0, 0, -2, 0),  # over the cap already (e.g. max_workers lowered)
    ],
)
def test_refill_count(
    min_idle: int, idle_ready: int, launching: int, room: int, expected: int
) -> None:
    """Launch what reaches min_idle counting ready and launching workers, within the room."""
    assert refill_count(min_idle, idle_ready, launching, room) == expected


def test_second_refill_while_the_first_is_launching_launches_nothing() -> None:
    """The first pass launches the shortfall; a pass during those launches adds none."""
    first = refill_count(2, idle_ready=0, launching_unleased=0, room=10)
    assert first == 2
    assert refill_count(2, idle_ready=0, launching_unleased=first, room=10 - first) == 0
    assert refill_count(2, idle_ready=1, launching_unleased=1, room=8) == 0


# --- on Trio's MockClock ----------------------------------------------------------------------

# Monday 2026-03-23 00:00 Berlin: a week that ends with the spring clock change.
WEEK_START = "2026-03-23T00:00"
WEEK = 7 * 86400.0


def berlin_week_schedule() -> WarmPoolSchedule:
    return schedule(
        window("mon-fri", "09:00", "18:00", 2),
        window("fri", "20:00", "01:00", 1),
        window("sun", "02:30", "04:00", 1),
        timezone="Europe/Berlin",
    )


async def test_schedule_loop_switches_at_the_stated_local_times(
    autojump_clock: MockClock,
) -> None:
    """Sleeping until next_change_after through a simulated week wakes exactly at each switch."""
    warm = berlin_week_schedule()
    clock = Clock(epoch=local(WEEK_START, BERLIN))
    end = clock.now() + WEEK
    seen: list[tuple[str, int]] = []
    while True:
        now = clock.now()
        seen.append((dt.datetime.fromtimestamp(now, BERLIN).isoformat(), warm.min_idle_at(now)))
        change = warm.next_change_after(now)
        if change is None or change >= end:
            break
        await trio.sleep(change - now)
    weekdays = [
        entry
        for day in range(23, 28)
        for entry in [(f"2026-03-{day}T09:00:00+01:00", 2), (f"2026-03-{day}T18:00:00+01:00", 0)]
    ]
    assert seen == [
        ("2026-03-23T00:00:00+01:00", 0),
        *weekdays,
        ("2026-03-27T20:00:00+01:00", 1),
        ("2026-03-28T01:00:00+01:00", 0),
        ("2026-03-29T03:00:00+02:00", 1),  # 02:30 does not exist that night
        ("2026-03-29T04:00:00+02:00", 0),
    ]


async def test_refill_loop_launches_once_per_switch(autojump_clock: MockClock) -> None:
    """A refill pass every 30 s with 90 s boots launches min_idle workers once, at 09:00."""
    warm = berlin_week_schedule()
    clock = Clock(epoch=local(WEEK_START, BERLIN))
    end = clock.now() + 86400.0
    max_workers, boot_time, tick = 10, 90.0, 30.0
    ready, launching = 0, 0
    launches: list[str] = []

    async def launch() -> None:
        nonlocal ready, launching
        await trio.sleep(boot_time)
        launching -= 1
        ready += 1

    change = warm.next_change_after(clock.now())
    async with trio.open_nursery() as nursery:
        while (now := clock.now()) < end:
            room = max_workers - ready - launching
            for _ in range(refill_count(warm.min_idle_at(now), ready, launching, room)):
                launching += 1
                launches.append(dt.datetime.fromtimestamp(now, BERLIN).isoformat())
                nursery.start_soon(launch)
            if change is not None and change <= now:  # ask again only once it has passed
                change = warm.next_change_after(now)
            wake = now + tick if change is None else min(now + tick, change)
            await trio.sleep(wake - now)
    assert launches == ["2026-03-23T09:00:00+01:00"] * 2
    assert (ready, launching) == (2, 0)
