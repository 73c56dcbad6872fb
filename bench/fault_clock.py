"""Fault scenario: the budget's clock jumps across midnight and a month's end, in-process on
Trio's MockClock (hours pass in milliseconds), the engine on an in-memory cloud and
registry."""

from __future__ import annotations

import datetime as dt
import time
from typing import Any
from zoneinfo import ZoneInfo

import structlog
import trio
from trio.testing import MockClock

from bench import fault_checks as checks
from bench.fault_bench import PRICE, Bench, Result
from broker.clock import Clock
from broker.cloud import LaunchSpec, Market
from broker.engine import Engine, EngineSettings, Refusal
from broker.ledger import MICROS, Budget, charge
from broker.memory_registry import MemoryRegistry
from broker.model import Limits, WorkerRequest
from broker.prices import PriceTable
from tests.fakes import FakeCloud

BERLIN = ZoneInfo("Europe/Berlin")
SPEC = LaunchSpec("c7i.8xlarge", Market.SPOT)
CLOCK_IDLE, CLOCK_REAP, CLOCK_LAUNCH = 600.0, 60.0, 300.0
COVER_SECONDS = CLOCK_LAUNCH + CLOCK_IDLE + 2 * CLOCK_REAP
ONE_COVER = PRICE * COVER_SECONDS / 3600


def clock_jumps(bench: Bench) -> list[Result]:
    """The clock jumps across midnight and the end of November in Europe/Berlin (UTC is an
    hour behind): caps apply per local day and month, a cover across midnight is split,
    every refusal names the period it was made in; after a pause longer than the covers,
    no launch passes a cap."""
    began = time.monotonic()
    with structlog.testing.capture_logs():  # the engine's log lines: not for the bench's output
        found, figures = trio.run(_midnight, clock=MockClock(autojump_threshold=0))
    return [
        Result(
            "budget clock across midnight and month end",
            "virtual time, Berlin: 23:50 30 Nov, jump 15 min, then a 2 h pause",
            tuple(found),
            figures,
            time.monotonic() - began,
        )
    ]


async def _midnight() -> tuple[list[checks.Check], dict[str, Any]]:
    start = dt.datetime(2026, 11, 30, 23, 50, tzinfo=BERLIN).timestamp()
    clock = Clock(epoch=start)
    cloud = FakeCloud(clock, boot_time=10.0)
    registry = MemoryRegistry("test")
    daily, monthly = round(2.5 * ONE_COVER, 4), round(10 * ONE_COVER, 4)
    # November's earlier spend leaves room for 2.5 launches' November part (600 of 1020 s).
    november = round(monthly - 2.5 * PRICE * 600 / 3600, 6)
    await registry.reserve_spend({"month:2026-11": round(november * MICROS)}, 1, {})
    settings = EngineSettings(
        default_spec=SPEC,
        limits=Limits(100, None, CLOCK_IDLE, 1),
        launch_timeout=CLOCK_LAUNCH,
        describe_interval=2.0,
        reap_interval=CLOCK_REAP,
        budget=Budget(daily, monthly, "Europe/Berlin"),
    )
    engine = Engine(cloud, settings, clock, PriceTable.default(), registry)  # type: ignore[arg-type]
    asked: list[tuple[float, str]] = []  # (when, reply)

    async def until_refused(prefix: str) -> tuple[int, str]:
        """Clients ask one after another until one is refused: (launches, the refusal)."""
        for n in range(20):
            now = clock.now()
            try:
                reply = (await engine.get_worker(WorkerRequest(wait=15.0), f"{prefix}{n}")).ip
            except Refusal as exc:
                reply = f"ERROR: {exc}"
            asked.append((now, reply))
            if reply.startswith("ERROR"):
                return n, reply
        return 20, ""

    mock = trio.lowlevel.current_clock()
    assert isinstance(mock, MockClock)
    async with trio.open_nursery() as nursery:
        await nursery.start(engine.run)
        before, month_refusal = await until_refused("nov")  # 23:50, 30 November: the month binds
        mock.jump(15 * 60)  # 00:05, 1 December: a new day and a new month
        await trio.sleep(2 * CLOCK_REAP)
        after, day_refusal = await until_refused("dec")  # the new day's cap binds
        settled = await registry.spend(KEYS)
        paused_at = clock.now()
        mock.jump(7200)  # the event loop stood still for two hours
        await trio.sleep(3 * CLOCK_REAP)
        late, _ = await until_refused("late")
        spend = await registry.spend(KEYS)
        live = set(cloud.alive())
        workers = {w.instance_id for w in await registry.list_workers(clock.now())}
        nursery.cancel_scope.cancel()

    dec1 = spend["day:2026-12-01"] / MICROS
    found = [
        checks.holds(
            "every request answered (a worker or one refusal)",
            all(reply for _, reply in asked),
            f"{len(asked)} requests",
        ),
        _periods_capped(settled, daily, monthly),
        _refusals_named(asked, daily, monthly),
        checks.holds(
            "the month bound before midnight, the new day after",
            "max_monthly_cost" in month_refusal and "max_daily_cost" in day_refusal,
            f"{before} launches before, {after} after",
        ),
        checks.holds(
            "a cover across midnight split over both days and months",
            all(settled.get(k, 0) > 0 for k in KEYS),
            _spend_text(settled),
        ),
        checks.holds(
            "after the pause: no launch while the day is over its cap",
            late == 0 or dec1 <= daily,
            f"{late} launched, day ${dec1:.4f}",
        ),
        checks.holds(
            "every running instance accounted for in the registry",
            live <= workers,
            f"{len(live)} running, {len(workers)} in the registry",
        ),
    ]
    uncovered = (spend["day:2026-12-01"] - settled["day:2026-12-01"]) / MICROS
    figures = {
        "launched": f"{before} + {after} + {late}",
        "charged for the pause": f"${uncovered:.4f} (time without cover: spent, whatever the cap)",
        "paused at": dt.datetime.fromtimestamp(paused_at, BERLIN).strftime("%H:%M"),
    }
    return found, figures


KEYS = ["day:2026-11-30", "day:2026-12-01", "month:2026-11", "month:2026-12"]


def _seconds_until(now: float, when: dt.datetime) -> float:
    return max(0.0, when.timestamp() - now)


def _spend_text(spend: dict[str, int]) -> str:
    return ", ".join(f"{k} ${v / MICROS:.4f}" for k, v in sorted(spend.items()))


def _periods_capped(spend: dict[str, int], daily: float, monthly: float) -> checks.Check:
    """Every day and month stayed within its cap."""
    over = [
        key
        for key, value in spend.items()
        if value / MICROS > (daily if key.startswith("day:") else monthly) + 1e-6
    ]
    return checks.holds(
        "max_daily_cost and max_monthly_cost respected per local period",
        not over,
        _spend_text(spend),
    )


def _refusals_named(asked: list[tuple[float, str]], daily: float, monthly: float) -> checks.Check:
    """Each refusal names the cap and the local period it was made in, with figures that
    bind; "one more needs" is the new cover's part in that period."""
    problems = []
    for when, reply in asked:
        if not reply.startswith("ERROR"):
            continue
        local = dt.datetime.fromtimestamp(when, BERLIN)
        day, month = local.date().isoformat(), f"{local.year:04d}-{local.month:02d}"
        parts = charge(PRICE, when, when + COVER_SECONDS, BERLIN)
        binding = "day" if "max_daily_cost" in reply else "month"
        key = f"day:{day}" if binding == "day" else f"month:{month}"
        caps = checks.Caps(
            max_daily_cost=daily,
            max_monthly_cost=monthly,
            price=PRICE,
            cover=parts.get(key, 0) / MICROS,
            day=day,
            month=month,
        )
        problem = checks.refusal_problem(reply, caps)
        if problem is None and "budget: max_" not in reply:
            problem = "not a period cap"
        if problem is not None:
            problems.append(f"{problem}: {reply!r}")
    refusals = sum(r.startswith("ERROR") for _, r in asked)
    detail = f"{refusals} refusals" + (f"; {problems[0]}" if problems else "")
    return checks.holds(
        "every refusal names the cap and local period, true figures", not problems, detail
    )
