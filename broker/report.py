"""`compute-broker report`: what the pool cost, and who. Pure code: records in, table out.

The lease history (`broker.history`) says who held which worker for how long, at its price;
the dollar ledger (`broker.ledger`) says what the pool committed per calendar day. A report
covers whole days `[since, until)` in the budget's time zone (the ledger's days), groups the
leases by client, identity, instance type or day (a lease is cut at the window's edges and,
by day, at midnights), and sets the ledger's committed spend for the same days beside them.

How the two relate: the ledger charges a worker's price from its launch until it ends (its
cover, committed ahead and refunded in part when it ends early; each charge rounded up to the
micro-dollar); a lease costs the same price only while it is held. So, for workers that have
ended, ledger = leases + what no lease paid for: boot time, idle time before the reaper, warm
workers waiting. That difference is the row "idle and warm (not leased)"; with one client per
worker and no boot or idle time it is zero to the cent. It goes negative only when leases
overlap on shared workers (each lease costs the worker's whole price), and it includes cover
committed ahead for workers still running in the window.
"""

from __future__ import annotations

import csv
import datetime as dt
import enum
import io
from collections.abc import Iterable, Iterator, Mapping
from zoneinfo import ZoneInfo

import attrs

from broker.ledger import MICROS, Period, period_bounds, period_key
from broker.registry import LeaseHistoryRecord

NOT_LEASED = "idle and warm (not leased)"
OVERLAPPING = "shared workers (leases overlap)"
LEDGER = "ledger (committed spend)"
TOTAL = "total"


class By(enum.StrEnum):
    """What a report's rows are."""

    CLIENT = "client"  # the lease owner, `<identity>[/<client id>]`
    IDENTITY = "identity"  # a token or an address
    TYPE = "type"  # instance type and market
    DAY = "day"  # the local day (budget_timezone)


@attrs.frozen
class Window:
    """Whole days from `since` to `until` (not included) in `timezone`."""

    since: dt.date
    until: dt.date
    timezone: str = "UTC"

    def __attrs_post_init__(self) -> None:
        if self.until <= self.since:
            raise ValueError(f"--until {self.until} must come after --since {self.since}")

    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)

    @property
    def start(self) -> float:
        """The window's first instant, Unix seconds."""
        return period_bounds(f"day:{self.since.isoformat()}", self.zone)[0]

    @property
    def end(self) -> float:
        """The first instant after the window, Unix seconds."""
        return period_bounds(f"day:{self.until.isoformat()}", self.zone)[0]

    def day_keys(self) -> list[str]:
        """The ledger keys of the window's days."""
        days = (self.until - self.since).days
        return [f"day:{(self.since + dt.timedelta(days=n)).isoformat()}" for n in range(days)]


@attrs.frozen
class Row:
    """One group's leases: how many, their hours and dollars; `ledger`: the ledger's committed
    dollars for the same days (by day, and on the total)."""

    key: str
    leases: int
    hours: float
    dollars: float
    ledger: float | None = None


@attrs.frozen
class Report:
    """The rows, their total, and the ledger's spend for the window."""

    by: By
    window: Window
    rows: tuple[Row, ...]
    total: Row
    unpriced: int  # leases whose worker had no price (lab machines): hours, no dollars

    @property
    def ledger(self) -> float:
        """The ledger's committed dollars for the window's days."""
        return self.total.ledger or 0.0

    @property
    def not_leased(self) -> float:
        """Ledger dollars no lease accounts for (negative: leases overlapped on shared
        workers)."""
        return self.ledger - self.total.dollars


def build(
    records: Iterable[LeaseHistoryRecord],
    ledger: Mapping[str, int],
    window: Window,
    by: By,
) -> Report:
    """The report of `records` (cut to the window) against `ledger` (micro-dollars committed
    per ledger key; days the ledger does not have count 0)."""
    groups: dict[str, tuple[set[int], float, float]] = {}
    counted: set[int] = set()
    unpriced: set[int] = set()
    for index, record in enumerate(records):
        for key, start, end in _pieces(record, window, by):
            leases, hours, dollars = groups.get(key, (set(), 0.0, 0.0))
            leases.add(index)
            piece_hours = (end - start) / 3600.0
            price = record.price_per_hour
            groups[key] = (leases, hours + piece_hours, dollars + (price or 0.0) * piece_hours)
            counted.add(index)
            if price is None:
                unpriced.add(index)
    days = window.day_keys()
    if by is By.DAY:  # every day of the window has a row, leased or not
        for key in days:
            groups.setdefault(key.partition(":")[2], (set(), 0.0, 0.0))
    rows = [
        Row(
            key,
            len(leases),
            hours,
            dollars,
            _dollars(ledger.get(f"day:{key}", 0)) if by is By.DAY else None,
        )
        for key, (leases, hours, dollars) in groups.items()
    ]
    if by is By.DAY:
        rows.sort(key=lambda row: row.key)
    else:
        rows.sort(key=lambda row: (-row.dollars, -row.hours, row.key))
    total = Row(
        TOTAL,
        len(counted),
        sum(row.hours for row in rows),
        sum(row.dollars for row in rows),
        _dollars(sum(ledger.get(key, 0) for key in days)),
    )
    return Report(by, window, tuple(rows), total, len(unpriced))


def table(report: Report) -> str:
    """The report as an aligned text table, with the total, the part no lease paid for and
    the ledger's spend; hours to 2 places, dollars to 4 (a short spot lease costs less than a
    cent)."""
    window = report.window
    by_day = report.by is By.DAY
    header = [str(report.by), "leases", "hours", "dollars"] + (["ledger"] if by_day else [])
    lines = [header]
    for row in (*report.rows, report.total):
        line = [row.key, str(row.leases), f"{row.hours:.2f}", f"{row.dollars:.4f}"]
        if by_day:
            line.append(f"{row.ledger or 0.0:.4f}")
        lines.append(line)
    difference = report.not_leased
    label = NOT_LEASED if difference >= 0 else OVERLAPPING
    lines.append([label, "", "", f"{difference:.4f}"] + ([""] if by_day else []))
    lines.append([LEDGER, "", "", f"{report.ledger:.4f}"] + ([""] if by_day else []))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    title = (
        f"Cost by {report.by}, {window.since} to {window.until} (not included), "
        f"{window.timezone} days, US dollars"
    )
    text = [title, ""]
    for line in lines:
        cells = [line[0].ljust(widths[0])] + [
            c.rjust(w) for c, w in zip(line[1:], widths[1:], strict=True)
        ]
        text.append("  ".join(cells).rstrip())
    if report.unpriced:
        text.append(f"\n{report.unpriced} lease(s) on workers without a price: hours, no dollars")
    return "\n".join(text)


def csv_text(report: Report) -> str:
    """The report as CSV: one line per row, then total, not leased and ledger; dollars to the
    micro-dollar, as the ledger counts them."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow([str(report.by), "leases", "hours", "dollars", "ledger_dollars"])
    for row in (*report.rows, report.total):
        ledger = "" if row.ledger is None else f"{row.ledger:.6f}"
        writer.writerow([row.key, row.leases, f"{row.hours:.6f}", f"{row.dollars:.6f}", ledger])
    label = NOT_LEASED if report.not_leased >= 0 else OVERLAPPING
    writer.writerow([label, "", "", f"{report.not_leased:.6f}", ""])
    writer.writerow([LEDGER, "", "", f"{report.ledger:.6f}", f"{report.ledger:.6f}"])
    return out.getvalue()


def _pieces(
    record: LeaseHistoryRecord, window: Window, by: By
) -> Iterator[tuple[str, float, float]]:
    """The parts of a lease inside the window, each with its group's key (by day: one part per
    local day)."""
    if record.ended_at < window.start or record.started_at >= window.end:
        return
    start, end = max(record.started_at, window.start), min(record.ended_at, window.end)
    if by is not By.DAY:
        yield _key(record, by), start, end
        return
    zone = window.zone
    if end <= start:  # a lease of no duration still counts, on its day
        yield period_key(Period.DAY, start, zone).partition(":")[2], start, start
        return
    begin = start
    while begin < end:
        key = period_key(Period.DAY, begin, zone)
        finish = min(end, period_bounds(key, zone)[1])
        yield key.partition(":")[2], begin, finish
        begin = finish


def _key(record: LeaseHistoryRecord, by: By) -> str:
    if by is By.CLIENT:
        return record.client
    if by is By.IDENTITY:
        return record.identity
    return f"{record.instance_type} {record.market}"


def _dollars(micros: int) -> float:
    return micros / MICROS
