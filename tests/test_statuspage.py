"""The status page: pure rendering of a STATUS document and a day of history, and the page as
headless Chromium shows it (skipped where Debian's `chromium` is not installed).

`python -m tests.test_statuspage docs/status-page.png` regenerates the screenshot in docs/.
"""

from __future__ import annotations

import re
import shutil
import sys
import tempfile
from datetime import UTC, datetime
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
import trio

from broker.metrics import Metrics
from broker.monitor import Monitor, MonitorSettings
from broker.statuspage import SAMPLE_SECONDS, History, chart_svg, render

# 16:42 in Berlin, the budget's time zone.
NOW = datetime(2026, 11, 23, 15, 42, 10, tzinfo=UTC).timestamp()
MIDNIGHT = datetime(2026, 11, 22, 23, 0, tzinfo=UTC).timestamp()  # 00:00 in Berlin
READY_IP, INTERRUPTED_IP = "54.214.3.7", "3.91.120.44"
HOSTILE = "<script>alert(1)</script>\"'&"
CHROMIUM = shutil.which("chromium")


def sample_history(now: float = NOW) -> History:
    """A working day: one warm worker at night, more in office hours, one sample a minute;
    the day's spend is the run rate summed since midnight in Berlin."""
    history = History()
    spent = 0.0
    at = now - 24 * 3600
    while at <= now:
        hour = (at - MIDNIGHT) / 3600 % 24
        workers = 1 if hour < 7.5 or hour >= 21 else 3 if hour < 9 else 7 if hour < 12.5 else 4
        if 13.5 <= hour < 15.3:
            workers = 9
        rate = 1.8064 if now - at < 20 * 60 else workers * 0.5
        if at >= MIDNIGHT and at - SAMPLE_SECONDS < MIDNIGHT:
            spent = 0.0  # a new day in the budget's time zone
        spent += rate * SAMPLE_SECONDS / 3600
        history.add(at, rate, round(spent, 4))
        at += SAMPLE_SECONDS
    return history


def sample_status(now: float = NOW, spent_today: float = 12.41) -> dict[str, Any]:
    """A STATUS document as protocol.md describes it: 3 workers, 2 leases, capped budget."""
    return {
        "workers": [
            {
                "instance_id": "i-0a1b2c3d4e5f60718",
                "ip": READY_IP,
                "type": "c7i.8xlarge",
                "market": "spot",
                "state": "ready",
                "clients": 1,
                "idle_seconds": 12.5,
                "price_per_hour": 0.5,
                "launched_at": now - 2 * 3600 - 13 * 60,
                "provider": "ec2",
                "paid_until": now + 1800,
                "interrupted": None,
            },
            {
                "instance_id": "i-0b2c3d4e5f6071829",
                "ip": INTERRUPTED_IP,
                "type": "c7i.8xlarge",
                "market": "spot",
                "state": "ready",
                "clients": 1,
                "idle_seconds": 64.0,
                "price_per_hour": 0.5,
                "launched_at": now - 5 * 3600 - 4 * 60,
                "provider": "ec2",
                "paid_until": now + 900,
                "interrupted": {"reason": "spot_interruption", "deadline": now + 95},
            },
            {
                "instance_id": "i-0c3d4e5f607182930",
                "ip": None,
                "type": "m7i.4xlarge",
                "market": "on-demand",
                "state": "launching",
                "clients": 0,
                "idle_seconds": 41.0,
                "price_per_hour": 0.8064,
                "launched_at": now - 41,
                "provider": "ec2",
                "paid_until": now + 1500,
                "interrupted": None,
            },
        ],
        "leases": [
            {
                "client": "10.0.0.5/main",
                "instance_id": "i-0a1b2c3d4e5f60718",
                "ip": READY_IP,
                "started_at": now - 2 * 3600,
                "idle_seconds": 12.5,
                "cost_usd": 1.0,
            },
            {
                "client": "10.0.0.17/scope-3",
                "instance_id": "i-0b2c3d4e5f6071829",
                "ip": INTERRUPTED_IP,
                "started_at": now - 300,
                "idle_seconds": 64.0,
                "cost_usd": 0.0417,
            },
        ],
        "totals": {
            "workers": 3,
            "by_state": {"launching": 1, "ready": 2, "terminating": 0},
            "launches_in_flight": 1,
            "run_rate_per_hour": 1.8064,
            "max_hourly_cost": 10.0,
            "max_workers": 10,
            "clients_per_worker": None,
        },
        "budget": {
            "day": {
                "period": "2026-11-23",
                "spent": spent_today,
                "committed": round(spent_today + 1.61, 4),
                "limit": 50.0,
                "remaining": round(50 - spent_today - 1.61, 4),
            },
            "month": {
                "period": "2026-11",
                "spent": 310.5,
                "committed": 312.11,
                "limit": None,
                "remaining": None,
            },
            "timezone": "Europe/Berlin",
            "on_cap": "refuse",
            "run_rate_per_hour": 1.8064,
            "max_hourly_cost": 10.0,
        },
        "capacity": {
            "failed_offerings": [
                {
                    "offering": "c7i.8xlarge spot in subnet-0aaa",
                    "code": "InsufficientInstanceCapacity",
                    "retry_after": now + 180,
                }
            ],
            "fallbacks": [
                {
                    "at": now - 41,
                    "wanted": "c7i.8xlarge spot",
                    "got": "m7i.4xlarge on-demand",
                    "after": ["c7i.8xlarge spot: InsufficientInstanceCapacity"],
                }
            ],
        },
    }


class _Cells(HTMLParser):
    """The text of every table row, as lists of cell texts, and every element's tag."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[list[str]] = []
        self.tags: list[str] = []
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        if tag == "tr":
            self.rows.append([])
        elif tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None:
            self.rows[-1].append("".join(self._cell).strip())
            self._cell = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


def parse(page: str) -> _Cells:
    parser = _Cells()
    parser.feed(page)
    return parser


def test_page_lists_every_worker_with_ip_type_market_state_and_clients() -> None:
    """Each worker of the STATUS document is a row: id, IP, type, market, state, clients."""
    document = sample_status()
    rows = parse(render(document, History(), NOW)).rows
    for worker in document["workers"]:
        row = next(r for r in rows if r and r[0] == worker["instance_id"])
        assert row[1] == (worker["ip"] or "\u2014")
        assert row[2:4] == [worker["type"], worker["market"]]
        assert row[4].startswith(worker["state"])
        assert row[5] == str(worker["clients"])
    interrupted = next(r for r in rows if r and r[1] == INTERRUPTED_IP)
    assert "interrupted: spot_interruption by 16:43:45" in interrupted[4]  # Berlin time


def test_page_shows_worker_idle_and_uptime_as_durations() -> None:
    """Idle and up times read as a person reads them: 12s, 2h 13m."""
    rows = parse(render(sample_status(), History(), NOW)).rows
    row = next(r for r in rows if r and r[1] == READY_IP)
    assert row[6:9] == ["12s", "2h 13m", "$0.50/h"]


def test_page_lists_leases_with_their_cost_so_far() -> None:
    """Each lease is a row with its client, worker, age, idle time and cost so far."""
    rows = parse(render(sample_status(), History(), NOW)).rows
    lease = next(r for r in rows if r and r[0] == "10.0.0.17/scope-3")
    assert lease == [
        "10.0.0.17/scope-3",
        INTERRUPTED_IP,
        "i-0b2c3d4e5f6071829",
        "5m 00s",
        "1m 04s",
        "$0.0417",
    ]


def test_page_shows_spend_today_and_this_month_against_the_caps() -> None:
    """The day's spend with its cap and a bar; the month without a cap says so."""
    page = render(sample_status(), History(), NOW)
    text = re.sub(r"<[^>]+>", " ", page)
    assert re.search(
        r"Spend today\s+\$12\.41\s+2026-11-23: committed \$14\.02 of the \$50\.00 cap", text
    )
    assert re.search(r"Spend this month\s+\$310\.50\s+2026-11: committed \$312\.11; no cap", text)
    assert 'style="width:28.0%"' in page  # 14.02 of 50
    assert re.search(r"Run rate\s+\$1\.81/h\s+cap \$10\.00/h", text)


def test_hostile_strings_from_the_document_are_escaped() -> None:
    """A tag or quote in any string field shows as text, never as markup."""
    document = sample_status()
    document["workers"][0].update(
        instance_id=HOSTILE, type=HOSTILE, market=HOSTILE, state=HOSTILE, provider=HOSTILE
    )
    document["workers"][1]["interrupted"]["reason"] = HOSTILE
    document["leases"][0]["client"] = HOSTILE
    document["budget"]["day"]["period"] = HOSTILE
    document["budget"]["timezone"] = HOSTILE
    document["capacity"]["failed_offerings"][0]["offering"] = HOSTILE
    page = render(document, History(), NOW)
    assert "<script" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;&quot;&#x27;&amp;" in page
    assert "script" not in parse(page).tags
    assert "(UTC)" in page  # an unknown time zone falls back to UTC


def test_a_malformed_or_empty_document_still_renders() -> None:
    """Missing sections and wrong types show as absent, not as an error page."""
    for document in ({}, {"workers": "x", "leases": [1, None], "budget": [], "totals": None}):
        page = render(document, History(), NOW)
        assert "No workers." in page
        assert "No leases." in page


def test_history_keeps_one_sample_a_minute_for_24_hours() -> None:
    """A second sample in the same minute replaces the first; samples older than a day go."""
    history = History()
    history.add(960_000.0, 1.0, 2.0)
    history.add(960_030.0, 1.5, 2.5)
    assert [(s.at, s.run_rate) for s in history.samples(960_030.0)] == [(960_030.0, 1.5)]
    for minute in range(1, 24 * 60 + 5):
        history.add(960_000.0 + minute * 60, 1.0, None)
    now = 960_000.0 + (24 * 60 + 4) * 60
    kept = history.samples(now)
    assert kept[0].at >= now - 24 * 3600
    assert len(kept) == 24 * 60 + 1


def test_history_records_a_status_documents_run_rate_and_days_spend() -> None:
    """`record` takes the budget's run rate and the day's spent dollars."""
    history = History()
    history.record(NOW, sample_status())
    history.record(NOW + 60, {})
    assert [(s.run_rate, s.spent_today) for s in history.samples(NOW + 60)] == [
        (1.8064, 12.41),
        (0.0, None),
    ]


def test_chart_draws_a_path_through_each_sample_and_the_caps() -> None:
    """Each panel's path has a point per sample; the caps are dashed lines with labels."""
    history = History()
    for minute in range(10):
        history.add(NOW - 600 + minute * 60, 0.5 * minute, 0.1 * minute)
    svg = chart_svg(history.samples(NOW), NOW, UTC, sample_status()["budget"])
    paths = re.findall(r'<path class="line" d="([^"]+)"', svg)
    assert len(paths) == 2
    for path in paths:
        points = path.split(" ")
        assert len(points) == 10
        assert points[0].startswith("M") and all(p.startswith("L") for p in points[1:])
    assert "cap $10.00/h" in svg and "cap $50.00" in svg


def test_chart_breaks_the_line_where_samples_are_missing() -> None:
    """A gap of more than two minutes (the broker was down) starts a new subpath."""
    history = History()
    for at in (NOW - 900, NOW - 840, NOW - 300, NOW - 240):
        history.add(at, 1.0, 1.0)
    svg = chart_svg(history.samples(NOW), NOW, UTC, {})
    path = re.search(r'<path class="line" d="([^"]+)"', svg)
    assert path is not None
    assert [p[0] for p in path.group(1).split(" ")] == ["M", "L", "M", "L"]


def test_chart_without_samples_says_so() -> None:
    """An empty history draws the axes and a note, no line."""
    svg = chart_svg([], NOW, UTC, {})
    assert "<path" not in svg
    assert "No samples yet" in svg


def test_page_has_no_script_and_embeds_the_chart() -> None:
    """The page is HTML and inline SVG only, with the day's history drawn."""
    page = render(sample_status(), sample_history(), NOW)
    tags = parse(page).tags
    assert "script" not in tags
    assert tags.count("svg") == 1
    assert tags.count("path") == 2


async def serve_sample(nursery: trio.Nursery) -> int:
    """Run a monitor on a free loopback port serving the sample STATUS; its port."""
    history = sample_history()
    spent_today = history.samples(NOW)[-1].spent_today
    assert spent_today is not None

    async def status() -> dict[str, Any]:
        return sample_status(spent_today=spent_today)

    monitor = Monitor(
        MonitorSettings(host="127.0.0.1", port=0, sample_interval=0),
        status=status,
        health=lambda: (True, "ok"),
        metrics=Metrics(),
        history=history,
        now=lambda: NOW,
    )
    listeners = await nursery.start(monitor.run)
    return int(listeners[0].socket.getsockname()[1])


async def chromium(*args: str, profile: Path) -> bytes:
    """Run headless Chromium (as root it needs --no-sandbox); its stdout."""
    assert CHROMIUM is not None
    command = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        f"--user-data-dir={profile}",
        *args,
    ]
    result = await trio.run_process(command, capture_stdout=True, capture_stderr=True)
    return result.stdout


@pytest.mark.slow  # starts Chromium
@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed")
async def test_chromium_shows_the_workers_status_shows(tmp_path: Path) -> None:
    """Headless Chromium loads / from the listener and its DOM lists every worker IP."""
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            port = await serve_sample(nursery)
            dom = (
                await chromium("--dump-dom", f"http://127.0.0.1:{port}/", profile=tmp_path)
            ).decode()
            nursery.cancel_scope.cancel()
    rows = parse(dom).rows
    ips = {w["ip"] for w in sample_status()["workers"] if w["ip"]}
    assert ips == {READY_IP, INTERRUPTED_IP}
    assert ips <= {row[1] for row in rows if len(row) > 1}
    assert "Spend today" in dom


async def _screenshot(path: Path, profile: Path) -> None:
    async with trio.open_nursery() as nursery:
        port = await serve_sample(nursery)
        await chromium(
            f"--screenshot={path}",
            "--window-size=1200,1180",
            "--hide-scrollbars",
            f"http://127.0.0.1:{port}/",
            profile=profile,
        )
        nursery.cancel_scope.cancel()


if __name__ == "__main__":
    target = Path(sys.argv[1] if len(sys.argv) > 1 else "docs/status-page.png").resolve()
    with tempfile.TemporaryDirectory() as profile_dir:
        trio.run(_screenshot, target, Path(profile_dir))
