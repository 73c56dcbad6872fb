"""The fault bench's frame: a scenario's context (`Bench`), its result (`Result`, one table
row), and the checks every scenario ends with (the pool settles, then the registry is held
against EC2)."""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import signal
import statistics
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs

from bench import fault_checks as checks
from bench.fault_checks import Caps, Check
from bench.fault_harness import Broker, Cloud, Outcome, brokers_of
from bench.fault_inject import Reply, Request, Rule
from broker.prices import PriceTable

TYPE, MARKET = "c7i.8xlarge", "spot"
PRICE = PriceTable.default().price(TYPE, MARKET) or 0.0
# The settings most scenarios run with: nothing is reaped during a scenario (idle_timeout),
# and every second a reconciliation looks at EC2 and the registry.
IDLE_TIMEOUT, REAP_INTERVAL, LAUNCH_TIMEOUT = 600.0, 1.0, 20.0
STANDARD = {
    "idle_timeout": IDLE_TIMEOUT,
    "reap_interval": REAP_INTERVAL,
    "launch_timeout": LAUNCH_TIMEOUT,
}


def cover(
    idle: float = IDLE_TIMEOUT, reap: float = REAP_INTERVAL, launch: float = LAUNCH_TIMEOUT
) -> float:
    """Dollars one launch commits: its price until it could first be reaped."""
    return PRICE * (launch + idle + 2 * reap) / 3600


@attrs.frozen
class Result:
    """One row of the table."""

    scenario: str
    fault: str
    checks: tuple[Check, ...]
    figures: Mapping[str, Any]
    seconds: float
    known: str | None = None  # a known broker bug this scenario shows

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)


class Bench:
    """What a scenario works with: the sandbox cloud, a work directory for configs and
    logs, and whether this is the `--full` run."""

    def __init__(self, cloud: Cloud, workdir: Path, *, full: bool) -> None:
        self.cloud = cloud
        self.workdir = workdir
        self.full = full

    def pool(self, prefix: str) -> str:
        return f"{prefix}-{uuid.uuid4().hex[:8]}"

    def config(self, pool: str, **overrides: Any) -> dict[str, Any]:
        return {**self.cloud.base_config(pool), **STANDARD, **overrides}

    @contextlib.contextmanager
    def brokers(self) -> Iterator[Callable[..., Broker]]:
        with brokers_of(self.cloud, self.workdir) as start:
            yield start

    def start_together(
        self, start: Callable[..., Broker], configs: Sequence[Mapping[str, Any]]
    ) -> list[Broker]:
        """Start several brokers at once (their start-up checks overlap)."""
        started: list[Broker | BaseException | None] = [None] * len(configs)

        def one(n: int) -> None:
            try:
                started[n] = start(configs[n])
            except BaseException as exc:  # reported below, in this thread
                started[n] = exc

        threads = [threading.Thread(target=one, args=(n,)) for n in range(len(configs))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        for item in started:
            if not isinstance(item, Broker):
                raise RuntimeError(f"a broker did not start: {item}")
        return [b for b in started if isinstance(b, Broker)]

    def reset(self) -> None:
        """Between scenarios: no faults, no boot delay, the endpoint up."""
        self.cloud.injector.clear()
        self.cloud.boot_delay(0)
        if self.cloud.proxy._listener is None:
            self.cloud.proxy.start()


def kill_rule(
    broker: Broker,
    service: str,
    operation: str,
    match: Callable[[Request], bool] | None,
    *,
    after: bool = False,
) -> Rule:
    """SIGKILL `broker` when the first matching request reaches AWS: before it is carried out
    (the request is lost with the broker), or with `after`, once carried out and before the
    broker hears the answer."""

    def kill(_: Request) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(broker.pid, signal.SIGKILL)

    if after:
        return Rule(service, operation, match, after=kill, times=1)
    lost = Reply(500, b"", "text/plain")
    return Rule(service, operation, match, before=kill, reply=lost, times=1)


def today(zone: dt.tzinfo = dt.UTC) -> tuple[str, str]:
    """The ledger's current day and month labels in `zone`."""
    now = dt.datetime.now(zone)
    return now.date().isoformat(), f"{now.year:04d}-{now.month:02d}"


def caps_of(config: Mapping[str, Any]) -> Caps:
    day, month = today()
    return Caps(
        max_workers=config.get("max_workers", 10),
        max_hourly_cost=config.get("max_hourly_cost"),
        max_daily_cost=config.get("max_daily_cost"),
        max_monthly_cost=config.get("max_monthly_cost"),
        price=PRICE,
        cover=cover(
            config.get("idle_timeout", IDLE_TIMEOUT),
            config.get("reap_interval", REAP_INTERVAL),
            config.get("launch_timeout", LAUNCH_TIMEOUT),
        ),
        day=day,
        month=month,
    )


def consistent(cloud: Cloud, pool: str) -> bool:
    """The registry agrees with EC2: same workers, no intent, counter = instances."""
    live = cloud.live(pool)
    view = cloud.registry(pool)
    return checks.accounted(live, view).ok and checks.settled(view, live).ok


def pool_checks(
    bench: Bench,
    pool: str,
    outcomes: Sequence[Outcome],
    *,
    released: Sequence[str] = (),
    capacity: int | None = None,
    timeout: float = 15.0,
) -> list[Check]:
    """Wait (up to `timeout`) for the registry to agree with EC2, then check it: every
    instance accounted for, nothing left over, no lease lost, and in exclusive mode no
    worker leased twice."""
    cloud = bench.cloud
    with contextlib.suppress(Exception):
        wait_consistent(cloud, pool, timeout)
    live, view = cloud.live(pool), cloud.registry(pool)
    found = [
        checks.accounted(live, view),
        checks.settled(view, live),
        checks.leases_kept(outcomes, view, released),
    ]
    if capacity is not None:
        found.append(checks.exclusive(outcomes, view, capacity))
    return found


def wait_consistent(cloud: Cloud, pool: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if consistent(cloud, pool):
            return True
        time.sleep(0.5)
    return False


def latency_figures(outcomes: Sequence[Outcome]) -> dict[str, str]:
    seconds = sorted(o.seconds for o in outcomes)
    if not seconds:
        return {}
    return {
        "p50": f"{statistics.median(seconds):.2f}s",
        "max": f"{seconds[-1]:.2f}s",
    }


def launched(cloud: Cloud, pool: str) -> int:
    """Instances ever launched for the pool (terminated ones included)."""
    return len(cloud.instances(pool))


def rate_in_registry(cloud: Cloud, pool: str) -> float:
    return cloud.registry(pool).spend.get("rate", 0) / checks.MICROS


def outcome_counts(outcomes: Sequence[Outcome]) -> str:
    given = len(checks.granted(outcomes))
    errors = sum(1 for o in outcomes if o.error)
    return f"{given} given, {errors} refused"
