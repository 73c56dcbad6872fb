"""The idle policy's decisions (broker/adaptive.py): pure, time passed in."""

from __future__ import annotations

import math

import attrs
import pytest

from broker.adaptive import (
    MEMORY,
    ArrivalHistory,
    IdlePolicy,
    IdleRule,
    LeaseLengths,
    break_even,
    use_odds,
    worth_keeping,
)
from broker.model import Market, Worker, WorkerState

T0 = 1_700_000_000.0
HOUR = 3600.0


def idle_worker(last_activity: float = T0, price: float | None = 0.50) -> Worker:
    return Worker(
        "i-1", "c7i.8xlarge", Market.SPOT, WorkerState.READY, "10.0.0.1", T0 - HOUR,
        last_activity, price,
    )  # fmt: skip


def steady(per_hour: float, until: float = T0, hours: float = 3.0) -> ArrivalHistory:
    """Arrivals every 1/per_hour hours for `hours` up to `until`."""
    gap = HOUR / per_hour
    count = int(hours * per_hour)
    return ArrivalHistory.seeded(until - i * gap for i in range(count))


def adaptive(history: ArrivalHistory, **changes: float) -> IdleRule:
    """The adaptive rule for a 15-minute timeout, 60 s reaper, $50/h of waiting, 30 s boots:
    a $0.50/h worker breaks even after 3000 s (50 min) idle."""
    knobs = {"idle_timeout": 900.0, "minimum": 60.0, "wait_cost_per_hour": 50.0} | changes
    return IdleRule(IdlePolicy.ADAPTIVE, history=history, **knobs)


def test_history_rate_is_the_steady_rate_and_decays_without_arrivals() -> None:
    """Six arrivals an hour for hours read as about six an hour; an hour later e times less."""
    history = steady(6.0, hours=10.0)
    assert pytest.approx(history.rate(T0) * HOUR, rel=0.1) == 6.0
    assert history.rate(T0) / math.e == pytest.approx(history.rate(T0 + MEMORY))


def test_history_is_the_same_whatever_order_the_arrivals_come_in() -> None:
    """Seeding from the registry's leases needs no sorting."""
    times = [T0, T0 - 100, T0 - 5000, T0 - 40]
    forward = ArrivalHistory.seeded(times)
    backward = ArrivalHistory.seeded(reversed(times))
    assert forward.rate(T0 + 60) == pytest.approx(backward.rate(T0 + 60))


def test_no_history_means_no_arrivals_expected() -> None:
    """An empty history expects nothing."""
    assert ArrivalHistory().rate(T0) == 0.0


def test_break_even_is_boot_times_wait_cost_over_price() -> None:
    """30 s of waiting at $50/h is worth 3000 s of a $0.50/h worker; a free one: always."""
    assert break_even(0.50, 30.0, 50.0) == 3000.0
    assert math.isinf(break_even(0.0, 30.0, 50.0))


def test_the_first_idle_worker_is_kept_while_an_arrival_is_due_within_break_even() -> None:
    """Rank 1: kept exactly while rate x break-even >= 1, however long it may still stay."""
    assert worth_keeping(1.01 / 3000, 3000.0, 60.0, 1)
    assert worth_keeping(1.01 / 3000, 3000.0, 900.0, 1)
    assert not worth_keeping(0.99 / 3000, 3000.0, 900.0, 1)


def test_later_ranks_need_more_arrivals() -> None:
    """Six arrivals an hour, 50 minutes to break even, 15 minutes left: two are worth it."""
    rate = 6.0 / HOUR
    kept = [k for k in range(1, 20) if worth_keeping(rate, 3000.0, 900.0, k)]
    assert kept == [1, 2]


def test_nothing_is_kept_without_arrivals_or_time_left() -> None:
    """No rate, or no horizon left, keeps nothing."""
    assert not worth_keeping(0.0, 3000.0, 900.0, 1)
    assert not worth_keeping(1.0, 3000.0, 0.0, 1)


def test_a_huge_boot_time_keeps_while_any_arrival_is_expected() -> None:
    """A boot of a day: the first idle worker is kept on the thinnest evidence."""
    few = ArrivalHistory.seeded([T0 - 5 * HOUR])
    rule = adaptive(few, default_boot=86400.0)
    assert not rule.reaps(idle_worker(T0 - 120), 1, T0)


def test_adaptive_reaps_soon_without_arrivals_and_keeps_under_steady_ones() -> None:
    """No arrivals for hours: reaped after the minimum; six an hour: the first kept."""
    quiet = adaptive(ArrivalHistory.seeded([T0 - 6 * HOUR]))
    assert not quiet.reaps(idle_worker(T0), 1, T0 + 59)
    assert quiet.reaps(idle_worker(T0), 1, T0 + 60)
    busy = adaptive(steady(6.0))
    assert not busy.reaps(idle_worker(T0), 1, T0 + 600)
    assert busy.reaps(idle_worker(T0), 3, T0 + 600)


def test_adaptive_never_keeps_beyond_the_idle_timeout() -> None:
    """However busy, a worker idle for idle_timeout is reaped and a released one that is
    already that idle is not kept."""
    busy = adaptive(steady(60.0))
    assert not busy.reaps(idle_worker(T0), 1, T0 + 899)
    assert busy.reaps(idle_worker(T0), 1, T0 + 900)
    assert not busy.keeps_released(idle_worker(T0), 1, T0 + 900)


def test_adaptive_without_a_price_falls_back_to_fixed() -> None:
    """No price, no break-even: released workers go, idle ones stay the whole timeout."""
    busy = adaptive(steady(60.0))
    unpriced = idle_worker(T0, price=None)
    assert not busy.keeps_released(unpriced, 1, T0 + 30)
    quiet = adaptive(ArrivalHistory())
    assert not quiet.reaps(unpriced, 1, T0 + 899)
    assert quiet.reaps(unpriced, 1, T0 + 900)


def test_adaptive_keeps_a_released_worker_only_when_it_pays() -> None:
    """At RELEASE the worker is the marginal one (rank: 1 + the idle ones of its kind)."""
    busy = adaptive(steady(6.0))
    assert busy.keeps_released(idle_worker(T0), 1, T0 + 30)
    assert not busy.keeps_released(idle_worker(T0), 4, T0 + 30)
    assert not adaptive(ArrivalHistory()).keeps_released(idle_worker(T0), 1, T0 + 30)


def test_fixed_is_the_old_broker_and_linger_keeps_released_workers() -> None:
    """fixed: RELEASE terminates, the reaper waits idle_timeout; linger: RELEASE keeps."""
    fixed = IdleRule.fixed(900.0)
    assert not fixed.keeps_released(idle_worker(T0), 1, T0 + 30)
    assert not fixed.reaps(idle_worker(T0), 5, T0 + 899)
    assert fixed.reaps(idle_worker(T0), 1, T0 + 900)
    linger = IdleRule(IdlePolicy.LINGER, 900.0)
    assert linger.keeps_released(idle_worker(T0), 7, T0 + 30)
    assert not linger.reaps(idle_worker(T0), 7, T0 + 899)


def poisson_tails(mean: float, count: int) -> list[float]:
    """[P(N >= j) for j in 1..count], N Poisson with `mean` (the rule without releases)."""
    return [1.0 - sum(math.exp(-mean) * mean**i / math.factorial(i) for i in range(j))
            for j in range(1, count + 1)]  # fmt: skip


@pytest.mark.parametrize("rank", [1, 2, 3, 5])
def test_without_releases_the_kth_worker_waits_for_the_kth_arrival(rank: int) -> None:
    """No releases: P(used) = P(N(H) >= k), E[idle] = (1/rate) sum_j P(N(H) >= j)."""
    rate, horizon = 6.0 / HOUR, 900.0
    used, idling = use_odds(rate, 0.0, horizon, rank)
    tails = poisson_tails(rate * horizon, rank)
    assert tails[-1] == pytest.approx(used)
    assert sum(tails) / rate == pytest.approx(idling)


def test_releases_push_an_idle_worker_down_the_stack() -> None:
    """Releases as frequent as arrivals: the first idle worker is taken less often, and
    idles longer on average before it is, than without them."""
    rate, horizon = 6.0 / HOUR, 900.0
    used, idling = use_odds(rate, rate, horizon, 1)
    alone, alone_idling = use_odds(rate, 0.0, horizon, 1)
    assert used < alone
    assert idling / used > alone_idling / alone


def test_use_odds_agree_with_a_simulated_stack() -> None:
    """The walk matches a Monte Carlo of arrivals and releases (2 deep, 15 minutes)."""
    import random

    rate, releases, horizon, rank = 8.0 / HOUR, 4.0 / HOUR, 900.0, 2
    rng, used, idling, runs = random.Random(1), 0, 0.0, 20000
    for _ in range(runs):
        now, depth = 0.0, rank
        while True:
            now += rng.expovariate(rate + releases)
            if now >= horizon:
                idling += horizon
                break
            depth += -1 if rng.random() < rate / (rate + releases) else 1
            if depth == 0:
                used += 1
                idling += now
                break
    expected_used, expected_idling = use_odds(rate, releases, horizon, rank)
    assert expected_used == pytest.approx(used / runs, abs=0.01)
    assert expected_idling == pytest.approx(idling / runs, rel=0.02)


def test_lease_lengths_are_a_decayed_mean_whatever_the_order() -> None:
    """Two leases an hour apart: the recent one weighs e times more; none: no mean."""
    assert LeaseLengths().mean() is None
    forward = LeaseLengths().add(T0 - HOUR, 100.0).add(T0, 400.0)
    backward = LeaseLengths().add(T0, 400.0).add(T0 - HOUR, 100.0)
    expected = (400.0 + 100.0 / math.e) / (1.0 + 1.0 / math.e)
    assert expected == pytest.approx(forward.mean())
    assert expected == pytest.approx(backward.mean())


def test_leases_that_expire_hold_a_worker_without_giving_it_back() -> None:
    """A 100 s lease released and a 300 s one expired, together: 200 s long on average, and
    400 s of holding for each worker given back; none released yet: nothing comes back."""
    both = LeaseLengths().add(T0, 100.0).add(T0, 300.0, released=False)
    assert both.mean() == pytest.approx(200.0)
    assert both.per_release() == pytest.approx(400.0)
    assert LeaseLengths().add(T0, 300.0, released=False).per_release() is None


def test_held_workers_soon_released_make_a_second_idle_worker_not_worth_keeping() -> None:
    """Six arrivals an hour keep two idle workers; with three held workers whose leases last
    ten minutes (a release every 200 s) the second goes: releases will serve the arrivals."""
    busy = adaptive(steady(6.0))
    assert not busy.reaps(idle_worker(T0), 2, T0 + 120)
    supplied = attrs.evolve(busy, held={("c7i.8xlarge", "spot"): 3}, lease_seconds=600.0)
    assert supplied.release_rate(idle_worker(T0)) == 3 / 600.0
    assert supplied.reaps(idle_worker(T0), 2, T0 + 120)
    assert attrs.evolve(busy, held=supplied.held).release_rate(idle_worker(T0)) == 0.0


def test_use_odds_stay_quick_and_sane_at_absurd_rates() -> None:
    """Thousands of arrivals and releases an hour: an answer within seconds, a chance
    between 0 and 1, no overflow."""
    import time

    started = time.perf_counter()
    used, idling = use_odds(10000.0 / HOUR, 10000.0 / HOUR, 900.0, 3)
    assert time.perf_counter() - started < 5.0
    assert 0.0 <= used <= 1.0
    assert 0.0 <= idling <= 900.0
    assert use_odds(0.0, 0.0, 900.0, 1) == (0.0, 0.0)


def test_a_worker_deeper_than_any_likely_arrivals_is_never_taken() -> None:
    """Rank 1000 at six arrivals an hour: never taken, idle the whole horizon."""
    used, idling = use_odds(6.0 / HOUR, 0.0, 900.0, 1000)
    assert used == 0.0
    assert idling == pytest.approx(900.0)
