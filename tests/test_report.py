"""The cost report (broker/report.py): lease history and the ledger in, a table or CSV out.
Pure: records are built here, nothing is read."""

from __future__ import annotations

import csv
import datetime as dt
import io
from zoneinfo import ZoneInfo

import pytest
import trio
from trio.testing import MockClock

from broker.clock import Clock
from broker.engine import Engine
from broker.ledger import MICROS
from broker.model import WorkerRequest
from broker.registry import LeaseHistoryRecord
from broker.report import (
    LEDGER,
    NOT_LEASED,
    OVERLAPPING,
    By,
    Report,
    Window,
    build,
    csv_text,
    table,
)
from broker.schedule import WarmPoolSchedule
from tests.engines import T0, get_ip, make_engine, running
from tests.fakes import FakeCloud
from tests.harness import wait_for

NOV = Window(dt.date(2026, 11, 1), dt.date(2026, 12, 1))
NOV_1 = dt.datetime(2026, 11, 1, tzinfo=dt.UTC).timestamp()
HOUR = 3600.0


def lease(
    client: str,
    start_hour: float,
    hours: float,
    *,
    kind: str = "c7i.8xlarge",
    market: str = "spot",
    price: float | None = 0.5,
) -> LeaseHistoryRecord:
    """A lease that started `start_hour` hours after 2026-11-01 00:00 UTC."""
    start = NOV_1 + start_hour * HOUR
    return LeaseHistoryRecord(
        client, "i-0a", kind, market, start, start + hours * HOUR, price, "released", None
    )


def micros(dollars: float) -> int:
    return round(dollars * MICROS)


def test_rows_by_client_count_leases_hours_and_dollars_dearest_first() -> None:
    """By client: one row per lease owner, dearest first (then longest), and a total row."""
    records = [
        lease("token:alice/a", 0, 1),
        lease("10.1.2.7", 2, 2, price=1.0),
        lease("token:alice/a", 5, 3),
    ]
    report = build(records, {"day:2026-11-01": micros(4.0)}, NOV, By.CLIENT)
    assert [(r.key, r.leases, r.hours, r.dollars) for r in report.rows] == [
        ("token:alice/a", 2, 4.0, 2.0),
        ("10.1.2.7", 1, 2.0, 2.0),
    ]
    assert (report.total.leases, report.total.hours, report.total.dollars) == (3, 6.0, 4.0)


def test_by_identity_and_by_type_group_as_named() -> None:
    """Identity is the owner before its `/`; type is instance type and market."""
    records = [
        lease("token:alice/a", 0, 1),
        lease("token:alice/b", 0, 1, kind="c7i.16xlarge", price=1.0),
        lease("token:bob", 0, 1, market="on-demand", price=1.4),
    ]
    by_identity = build(records, {}, NOV, By.IDENTITY)
    assert [(r.key, r.leases) for r in by_identity.rows] == [
        ("token:alice", 2),
        ("token:bob", 1),
    ]
    by_type = build(records, {}, NOV, By.TYPE)
    assert [r.key for r in by_type.rows] == [
        "c7i.8xlarge on-demand",
        "c7i.16xlarge spot",
        "c7i.8xlarge spot",
    ]


def test_a_lease_is_cut_at_the_window_s_edges() -> None:
    """Only the hours inside [since, until) count: a lease from 23:00 on Oct 31 to 01:00 on
    Nov 1 is one hour of November."""
    report = build([lease("a", -1, 2), lease("b", -5, 1)], {}, NOV, By.CLIENT)
    assert [(r.key, r.hours) for r in report.rows] == [("a", 1.0)]


def test_by_day_splits_a_lease_at_midnight_and_sets_each_day_s_ledger_beside_it() -> None:
    """By day: a lease over midnight counts on both days; every day of the window has a row,
    with the ledger's spend for that day."""
    window = Window(dt.date(2026, 11, 1), dt.date(2026, 11, 4))
    ledger = {"day:2026-11-01": micros(0.75), "day:2026-11-02": micros(0.25)}
    report = build([lease("a", 22, 4)], ledger, window, By.DAY)
    assert [(r.key, r.leases, r.hours, r.ledger) for r in report.rows] == [
        ("2026-11-01", 1, 2.0, 0.75),
        ("2026-11-02", 1, 2.0, 0.25),
        ("2026-11-03", 0, 0.0, 0.0),
    ]
    assert (report.total.leases, report.total.hours, report.ledger) == (1, 4.0, 1.0)


def test_days_are_the_budget_time_zone_s() -> None:
    """In Europe/Berlin (UTC+1 in November) 23:30 UTC on Nov 1 is already Nov 2."""
    window = Window(dt.date(2026, 11, 1), dt.date(2026, 11, 3), "Europe/Berlin")
    report = build([lease("a", 23.5, 0.25)], {}, window, By.DAY)
    assert [(r.key, r.hours) for r in report.rows] == [("2026-11-01", 0.0), ("2026-11-02", 0.25)]


def test_ledger_minus_leases_is_what_no_lease_paid_for() -> None:
    """The ledger committed $3 in the window, leases account for $2: $1 idle and warm."""
    report = build([lease("a", 0, 4)], {"day:2026-11-01": micros(3.0)}, NOV, By.CLIENT)
    assert (report.ledger, report.not_leased) == (3.0, 1.0)
    assert f"{NOT_LEASED}  " in table(report)


def test_overlapping_leases_on_a_shared_worker_are_named_not_called_idle() -> None:
    """Two leases at once on a $0.50/h worker cost $1/h in leases, $0.50/h in the ledger."""
    report = build(
        [lease("a", 0, 1), lease("b", 0, 1)], {"day:2026-11-01": micros(0.5)}, NOV, By.CLIENT
    )
    assert report.not_leased == -0.5
    assert OVERLAPPING in table(report)
    assert NOT_LEASED not in table(report)


def test_the_table_is_aligned_with_total_difference_and_ledger_rows() -> None:
    """The whole table, as printed."""
    records = [lease("token:alice/a", 0, 1.5), lease("10.1.2.7", 2, 0.25, price=1.0)]
    report = build(records, {"day:2026-11-01": micros(1.1)}, NOV, By.CLIENT)
    assert table(report) == "\n".join(
        [
            "Cost by client, 2026-11-01 to 2026-12-01 (not included), UTC days, US dollars",
            "",
            "client                      leases  hours  dollars",
            "token:alice/a                    1   1.50   0.7500",
            "10.1.2.7                         1   0.25   0.2500",
            "total                            2   1.75   1.0000",
            "idle and warm (not leased)                  0.1000",
            "ledger (committed spend)                    1.1000",
        ]
    )


def test_csv_has_a_header_every_row_and_micro_dollars() -> None:
    """CSV: header, rows, total, the difference and the ledger, dollars to 6 places."""
    report = build([lease("a", 0, 1)], {"day:2026-11-01": micros(0.5)}, NOV, By.CLIENT)
    rows = list(csv.reader(io.StringIO(csv_text(report))))
    assert rows == [
        ["client", "leases", "hours", "dollars", "ledger_dollars"],
        ["a", "1", "1.000000", "0.500000", ""],
        ["total", "1", "1.000000", "0.500000", "0.500000"],
        [NOT_LEASED, "", "", "0.000000", ""],
        [LEDGER, "", "", "0.500000", "0.500000"],
    ]


def test_workers_without_a_price_count_hours_and_say_so() -> None:
    """A lab machine's lease has hours and no dollars; the table says how many."""
    report = build([lease("a", 0, 2, market="local", price=None)], {}, NOV, By.CLIENT)
    assert (report.total.hours, report.total.dollars, report.unpriced) == (2.0, 0.0, 1)
    assert "1 lease(s) on workers without a price" in table(report)


def test_a_window_must_end_after_it_starts() -> None:
    """--until on or before --since is refused."""
    with pytest.raises(ValueError, match="must come after"):
        Window(dt.date(2026, 11, 2), dt.date(2026, 11, 2))


# --- against the broker's own records ----------------------------------------------------------


async def test_with_one_client_per_worker_and_no_idle_time_leases_and_ledger_agree_to_the_cent(
    autojump_clock: MockClock,
) -> None:
    """Exclusive workers that boot at once, are used and released (so terminated), never
    idle: the ledger charged each worker only while it was leased, and the report's totals
    agree to the cent."""
    cloud = FakeCloud(Clock(T0), boot_time=0.0)
    engine = make_engine(cloud, cloud.clock, clients_per_worker=1)
    async with running(engine):
        for client, hours in (("token:alice/a", 2.0), ("token:bob/b", 0.5)):
            ip = await get_ip(engine, WorkerRequest(), client)
            await _use(engine, ip, client, hours * HOUR)
            await engine.release(ip, client)

        async def both_kept() -> bool:
            return len(await engine.registry.lease_history(0.0)) == 2

        await wait_for(both_kept)
        report = await _report(engine)
    assert [(r.key, r.hours) for r in report.rows] == [("token:alice/a", 2.0), ("token:bob/b", 0.5)]
    assert report.total.dollars == pytest.approx(0.5 * 2.5)
    assert 0 <= report.ledger - report.total.dollars < 0.005  # micro-dollar rounding only
    assert NOT_LEASED in table(report)


async def test_a_warm_worker_nobody_leases_is_idle_and_warm(
    autojump_clock: MockClock, cloud: FakeCloud, clock: Clock
) -> None:
    """A warm pool's worker waiting an hour costs the ledger and no lease: the difference row
    holds it (with the cover committed ahead, as the worker still runs)."""
    engine = make_engine(cloud, clock, warm_pool=WarmPoolSchedule.from_dict({"min_idle": 1}))
    async with running(engine):
        await trio.sleep(HOUR)
        report = await _report(engine)
    assert report.total.leases == 0
    assert report.not_leased >= 0.5


async def _use(engine: Engine, ip: str, client: str, seconds: float) -> None:
    """Hold the worker for `seconds`, pinging as a working client does."""
    for _ in range(int(seconds // 300)):
        await trio.sleep(300)
        await engine.ping(ip, client)


async def _report(engine: Engine) -> Report:
    zone = engine.ctx.settings.budget.timezone
    day = dt.datetime.fromtimestamp(engine.ctx.clock.now(), ZoneInfo(zone)).date()
    window = Window(day - dt.timedelta(days=1), day + dt.timedelta(days=1), zone)
    records = await engine.registry.lease_history(window.start)
    ledger = await engine.registry.spend(window.day_keys())
    return build(records, ledger, window, By.CLIENT)
