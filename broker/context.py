"""What the engine's rooms share: the pool, the ports, the clock, the settings, the signals.

Every room (`broker.handout`, `broker.launcher`, `broker.bootwatch`, `broker.retire`,
`broker.reconcile`, `broker.spending`, `broker.scaling`, `broker.ec2_events`) takes one
`Context`. Best-effort registry writes and reads (logged, never raised) go through
`Context.write` and `Context.read`, so their log lines are written in one place.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from typing import Any, TypeVar

import attrs
import structlog
import trio

from broker.adaptive import (
    DEFAULT_BOOT_SECONDS,
    ArrivalHistory,
    IdlePolicy,
    IdleRule,
    LeaseLengths,
)
from broker.boottimes import BootTimes
from broker.burst import BurstPolicy
from broker.clock import Clock
from broker.cloud import Cloud, CloudError
from broker.ledger import Budget
from broker.metrics import Metrics
from broker.model import NO_WARM_POOL, LaunchSpec, Lease, Limits, LocalWorker, WarmPool, Worker
from broker.pool import Pool
from broker.prices import PriceTable
from broker.registry import Registry
from broker.schedule import WarmPoolSchedule

T = TypeVar("T")

_log = structlog.get_logger("broker.engine")


@attrs.frozen
class EngineSettings:
    """The engine's knobs (a subset of the config)."""

    default_spec: LaunchSpec
    limits: Limits
    launch_timeout: float = 300.0
    describe_interval: float = 2.0
    reap_interval: float = 60.0
    worker_port: int = 2560
    probe: bool = False
    probe_timeout: float = 2.0
    warm_pool: WarmPoolSchedule = attrs.field(factory=WarmPoolSchedule.default)
    local_workers: tuple[LocalWorker, ...] = ()
    prefer_local: bool = True
    burst: BurstPolicy = attrs.field(factory=BurstPolicy.default)
    budget: Budget = attrs.field(factory=Budget)
    subnets: tuple[str | None, ...] = ()
    boot_time_hint: float | None = None  # seconds a launch is expected to take to boot
    allowed_types: frozenset[str] = frozenset()  # what GET_WORKER type= may name (empty: any)
    allow_on_demand: bool = True  # whether GET_WORKER market=on-demand may be asked for
    agent_heartbeat: float = 30.0  # seconds between an agent's heartbeats (REGISTER tells it)
    idle_policy: IdlePolicy = IdlePolicy.FIXED  # how long idle workers are kept
    wait_cost_per_hour: float = 50.0  # $ an hour of waiting for a worker costs (adaptive)
    lease_history_days: int = 90  # how long ended leases are kept in the registry (0: not)

    @property
    def warm_pool_configured(self) -> bool:
        """True if a warm pool is configured at any time of the week."""
        return bool(self.warm_pool.min_idle or self.warm_pool.windows)


class Wakeup:
    """A signal one task waits on and others set; each wait needs a new set."""

    def __init__(self) -> None:
        self._event = trio.Event()

    def set(self) -> None:
        """Wake the waiting task (now, or as soon as it next waits)."""
        self._event.set()

    async def wait(self) -> None:
        """Wait for the next `set` (at once if one came since the last wait), then rearm."""
        await self._event.wait()
        self._event = trio.Event()


@attrs.define
class Context:
    """The pool and the ports, shared by every room of one engine."""

    pool: Pool
    registry: Registry
    cloud: Cloud
    clock: Clock
    settings: EngineSettings
    prices: PriceTable  # replaced when spot prices are refreshed
    nursery: trio.Nursery | None = None  # set by Engine.run
    closing: bool = False  # shutdown began: waiting requests are refused
    metrics: Metrics = attrs.field(factory=Metrics)  # counters for /metrics (broker.monitor)
    boot_wakeup: Wakeup = attrs.field(factory=Wakeup)  # a launch answered: reschedule describes
    boot_now: bool = False  # EC2 said a launching worker runs: describe at once (with boot_wakeup)
    warm_wakeup: Wakeup = attrs.field(factory=Wakeup)  # a worker was taken: refill
    # GET_WORKERs that needed an idle or a new cloud worker (idle_policy: adaptive); their
    # days are the budget's (budget_timezone: the lab's calendar).
    arrivals: ArrivalHistory = attrs.field(
        default=attrs.Factory(lambda ctx: ctx.seeded_arrivals(()), True)
    )
    lease_lengths: LeaseLengths = attrs.field(factory=LeaseLengths)  # released or expired
    boot_times: BootTimes = attrs.field(  # learned by the boot watcher
        default=attrs.Factory(lambda ctx: BootTimes(hint=ctx.settings.boot_time_hint), True)
    )
    _changed: trio.Event = attrs.field(factory=trio.Event, alias="_changed")

    def notify(self) -> None:
        """Wake every task waiting for the pool to change."""
        self._changed.set()
        self._changed = trio.Event()

    async def changed(self) -> None:
        """Wait until the pool changes (the next `notify`)."""
        await self._changed.wait()

    def spawn(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> None:
        """Run `fn(*args)` in the engine's nursery (the engine must be running)."""
        assert self.nursery is not None, "Engine.run() must be running"
        self.nursery.start_soon(fn, *args)

    def warm(self, now: float) -> WarmPool:
        """What the warm pool keeps at `now`: idle workers of the default type and market."""
        if not self.settings.warm_pool_configured:
            return NO_WARM_POOL
        return WarmPool(self.settings.default_spec, self.settings.warm_pool.min_idle_at(now))

    def note_arrival(self, now: float) -> None:
        """A GET_WORKER took an idle or a new cloud worker at `now`."""
        self.arrivals = self.arrivals.add(now)

    def note_lease_end(self, lease: Lease, now: float, *, released: bool) -> None:
        """A lease ended at `now`, by RELEASE or by expiring (how long leases last and how
        many give their worker back: idle_policy: adaptive)."""
        self.note_ended(now, max(0.0, now - lease.started_at), released=released)

    def note_ended(self, ended: float, seconds: float, *, released: bool) -> None:
        """A lease of `seconds` ended at `ended` (by RELEASE, or by expiring)."""
        self.lease_lengths = self.lease_lengths.add(ended, seconds, released=released)

    def seed_arrivals(self, arrivals: Iterable[float]) -> None:
        """Start the arrival history from what the registry remembers (at start-up)."""
        self.arrivals = self.seeded_arrivals(arrivals)

    def seeded_arrivals(self, arrivals: Iterable[float]) -> ArrivalHistory:
        """An arrival history of these times, its days in the budget's time zone."""
        return ArrivalHistory.seeded(arrivals, zone=self.settings.budget.timezone)

    def idle_rule(self) -> IdleRule:
        """How long idle workers are kept, as of the arrivals and boot times seen so far."""
        settings = self.settings
        if settings.idle_policy is IdlePolicy.FIXED:
            return IdleRule.fixed(settings.limits.idle_timeout)
        return IdleRule(
            settings.idle_policy,
            settings.limits.idle_timeout,
            minimum=settings.reap_interval,
            wait_cost_per_hour=settings.wait_cost_per_hour,
            history=self.arrivals,
            boot_seconds=self.boot_times.typical(),
            default_boot=self.boot_times.hint or DEFAULT_BOOT_SECONDS,
            held=self._held(),
            lease_seconds=self.lease_lengths.per_release(),
        )

    def _held(self) -> dict[tuple[str, str], int]:
        """Cloud workers someone holds now, by type and market: the available ones (an
        interrupted worker does not come back), from the pool's index, not a walk of the
        leases (built at every RELEASE)."""
        return {
            (instance_type, str(market)): n
            for (instance_type, market), n in self.pool.held_by_kind().items()
        }

    async def write(
        self,
        op: str,
        call: Callable[..., Awaitable[T]],
        *args: Any,
        default: T | None = None,
        level: str = "error",
        **kwargs: Any,
    ) -> T | None:
        """A best-effort registry write: its result, or `default` (logged) if it failed."""
        try:
            return await call(*args, **kwargs)
        except CloudError as exc:
            getattr(_log, level)("registry.write_failed", op=op, error=str(exc))
            self.metrics.registry_error(op)
            return default

    async def read(
        self, op: str, call: Callable[..., Awaitable[T]], *args: Any, level: str = "error"
    ) -> T | None:
        """A best-effort registry read: its result, or None (logged) if it failed."""
        try:
            return await call(*args)
        except CloudError as exc:
            getattr(_log, level)("registry.read_failed", op=op, error=str(exc))
            self.metrics.registry_error(op)
            return None

    async def persist_interruption(self, worker: Worker) -> None:
        """Tell other replicas (through the registry) to hand the worker out no more, or (no
        interruption any more) again."""
        stop = worker.interruption
        await self.write(
            "mark_interrupted",
            self.registry.mark_interrupted,
            worker.instance_id,
            None if stop is None else stop.reason,
            None if stop is None else stop.deadline,
        )


def log_lease_end(lease: Lease, reason: str, now: float) -> None:
    """The `lease.ended` event, with what the lease cost."""
    cost = lease.cost(now)
    _log.info(
        "lease.ended",
        client=lease.client,
        instance_id=lease.instance_id,
        ip=lease.ip,
        reason=reason,
        duration_seconds=round(max(0.0, now - lease.started_at), 3),
        cost_usd=None if cost is None else round(cost, 6),
    )
