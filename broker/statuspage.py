"""The status page: one read-only HTML page for a person, from a STATUS document. Pure code.

`render(document, history, now)` returns the whole page: the workers, the leases with their
cost so far, spend today and this month against the caps, and a chart of the run rate and the
day's spend over the last 24 hours drawn as inline SVG on the server (no JavaScript; the
monitor's Content-Security-Policy forbids scripts anyway). Every string that comes from the
document is HTML-escaped; numbers are formatted from validated floats.

`History` keeps one (time, run rate, spent today) sample a minute for the chart; time is
passed in, nothing here reads a clock.
"""

from __future__ import annotations

import collections
import html
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime, tzinfo
from typing import Any, Final
from zoneinfo import ZoneInfo

import attrs

SPAN_SECONDS: Final = 24 * 3600.0
SAMPLE_SECONDS: Final = 60.0
REFRESH_SECONDS: Final = 60  # the page reloads itself (a meta refresh, not a script)
DASH: Final = "\u2014"

# The chart's geometry (SVG user units; the SVG scales to the page's width).
CHART_WIDTH: Final = 960
PANEL_HEIGHT: Final = 150
PANEL_GAP: Final = 44
MARGIN_LEFT: Final = 64
MARGIN_RIGHT: Final = 16
MARGIN_TOP: Final = 26
TICK_HOURS: Final = 3


@attrs.frozen
class Sample:
    """One minute's figures: Unix time, run rate ($/h), spent today ($, None: unknown)."""

    at: float
    run_rate: float
    spent_today: float | None


class History:
    """The last 24 hours of samples, at most one a minute (a later one in the same minute
    replaces the earlier), oldest first."""

    def __init__(self, span: float = SPAN_SECONDS, interval: float = SAMPLE_SECONDS) -> None:
        self.span = span
        self.interval = interval
        self._samples: collections.deque[Sample] = collections.deque(
            maxlen=int(span // interval) + 1
        )

    def add(self, at: float, run_rate: float, spent_today: float | None) -> None:
        """Record the figures at `at` (Unix seconds)."""
        sample = Sample(at, run_rate, spent_today)
        if self._samples and self._samples[-1].at // self.interval >= at // self.interval:
            self._samples[-1] = sample
        else:
            self._samples.append(sample)

    def record(self, at: float, document: Mapping[str, Any]) -> None:
        """Record a STATUS document's run rate and the day's spend."""
        budget = _dict(document.get("budget"))
        rate = _number(budget.get("run_rate_per_hour"))
        if rate is None:
            rate = _number(_dict(document.get("totals")).get("run_rate_per_hour"))
        self.add(at, rate or 0.0, _number(_dict(budget.get("day")).get("spent")))

    def samples(self, now: float) -> list[Sample]:
        """The samples of the last `span` seconds before `now`, oldest first."""
        return [s for s in self._samples if now - self.span <= s.at <= now]

    def __len__(self) -> int:
        return len(self._samples)


def render(document: Mapping[str, Any], history: History, now: float) -> str:
    """The status page for a STATUS document, with the chart from `history`, at `now`."""
    budget = _dict(document.get("budget"))
    zone = _zone(budget.get("timezone"))
    workers = _dicts(document.get("workers"))
    leases = _dicts(document.get("leases"))
    parts = [
        _HEAD,
        "<body><header><h1>compute-broker</h1>",
        f'<p class="muted">as of {_e(_clock(now, zone, seconds=True))}'
        f" ({_e(_zone_name(zone))}); reloads every {REFRESH_SECONDS} s</p></header>",
        _summary(document, workers, leases),
        '<section><h2>Run rate and spend, last 24 hours</h2><div class="chart">',
        chart_svg(history.samples(now), now, zone, budget),
        "</div></section>",
        _workers_table(workers, now, zone),
        _leases_table(leases, now),
        _capacity(_dict(document.get("capacity")), now, zone),
        "</body></html>\n",
    ]
    return "".join(parts)


# --- the summary -----------------------------------------------------------------------------


def _summary(
    document: Mapping[str, Any],
    workers: Sequence[Mapping[str, Any]],
    leases: Sequence[Mapping[str, Any]],
) -> str:
    budget = _dict(document.get("budget"))
    totals = _dict(document.get("totals"))
    states: dict[str, int] = {}
    for worker in workers:
        state = str(worker.get("state"))
        states[state] = states.get(state, 0) + 1
    by_state = ", ".join(f"{n} {_e(state)}" for state, n in sorted(states.items())) or "none"
    max_workers = _number(totals.get("max_workers"))
    rate = _number(budget.get("run_rate_per_hour"))
    if rate is None:
        rate = _number(totals.get("run_rate_per_hour"))
    max_hourly = _number(budget.get("max_hourly_cost", totals.get("max_hourly_cost")))
    cards = [
        _card(
            "Workers",
            str(len(workers)) + (f" of {max_workers:g}" if max_workers is not None else ""),
            by_state,
        ),
        _card("Leases", str(len(leases)), _lease_cost_line(leases)),
        _card(
            "Run rate",
            f"{_money(rate)}/h",
            "no cap" if max_hourly is None else f"cap {_money(max_hourly)}/h",
            _fraction(rate, max_hourly),
        ),
    ]
    for key, title in (("day", "Spend today"), ("month", "Spend this month")):
        period = _dict(budget.get(key))
        cards.append(_period_card(title, period))
    return '<section class="cards">' + "".join(cards) + "</section>"


def _lease_cost_line(leases: Sequence[Mapping[str, Any]]) -> str:
    costs = [c for lease in leases if (c := _number(lease.get("cost_usd"))) is not None]
    return f"{_money(sum(costs))} so far" if costs else "no cost yet"


def _period_card(title: str, period: Mapping[str, Any]) -> str:
    if not period:
        return _card(title, DASH, "not reported")
    spent = _number(period.get("spent"))
    committed = _number(period.get("committed"))
    limit = _number(period.get("limit"))
    label = _e(str(period.get("period", "")))
    detail = f"{label}: committed {_money(committed)}"
    detail += "; no cap" if limit is None else f" of the {_money(limit)} cap"
    return _card(title, _money(spent), detail, _fraction(committed, limit))


def _card(title: str, value: str, detail: str, fraction: float | None = None) -> str:
    bar = ""
    if fraction is not None:
        percent = min(100.0, max(0.0, fraction * 100))
        level = "high" if fraction >= 0.9 else "mid" if fraction >= 0.7 else "low"
        bar = (
            f'<div class="bar" title="{percent:.0f}% of the cap">'
            f'<div class="fill {level}" style="width:{percent:.1f}%"></div></div>'
        )
    return (
        f'<div class="card"><div class="title">{title}</div><div class="value">{value}</div>'
        f'{bar}<div class="muted">{detail}</div></div>'
    )


def _fraction(value: float | None, limit: float | None) -> float | None:
    if value is None or limit is None or limit <= 0:
        return None
    return value / limit


# --- the tables ------------------------------------------------------------------------------


def _workers_table(workers: Sequence[Mapping[str, Any]], now: float, zone: tzinfo) -> str:
    head = "<section><h2>Workers</h2>"
    if not workers:
        return head + '<p class="muted">No workers.</p></section>'
    rows = []
    for w in workers:
        state = str(w.get("state", ""))
        interrupted = _dict(w.get("interrupted"))
        state_cell = f'<span class="state {_state_class(state)}">{_e(state)}</span>'
        if interrupted:
            deadline = _number(interrupted.get("deadline"))
            when = f" by {_e(_clock(deadline, zone))}" if deadline is not None else ""
            state_cell += (
                f' <span class="state interrupted">interrupted: '
                f"{_e(str(interrupted.get('reason', '')))}{when}</span>"
            )
        launched = _number(w.get("launched_at"))
        price = _number(w.get("price_per_hour"))
        rows.append(
            "<tr>"
            f"<td><code>{_e(_text(w.get('instance_id')))}</code></td>"
            f"<td><code>{_e(_text(w.get('ip')))}</code></td>"
            f"<td>{_e(_text(w.get('type')))}</td>"
            f"<td>{_e(_text(w.get('market')))}</td>"
            f"<td>{state_cell}</td>"
            f'<td class="num">{_e(_text(w.get("clients")))}</td>'
            f'<td class="num">{_duration(_number(w.get("idle_seconds")))}</td>'
            f'<td class="num">{DASH if launched is None else _duration(now - launched)}</td>'
            f'<td class="num">{DASH if price is None else _money(price) + "/h"}</td>'
            f"<td>{_e(_text(w.get('provider')))}</td>"
            "</tr>"
        )
    return (
        head + "<table><thead><tr><th>Instance</th><th>IP</th><th>Type</th><th>Market</th>"
        '<th>State</th><th class="num">Clients</th><th class="num">Idle</th>'
        '<th class="num">Up</th><th class="num">Price</th><th>Provider</th></tr></thead>'
        "<tbody>" + "".join(rows) + "</tbody></table></section>"
    )


def _leases_table(leases: Sequence[Mapping[str, Any]], now: float) -> str:
    head = "<section><h2>Leases</h2>"
    if not leases:
        return head + '<p class="muted">No leases.</p></section>'
    rows = []
    for lease in leases:
        started = _number(lease.get("started_at"))
        cost = _number(lease.get("cost_usd"))
        rows.append(
            "<tr>"
            f"<td><code>{_e(_text(lease.get('client')))}</code></td>"
            f"<td><code>{_e(_text(lease.get('ip')))}</code></td>"
            f"<td><code>{_e(_text(lease.get('instance_id')))}</code></td>"
            f'<td class="num">{DASH if started is None else _duration(now - started)}</td>'
            f'<td class="num">{_duration(_number(lease.get("idle_seconds")))}</td>'
            f'<td class="num">{DASH if cost is None else _money(cost)}</td>'
            "</tr>"
        )
    return (
        head + "<table><thead><tr><th>Client</th><th>Worker IP</th><th>Instance</th>"
        '<th class="num">Held for</th><th class="num">Idle</th>'
        '<th class="num">Cost so far</th></tr></thead>'
        "<tbody>" + "".join(rows) + "</tbody></table></section>"
    )


def _capacity(capacity: Mapping[str, Any], now: float, zone: tzinfo) -> str:
    failed = _dicts(capacity.get("failed_offerings"))
    fallbacks = _dicts(capacity.get("fallbacks"))
    if not failed and not fallbacks:
        return ""
    items = []
    for f in failed:
        retry = _number(f.get("retry_after"))
        when = "" if retry is None else f" until {_e(_clock(retry, zone))}"
        items.append(
            f"<li>skipping <code>{_e(_text(f.get('offering')))}</code>{when}: "
            f"{_e(_text(f.get('code')))}</li>"
        )
    for f in fallbacks[-5:]:
        at = _number(f.get("at"))
        ago = "" if at is None else f" {_duration(now - at)} ago"
        items.append(
            f"<li>fallback{ago}: wanted <code>{_e(_text(f.get('wanted')))}</code>, "
            f"got <code>{_e(_text(f.get('got')))}</code></li>"
        )
    return "<section><h2>Capacity</h2><ul>" + "".join(items) + "</ul></section>"


def _state_class(state: str) -> str:
    return state if state in ("launching", "ready", "terminating") else "other"


# --- the chart -------------------------------------------------------------------------------


def chart_svg(
    samples: Sequence[Sample], now: float, zone: tzinfo, budget: Mapping[str, Any]
) -> str:
    """Two panels over the last 24 hours: the run rate ($/h) with its cap, and the day's
    spend ($) with the daily cap. A gap of more than two sample intervals breaks a line."""
    start = now - SPAN_SECONDS
    rate_cap = _number(budget.get("max_hourly_cost"))
    day_cap = _number(_dict(budget.get("day")).get("limit"))
    rates = [(s.at, s.run_rate) for s in samples]
    spends = [(s.at, s.spent_today) for s in samples if s.spent_today is not None]
    height = MARGIN_TOP + 2 * PANEL_HEIGHT + PANEL_GAP + 22
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {CHART_WIDTH} {height}" '
        f'role="img" aria-label="Run rate and spend today over the last 24 hours">'
    ]
    top = MARGIN_TOP
    for title, points, cap, unit, css in (
        ("Run rate", rates, rate_cap, "/h", "rate"),
        ("Spent today", spends, day_cap, "", "spend"),
    ):
        parts.append(_panel(title, points, cap, unit, css, top, start, now, zone))
        top += PANEL_HEIGHT + PANEL_GAP
    if not samples:
        parts.append(
            f'<text class="empty" x="{CHART_WIDTH / 2:.0f}" y="{height / 2:.0f}" '
            'text-anchor="middle">No samples yet: one is taken each minute.</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


def _panel(
    title: str,
    points: Sequence[tuple[float, float]],
    cap: float | None,
    unit: str,
    css: str,
    top: float,
    start: float,
    now: float,
    zone: tzinfo,
) -> str:
    left, right = MARGIN_LEFT, CHART_WIDTH - MARGIN_RIGHT
    bottom = top + PANEL_HEIGHT
    highest = max([v for _, v in points] + ([cap] if cap is not None else []) + [0.0])
    ceiling = _nice_ceiling(highest * 1.05 if highest > 0 else 1.0)

    def x(at: float) -> float:
        return left + (at - start) / (now - start) * (right - left)

    def y(value: float) -> float:
        return bottom - value / ceiling * PANEL_HEIGHT

    out = [
        f'<g class="panel {css}">',
        f'<text class="title" x="{left}" y="{top - 8:.1f}">{title} ($' + unit + ")</text>",
    ]
    for i in range(5):  # horizontal grid lines and the y axis' labels
        value = ceiling * i / 4
        out.append(
            f'<line class="grid" x1="{left}" x2="{right}" y1="{y(value):.1f}" y2="{y(value):.1f}"/>'
            f'<text class="axis" x="{left - 6}" y="{y(value) + 4:.1f}" text-anchor="end">'
            f"{_axis_money(value, ceiling / 4)}</text>"
        )
    for at in _hour_ticks(start, now, zone):  # vertical ticks at whole hours, local time
        out.append(
            f'<line class="tick" x1="{x(at):.1f}" x2="{x(at):.1f}" y1="{top}" y2="{bottom}"/>'
            f'<text class="axis" x="{x(at):.1f}" y="{bottom + 16:.1f}" text-anchor="middle">'
            f"{_e(_clock(at, zone, hour_only=True))}</text>"
        )
    if cap is not None:
        out.append(
            f'<line class="cap" x1="{left}" x2="{right}" y1="{y(cap):.1f}" y2="{y(cap):.1f}"/>'
            f'<text class="caplabel" x="{right - 4}" y="{y(cap) - 5:.1f}" text-anchor="end">'
            f"cap {_money(cap)}{unit}</text>"
        )
    if points:
        out.append(f'<path class="line" d="{_path(points, x, y)}"/>')
        last_at, last = points[-1]
        out.append(
            f'<circle class="dot" cx="{x(last_at):.1f}" cy="{y(last):.1f}" r="3"/>'
            f'<text class="now" x="{min(x(last_at), right - 70) + 6:.1f}" '
            f'y="{max(y(last) - 8, top + 12):.1f}">{_money(last)}{unit}</text>'
        )
    out.append("</g>")
    return "".join(out)


def _path(
    points: Sequence[tuple[float, float]],
    x: Callable[[float], float],
    y: Callable[[float], float],
) -> str:
    """An SVG path through the points; a new subpath after a gap of more than 2 samples."""
    commands = []
    previous: float | None = None
    for at, value in points:
        verb = "M" if previous is None or at - previous > 2 * SAMPLE_SECONDS else "L"
        commands.append(f"{verb}{x(at):.1f},{y(value):.1f}")
        previous = at
    return " ".join(commands)


def _hour_ticks(start: float, end: float, zone: tzinfo) -> Iterable[float]:
    """Whole local hours divisible by TICK_HOURS between `start` and `end`."""
    t = math.ceil(start / 3600) * 3600.0
    while t <= end:
        local = datetime.fromtimestamp(t, zone)
        if local.minute == 0 and local.hour % TICK_HOURS == 0:
            yield t
        t += 3600.0


def _nice_ceiling(value: float) -> float:
    """The smallest round number at or above `value` whose quarters are round too."""
    magnitude = 10.0 ** math.floor(math.log10(value))
    for step in (1.0, 1.2, 1.6, 2.0, 3.0, 4.0, 6.0, 8.0, 10.0):
        if step * magnitude >= value * (1 - 1e-9):
            return step * magnitude
    return 10 * magnitude


# --- formatting ------------------------------------------------------------------------------


def _e(text: str) -> str:
    return html.escape(text, quote=True)


def _text(value: object) -> str:
    return DASH if value is None else str(value)


def _money(value: float | None) -> str:
    """Dollars: cents, or four decimals below $1 when cents would hide them ($0.0417)."""
    if value is None:
        return DASH
    if abs(value) < 1 and round(value, 2) != round(value, 6):
        return f"${value:.4f}"
    return f"${value:,.2f}"


def _axis_money(value: float, step: float) -> str:
    """An axis label: whole dollars when the grid's step is whole, else enough decimals."""
    if step >= 1 and step == round(step):
        return f"${value:,.0f}"
    return f"${value:,.2f}" if step >= 0.01 else f"${value:.4f}"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return DASH
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h {s % 3600 // 60:02d}m"
    return f"{s // 86400}d {s % 86400 // 3600}h"


def _clock(at: float, zone: tzinfo, *, seconds: bool = False, hour_only: bool = False) -> str:
    moment = datetime.fromtimestamp(at, zone)
    if hour_only:
        return moment.strftime("%H:%M")
    return moment.strftime("%Y-%m-%d %H:%M:%S" if seconds else "%H:%M:%S")


def _zone(name: object) -> tzinfo:
    if isinstance(name, str) and name:
        try:
            return ZoneInfo(name)
        except (KeyError, ValueError, OSError):  # ZoneInfoNotFoundError is a KeyError
            pass
    return UTC


def _zone_name(zone: tzinfo) -> str:
    return zone.key if isinstance(zone, ZoneInfo) else "UTC"


def _dict(value: object) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _dicts(value: object) -> list[Mapping[str, Any]]:
    return [item for item in value if isinstance(item, Mapping)] if isinstance(value, list) else []


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


_HEAD: Final = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="refresh" content="{REFRESH_SECONDS}">
<title>compute-broker status</title>
<style>
:root {{ color-scheme: light; --ink: #1f2430; --muted: #6b7280; --line: #e5e7eb;
  --rate: #2563eb; --spend: #d97706; --cap: #dc2626; --card: #f8fafc; }}
body {{ font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: var(--ink);
  margin: 0 auto; padding: 16px 24px 40px; max-width: 1180px; }}
header {{ display: flex; align-items: baseline; gap: 16px; flex-wrap: wrap; }}
h1 {{ font-size: 20px; margin: 0; }}
h2 {{ font-size: 15px; margin: 22px 0 8px; }}
.muted {{ color: var(--muted); font-size: 12.5px; margin: 0; }}
code {{ font: 12.5px ui-monospace, "DejaVu Sans Mono", monospace; }}
.cards {{ display: grid; grid-template-columns: repeat(auto-fit, minmax(190px, 1fr));
  gap: 12px; margin-top: 14px; }}
.card {{ background: var(--card); border: 1px solid var(--line); border-radius: 8px;
  padding: 10px 12px; }}
.card .title {{ color: var(--muted); font-size: 12px; text-transform: uppercase;
  letter-spacing: .04em; }}
.card .value {{ font-size: 22px; font-weight: 600; margin: 2px 0 4px; }}
.bar {{ height: 6px; background: var(--line); border-radius: 3px; overflow: hidden;
  margin-bottom: 5px; }}
.fill {{ height: 100%; }} .fill.low {{ background: #16a34a; }}
.fill.mid {{ background: #d97706; }} .fill.high {{ background: var(--cap); }}
table {{ border-collapse: collapse; width: 100%; }}
th, td {{ text-align: left; padding: 5px 8px; border-bottom: 1px solid var(--line);
  white-space: nowrap; }}
th {{ color: var(--muted); font-weight: 600; font-size: 12px; }}
.num {{ text-align: right; font-variant-numeric: tabular-nums; }}
.state {{ display: inline-block; padding: 0 7px; border-radius: 9px; font-size: 12px; }}
.state.ready {{ background: #dcfce7; color: #166534; }}
.state.launching {{ background: #dbeafe; color: #1e40af; }}
.state.terminating, .state.other {{ background: #f3f4f6; color: #374151; }}
.state.interrupted {{ background: #fee2e2; color: #991b1b; }}
.chart svg {{ width: 100%; height: auto; display: block; }}
svg text {{ font: 11px system-ui, sans-serif; fill: var(--muted); }}
svg .title {{ font-size: 12px; font-weight: 600; fill: var(--ink); }}
svg .grid {{ stroke: var(--line); }} svg .tick {{ stroke: #f1f5f9; }}
svg .line {{ fill: none; stroke-width: 2; stroke-linejoin: round; }}
svg .rate .line, svg .rate .dot {{ stroke: var(--rate); fill: var(--rate); }}
svg .rate .line {{ fill: none; }}
svg .spend .line, svg .spend .dot {{ stroke: var(--spend); fill: var(--spend); }}
svg .spend .line {{ fill: none; }}
svg .cap {{ stroke: var(--cap); stroke-dasharray: 6 4; }}
svg .caplabel {{ fill: var(--cap); }} svg .now {{ fill: var(--ink); font-weight: 600; }}
svg .empty {{ font-size: 13px; }}
ul {{ margin: 0; padding-left: 20px; }}
</style></head>
"""
