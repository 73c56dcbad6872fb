"""The warm pool's schedule, as plain code: how many idle workers to keep warm at a given time.

No I/O and no clock: time comes in as Unix seconds. The engine asks `min_idle_at(now)` what to
keep warm, `refill_count(...)` how many to launch for it, and `next_change_after(now)` how long
it may sleep before the answer changes.

Config shape (YAML), the `warm_pool` key::

    warm_pool:
      timezone: Europe/Berlin        # IANA name; default UTC
      min_idle: 0                    # outside every window; default 0
      windows:                       # first matching window wins; default []
        - days: mon-fri              # default daily
          from: "09:00"
          to: "18:00"
          min_idle: 2

- `days`: `mon` .. `sun`, ranges (`mon-fri`; `fri-mon` wraps through the weekend), lists
  (`sat,sun`, `mon-wed,fri`, or a YAML list `[sat, sun]`) and `daily`. They name the day a
  window *starts*: `days: fri, from: "22:00", to: "06:00"` runs Friday 22:00 to Saturday 06:00.
- `from` and `to` are local `"HH:MM"` in `timezone`; quote them, since YAML reads an unquoted
  `18:00` as the number 1080 (the error says so). `to` is exclusive and may be `"24:00"` (end
  of the day). `to` earlier than `from` crosses midnight; `to` equal to `from` is 24 hours.
- Windows are tried in order and the first that contains the time gives `min_idle`; outside
  every window the top-level `min_idle` applies.
- Clock changes: a boundary is the first instant whose local time is at or after the stated
  time on that date. A `09:00` start is 09:00 local on the day clocks change too. A time that
  does not exist (the spring-forward gap, e.g. 02:30 in Europe/Berlin on 2026-03-29) means the
  first instant after the gap (03:00 CEST). A time that happens twice (fall back) means its
  first occurrence, so a window is one unbroken stretch of real time.

Errors are `ScheduleError` (a `ValueError`) whose message names the sub-key path:
`windows[0].from: must be HH:MM (got '9am')`; `.path` and `.problem` give the parts.
"""

from __future__ import annotations

import datetime as dt
import difflib
import re
from collections.abc import Iterator, Mapping
from typing import Any, Final
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import attrs

from broker.values import show as _show

DAY_NAMES: Final = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")  # index = date.weekday()
ALL_DAYS: Final = frozenset(range(7))
# next_change_after looks this many local days ahead: two weeks of a weekly schedule, so a
# change swallowed by one clock change still shows a week later.
_HORIZON_DAYS: Final = 15
_TIME = re.compile(r"(\d{1,2}):(\d{2})")
_TOP_KEYS: Final = ("timezone", "min_idle", "windows")
_WINDOW_KEYS: Final = ("days", "from", "to", "min_idle")

WARM_POOL_LABEL: Final = "warm pool schedule (timezone, min_idle, windows)"
WARM_POOL_EXAMPLE: Final[Mapping[str, Any]] = {
    "timezone": "Europe/Berlin",
    "min_idle": 0,
    "windows": [{"days": "mon-fri", "from": "09:00", "to": "18:00", "min_idle": 2}],
}


class ScheduleError(ValueError):
    """A warm pool config that cannot be used; `str()` is `<path>: <problem>`."""

    def __init__(self, problem: str, path: tuple[str | int, ...] = ()) -> None:
        self.problem = problem
        self.path = path
        where = _path_text(path)
        super().__init__(f"{where}: {problem}" if where else problem)

    def below(self, step: str | int) -> ScheduleError:
        """The same problem, one level further from the root."""
        return ScheduleError(self.problem, (step, *self.path))


def _path_text(path: tuple[str | int, ...]) -> str:
    text = "".join(f"[{step}]" if isinstance(step, int) else f".{step}" for step in path)
    return text.removeprefix(".")


def _must(rule: str, value: Any, step: str | int | None = None) -> ScheduleError:
    error = ScheduleError(f"must {rule} (got {_show(value)})")
    return error if step is None else error.below(step)


# --- the schedule -----------------------------------------------------------------------------


@attrs.frozen
class Window:
    """A weekly stretch of local time with its own min_idle.

    `days` are the weekdays it starts on (Monday 0 .. Sunday 6). It runs from `start` to `end`
    (exclusive); `end <= start` means it ends on the next day.
    """

    days: frozenset[int]
    start: dt.time
    end: dt.time
    min_idle: int

    def occurrence(self, day: dt.date, zone: ZoneInfo) -> tuple[float, float]:
        """The Unix-time interval [start, end) of the run starting on local date `day`."""
        end_day = day + dt.timedelta(days=1) if self.end <= self.start else day
        return _instant(day, self.start, zone), _instant(end_day, self.end, zone)


@attrs.frozen
class WarmPoolSchedule:
    """The warm pool's target: `min_idle` outside the windows, the first matching window's
    inside one."""

    timezone: str = "UTC"
    min_idle: int = 0
    windows: tuple[Window, ...] = ()

    @classmethod
    def default(cls) -> WarmPoolSchedule:
        """No warm pool: min_idle 0 at all times."""
        return cls()

    @classmethod
    def from_dict(cls, data: Any) -> WarmPoolSchedule:
        """A validated schedule from the parsed YAML mapping; raises ScheduleError."""
        if not isinstance(data, Mapping):
            raise _must("be a mapping with timezone, min_idle, windows", data)
        _reject_unknown(data, _TOP_KEYS)
        timezone = _timezone(data.get("timezone", "UTC"))
        min_idle = _count(data.get("min_idle", 0), "min_idle")
        windows = data.get("windows", [])
        if not isinstance(windows, list | tuple):
            raise _must("be a list of windows", windows, "windows")
        parsed = []
        for index, window in enumerate(windows):
            try:
                parsed.append(_window(window))
            except ScheduleError as exc:
                raise exc.below(index).below("windows") from None
        return cls(timezone, min_idle, tuple(parsed))

    @property
    def zone(self) -> ZoneInfo:
        """The time zone (zoneinfo caches it by name)."""
        return ZoneInfo(self.timezone)

    def min_idle_at(self, now: float) -> int:
        """How many ready workers to keep idle at Unix time `now`."""
        zone = self.zone
        today = dt.datetime.fromtimestamp(now, zone).date()
        # A run that contains `now` starts the local day before or on it; one day of slack on
        # each side covers zones whose clock changes cross midnight.
        days = [today + dt.timedelta(days=offset) for offset in range(-2, 2)]
        for window in self.windows:
            for day in days:
                if day.weekday() in window.days:
                    start, end = window.occurrence(day, zone)
                    if start <= now < end:
                        return window.min_idle
        return self.min_idle

    def next_change_after(self, now: float) -> float | None:
        """The first Unix time after `now` at which `min_idle_at` differs from its value at
        `now`, or None if it never changes. It is constant on [now, the answer)."""
        if not self.windows:
            return None
        zone = self.zone
        today = dt.datetime.fromtimestamp(now, zone).date()
        limit = _instant(today + dt.timedelta(days=_HORIZON_DAYS), dt.time(0), zone)
        boundaries = sorted(
            {b for b in self._boundaries(today, zone) if now < b <= limit},
        )
        current = self.min_idle_at(now)
        for boundary in boundaries:
            if self.min_idle_at(boundary) != current:
                return boundary
        return None

    def _boundaries(self, today: dt.date, zone: ZoneInfo) -> Iterator[float]:
        for offset in range(-2, _HORIZON_DAYS + 1):
            day = today + dt.timedelta(days=offset)
            for window in self.windows:
                if day.weekday() in window.days:
                    yield from window.occurrence(day, zone)


def _instant(day: dt.date, time: dt.time, zone: ZoneInfo) -> float:
    """The first Unix time whose local time in `zone` is at or after `time` on `day`.

    An ambiguous time (fall back) gives its first occurrence; a time in a gap (spring forward)
    gives the instant the clock jumps, the first one after the gap.
    """
    wall = dt.datetime.combine(day, time)
    first = wall.replace(tzinfo=zone, fold=0)
    instant = first.timestamp()
    found = dt.datetime.fromtimestamp(instant, zone)
    if found.replace(tzinfo=None) == wall:
        return instant
    # In a gap, fold=0 reads the wall time with the offset from before the jump (an instant
    # after it) and fold=1 with the one from after (an instant before it). Transitions fall on
    # whole seconds: search between the two for the first second with the later offset.
    before = wall.replace(tzinfo=zone, fold=1)
    later_offset = found.utcoffset()
    low, high = int(before.timestamp()), int(instant)
    while high - low > 1:
        middle = (low + high) // 2
        if dt.datetime.fromtimestamp(middle, zone).utcoffset() == later_offset:
            high = middle
        else:
            low = middle
    return float(high)


# --- refills ----------------------------------------------------------------------------------


def refill_count(
    schedule_min_idle: int, idle_ready: int, launching_unleased: int, room: int
) -> int:
    """How many workers to launch now for the warm pool.

    Enough that ready-and-idle workers plus those already launching for the pool (not promised
    to a waiting client) reach `schedule_min_idle`, and never more than `room` (what
    max_workers and the cost cap still allow). Counting the launching ones is what keeps a
    second refill, while the first is still booting, from launching again.
    """
    return max(0, min(room, schedule_min_idle - idle_ready - launching_unleased))


# --- validation -------------------------------------------------------------------------------


def warm_pool_kind_check(value: Any) -> WarmPoolSchedule:
    """The config schema's check for `warm_pool`: a schedule, or ScheduleError (a ValueError)
    whose `.path` and `.problem` locate what is wrong below the key."""
    return WarmPoolSchedule.from_dict(value)


def _reject_unknown(data: Mapping[Any, Any], known: tuple[str, ...]) -> None:
    for key in data:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f" (did you mean {close[0]}?)" if close else f" (known: {', '.join(known)})"
            raise ScheduleError(f"unknown key{hint}", (str(key),))


def _timezone(value: Any) -> str:
    rule = "be an IANA time zone name like Europe/Berlin or UTC"
    if not isinstance(value, str) or not value:
        raise _must(rule, value, "timezone")
    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise _must(rule, value, "timezone") from None
    return value


def _count(value: Any, step: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise _must("be an integer >= 0", value, step)
    return value


def _window(data: Any) -> Window:
    if not isinstance(data, Mapping):
        raise _must("be a mapping with days, from, to, min_idle", data)
    _reject_unknown(data, _WINDOW_KEYS)
    for key in ("from", "to", "min_idle"):
        if key not in data:
            raise ScheduleError("required", (key,))
    return Window(
        days=_days(data.get("days", "daily")),
        start=_time(data["from"], "from", allow_midnight_end=False),
        end=_time(data["to"], "to", allow_midnight_end=True),
        min_idle=_count(data["min_idle"], "min_idle"),
    )


def _days(value: Any) -> frozenset[int]:
    if isinstance(value, list | tuple) and value:
        days: set[int] = set()
        for index, item in enumerate(value):
            try:
                days |= _days_text(item)
            except ScheduleError as exc:
                raise exc.below(index).below("days") from None
        return frozenset(days)
    try:
        return _days_text(value)
    except ScheduleError as exc:
        raise exc.below("days") from None


def _days_text(value: Any) -> frozenset[int]:
    rule = "be days like mon-fri, sat,sun or daily"
    if not isinstance(value, str):
        raise _must(rule, value)
    days: set[int] = set()
    for part in value.lower().split(","):
        names = [name.strip() for name in part.split("-")]
        if names == ["daily"]:
            days |= ALL_DAYS
        elif len(names) in (1, 2) and all(name in DAY_NAMES for name in names):
            first, last = DAY_NAMES.index(names[0]), DAY_NAMES.index(names[-1])
            days |= {(first + step) % 7 for step in range((last - first) % 7 + 1)}
        else:
            raise _must(rule, value)
    return frozenset(days)


def _time(value: Any, step: str, *, allow_midnight_end: bool) -> dt.time:
    rule = "be HH:MM" + (" (up to 24:00)" if allow_midnight_end else "")
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 24 * 60:
        # YAML 1.1 reads an unquoted 18:00 as base 60: 18 * 60 + 0.
        hours, minutes = divmod(value, 60)
        raise ScheduleError(
            f"must be HH:MM in quotes (got {value}: YAML reads an unquoted {hours}:{minutes:02d} "
            f'as a number; write "{hours:02d}:{minutes:02d}")',
            (step,),
        )
    match = _TIME.fullmatch(value) if isinstance(value, str) else None
    if match is None:
        raise _must(rule, value, step)
    hours, minutes = int(match[1]), int(match[2])
    if allow_midnight_end and (hours, minutes) == (24, 0):
        return dt.time(0)
    if hours > 23 or minutes > 59:
        raise _must(rule, value, step)
    return dt.time(hours, minutes)
