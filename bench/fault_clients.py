"""Fault scenarios at the edges: the budget's clock running across midnight and a month's
end (in-process, on Trio's MockClock: hours pass in milliseconds), and hostile clients
against a broker process."""

from __future__ import annotations

import datetime as dt
import math
import os
import random
import select
import socket
import statistics
import threading
import time
from typing import Any
from zoneinfo import ZoneInfo

import structlog
import trio
from trio.testing import MockClock

from bench import fault_checks as checks
from bench.fault_bench import PRICE, Bench, Result
from bench.fault_harness import HOST, Outcome, ask, proc_figures
from broker.clock import Clock
from broker.cloud import LaunchSpec, Market
from broker.engine import Engine, EngineSettings, Refusal
from broker.ledger import MICROS, Budget, charge
from broker.memory_registry import MemoryRegistry
from broker.model import Limits, WorkerRequest
from broker.prices import PriceTable
from tests.fakes import FakeCloud

# --- the budget's clock across midnight and month end ---------------------------------------

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
        "charged for the pause": f"${uncovered:.4f} (uncovered time, over the cap by design)",
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


# --- hostile clients ------------------------------------------------------------------------

CLIENT_TIMEOUT = 12.0  # the broker's, in this scenario: longer than one byte's 10 s gap
SILENT = 200
HUGE = 10
BINARY_CONNECTIONS, BINARY_LINES = 20, 50
SLOW = 3
STORM_RATE = 2000  # connect-and-close attempts per second, at most


def hostile_clients(bench: Bench) -> list[Result]:
    """Silent sockets, 1 MiB lines, binary lines, one byte per 10 s and a connect-and-close
    storm, all at once against one broker, while a well-behaved client keeps asking."""
    storm_seconds = 10.0 if bench.full else 5.0
    pool = bench.pool("hostile")
    config = bench.config(pool, client_timeout=CLIENT_TIMEOUT, max_connections=4096)
    rows: list[Result] = []
    with bench.brokers() as start:
        broker = start(config)
        good_ip = broker.ask("GET_WORKER client=good").reply
        time.sleep(0.5)
        rss_before, fds_before = proc_figures(broker.pid)
        results: dict[str, Any] = {}
        stop = threading.Event()
        jobs = {
            "silent": lambda: _silent(broker.port),
            "huge": lambda: _huge(broker.port),
            "binary": lambda: _binary(broker.port),
            "slow": lambda: _slow(broker.port),
            "storm": lambda: _storm(broker.port, storm_seconds),
        }
        good: list[Outcome] = []
        threads = [
            threading.Thread(target=_into, args=(results, name, job), daemon=True)
            for name, job in jobs.items()
        ]
        keeper = threading.Thread(target=_good_client, args=(broker.port, good_ip, stop, good))
        began = time.monotonic()
        keeper.start()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(CLIENT_TIMEOUT * 3 + storm_seconds)
        stop.set()
        keeper.join(30)
        seconds = time.monotonic() - began
        closed = _wait_fds(broker.pid, fds_before + 5, 15)
        rss_after, fds_after = proc_figures(broker.pid)
        alive = broker.alive()
        instances = len(bench.cloud.instances(pool))
    for name, job_rows in _rows(results, seconds).items():
        rows.extend(job_rows if name in results else [_missing(name, seconds)])
    latencies = sorted(o.seconds for o in good)
    p99 = latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))] if latencies else math.inf
    found = [
        checks.holds("the broker stayed up", alive),
        checks.one_reply_each(good),
        checks.holds(
            "every request of the good client served",
            bool(good) and all(o.ok for o in good),
            f"{sum(o.ok for o in good)} of {len(good)}",
        ),
        checks.holds("good client's p99 under 1 s", p99 < 1.0, f"p99 {p99 * 1000:.0f} ms"),
        checks.holds(
            "connections given back (open files at the start again)",
            closed,
            f"{fds_before} -> {fds_after}",
        ),
        checks.holds(
            "nothing launched by hostile input", instances == 1, f"{instances} instance(s)"
        ),
    ]
    figures = {
        "good requests": len(good),
        "p50": f"{statistics.median(latencies) * 1000:.1f} ms" if latencies else "-",
        "p99": f"{p99 * 1000:.0f} ms",
        "RSS": f"{rss_before:.0f} -> {rss_after:.0f} MB",
        "open files": f"{fds_before} -> {fds_after}",
    }
    rows.append(
        Result(
            "hostile clients: a good client meanwhile",
            "all of the above at once",
            tuple(found),
            figures,
            seconds,
        )
    )
    return rows


def _into(results: dict[str, Any], name: str, job: Any) -> None:
    try:
        results[name] = job()
    except Exception as exc:  # a failed job is reported as such in its row
        results[name] = exc


def _missing(name: str, seconds: float) -> Result:
    return Result(f"hostile clients: {name}", "", (checks.holds("ran", False),), {}, seconds)


def _rows(results: dict[str, Any], seconds: float) -> dict[str, list[Result]]:
    rows: dict[str, list[Result]] = {}
    for name, (title, fault) in {
        "silent": ("silent sockets", f"{SILENT} connections that send nothing"),
        "huge": ("1 MiB lines", f"{HUGE} connections send 1 MiB without a line feed"),
        "binary": ("binary lines", f"{BINARY_CONNECTIONS} x {BINARY_LINES} random binary lines"),
        "slow": ("one byte per 10 s", f"{SLOW} connections, a byte every 10 s"),
        "storm": ("connect-and-close storm", f"up to {STORM_RATE}/s"),
    }.items():
        value = results.get(name)
        if isinstance(value, Exception) or value is None:
            found = (checks.holds("ran to the end", False, repr(value)),)
            rows[name] = [Result(f"hostile clients: {title}", fault, found, {}, seconds)]
            continue
        found, figures = value
        rows[name] = [Result(f"hostile clients: {title}", fault, tuple(found), figures, seconds)]
    return rows


def _good_client(port: int, ip: str | None, stop: threading.Event, out: list[Outcome]) -> None:
    lines = ["GET_WORKER client=good", f"PING {ip} client=good"]
    n = 0
    while not stop.is_set():
        out.append(ask(port, lines[n % 2], timeout=10))
        n += 1
        stop.wait(0.05)


def _wait_fds(pid: int, at_most: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if len(os.listdir(f"/proc/{pid}/fd")) <= at_most:
            return True
        time.sleep(0.5)
    return False


def _closed_after(sock: socket.socket, timeout: float) -> tuple[float | None, bytes]:
    """Seconds until the broker closed `sock` (None: still open after `timeout`) and the
    bytes it sent meanwhile."""
    began = time.monotonic()
    received = b""
    while (left := timeout - (time.monotonic() - began)) > 0:
        ready, _, _ = select.select([sock], [], [], left)
        if not ready:
            break
        try:
            chunk = sock.recv(65536)
        except OSError:
            return time.monotonic() - began, received  # reset
        if not chunk:
            return time.monotonic() - began, received
        received += chunk
    return None, received


def _silent(port: int) -> tuple[list[checks.Check], dict[str, Any]]:
    socks = [socket.create_connection((HOST, port), timeout=10) for _ in range(SILENT)]
    began = time.monotonic()
    closes: list[float | None] = []
    sent = 0
    try:
        for sock in socks:
            left = CLIENT_TIMEOUT + 10 - (time.monotonic() - began)
            after, data = _closed_after(sock, max(0.1, left))
            closes.append(None if after is None else time.monotonic() - began)
            sent += len(data)
    finally:
        for sock in socks:
            sock.close()
    shut = [c for c in closes if c is not None]
    in_time = all(CLIENT_TIMEOUT - 1 <= c <= CLIENT_TIMEOUT + 5 for c in shut)
    found = [
        checks.holds(
            "every silent connection closed at client_timeout",
            len(shut) == SILENT and in_time,
            f"{len(shut)} of {SILENT}, after {min(shut, default=0):.1f}-"
            f"{max(shut, default=0):.1f}s (client_timeout {CLIENT_TIMEOUT:g}s)",
        ),
        checks.holds("nothing sent to a silent client", sent == 0, f"{sent} bytes"),
    ]
    return found, {"closed": f"{len(shut)}/{SILENT}", "after": f"{max(shut, default=0):.1f}s"}


def _huge(port: int) -> tuple[list[checks.Check], dict[str, Any]]:
    outcomes: list[str] = []

    def one() -> None:
        with socket.create_connection((HOST, port), timeout=30) as sock:
            try:
                sock.sendall(b"A" * (1 << 20))
            except OSError:
                pass  # the broker stopped reading and closed: the reply may still be there
            after, data = _closed_after(sock, 30)
            if after is None:
                outcomes.append("still open")
            elif data == b"ERROR: line too long\n":
                outcomes.append("ERROR: line too long")
            elif data == b"":
                outcomes.append("reset")
            else:
                outcomes.append(f"other: {data[:40]!r}")

    threads = [threading.Thread(target=one) for _ in range(HUGE)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    good = outcomes.count("ERROR: line too long") + outcomes.count("reset")
    found = [
        checks.holds(
            "each answered ERROR: line too long (or reset) and closed",
            good == HUGE,
            ", ".join(f"{outcomes.count(k)} {k}" for k in sorted(set(outcomes))),
        )
    ]
    return found, {
        "line too long": outcomes.count("ERROR: line too long"),
        "reset": outcomes.count("reset"),
    }


def _binary(port: int) -> tuple[list[checks.Check], dict[str, Any]]:
    replies: list[list[str]] = []
    rng = random.Random(15)

    def line() -> bytes:
        body = bytes(
            rng.choice([b for b in range(256) if b != 0x0A]) for _ in range(rng.randint(0, 200))
        )
        return bytes([rng.randint(0x80, 0xFF)]) + body + b"\n"

    batches = [b"".join(line() for _ in range(BINARY_LINES)) for _ in range(BINARY_CONNECTIONS)]

    def one(batch: bytes) -> None:
        got: list[str] = []
        with socket.create_connection((HOST, port), timeout=30) as sock:
            sock.sendall(batch + b"QUIT\n")
            data = b""
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
            got = data.decode("ascii", "replace").split("\n")
        replies.append(got)

    threads = [threading.Thread(target=one, args=(batch,)) for batch in batches]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    exact = sum(1 for got in replies if got[-2:] == ["OK bye", ""] and len(got) == BINARY_LINES + 2)
    errors = [r for got in replies for r in got[:BINARY_LINES]]
    all_errors = all(r.startswith("ERROR") for r in errors)
    kinds = sorted({r.partition(":")[2].strip() for r in errors if r.startswith("ERROR")})
    found = [
        checks.holds(
            "one reply line per binary line, in order, then QUIT's",
            exact == BINARY_CONNECTIONS,
            f"{exact} of {BINARY_CONNECTIONS} exact",
        ),
        checks.holds("every binary line answered with an ERROR line", all_errors, "; ".join(kinds)),
    ]
    return found, {"lines": BINARY_CONNECTIONS * BINARY_LINES, "replies": len(errors)}


def _slow(port: int) -> tuple[list[checks.Check], dict[str, Any]]:
    closes: list[float | None] = []

    def one() -> None:
        with socket.create_connection((HOST, port), timeout=30) as sock:
            began = time.monotonic()
            for byte in b"PING 1.2.3.4":
                try:
                    sock.sendall(bytes([byte]))
                except OSError:
                    break
                after, _ = _closed_after(sock, 10.0)
                if after is not None:
                    closes.append(time.monotonic() - began)
                    return
            closes.append(None)

    threads = [threading.Thread(target=one) for _ in range(SLOW)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(CLIENT_TIMEOUT * 3)
    shut = [c for c in closes if c is not None]
    ok = len(shut) == SLOW and all(CLIENT_TIMEOUT - 1 <= c <= CLIENT_TIMEOUT + 5 for c in shut)
    found = [
        checks.holds(
            "a trickle does not extend client_timeout",
            ok,
            f"closed after {', '.join(f'{c:.1f}s' for c in shut)}",
        )
    ]
    return found, {"closed after": f"{max(shut, default=0):.1f}s"}


def _storm(port: int, seconds: float) -> tuple[list[checks.Check], dict[str, Any]]:
    counts = {"connected": 0, "failed": 0}
    lock = threading.Lock()
    began = time.monotonic()

    def one(share: float) -> None:
        n = 0
        while (elapsed := time.monotonic() - began) < seconds:
            if n > elapsed * share:  # pace: at most `share` per second from this thread
                time.sleep(0.001)
                continue
            n += 1
            try:
                socket.create_connection((HOST, port), timeout=5).close()
                key = "connected"
            except OSError:
                key = "failed"
            with lock:
                counts[key] += 1

    workers = 4
    threads = [threading.Thread(target=one, args=(STORM_RATE / workers,)) for _ in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(seconds + 30)
    elapsed = time.monotonic() - began
    rate = counts["connected"] / elapsed
    found = [
        checks.holds(
            "every connection accepted",
            counts["failed"] == 0,
            f"{counts['connected']} connected, {counts['failed']} failed",
        )
    ]
    return found, {"connects": counts["connected"], "rate": f"{rate:,.0f}/s"}
