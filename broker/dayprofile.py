"""When in the day arrivals come (`idle_policy: adaptive`): pure code, time passed in.

`DayProfile` counts arrivals per half hour of the day in the lab's time zone, weekdays and
weekend days apart, over the complete days it has seen (today's arrivals join when the day is
over, so a half-day does not read as a quiet afternoon). Its `shape` at a time is the mean
count of that half hour on the days of that kind, with one pseudo-day of the kind's all-day
average mixed in (so one day seen does not yet mean "nobody ever comes at 11:30"). Only its
shape is used: `ArrivalHistory.rate_ahead` scales the short-term decayed rate by the shape's
mean over the time ahead against its decayed mean over the time behind (docs/adaptive-idle.md).
Constant memory: two days of counts and the one being seen.
"""

from __future__ import annotations

import datetime as dt
import math
from functools import cache
from typing import Final
from zoneinfo import ZoneInfo

import attrs

SLOT: Final = 1800  # seconds: the profile's resolution (a half hour; must divide an hour)
SLOTS: Final = 86400 // SLOT  # per day
WEEKDAY, WEEKEND = 0, 1  # the kinds of day, as indices


@cache
def _zone(name: str) -> ZoneInfo:
    return ZoneInfo(name)


def place(when: float, zone: str) -> tuple[int, int, int]:
    """(the local day's ordinal, its kind, the slot of the day) of Unix time `when`."""
    local = dt.datetime.fromtimestamp(when, _zone(zone))
    kind = WEEKEND if local.weekday() >= 5 else WEEKDAY
    seconds = local.hour * 3600 + local.minute * 60 + local.second
    return local.toordinal(), kind, seconds // SLOT


def slot_end(when: float, zone: str) -> float:
    """The Unix time at which the slot holding `when` ends."""
    local = dt.datetime.fromtimestamp(when, _zone(zone))
    into = (local.minute * 60 + local.second) % SLOT + local.microsecond / 1e6
    return when - into + SLOT


@attrs.frozen
class DayProfile:
    """Arrival counts per slot of the day, weekdays and weekend days apart (see the module)."""

    zone: str = "UTC"
    counts: tuple[float, ...] = (0.0,) * (2 * SLOTS)  # complete days: [kind * SLOTS + slot]
    today: tuple[float, ...] = (0.0,) * SLOTS  # the latest day seen, `day`
    day: int | None = None  # its ordinal
    first: int | None = None  # the first day seen

    def add(self, when: float) -> DayProfile:
        """With one more arrival at `when` (which may be older than the last)."""
        day, kind, slot = place(when, self.zone)
        if self.day is None or self.first is None:
            return attrs.evolve(self, today=_plus(self.today, slot), day=day, first=day)
        if day == self.day:
            return attrs.evolve(self, today=_plus(self.today, slot))
        if day < self.day:
            counts = _plus(self.counts, kind * SLOTS + slot)
            return attrs.evolve(self, counts=counts, first=min(self.first, day))
        folded = self._folded()
        return attrs.evolve(self, counts=folded, today=_plus((0.0,) * SLOTS, slot), day=day)

    def _folded(self) -> tuple[float, ...]:
        """The complete days' counts with the latest day's added."""
        assert self.day is not None
        base = _kind(self.day) * SLOTS
        counts = list(self.counts)
        for slot, count in enumerate(self.today):
            counts[base + slot] += count
        return tuple(counts)

    def shape(self, when: float, now: float) -> float | None:
        """The profile's arrivals per slot at `when`, from the days complete at `now`; None
        when no complete day of `when`'s kind has been seen."""
        if self.day is None or self.first is None:
            return None
        today = place(now, self.zone)[0]
        _, kind, slot = place(when, self.zone)
        last = today - 1 if today > self.day else self.day - 1  # the last complete day
        days = _days_of(kind, self.first, last)
        if days == 0:
            return None
        counts = self._folded() if today > self.day else self.counts
        row = counts[kind * SLOTS : (kind + 1) * SLOTS]
        return (row[slot] + sum(row) / SLOTS) / (days + 1)

    def ahead(self, now: float, horizon: float) -> float | None:
        """The shape's mean over [now, now + horizon]."""
        return _mean(self, now, now, now + horizon)

    def behind(self, now: float, memory: float) -> float | None:
        """The shape's mean over the time before `now`, weighted e^-(now - t)/memory (as the
        decayed count weighs arrivals), over 8 memories back."""
        total = weights = 0.0
        end = now
        while end > now - 8 * memory:
            start = max(now - 8 * memory, _slot_start(end, self.zone))
            shape = self.shape((start + end) / 2, now)
            if shape is None:
                return None
            weight = math.exp(-(now - end) / memory) - math.exp(-(now - start) / memory)
            total += shape * weight
            weights += weight
            end = start
        return total / weights if weights > 0 else None


def _kind(ordinal: int) -> int:
    return WEEKEND if dt.date.fromordinal(ordinal).weekday() >= 5 else WEEKDAY


def _days_of(kind: int, first: int, last: int) -> int:
    """How many days of `kind` there are from ordinal `first` to `last`, both included."""
    if last < first:
        return 0
    weeks, rest = divmod(last - first + 1, 7)
    extra = sum(1 for ordinal in range(last - rest + 1, last + 1) if _kind(ordinal) == kind)
    return weeks * (5 if kind == WEEKDAY else 2) + extra


def _plus(counts: tuple[float, ...], index: int) -> tuple[float, ...]:
    return (*counts[:index], counts[index] + 1.0, *counts[index + 1 :])


def _slot_start(when: float, zone: str) -> float:
    """The start of the slot that ends at or holds the instant just before `when`."""
    return slot_end(when - 1e-6, zone) - SLOT


def _mean(profile: DayProfile, now: float, low: float, high: float) -> float | None:
    """The shape's plain mean over [low, high] (complete days as of `now`)."""
    if high <= low:
        return profile.shape(low, now)
    total, start = 0.0, low
    while start < high:
        end = min(high, slot_end(start, profile.zone))
        shape = profile.shape((start + end) / 2, now)
        if shape is None:
            return None
        total += shape * (end - start)
        start = end
    return total / (high - low)
