"""The policy simulator: the broker's real engine on simulated time over a trace of sessions.

`simulate(config, trace)` builds the real `broker.engine.Engine` for a config, with a
`MemoryRegistry` and `broker.simcloud.SimCloud` (the `Cloud` port in memory: instances boot
after a time drawn from a `BootModel` and are billed at the config's price table from launch to
termination), and runs it under Trio's `MockClock`, so a week of reaping, warm-pool refills,
bursting and boot polling passes in seconds. Each session of the trace (`broker.traces`) is a
client: it sends GET_WORKER at its arrival (`Engine.get_worker`), PINGs at its cadence, and
RELEASEs at its end or just goes away. A client whose PING says the worker is gone asks for
another one.

What it reports (`Result`): dollars spent (every instance's price x its lifetime), idle
dollars (the part of that while it was up and no session used it; booting is not idle), the
instances launched, the waits for a worker (median, p95), and the requests refused and the
workers lost under a session. `table` and `plot` compare configs. See docs/simulator.md.
"""

from __future__ import annotations

import contextlib
import logging
import math
import statistics
from collections.abc import Iterator, Sequence
from typing import Final

import attrs
import structlog
import trio
import trio.testing

from broker import wiring
from broker.clock import Clock, wall_time
from broker.config_validate import Config
from broker.engine import Engine, EngineSettings, Refusal, WorkerInterrupted, WorkerNotFound
from broker.handout import Handout
from broker.memory_registry import MemoryRegistry
from broker.model import WorkerRequest
from broker.prices import PriceTable
from broker.simcloud import BootModel, SimCloud, SimQueue
from broker.traces import Session, Trace

__all__ = ["BootModel", "PlotUnavailable", "Result", "plot", "simulate", "summary", "table"]

DAY: Final = 86400.0


# --- the clients ---------------------------------------------------------------------------


@attrs.frozen
class Use:
    """A session had a worker from `start` to `end` (or until the worker went away)."""

    instance_id: str
    start: float
    end: float


class Clients:
    """Plays the trace's sessions against the engine, and notes what they saw."""

    def __init__(self, engine: Engine, cloud: SimCloud) -> None:
        self.engine = engine
        self.cloud = cloud
        self.clock = engine.clock
        self.waits: list[float] = []
        self.uses: list[Use] = []
        self.refused = 0
        self.lost = 0
        self.last_end = 0.0

    async def play(self, session: Session) -> None:
        """One session: GET_WORKER, use it with PINGs, RELEASE (or not); a worker that
        goes away under a PINGing client is replaced for the rest of the session."""
        request = WorkerRequest(session.instance_type, session.market)
        remaining, asked = session.duration, self.clock.now()
        while True:
            try:
                handout = await self.engine.get_worker(request, session.client)
            except Refusal:
                self.refused += 1
                return
            got = self.clock.now()
            self.waits.append(got - asked)
            end = got + remaining
            self.last_end = max(self.last_end, end)
            if not await self._use(handout, session, end):
                now = self.clock.now()
                self.uses.append(Use(handout.instance_id, got, now))
                self.lost += 1
                remaining, asked = end - now, now
                continue
            self.uses.append(Use(handout.instance_id, got, end))
            if self.cloud.gone_before(handout.instance_id, end):
                self.lost += 1  # it went while the client did not PING: it never knew
            if session.release:
                with contextlib.suppress(WorkerNotFound):
                    await self.engine.release(handout.ip, session.client)
            return

    async def _use(self, handout: Handout, session: Session, end: float) -> bool:
        """PING until `end`; False if a PING said the worker is gone (or going)."""
        while True:
            now = self.clock.now()
            if session.ping is None or now + session.ping >= end:
                await sleep_until(self.clock, end)
                return True
            await sleep_until(self.clock, now + session.ping)
            try:
                await self.engine.ping(handout.ip, session.client)
            except (WorkerNotFound, WorkerInterrupted, Refusal):
                return False


async def sleep_until(clock: Clock, when: float) -> None:
    """Sleep until the engine's clock reads `when` (Unix seconds)."""
    await trio.sleep(max(0.0, when - clock.now()))


# --- one run ---------------------------------------------------------------------------------


@attrs.frozen
class Result:
    """What one config cost on one trace, and what its clients waited."""

    name: str
    sessions: int
    launches: int  # instances launched
    spent: float  # $: every instance's price x its lifetime
    idle: float  # $: the part of `spent` while up and used by no session (boot excluded)
    instance_hours: float
    waits: tuple[float, ...]  # seconds, one per GET_WORKER answered
    refused: int  # GET_WORKERs refused (a cap, max_workers, a launch that failed)
    lost: int  # workers that went away under a session
    unpriced_hours: float  # instance-hours of types with no known price (charged $0)
    running_at_end: int  # instances still up when the simulation stopped (charged until then)
    simulated_seconds: float
    wall_seconds: float = 0.0

    @property
    def median_wait(self) -> float | None:
        """Median seconds from GET_WORKER to the IP."""
        return statistics.median(self.waits) if self.waits else None

    @property
    def p95_wait(self) -> float | None:
        """95th percentile (nearest rank) of the seconds from GET_WORKER to the IP."""
        if not self.waits:
            return None
        ordered = sorted(self.waits)
        return ordered[max(0, math.ceil(0.95 * len(ordered)) - 1)]


def engine_settings(config: Config) -> EngineSettings:
    """The engine's knobs for a config, as serve sets them for AWS: no boot-time hint, the
    boot watcher learns them."""
    return wiring.engine_settings(config)


def simulate(
    config: Config,
    trace: Trace,
    *,
    boot: BootModel | None = None,
    seed: int = 0,
    name: str = "config",
) -> Result:
    """Run the engine for `config` over `trace` on simulated time (quietly: engine events
    below warning are dropped, which also makes it faster)."""
    started = wall_time()
    with quiet_logs():
        result = trio.run(
            _run,
            config,
            trace,
            boot or BootModel(),
            seed,
            name,
            clock=trio.testing.MockClock(autojump_threshold=0),
        )
    return attrs.evolve(result, wall_seconds=wall_time() - started)


async def _run(config: Config, trace: Trace, boot: BootModel, seed: int, name: str) -> Result:
    start = math.floor(trace.start / DAY) * DAY  # the first event's day, from midnight UTC
    clock = Clock(start)
    prices = PriceTable.default().with_overrides(config.prices)
    cloud = SimCloud(clock, prices, boot=boot, pool_name=config.pool_name, seed=seed)
    settings = attrs.evolve(engine_settings(config), probe=False)
    queue = SimQueue(clock, trace.depths) if settings.burst.mode == "auto" else None
    registry = MemoryRegistry(config.pool_name)
    engine = Engine(cloud, settings, clock, prices, registry, queue)
    clients = Clients(engine, cloud)
    async with trio.open_nursery() as nursery:
        await nursery.start(engine.run)
        async with trio.open_nursery() as sessions:
            for session in trace.sessions:
                await sleep_until(clock, session.at)
                sessions.start_soon(clients.play, session)
        # Every session is over: let the reaper take what it will, then stop the clock.
        await sleep_until(clock, trace.last_depth_change)
        reap = settings.reap_interval
        horizon = max(clock.now(), clients.last_end) + settings.limits.idle_timeout + 2 * reap
        while cloud.alive and clock.now() < horizon:
            await sleep_until(clock, min(horizon, clock.now() + reap))
        nursery.cancel_scope.cancel()
    return _result(name, trace, cloud, clients, start, clock.now())


def _result(
    name: str, trace: Trace, cloud: SimCloud, clients: Clients, start: float, end: float
) -> Result:
    uses: dict[str, list[Use]] = {}
    for use in clients.uses:
        uses.setdefault(use.instance_id, []).append(use)
    spent = idle = hours = unpriced = 0.0
    for instance in cloud.instances.values():
        stop = instance.terminated_at if instance.terminated_at is not None else end
        life = max(0.0, stop - instance.launched_at)
        up_from = min(stop, max(instance.launched_at, instance.running_at))
        busy = _covered(uses.get(instance.instance_id, []), up_from, stop)
        price = instance.price or 0.0
        spent += price * life / 3600
        idle += price * max(0.0, stop - up_from - busy) / 3600
        hours += life / 3600
        if instance.price is None:
            unpriced += life / 3600
    return Result(
        name=name,
        sessions=len(trace.sessions),
        launches=len(cloud.instances),
        spent=spent,
        idle=idle,
        instance_hours=hours,
        waits=tuple(clients.waits),
        refused=clients.refused,
        lost=clients.lost,
        unpriced_hours=unpriced,
        running_at_end=len(cloud.alive),
        simulated_seconds=end - start,
    )


def _covered(uses: Sequence[Use], low: float, high: float) -> float:
    """Seconds of [low, high] inside at least one use."""
    total, reached = 0.0, low
    for use in sorted(uses, key=lambda u: u.start):
        begin, finish = max(use.start, reached), min(use.end, high)
        if finish > begin:
            total += finish - begin
            reached = finish
    return total


@contextlib.contextmanager
def quiet_logs(level: int = logging.WARNING) -> Iterator[None]:
    """Drop structlog events below `level` while simulating; the old setup comes back."""
    saved = structlog.get_config()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(level))
    try:
        yield
    finally:
        structlog.configure(**saved)


# --- comparing -------------------------------------------------------------------------------


COLUMNS: Final = (
    "config",
    "spent $",
    "idle $",
    "launches",
    "median wait s",
    "p95 wait s",
    "refused",
    "lost",
)


def table(results: Sequence[Result]) -> str:
    """A Markdown table, one row per result."""

    def seconds(value: float | None) -> str:
        return "-" if value is None else f"{value:.1f}"

    rows = [
        (
            r.name,
            f"{r.spent:.2f}",
            f"{r.idle:.2f}",
            str(r.launches),
            seconds(r.median_wait),
            seconds(r.p95_wait),
            str(r.refused),
            str(r.lost),
        )
        for r in results
    ]
    lines = ["| " + " | ".join(COLUMNS) + " |", "| --- |" + " ---: |" * (len(COLUMNS) - 1)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def summary(result: Result) -> str:
    """One line on what was simulated, and how fast."""
    days = result.simulated_seconds / DAY
    line = (
        f"{result.name}: {result.sessions} sessions, {len(result.waits)} GET_WORKERs answered, "
        f"{result.instance_hours:.1f} instance-hours; {days:.1f} days simulated in "
        f"{result.wall_seconds:.1f} s"
    )
    if result.running_at_end:
        line += f"; {result.running_at_end} instance(s) still up at the end, charged until then"
    if result.unpriced_hours:
        line += f" ({result.unpriced_hours:.1f} instance-hours of types without a price: $0)"
    return line


class PlotUnavailable(RuntimeError):
    """matplotlib is not installed (the `plot` extra)."""


MARKERS: Final = "osD^vP*X"


def plot(results: Sequence[Result], path: str, *, title: str = "") -> None:
    """A PNG of dollars spent against the wait for a worker, one labelled point per result:
    the marker at the median wait, a line from it to the p95; the legend has the figures."""
    try:
        from matplotlib.figure import Figure  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        raise PlotUnavailable(
            "--plot needs matplotlib: pip install 'compute-broker[plot]'"
        ) from None
    shown = [r for r in results if r.median_wait is not None and r.p95_wait is not None]
    right = max((r.p95_wait or 0.0 for r in shown), default=1.0) * 1.4 + 1
    top = max((r.spent for r in shown), default=1.0) * 1.3 + 0.01
    figure = Figure(figsize=(7.5, 4.8), layout="constrained")
    axes = figure.subplots()
    placed: list[tuple[float, float]] = []
    for index, result in enumerate(shown):
        median, p95 = result.median_wait or 0.0, result.p95_wait or 0.0
        color, marker = f"C{index % 10}", MARKERS[index % len(MARKERS)]
        label = (
            f"{result.name}: \\${result.spent:.2f} spent, \\${result.idle:.2f} idle; "
            f"wait {median:.0f} s median, {p95:.0f} s p95"
        )
        axes.plot([median, p95], [result.spent] * 2, color=color, linewidth=2, alpha=0.4)
        axes.plot([median], [result.spent], marker, color=color, markersize=8, label=label)
        # Names of points close together are stacked rather than drawn over each other.
        near = sum(
            1
            for x, y in placed
            if abs(x - median) < 0.15 * right and abs(y - result.spent) < 0.08 * top
        )
        placed.append((median, result.spent))
        axes.annotate(
            result.name,
            (median, result.spent),
            xytext=(8 + 36 * near, 6 + 12 * near),
            textcoords="offset points",
            fontsize=9,
            color=color,
            # A name moved away from its point is tied to it by a thin line.
            arrowprops={"arrowstyle": "-", "color": color, "lw": 0.6} if near else None,
        )
    axes.set_xlim(-0.02 * right, right)  # a marker at 0 s shows whole
    axes.set_ylim(0, top)
    axes.set_xlabel("wait for a worker, s (marker: median; line: to the 95th percentile)")
    axes.set_ylabel("spent, $")
    axes.grid(alpha=0.3)
    axes.legend(loc="lower right", fontsize=8)
    if title:
        axes.set_title(title, fontsize=10)
    figure.savefig(path, dpi=110)
