"""When in the day arrivals come (broker/dayprofile.py), and how it bends the decayed rate
(ArrivalHistory.rate_ahead): pure, time passed in."""

from __future__ import annotations

import datetime as dt

import pytest

from broker.adaptive import ArrivalHistory
from broker.dayprofile import SLOT, SLOTS, WEEKDAY, WEEKEND, DayProfile, place

HOUR = 3600.0
MONDAY = dt.datetime(2026, 11, 2, tzinfo=dt.UTC).timestamp()  # 00:00 UTC
DAY = 86400.0


def mornings(days: int, start: float = MONDAY) -> list[float]:
    """Twelve arrivals between 09:00 and 12:00 on each of `days` days from `start`."""
    return [start + d * DAY + 9 * HOUR + i * 900 for d in range(days) for i in range(12)]


def test_no_complete_day_means_no_shape_and_the_recent_rate() -> None:
    """Arrivals so far today only: the profile says nothing; the rate is the decayed one."""
    history = ArrivalHistory.seeded(mornings(1))
    now = MONDAY + 12 * HOUR
    assert history.profile.shape(now, now) is None
    assert history.rate(now) == history.rate_ahead(now, 900)


def test_a_day_seen_says_the_morning_is_over_at_noon_and_about_to_start_before_nine() -> None:
    """After a Monday of mornings: on Tuesday at 12:00 fewer arrivals are expected than the
    last hour's, and at 08:45 (after an early one) more until 09:15."""
    history = ArrivalHistory.seeded([*mornings(1), *mornings(1, MONDAY + DAY)])
    noon = MONDAY + DAY + 12 * HOUR
    assert history.rate_ahead(noon, 900) < history.rate(noon) / 3
    early = ArrivalHistory.seeded([*mornings(1), MONDAY + DAY + 8.5 * HOUR])
    before = MONDAY + DAY + 8.75 * HOUR
    assert early.rate_ahead(before, 1800) > 2 * early.rate(before)


def test_one_day_of_nothing_at_a_time_does_not_mean_never() -> None:
    """The pseudo-day of the all-day mean: a slot empty on the one day seen still has a
    shape, smaller than a busy one's."""
    profile = ArrivalHistory.seeded(mornings(1)).profile
    tuesday = MONDAY + DAY
    quiet = profile.shape(tuesday + 15 * HOUR, tuesday + 15 * HOUR)
    busy = profile.shape(tuesday + 10 * HOUR, tuesday + 15 * HOUR)
    assert quiet is not None and busy is not None
    assert 0 < quiet < busy
    assert quiet == pytest.approx(12 / SLOTS / 2)
    assert busy == pytest.approx((2 + 12 / SLOTS) / 2)


def test_weekdays_and_weekend_days_are_learned_apart() -> None:
    """A week of weekday mornings says nothing about Saturday until a Saturday was seen."""
    history = ArrivalHistory.seeded(mornings(5))
    saturday = MONDAY + 5 * DAY + 10 * HOUR
    assert history.profile.shape(saturday, saturday) is None
    monday = MONDAY + 7 * DAY + 10 * HOUR
    assert history.profile.shape(monday, monday) == pytest.approx((5 * 2 + 5 * 12 / SLOTS) / 6)


def test_the_profile_is_the_same_whatever_order_the_arrivals_come_in() -> None:
    """Seeding from the registry's leases needs no sorting."""
    times = mornings(3)
    forward = ArrivalHistory.seeded(times).profile
    backward = ArrivalHistory.seeded(reversed(times)).profile
    now = MONDAY + 4 * DAY
    for hour in (8, 9.5, 11, 15):
        assert forward.shape(now + hour * HOUR, now) == backward.shape(now + hour * HOUR, now)


def test_days_and_slots_are_the_lab_s_local_ones() -> None:
    """08:30 UTC on a winter Monday is Berlin's 09:30; Friday 23:30 UTC is Saturday there."""
    assert place(MONDAY + 8.5 * HOUR, "Europe/Berlin") == (
        dt.date(2026, 11, 2).toordinal(), WEEKDAY, int(9.5 * HOUR) // SLOT)  # fmt: skip
    assert place(MONDAY + 4 * DAY + 23.5 * HOUR, "Europe/Berlin")[1] == WEEKEND
    assert place(MONDAY + 4 * DAY + 23.5 * HOUR, "UTC")[1] == WEEKDAY
    history = ArrivalHistory.seeded([MONDAY], zone="Europe/Berlin")
    assert history.profile.zone == "Europe/Berlin"


def test_an_empty_profile_has_no_shape() -> None:
    """Nothing seen: no shape, no mean ahead or behind."""
    assert DayProfile().shape(MONDAY, MONDAY) is None
    assert DayProfile().ahead(MONDAY, 900) is None
    assert DayProfile().behind(MONDAY, HOUR) is None
