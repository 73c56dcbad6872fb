"""The dollar ledger's arithmetic: calendar periods, covers, charges and admission. Pure code.

Money is counted in whole micro-dollars (`int`), so the registry's conditional writes compare
exact numbers. Spend is tracked per calendar period (a day and a month in the budget's time
zone) as one number per period, `committed`: every dollar a worker has cost or may still cost
before it can next be reaped. A worker carries a *cover*, the time up to which its cost is
already committed (`paid_until`); a launch commits a cover for each new worker, activity that
lets a worker live longer extends it, and a worker that ends before its cover runs out gives
the rest back. Caps are checked when cover is committed, atomically in the registry, so the
committed total (and with it the spend) never passes a cap, whatever the number of replicas.

Times are Unix seconds, passed in; nothing here reads a clock.
"""

from __future__ import annotations

import datetime as dt
import enum
import math
from collections.abc import Iterable, Mapping
from typing import Final
from zoneinfo import ZoneInfo

import attrs

MICROS: Final = 1_000_000  # micro-dollars per dollar
_ROUNDING_SLACK: Final = 1e-6  # float noise tolerated before rounding a charge up


class Period(enum.StrEnum):
    """A calendar period the ledger counts spend in."""

    DAY = "day"
    MONTH = "month"


class OnCap(enum.StrEnum):
    """What the broker does when a cap is reached."""

    REFUSE = "refuse"  # refuse launches; idle workers live out their cover
    TERMINATE_IDLE = "terminate_idle"  # also terminate idle workers at once


def to_micros(dollars: float) -> int:
    """Dollars as micro-dollars, rounded up (a charge is never under-counted)."""
    return max(0, math.ceil(dollars * MICROS - _ROUNDING_SLACK))


def to_dollars(micros: int) -> float:
    """Micro-dollars as dollars."""
    return micros / MICROS


def period_key(period: Period, instant: float, zone: ZoneInfo) -> str:
    """The ledger key of the `period` containing `instant`: `day:2026-11-23`, `month:2026-11`."""
    local = dt.datetime.fromtimestamp(instant, zone)
    if period is Period.DAY:
        return f"day:{local.date().isoformat()}"
    return f"month:{local.year:04d}-{local.month:02d}"


def key_period(key: str) -> Period:
    """The period kind of a ledger key."""
    return Period(key.partition(":")[0])


def period_bounds(key: str, zone: ZoneInfo) -> tuple[float, float]:
    """Start and end (Unix seconds) of the period a ledger key names, in `zone`."""
    period, _, label = key.partition(":")
    if period == Period.DAY:
        first = dt.date.fromisoformat(label)
        after = first + dt.timedelta(days=1)
    else:
        year, month = (int(part) for part in label.split("-"))
        first = dt.date(year, month, 1)
        after = dt.date(year + month // 12, month % 12 + 1, 1)
    return _midnight(first, zone), _midnight(after, zone)


def charge(price_per_hour: float, start: float, end: float, zone: ZoneInfo) -> dict[str, int]:
    """What one instance costs from `start` to `end`, split over the days and months it spans
    (micro-dollars per ledger key, each rounded up: a charge is never under-counted)."""
    return {key: to_micros(amount) for key, amount in _split(price_per_hour, start, end, zone)}


def refund(price_per_hour: float, start: float, end: float, zone: ZoneInfo) -> dict[str, int]:
    """What one instance gives back for unused cover from `start` to `end`: like `charge`, but
    rounded down, so a refund never exceeds what was charged for the same time."""
    split = _split(price_per_hour, start, end, zone)
    return {key: int(amount * MICROS) for key, amount in split if int(amount * MICROS) > 0}


def admit_count(
    per_instance: Mapping[str, int],
    committed: Mapping[str, int],
    limits: Mapping[str, int],
    count: int,
) -> int:
    """How many of `count` instances, each charging `per_instance`, fit under `limits` given
    what is `committed` already (0..count)."""
    fits = count
    for key, amount in per_instance.items():
        limit = limits.get(key)
        if limit is None or amount <= 0:
            continue
        room = limit - committed.get(key, 0)
        fits = min(fits, max(0, room // amount))
    return max(0, fits)


@attrs.frozen
class CoverPolicy:
    """How long a worker's cost must be committed ahead: until it could next be reaped.

    A worker untouched since `last_activity` is reaped within `idle_timeout` plus a reaper pass
    (`reap_interval`); one more pass of slack covers the termination itself. A launch commits
    enough for a worker that boots (up to `launch_timeout`) and is then used once.
    """

    idle_timeout: float
    reap_interval: float
    launch_timeout: float

    @property
    def slack(self) -> float:
        """Reaper passes of margin beyond the idle timeout."""
        return 2 * self.reap_interval

    def initial(self, now: float) -> float:
        """The cover of a worker launched at `now`: it may boot for up to launch_timeout, then
        be handed out (or sit idle) for a whole idle timeout."""
        return now + self.launch_timeout + self.idle_timeout + self.slack

    def needed(self, last_activity: float, now: float) -> float:
        """The cover a worker needs so it is paid for until it can be reaped."""
        return max(last_activity, now) + self.idle_timeout + self.slack

    def extended(self, now: float) -> float:
        """The cover to extend to when more is needed: the need, plus as much again, so a
        worker in steady use extends once per idle timeout rather than on every request."""
        return now + 2 * (self.idle_timeout + self.slack)


@attrs.frozen
class Budget:
    """The dollar caps (None: no cap), the time zone their calendar periods are counted in, and
    what happens when one is reached."""

    max_daily_cost: float | None = None
    max_monthly_cost: float | None = None
    timezone: str = "UTC"
    on_cap: OnCap = OnCap.REFUSE

    @property
    def has_caps(self) -> bool:
        """True if any cumulative cap is set."""
        return self.max_daily_cost is not None or self.max_monthly_cost is not None

    @property
    def zone(self) -> ZoneInfo:
        """The time zone of the periods."""
        return ZoneInfo(self.timezone)

    def cap(self, period: Period) -> float | None:
        """The cap in dollars on one period's spend."""
        return self.max_daily_cost if period is Period.DAY else self.max_monthly_cost

    def limits(self, keys: Iterable[str]) -> dict[str, int]:
        """The cap, in micro-dollars, of each key whose period is capped."""
        limits: dict[str, int] = {}
        for key in keys:
            cap = self.cap(key_period(key))
            if cap is not None:
                limits[key] = round(cap * MICROS)
        return limits

    def current_keys(self, now: float) -> tuple[str, ...]:
        """The ledger keys of the day and the month containing `now`."""
        return tuple(period_key(period, now, self.zone) for period in Period)


@attrs.frozen
class PeriodSpend:
    """One period's numbers, for STATUS and refusals (micro-dollars).

    `committed` is what the ledger holds; `outstanding` the part of it that is cover not yet
    used (workers still running). What has been spent is the difference."""

    key: str
    committed: int
    outstanding: int
    limit: int | None

    @property
    def spent(self) -> int:
        """Micro-dollars spent so far in the period."""
        return max(0, self.committed - self.outstanding)

    @property
    def remaining(self) -> int | None:
        """Micro-dollars that may still be committed (None: no cap)."""
        return None if self.limit is None else max(0, self.limit - self.committed)

    def to_status(self) -> dict[str, object]:
        """The period as STATUS shows it (dollars)."""
        return {
            "period": self.key.partition(":")[2],
            "spent": round(to_dollars(self.spent), 4),
            "committed": round(to_dollars(self.committed), 4),
            "limit": None if self.limit is None else to_dollars(self.limit),
            "remaining": None if self.remaining is None else round(to_dollars(self.remaining), 4),
        }


def outstanding(covers: Iterable[tuple[float, float]], now: float, key: str, zone: ZoneInfo) -> int:
    """Micro-dollars of unused cover in the period `key`: for each running worker's
    (price per hour, paid until), its price from `now` to its cover's end, within the period."""
    start, end = period_bounds(key, zone)
    total = 0.0
    for price, paid_until in covers:
        overlap = min(paid_until, end) - max(now, start)
        if overlap > 0:
            total += price * overlap / 3600.0
    return int(total * MICROS)


# The ledger key of the pool-wide run rate (micro-dollars per hour of every replica's running,
# booting and requested workers), kept only while max_hourly_cost is set: a launch adds its
# workers' prices, a worker that ends gives its price back, and admission is the same
# conditional write as the period caps'.
RATE_KEY: Final = "rate"


def rate_refusal(description: str, price_per_hour: float, rate: float, cap: float) -> str:
    """The `ERROR: budget: ...` reason when one more worker would pass max_hourly_cost."""
    return (
        f"budget: launching one {description} (${price_per_hour:.4g}/h) would raise the run "
        f"rate from ${rate:.4g}/h to ${rate + price_per_hour:.4g}/h, above max_hourly_cost "
        f"${cap:.4g}/h"
    )


def refusal(spend: PeriodSpend, per_instance: int) -> str:
    """The `ERROR: budget: ...` reason naming the cap, the spend and the limit."""
    period = key_period(spend.key)
    name = "max_daily_cost" if period is Period.DAY else "max_monthly_cost"
    limit = 0 if spend.limit is None else spend.limit
    return (
        f"budget: {name} ${to_dollars(limit):.2f} for {spend.key.partition(':')[2]} reached "
        f"(spent ${to_dollars(spend.spent):.2f}, committed ${to_dollars(spend.committed):.2f} "
        f"until running workers can be reaped, one more needs ${to_dollars(per_instance):.2f})"
    )


def _split(
    price_per_hour: float, start: float, end: float, zone: ZoneInfo
) -> list[tuple[str, float]]:
    """Dollars per ledger key for one instance from `start` to `end`."""
    dollars: dict[str, float] = {}
    for begin, finish in _day_segments(start, end, zone):
        cost = price_per_hour * (finish - begin) / 3600.0
        for period in Period:
            key = period_key(period, begin, zone)
            dollars[key] = dollars.get(key, 0.0) + cost
    return [(key, amount) for key, amount in dollars.items() if amount > 0]


def _midnight(day: dt.date, zone: ZoneInfo) -> float:
    return dt.datetime.combine(day, dt.time(0, 0), zone).timestamp()


def _day_segments(start: float, end: float, zone: ZoneInfo) -> Iterable[tuple[float, float]]:
    """[start, end) cut at each local midnight in `zone`."""
    begin = start
    while begin < end:
        day = dt.datetime.fromtimestamp(begin, zone).date()
        midnight = _midnight(day + dt.timedelta(days=1), zone)
        finish = min(end, midnight)
        yield begin, finish
        begin = finish
