"""The ledger's arithmetic: periods in a time zone, charges split at midnight, admission."""

from __future__ import annotations

import datetime as dt
from zoneinfo import ZoneInfo

from broker.ledger import (
    MICROS,
    Budget,
    CoverPolicy,
    Period,
    PeriodSpend,
    admit_count,
    charge,
    outstanding,
    period_bounds,
    period_key,
    refund,
    refusal,
)

BERLIN = ZoneInfo("Europe/Berlin")
UTC = ZoneInfo("UTC")


def at(text: str, zone: ZoneInfo = BERLIN) -> float:
    return dt.datetime.fromisoformat(text).replace(tzinfo=zone).timestamp()


def test_period_keys_follow_the_configured_zone() -> None:
    """23:30 UTC on 30 Nov is already 1 Dec in Berlin: a new day and a new month there."""
    instant = at("2026-11-30T23:30", UTC)
    assert period_key(Period.DAY, instant, UTC) == "day:2026-11-30"
    assert period_key(Period.DAY, instant, BERLIN) == "day:2026-12-01"
    assert period_key(Period.MONTH, instant, BERLIN) == "month:2026-12"


def test_period_bounds_are_local_midnights_including_a_dst_day() -> None:
    """The day DST ends in Berlin has 25 hours; December ends at the new year's midnight."""
    start, end = period_bounds("day:2026-10-25", BERLIN)
    assert at("2026-10-25T00:00") == start
    assert end - start == 25 * 3600
    start, end = period_bounds("month:2026-12", BERLIN)
    assert (at("2026-12-01T00:00"), at("2027-01-01T00:00")) == (start, end)


def test_charge_splits_at_midnight_and_month_end() -> None:
    """An hour across midnight into a new month costs half in each day and each month."""
    start = at("2026-11-30T23:30")
    split = charge(2.0, start, start + 3600, BERLIN)
    assert split == {
        "day:2026-11-30": MICROS,
        "day:2026-12-01": MICROS,
        "month:2026-11": MICROS,
        "month:2026-12": MICROS,
    }


def test_charges_round_up_and_refunds_round_down() -> None:
    """A third of a micro-dollar is charged as one and refunded as none."""
    third = 1 / 3 / MICROS * 3600  # seconds costing 1/3 micro-dollar at $1/h
    assert charge(1.0, at("2026-11-23T10:00"), at("2026-11-23T10:00") + third, BERLIN) == {
        "day:2026-11-23": 1,
        "month:2026-11": 1,
    }
    assert refund(1.0, at("2026-11-23T10:00"), at("2026-11-23T10:00") + third, BERLIN) == {}


def test_admit_count_fits_under_every_capped_key() -> None:
    """The tightest cap decides; uncapped keys never limit."""
    per = {"day:x": 100, "month:x": 100}
    assert admit_count(per, {"day:x": 50}, {"day:x": 360}, 10) == 3
    assert admit_count(per, {"day:x": 300}, {"day:x": 360}, 10) == 0
    assert admit_count(per, {"month:x": 900}, {"day:x": 1000, "month:x": 1000}, 10) == 1
    assert admit_count(per, {}, {}, 10) == 10


def test_cover_policy() -> None:
    """A launch covers boot and idle time plus two reaper passes; use extends it by double."""
    policy = CoverPolicy(idle_timeout=600, reap_interval=60, launch_timeout=300)
    assert policy.initial(1000) == 1000 + 300 + 600 + 120
    assert policy.needed(last_activity=2000, now=1500) == 2000 + 720
    assert policy.extended(5000) == 5000 + 2 * 720


def test_budget_limits_only_capped_periods() -> None:
    """A daily cap limits day keys; months stay uncapped without max_monthly_cost."""
    budget = Budget(max_daily_cost=5.0, timezone="Europe/Berlin")
    assert budget.has_caps
    assert budget.limits(["day:2026-11-23", "month:2026-11"]) == {"day:2026-11-23": 5 * MICROS}
    assert budget.current_keys(at("2026-11-23T12:00")) == ("day:2026-11-23", "month:2026-11")
    assert not Budget().has_caps


def test_outstanding_and_spent() -> None:
    """Unused cover within the period is outstanding; spent is committed minus that."""
    now = at("2026-11-23T23:00")
    covers = [(3.6, now + 7200)]  # $3.60/h, paid two hours ahead, one of them tomorrow
    assert outstanding(covers, now, "day:2026-11-23", BERLIN) == 3_600_000
    assert outstanding(covers, now, "day:2026-11-24", BERLIN) == 3_600_000
    spend = PeriodSpend("day:2026-11-23", 5_000_000, 3_600_000, 6_000_000)
    assert spend.spent == 1_400_000
    assert spend.remaining == 1_000_000
    assert spend.to_status() == {
        "period": "2026-11-23",
        "spent": 1.4,
        "committed": 5.0,
        "limit": 6.0,
        "remaining": 1.0,
    }


def test_refusal_names_the_cap_the_spend_and_the_limit() -> None:
    """The ERROR reason says which cap, how much is spent and committed, and the limit."""
    spend = PeriodSpend("day:2026-11-23", 4_800_000, 800_000, 5_000_000)
    assert refusal(spend, 500_000) == (
        "budget: max_daily_cost $5.00 for 2026-11-23 reached (spent $4.00, committed $4.80 "
        "until running workers can be reaped, one more needs $0.50)"
    )
