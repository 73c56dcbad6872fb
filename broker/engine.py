"""The engine: runs the pool in Trio. Launch coalescing, the batched boot watcher, the reaper.

`broker.pool` decides; the engine acts (through the `Cloud` port) and reports back. Every
request-path method is synchronous up to its first `await`, so a decision and the bookkeeping
that makes it visible to other tasks (an in-flight launch, a lease) happen atomically.

Money goes through `broker.spending` (the ledger in the registry): a launch commits its cover
before RunInstances, activity extends covers, ended workers refund them. Capacity fallback
follows `broker.offerings`; EC2 events (spot interruptions) come from an `EventQueue`.

Every decision that matters is written to the `Registry` before it is acted on or answered:
a launch intent before RunInstances, a lease before the IP is sent. The in-memory pool is a
write-through cache of it; at start the engine restores the pool from the registry, then
reconciles with EC2 (see `_restore` and `_reconcile`).
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Sequence
from typing import Any, Protocol

import attrs
import structlog
import trio

from broker.burst import BurstDecision, BurstPolicy, WorkerView, decide
from broker.clock import Clock
from broker.cloud import Cloud, CloudError, Instance, LaunchSpec
from broker.interruptions import (
    InterruptionWarning,
    RebalanceRecommendation,
    StateChange,
    Unrecognised,
    parse_event,
)
from broker.ledger import Budget, CoverPolicy, OnCap, PeriodSpend, refund, refusal
from broker.offerings import Offering, OfferingMemory, offerings
from broker.pool import (
    LOCAL_TYPE,
    Interruption,
    Lease,
    Limits,
    LocalWorker,
    Pool,
    Released,
    ReleaseOutcome,
    Worker,
    WorkerState,
)
from broker.prices import PriceTable
from broker.protocol import GetWorker
from broker.registry import (
    LaunchIntent,
    LeaseRecord,
    MemoryRegistry,
    Registry,
    WorkerRecord,
)
from broker.schedule import WarmPoolSchedule, refill_count
from broker.spending import Cover, LaunchCharge, Refused, Spending
from broker.sqs import EventQueue, JobQueue

_log = structlog.get_logger("broker.engine")

TERMINATING = WorkerState.TERMINATING
LAUNCH_TOKEN_TAG = "compute-broker:launch-token"  # the EC2 adapter tags every launch with it

ACTIVITY_WRITE_EVERY = 30.0  # seconds; lease activity is written at most this often
WAIT_SLACK = 2.0  # seconds a default GET_WORKER waits beyond launch_timeout + describe_interval
FALLBACKS_SHOWN = 20  # the latest capacity fallbacks STATUS lists
LEDGER_READ_EVERY = 1.0  # seconds; refusals under load read the registry's spend at most so often
EVENTS_WAIT = 20  # seconds an SQS long poll for EC2 events waits
EVENTS_RETRY = 10.0  # seconds before polling again after the events queue failed
SPOT_PRICE_REFRESH = 3600.0  # seconds between spot price history reads


class SpotPriceSource(Protocol):
    """Where current spot prices come from (`broker.ec2.Ec2Cloud`)."""

    async def spot_prices(self, instance_types: Sequence[str]) -> dict[str, float]:
        """$/hour per type; may raise CloudError (e.g. the account may not ask)."""
        ...


class _AllReserved(Exception):
    """The pool-wide instance counter is at max_workers (other replicas' launches count)."""


class _OverBudget(Exception):
    """The dollar ledger refused the launch: a daily or monthly cap would be passed."""


class Refusal(Exception):
    """A request the engine cannot satisfy; `str()` is the reason for `ERROR: <reason>`."""


class WorkerNotFound(Exception):
    """PING or RELEASE of an IP the pool does not know."""


class WorkerInterrupted(Exception):
    """PING of a worker being taken away (spot interruption, rebalance, budget)."""

    def __init__(self, interruption: Interruption) -> None:
        super().__init__(interruption.reason)
        self.interruption = interruption


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


@attrs.frozen
class Handout:
    """A GET_WORKER answered: the worker's IP, and whether this request created the lease."""

    ip: str
    instance_id: str
    new_lease: bool


@attrs.define
class _Attempt:
    """One RunInstances call and the workers it produced, for the requests waiting on it."""

    token: str
    spec: LaunchSpec
    answered: trio.Event = attrs.field(factory=trio.Event)
    instances: list[Instance] = attrs.field(factory=list)
    error: str | None = None
    capped: bool = False  # refused by the pool-wide counter: may succeed later
    reserved: int = 0  # instances reserved on the pool-wide counter, not yet launched
    charged: LaunchCharge | None = None  # spend committed for this launch


class Engine:
    """Owns the pool; serves GET_WORKER/PING/RELEASE/BURST/STATUS; runs the background loops."""

    def __init__(
        self,
        cloud: Cloud,
        settings: EngineSettings,
        clock: Clock,
        prices: PriceTable,
        registry: Registry | None = None,
        queue: JobQueue | None = None,
        *,
        events: EventQueue | None = None,
        spot_prices: SpotPriceSource | None = None,
    ) -> None:
        self.cloud = cloud
        self.queue = queue
        self.events = events
        self.spot_prices = spot_prices
        self.registry: Registry = registry if registry is not None else MemoryRegistry("default")
        self.settings = settings
        self.clock = clock
        self.prices = prices
        self.pool = Pool(settings.limits)
        self._attempts: dict[str, _Attempt] = {}
        self._demand: dict[LaunchSpec, int] = {}  # requests waiting for a worker, per spec
        self._changed = trio.Event()
        self._watch_wakeup = trio.Event()
        self._probing: set[str] = set()
        self._retry_terminate: set[str] = set()
        self._to_persist: list[tuple[Worker, str]] = []
        self._counter_suspect: tuple[int, int] | None = None
        # spec -> (retry at, reason, refused by the pool-wide counter rather than the budget)
        self._capped: dict[LaunchSpec, tuple[float, str, bool]] = {}
        self._warm_wakeup = trio.Event()
        self._warm_pool_configured = bool(settings.warm_pool.min_idle or settings.warm_pool.windows)
        self.spending = Spending(
            self.registry,
            settings.budget,
            CoverPolicy(
                settings.limits.idle_timeout, settings.reap_interval, settings.launch_timeout
            ),
        )
        self._offering_memory = OfferingMemory()
        self._fallbacks: list[dict[str, Any]] = []  # the latest fallbacks, for STATUS
        self._cap_reached: str | None = None  # the ledger key whose cap was last reached
        # Other replicas' workers' (price, paid until) as last read, for the spend shown.
        self._remote_covers: dict[str, tuple[float, float]] = {}
        self._ledger_read_at = -math.inf
        self._closing = False
        self._nursery: trio.Nursery | None = None

    # --- lifecycle -------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Adopt the pool's existing instances, then run the watcher and the reaper forever."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            await self._restore()  # the pool as the registry has it (after a restart)
            await self._add_declared_local_workers()
            await self._reconcile()  # then as EC2 has it
            nursery.start_soon(self._watch_launches)
            nursery.start_soon(self._reap_loop)
            if self._warm_pool_configured:
                nursery.start_soon(self._warm_loop)
            if self.settings.burst.mode == "auto" and self.queue is not None:
                nursery.start_soon(self._burst_loop)
            if self.events is not None:
                nursery.start_soon(self._events_loop)
            if self.spot_prices is not None:
                nursery.start_soon(self._price_loop)
            task_status.started()

    def stop_handing_out(self) -> None:
        """Shutdown begins: waiting requests answer `ERROR: broker shutting down`."""
        self._closing = True
        self._notify()

    # --- requests --------------------------------------------------------------------------

    async def get_worker(self, request: GetWorker, client: str) -> Handout:
        """A ready worker for `client`: reuse one, join a launch in flight, or launch."""
        spec = default = self.settings.default_spec
        local_ok = request.instance_type is None and request.market is None
        prefer = self.settings.prefer_local
        if not local_ok:
            spec = LaunchSpec(
                request.instance_type or default.instance_type,
                request.market or default.market,
                () if request.instance_type else default.fallback_types,
                default.on_demand_fallback if request.market is None else False,
            )
        ready = self.pool.choose_ready(spec, client, local_ok=local_ok, prefer_local=prefer)
        if not self._closing and ready is not None:
            handout = await self._hand_out(ready, client, reused=True, waited=0.0)
            if handout is not None:
                return handout  # the warm path
        # Without wait=, a waiter outlives the launch it waits for by a little, so it hears the
        # launch's own verdict ("launch timed out ...") rather than a generic one.
        longest = self.settings.launch_timeout + self.settings.describe_interval + WAIT_SLACK
        wait = min(request.wait, longest) if request.wait is not None else longest
        started = trio.current_time()
        joined: _Attempt | None = None
        refusal: str | None = None
        refused: set[str] = set()  # workers whose registry claim failed: full elsewhere
        if ready is not None and not self._closing:
            refused.add(ready.instance_id)
        self._demand[spec] = self._demand.get(spec, 0) + 1
        try:
            with trio.move_on_after(wait):
                while True:
                    if self._closing:
                        raise Refusal("broker shutting down")
                    worker = self.pool.choose_ready(
                        spec, client, local_ok=local_ok, prefer_local=prefer, exclude=refused
                    )
                    if worker is not None:
                        waited = trio.current_time() - started
                        reused = joined is None
                        handout = await self._hand_out(worker, client, reused=reused, waited=waited)
                        if handout is not None:
                            return handout
                        refused.add(worker.instance_id)  # full elsewhere: launch or wait
                        continue
                    coming = self.pool.coming_capacity(spec)
                    if joined is not None and joined.error is not None and not coming:
                        if not joined.capped:
                            raise Refusal(joined.error)
                        refusal, joined = joined.error, None  # may free up: wait for it
                        await self._changed.wait()
                        continue
                    if self._demand[spec] > coming:
                        try:
                            joined = self._launch_for_demand(spec, self._demand[spec] - coming)
                        except Refusal as exc:
                            if not self._may_free_up(spec):
                                raise
                            refusal = str(exc)  # wait for a holder to release a worker
                    elif joined is None:
                        joined = self._attempt_for(spec)
                    await self._changed.wait()
        finally:
            self._demand[spec] -= 1
        if refusal is not None:
            raise Refusal(f"no worker free after {wait:g}s ({refusal})")
        raise Refusal(f"no worker ready after {wait:g}s")

    def _launch_for_demand(self, spec: LaunchSpec, unserved: float) -> _Attempt:
        """Launch enough workers for `unserved` waiting clients (one in shared mode).

        After the pool-wide counter refused a launch, no new launch for `spec` is tried for
        a describe_interval, so waiters do not hammer the registry."""
        capped = self._capped.get(spec)
        if capped is not None and trio.current_time() < capped[0]:
            raise Refusal(capped[1])
        self._capped.pop(spec, None)  # past its pause: this launch decides afresh
        capacity = self.settings.limits.clients_per_worker
        count = 1 if capacity is None else max(1, math.ceil(unserved / capacity))
        return self._start_launch(spec, count)

    def _may_free_up(self, spec: LaunchSpec) -> bool:
        """In exclusive mode, while the pool has workers (held, launching or on their way out),
        a release or a termination may soon make room: a refused request waits for that. So
        it does after the pool-wide counter refused (other replicas' workers may free up)."""
        capped = self._capped.get(spec)
        if capped is not None and capped[2]:
            return True
        if self.settings.limits.clients_per_worker is None:
            return False
        return bool(self.pool.in_flight or self.pool.workers)

    async def ping(self, ip: str, client: str) -> Worker:
        """Restart the worker's idle clock and the caller's lease (one registry write)."""
        now = self.clock.now()
        worker = self.pool.ping(ip, client, now)
        if worker is None:
            raise WorkerNotFound(ip)
        if worker.interruption is not None:
            raise WorkerInterrupted(worker.interruption)
        try:
            lease = self.pool.leases.get((client, worker.instance_id))
            if lease is not None and not await self._persist_activity(lease, now):
                self.pool.end_lease(lease)  # ended or expired in the registry
            else:
                await self.registry.update_worker_activity(worker.instance_id, now)
            cover = await self._covered(worker, now)
        except CloudError as exc:
            raise Refusal(f"registry unavailable: {exc}") from exc
        if cover is Cover.GONE:
            self.pool.remove(worker.instance_id, now)  # ended through another replica
            raise WorkerNotFound(ip)
        if cover is Cover.CAPPED:
            raise WorkerInterrupted(self._interrupt_for_budget(worker, now))
        return worker

    async def release(self, ip: str, client: str) -> None:
        """End the caller's lease; terminate the worker if nobody else holds it."""
        now = self.clock.now()
        released = self.pool.release(ip, client, now, keep_idle=self._min_idle(now))
        if released.lease is not None:
            self._log_lease_end(released.lease, "released", now)
            await self._forget_lease(released.lease)
        if released.outcome is ReleaseOutcome.KEPT and released.worker is not None:
            released = await self._recheck_holders(released.worker, ip, client, now) or released
        if released.outcome is ReleaseOutcome.NOT_FOUND:
            raise WorkerNotFound(ip)
        if released.outcome is ReleaseOutcome.ALREADY_GONE:
            _log.info("worker.release", ip=ip, client=client, already_gone=True)
            return
        if released.outcome is ReleaseOutcome.KEPT_WARM:
            _log.info("worker.release", ip=ip, client=client, terminated=False, kept_warm=True)
            return
        worker = released.worker
        assert worker is not None
        terminate = released.outcome is ReleaseOutcome.TERMINATE
        _log.info(
            "worker.release",
            instance_id=worker.instance_id,
            ip=ip,
            client=client,
            had_lease=released.lease is not None,
            terminated=terminate,
            holders=released.holders,
        )
        if terminate and not await self._claim_reap(worker):
            worker.state = WorkerState.READY  # held through another replica: keep it
            return
        if terminate:
            self._notify()
            try:
                await self._terminate([worker], reason="released")
            except CloudError as exc:
                raise Refusal(f"terminate failed: {exc}; the broker will retry") from exc

    async def _recheck_holders(
        self, worker: Worker, ip: str, client: str, now: float
    ) -> Released | None:
        """Other holders known here may have released through another replica: if the
        registry counts none, drop the stale local leases and decide again."""
        try:
            record = await self.registry.get_worker(worker.instance_id)
        except CloudError:
            return None  # keep the worker: the safe side
        if record is None or record.holders > 0:
            return None
        for stale in self.pool.holders(worker.instance_id):
            self.pool.end_lease(stale)
        return self.pool.release(ip, client, now, keep_idle=self._min_idle(now))

    async def burst(self, count: int) -> list[str]:
        """Launch up to `count` workers of the default spec now; their instance ids."""
        attempt = self._start_launch(self.settings.default_spec, count)
        await attempt.answered.wait()
        if attempt.error is not None:
            raise Refusal(attempt.error)
        return [instance.instance_id for instance in attempt.instances]

    def status(self) -> dict[str, Any]:
        """The STATUS document."""
        now = self.clock.now()
        document = self.pool.status(now)
        document["budget"] = self._budget_status(now)
        document["capacity"] = {
            "failed_offerings": [
                {
                    "offering": failed.offering.describe(),
                    "code": failed.code,
                    "retry_after": round(failed.until, 3),
                }
                for failed in self._offering_memory.failed(now)
            ],
            "fallbacks": list(self._fallbacks),
        }
        return document

    def _budget_status(self, now: float) -> dict[str, Any]:
        budget = self.settings.budget
        periods = {}
        for key in budget.current_keys(now):
            spend = self._period_spend(key, now)
            periods[key.partition(":")[0]] = spend.to_status()
        return {
            **periods,
            "timezone": budget.timezone,
            "on_cap": str(budget.on_cap),
            "run_rate_per_hour": round(self.pool.run_rate(), 6),
            "max_hourly_cost": self.settings.limits.max_hourly_cost,
        }

    async def report(self) -> dict[str, Any]:
        """The STATUS document, with the ledger's totals and every replica's covers read
        from the registry first (else as last seen)."""
        await self._read_ledger(self.clock.now())
        return self.status()

    async def _read_ledger(self, now: float) -> None:
        self._ledger_read_at = trio.current_time()
        try:
            await self.spending.refresh(now)
            records = await self.registry.list_workers(now)
        except CloudError as exc:
            _log.warning("registry.read_failed", op="ledger", error=str(exc))
            return
        self._remote_covers = _covers_of(records)

    def _period_spend(self, key: str, now: float) -> PeriodSpend:
        covers = dict(self._remote_covers)  # other replicas' workers too
        for w in self.pool.workers.values():
            if w.price_per_hour is not None and w.paid_until is not None and not w.local:
                covers[w.instance_id] = (w.price_per_hour, w.paid_until)
        pending = sum(  # launches charged, not answered yet
            a.charged.total().get(key, 0) for a in self._attempts.values() if a.charged is not None
        )
        return self.spending.period(key, now, covers.values(), pending)

    # --- launching -------------------------------------------------------------------------

    def _start_launch(self, spec: LaunchSpec, count: int) -> _Attempt:
        price = self.prices.price(spec.instance_type, spec.market)
        admission = self.pool.admit(spec, count, price)
        if admission.refusal is not None:
            _log.warning("launch.refused", reason=admission.refusal, type=spec.instance_type)
            raise Refusal(admission.refusal)
        assert self._nursery is not None, "Engine.run() must be running"
        token = uuid.uuid4().hex
        self.pool.launch_started(token, spec, admission.count, price, self.clock.now())
        attempt = _Attempt(token, spec)
        self._attempts[token] = attempt
        self._nursery.start_soon(self._launch, attempt, admission.count)
        return attempt

    def _attempt_for(self, spec: LaunchSpec) -> _Attempt | None:
        for attempt in self._attempts.values():
            if attempt.spec == spec and attempt.error is None:
                return attempt
        return None

    async def _launch(self, attempt: _Attempt, count: int) -> None:
        spec = attempt.spec
        _log.info(
            "worker.launch",
            type=spec.instance_type,
            market=str(spec.market),
            count=count,
            client_token=attempt.token,
        )
        started = trio.current_time()
        try:
            with trio.fail_after(self.settings.launch_timeout):
                # max_workers across replicas: a pool-wide counter in the registry.
                max_workers = self.settings.limits.max_workers
                attempt.reserved = await self.registry.reserve_instances(count, max_workers)
                if attempt.reserved == 0:
                    raise _AllReserved(f"max_workers reached ({max_workers}) across replicas")
                launched = await self._launch_offerings(attempt)
                instances, offering, price, paid_until, token = launched
        except Exception as exc:
            if not isinstance(exc, CloudError | trio.TooSlowError | _AllReserved | _OverBudget):
                _log.exception("launch.crashed", client_token=attempt.token)
            if isinstance(exc, trio.TooSlowError):
                # RunInstances may still launch: the intent keeps the charge and the counter
                # its reservation; the reconciler adopts what came with the intent's cover and
                # refunds what did not when it settles the intent.
                attempt.charged = None
            else:
                await self._undo_reservations(attempt)  # nothing was launched
            attempt.error = self._launch_error(exc)
            self.pool.launch_failed(attempt.token)
            self._attempts.pop(attempt.token, None)
            counter = isinstance(exc, _AllReserved)
            if isinstance(exc, _OverBudget):
                # Exclusive mode with workers: a release refunds their cover; wait for it.
                attempt.capped = self._may_free_up(spec)
            if counter or attempt.capped:
                attempt.capped = True
                retry_at = trio.current_time() + self.settings.describe_interval
                self._capped[spec] = (retry_at, attempt.error, counter)
            _log.error(
                "launch.failed",
                reason=attempt.error,
                type=spec.instance_type,
                market=str(spec.market),
                client_token=attempt.token,
            )
            attempt.answered.set()
            self._notify()
            return
        now = self.clock.now()
        attempt.instances = instances
        self._capped.pop(spec, None)
        attempt.reserved -= len(instances)
        await self._refund_charge(attempt, launched=len(instances))  # for what was not launched
        await self._undo_reservations(attempt)
        workers = self.pool.launch_answered(attempt.token, instances, now, price=price)
        for worker in workers:
            worker.paid_until = paid_until
        await self._persist_launched(token, workers)
        for worker in workers:
            _log.info(
                "worker.launched",
                instance_id=worker.instance_id,
                type=worker.instance_type,
                market=str(worker.market),
                subnet=offering.subnet,
                price_per_hour=price,
                api_seconds=round(trio.current_time() - started, 3),
            )
        if not instances:
            attempt.error = "launch failed: EC2 launched no instance"
            self._attempts.pop(attempt.token, None)
        attempt.answered.set()
        self._watch_wakeup.set()
        self._notify()

    async def _launch_offerings(
        self, attempt: _Attempt
    ) -> tuple[list[Instance], Offering, float | None, float | None, str]:
        """Try the spec's offerings in order until EC2 has capacity for one: each is charged
        to the ledger first, and refunded if EC2 answers a capacity error (remembered, so the
        next launches skip that offering for a while). The instances, the offering, its price,
        the cover committed for each instance, and the launch's client token (its intent's)."""
        spec = attempt.spec
        now = self.clock.now()
        candidates = offerings(spec, self.settings.subnets)
        tried = self._offering_memory.available(candidates, now)
        if not tried:
            skipped = ", ".join(f.offering.describe() for f in self._offering_memory.failed(now))
            raise CloudError("InsufficientInstanceCapacity", f"no capacity recently: {skipped}")
        failures: list[str] = []
        last: CloudError | None = None
        for index, offering in enumerate(tried):
            price = self.prices.price(offering.instance_type, offering.market)
            over_rate = self.pool.rate_refusal(attempt.token, offering.spec, price)
            if over_rate is not None:  # a fallback dearer than the admitted price
                failures.append(f"{offering.describe()}: {over_rate}")
                continue
            paid_until = await self._charge_launch(attempt, offering, price)
            token = attempt.token if index == 0 else f"{attempt.token}-{index}"
            charged = attempt.charged
            intent = LaunchIntent.begin(
                token,
                offering.spec,
                attempt.reserved,
                now if charged is None else charged.start,
                2 * self.settings.launch_timeout,
                price_per_hour=price if charged is not None else None,
                paid_until=paid_until,
            )
            await self.registry.put_intent(intent)  # written before it is acted on
            try:
                instances = await self.cloud.launch(
                    offering.spec, attempt.reserved, token, subnet=offering.subnet
                )
            except CloudError as exc:
                await self._refund_charge(attempt)
                await self._drop_intent(token)
                if not exc.capacity:
                    raise
                now, last = self.clock.now(), exc
                self._offering_memory.fail(offering, exc.code, now)
                failures.append(f"{offering.describe()}: {exc.code}")
                following = tried[index + 1] if index + 1 < len(tried) else None
                _log.warning(
                    "launch.fallback",
                    offering=offering.describe(),
                    code=exc.code,
                    next=None if following is None else following.describe(),
                    client_token=attempt.token,
                )
                continue
            self._offering_memory.succeeded(offering)
            if index > 0:
                self._note_fallback(spec, offering, failures, now)
            return instances, offering, price, paid_until, token
        if last is not None and len(failures) == 1:
            raise last  # AWS's own words when there was nothing to fall back to
        raise CloudError(
            "InsufficientInstanceCapacity", "no offering had capacity: " + "; ".join(failures)
        )

    async def _charge_launch(
        self, attempt: _Attempt, offering: Offering, price: float | None
    ) -> float | None:
        """Commit the cost of `attempt.reserved` new workers of `offering` until they could
        first be reaped; fewer if only fewer fit under the caps. The cover's end (None when
        the price is unknown: nothing is charged)."""
        if price is None:
            if self.settings.budget.capped:
                raise _OverBudget(
                    f"budget: no price known for {offering.instance_type} {offering.market}; "
                    "add it under prices in the config"
                )
            return None
        now = self.clock.now()
        charged = await self.spending.charge_launch(price, attempt.reserved, now)
        if isinstance(charged, Refused):
            if attempt.spec == self.settings.default_spec:  # not a dearer one-off request
                self._on_cap(now, charged.key)
            if trio.current_time() - self._ledger_read_at >= LEDGER_READ_EVERY:
                await self._read_ledger(now)  # the refusal names the pool's spend, replicas too
            spend = self._period_spend(charged.key, now)
            raise _OverBudget(refusal(spend, charged.per_instance))
        attempt.charged = charged
        if charged.count < attempt.reserved:
            await self._unreserve(attempt.reserved - charged.count)
            attempt.reserved = charged.count
        return charged.paid_until

    async def _refund_charge(self, attempt: _Attempt, launched: int = 0) -> None:
        """Give back what `_charge_launch` committed for workers not launched."""
        if attempt.charged is None:
            return
        charged, attempt.charged = attempt.charged, None
        await self.spending.refund(charged.total(charged.count - launched))

    async def _undo_reservations(self, attempt: _Attempt) -> None:
        await self._refund_charge(attempt)
        if attempt.reserved > 0:
            await self._unreserve(attempt.reserved)
            attempt.reserved = 0

    async def _drop_intent(self, token: str) -> None:
        try:
            await self.registry.delete_intent(token)
        except CloudError as exc:
            _log.error("registry.write_failed", op="delete_intent", error=str(exc))

    def _note_fallback(
        self, spec: LaunchSpec, offering: Offering, failures: Sequence[str], now: float
    ) -> None:
        """A launch got its workers from a later offering: keep it for STATUS."""
        self._fallbacks.append(
            {
                "at": round(now, 3),
                "wanted": f"{spec.instance_type} {spec.market}",
                "got": offering.describe(),
                "after": list(failures),
            }
        )
        del self._fallbacks[:-FALLBACKS_SHOWN]
        _log.info("launch.fell_back", got=offering.describe(), after=list(failures))

    # --- the dollar ledger -----------------------------------------------------------------

    async def _covered(self, worker: Worker, now: float) -> Cover:
        """Make sure the worker's cost is committed until it could next be reaped: COVERED,
        CAPPED (a cap forbids) or GONE (the registry no longer has the worker). May raise
        CloudError."""
        if self.spending.covered(worker, now):
            return Cover.COVERED
        cover = await self.spending.cover(worker, now)
        if cover is Cover.CAPPED:
            self._on_cap(now)
        return cover

    async def _persist_interruption(self, worker: Worker) -> None:
        """Tell other replicas (through the registry) to hand the worker out no more, or (no
        interruption any more) again."""
        interruption = worker.interruption
        try:
            if interruption is None:
                await self.registry.mark_interrupted(worker.instance_id, None, None)
            else:
                await self.registry.mark_interrupted(
                    worker.instance_id, interruption.reason, interruption.deadline
                )
        except CloudError as exc:
            _log.error("registry.write_failed", op="mark_interrupted", error=str(exc))

    def _interrupt_for_budget(self, worker: Worker, now: float) -> Interruption:
        """A cap forbids extending the worker's cover: it goes when the cover runs out."""
        if worker.interruption is None:
            worker.interruption = Interruption("budget", worker.paid_until, now)
            if self._nursery is not None:
                self._nursery.start_soon(self._persist_interruption, worker)
            _log.warning(
                "worker.budget_exhausted",
                instance_id=worker.instance_id,
                ip=worker.ip,
                paid_until=worker.paid_until,
            )
            self._notify()
        return worker.interruption

    def _on_cap(self, now: float, key: str | None = None) -> None:
        """A cap (of the period `key`, else the one with least room) refused a charge: the
        warm pool stops refilling for the rest of that period, and with on_cap:
        terminate_idle the idle workers go at once."""
        budget = self.settings.budget
        keys = budget.current_keys(now)
        if key is None:
            limits = budget.limits(keys)
            committed = self.spending.committed
            key = min(limits, key=lambda k: limits[k] - committed.get(k, 0), default=keys[0])
        first = self._cap_reached not in keys
        self._cap_reached = key
        if first:
            _log.warning("budget.cap_reached", period=key, on_cap=str(budget.on_cap))
        if budget.on_cap is OnCap.TERMINATE_IDLE and self._nursery is not None:
            self._nursery.start_soon(self._terminate_idle, "budget_cap")

    async def _terminate_idle(self, reason: str) -> None:
        held = {lease.instance_id for lease in self.pool.leases.values()}
        idle = [
            w
            for w in self.pool.workers.values()
            if w.state is WorkerState.READY and not w.local and w.instance_id not in held
        ]
        doomed = [w for w in idle if await self._claim_reap(w)]
        if not doomed:
            return
        for worker in doomed:
            worker.state = WorkerState.TERMINATING
        self._notify()
        try:
            await self._terminate(doomed, reason=reason)
        except CloudError:
            pass  # logged; the reaper retries

    async def _check_covers(self, now: float) -> None:
        """Each reaper pass: extend the covers running workers need; a worker whose cover a
        cap forbids extending is interrupted, and terminated before its cover runs out."""
        await self.spending.refresh(now)
        keys = self.settings.budget.current_keys(now)
        doomed: list[Worker] = []
        for worker in list(self.pool.workers.values()):
            if worker.local or worker.state is not WorkerState.READY:
                continue
            stop = worker.interruption
            lift = stop is not None and stop.reason == "budget"
            if (
                lift
                and stop is not None
                and self.settings.budget.current_keys(stop.noticed_at) != keys
            ):
                # A new day or month began since the stop: its cap may allow the worker again.
                worker.interruption = None
                await self._persist_interruption(worker)
            try:
                cover = await self._covered(worker, now)
            except CloudError as exc:
                _log.warning("registry.write_failed", op="extend_cover", error=str(exc))
                continue
            if cover is not Cover.CAPPED:
                continue  # covered, or gone (the reconciliation drops it)
            self._interrupt_for_budget(worker, now)
            ends = worker.paid_until if worker.paid_until is not None else now
            # Before the next pass can come (a pass takes time too): two intervals of margin.
            margin = 2 * self.settings.reap_interval
            if ends <= now + margin and worker.state is WorkerState.READY:
                doomed.append(worker)
        if not doomed:
            return
        for worker in doomed:
            worker.state = WorkerState.TERMINATING
            try:
                await self.registry.set_worker_state(worker.instance_id, WorkerState.TERMINATING)
            except CloudError as exc:
                _log.warning("registry.write_failed", op="terminating", error=str(exc))
        self._notify()
        try:
            await self._terminate(doomed, reason="budget")
        except CloudError:
            pass  # logged; retried next pass

    def _launch_error(self, exc: Exception) -> str:
        if isinstance(exc, _AllReserved | _OverBudget):
            return str(exc)
        if isinstance(exc, trio.TooSlowError):
            # RunInstances may still complete in its abandoned thread: the reconciler adopts
            # (and later reaps) whatever it launched.
            return f"launch timed out after {self.settings.launch_timeout:g}s"
        if isinstance(exc, CloudError):
            if exc.unreachable:
                return f"cloud unreachable: {exc.message or exc.code}"
            return f"launch failed: {exc}"
        return "launch failed: internal error (logged by the broker)"

    # --- the boot watcher: one batched DescribeInstances for every pending launch ---------

    async def _watch_launches(self) -> None:
        while True:
            try:
                if not await self._watch_once():
                    self._watch_wakeup = trio.Event()
                    await self._watch_wakeup.wait()
                    continue
            except Exception:
                _log.exception("watcher.crashed")  # logged; the next pass starts afresh
            await trio.sleep(self.settings.describe_interval)

    async def _watch_once(self) -> bool:
        """One pass over the launching workers; False when there are none."""
        waiting = self.pool.launching()
        if not waiting:
            return False
        try:
            described = await self.cloud.describe([w.instance_id for w in waiting])
        except CloudError as exc:
            _log.warning("describe.failed", error=str(exc), pending=len(waiting))
            described = []
        by_id = {instance.instance_id: instance for instance in described}
        now = self.clock.now()
        self._to_persist = []
        for worker in waiting:
            self._advance(worker, by_id.get(worker.instance_id), now)
        for worker, ip in self._to_persist:
            # The registry first: a hand-out claims the lease there, and a worker must be
            # ready there before anyone here can be given it.
            await self._persist_ready(worker, ip)
            self._ready(worker, ip, self.clock.now())
        self._notify()
        await self._fail_overdue(self.clock.now())
        return True

    def _advance(self, worker: Worker, instance: Instance | None, now: float) -> None:
        if worker.state is not WorkerState.LAUNCHING or instance is None:
            return  # just launched instances may not be visible yet (eventual consistency)
        if instance.state == "running" and instance.public_ip:
            if not self.settings.probe:
                self._to_persist.append((worker, instance.public_ip))
            elif worker.instance_id not in self._probing:
                self._probing.add(worker.instance_id)
                assert self._nursery is not None
                self._nursery.start_soon(self._probe, worker, instance.public_ip)
        elif not instance.is_alive:
            self._lose(
                worker, f"worker {worker.instance_id} was {instance.state} while booting", now
            )

    async def _probe(self, worker: Worker, ip: str) -> None:
        """Hand the worker out only once its port accepts a TCP connection."""
        ok = False
        try:
            with trio.move_on_after(self.settings.probe_timeout):
                stream = await trio.open_tcp_stream(ip, self.settings.worker_port)
                await stream.aclose()
                ok = True
        except OSError as exc:
            _log.debug("probe.failed", instance_id=worker.instance_id, ip=ip, error=str(exc))
        finally:
            self._probing.discard(worker.instance_id)
        if ok:
            await self._persist_ready(worker, ip)
            self._ready(worker, ip, self.clock.now())
            self._notify()

    def _ready(self, worker: Worker, ip: str, now: float) -> None:
        if self.pool.mark_ready(worker.instance_id, ip, now) is None:
            return
        _log.info(
            "worker.ready",
            instance_id=worker.instance_id,
            ip=ip,
            boot_seconds=round(max(0.0, now - worker.launched_at), 3),
        )
        self._settle_attempt(worker.launch_token)

    def _lose(self, worker: Worker, reason: str, now: float) -> None:
        _, leases = self.pool.remove(worker.instance_id, now)
        for lease in leases:
            self._log_lease_end(lease, "worker_lost", now)
        assert self._nursery is not None
        self._nursery.start_soon(self._forget_worker, worker.instance_id, leases, not worker.local)
        _log.error("worker.lost", instance_id=worker.instance_id, reason=reason)
        attempt = self._attempts.get(worker.launch_token or "")
        if attempt is not None:
            attempt.error = reason
        self._settle_attempt(worker.launch_token)

    async def _fail_overdue(self, now: float) -> None:
        """Terminate launching workers older than launch_timeout (booting or failing probes)."""
        overdue = [
            w for w in self.pool.launching() if now - w.launched_at > self.settings.launch_timeout
        ]
        if not overdue:
            return
        reason = f"launch timed out after {self.settings.launch_timeout:g}s"
        for worker in overdue:
            attempt = self._attempts.get(worker.launch_token or "")
            if attempt is not None:
                attempt.error = reason
            worker.state = WorkerState.TERMINATING
            self._settle_attempt(worker.launch_token)
            _log.error("worker.boot_timeout", instance_id=worker.instance_id, reason=reason)
        self._notify()  # waiters hear the verdict before the termination call returns
        for worker in overdue:
            try:
                await self.registry.set_worker_state(worker.instance_id, WorkerState.TERMINATING)
            except CloudError as exc:
                _log.warning("registry.write_failed", op="terminating", error=str(exc))
        try:
            await self._terminate(overdue, reason="boot_timeout")
        except CloudError:
            pass  # logged by _terminate; the reaper retries

    def _settle_attempt(self, token: str | None) -> None:
        """Forget an attempt once none of its workers is still launching."""
        attempt = self._attempts.get(token or "")
        if attempt is None:
            return
        if not any(
            w.launch_token == token and w.state is WorkerState.LAUNCHING
            for w in self.pool.workers.values()
        ):
            del self._attempts[attempt.token]

    # --- hand-out, reaping, termination ----------------------------------------------------

    async def _hand_out(
        self, worker: Worker, client: str, *, reused: bool, waited: float
    ) -> Handout | None:
        """Record the lease (pool, then registry) and return the hand-out; None if the registry
        refused the claim (the worker is full: another replica got there first)."""
        now = self.clock.now()
        lease, new = self.pool.hand_out(worker, client, now)
        timeout = self.settings.limits.idle_timeout
        try:
            cover = await self._covered(worker, now)
            if cover is not Cover.COVERED:
                if new:
                    self.pool.end_lease(lease)
                if cover is Cover.CAPPED:
                    self._interrupt_for_budget(worker, now)
                return None  # a cap forbids keeping it longer (or it is gone): look further
            if new:
                # Set before the await: a concurrent refresh of this lease writes nothing
                # while the claim is in flight.
                lease.persisted_activity = now
                record = LeaseRecord.start(client, worker.instance_id, lease.ip, now, timeout)
                claimed = await self.registry.claim_lease(
                    record, self.settings.limits.clients_per_worker
                )
            elif not await self._persist_activity(lease, now):
                # The registry lost this lease (ended or expired elsewhere): claim it anew.
                self.pool.end_lease(lease)
                return await self._hand_out(worker, client, reused=reused, waited=waited)
            else:
                claimed = True
        except CloudError as exc:
            if new:
                self.pool.end_lease(lease)
            raise Refusal(f"registry unavailable: {exc}") from exc
        if not claimed:
            self.pool.end_lease(lease)
            return None
        if self._warm_pool_configured:
            self._warm_wakeup.set()  # a warm worker may just have been taken: refill
        if new:
            _log.info(
                "lease.started",
                client=client,
                instance_id=worker.instance_id,
                ip=worker.ip,
                reused=reused,
                waited_seconds=round(waited, 3),
            )
        return Handout(lease.ip, worker.instance_id, new)

    async def undeliverable(self, handout: Handout, client: str) -> None:
        """The GET_WORKER reply could not be sent: drop the lease it created, if it did."""
        if not handout.new_lease:
            return
        lease = self.pool.leases.get((client, handout.instance_id))
        if lease is not None:
            self.pool.end_lease(lease)
            self._log_lease_end(lease, "reply_undeliverable", self.clock.now())
            await self._forget_lease(lease)

    def _min_idle(self, now: float) -> int:
        if not self._warm_pool_configured:
            return 0
        return self.settings.warm_pool.min_idle_at(now)

    async def _warm_loop(self) -> None:
        """Keep min_idle ready workers of the default type: refill in the background, at each
        schedule change, after each hand-out, and at least every reap_interval."""
        schedule = self.settings.warm_pool
        next_change = schedule.next_change_after(self.clock.now())
        while True:
            try:
                await self.refill_once()
            except Exception:
                _log.exception("warm_pool.crashed")  # logged; the next pass tries again
            now = self.clock.now()
            if next_change is not None and now >= next_change:
                next_change = schedule.next_change_after(now)
            timeout = self.settings.reap_interval
            if next_change is not None:
                timeout = min(timeout, max(0.0, next_change - now))
            self._warm_wakeup = trio.Event()
            with trio.move_on_after(timeout):
                await self._warm_wakeup.wait()

    async def refill_once(self) -> int:
        """Launch what the warm pool lacks now (counting launches under way); how many.

        When the local view says to launch, the registry is consulted first: other replicas'
        idle workers and their launches (intents are written before RunInstances) count too,
        so two replicas do not both refill."""
        now = self.clock.now()
        target = self._min_idle(now)
        if target <= 0:
            return 0
        if self._cap_reached in self.settings.budget.current_keys(now):
            return 0  # a cap was reached this period: no speculative launches until it ends
        spec = self.settings.default_spec
        idle = len(self.pool.idle_ready(spec))
        waiting = self._demand.get(spec, 0)
        per_worker = self.settings.limits.clients_per_worker
        promised = (1 if waiting else 0) if per_worker is None else math.ceil(waiting / per_worker)
        unpromised = max(0, self.pool.coming_instances(spec) - promised)
        price = self.prices.price(spec.instance_type, spec.market)
        room = self.pool.admit(spec, target, price).count
        if refill_count(target, idle, unpromised, room) == 0:
            return 0
        try:
            idle, unpromised = await self._registry_warm_view(spec, now, idle, unpromised)
        except CloudError as exc:
            _log.warning("registry.read_failed", op="warm_view", error=str(exc))
        count = refill_count(target, idle, unpromised, room)
        if count:
            _log.info(
                "warm_pool.refill", min_idle=target, idle=idle, launching=unpromised, count=count
            )
            self._start_launch(spec, count)
        return count

    async def _registry_warm_view(
        self, spec: LaunchSpec, now: float, idle: int, launching: int
    ) -> tuple[int, int]:
        """Idle and launching counts for `spec` across replicas (at least the local ones)."""
        records = await self.registry.list_workers(now)
        intents = await self.registry.list_intents(now)
        shared_idle = sum(
            1
            for r in records
            if r.state is WorkerState.READY
            and r.holders == 0
            and r.provider != "local"
            and spec.accepts(r.instance_type, r.market)
        )
        booting = sum(
            1
            for r in records
            if r.state is WorkerState.LAUNCHING and spec.accepts(r.instance_type, r.market)
        )
        requested = sum(
            i.count
            for i in intents
            if spec.accepts(i.instance_type, i.market) and not i.instance_ids
        )
        return max(idle, shared_idle), max(launching, booting + requested)

    async def _burst_loop(self) -> None:
        """Every check_interval, scale the cloud pool on the job queue's depth."""
        while True:
            try:
                await self.burst_once()
            except Exception:
                _log.exception("burst.crashed")  # logged; the next check tries again
            await trio.sleep(self.settings.burst.check_interval)

    async def burst_once(self) -> BurstDecision | None:
        """One burst check: read the depth, decide (broker.burst), launch and terminate."""
        assert self.queue is not None
        try:
            depth = await self.queue.depth()
        except CloudError as exc:
            _log.warning("burst.depth_failed", error=str(exc))
            return None
        now = self.clock.now()
        spec = self.settings.default_spec
        held = {lease.instance_id for lease in self.pool.leases.values()}
        views = [
            WorkerView(
                w.instance_id, w.local, w.instance_id in held, w.last_activity, w.price_per_hour
            )
            for w in self.pool.workers.values()
            if w.state is WorkerState.READY and (w.local or w.matches(spec))
        ]
        decision = decide(
            self.settings.burst,
            depth,
            views,
            now,
            launching=self.pool.coming_instances(spec),
            run_rate=self.pool.run_rate(),
            price_per_hour=self.prices.price(spec.instance_type, spec.market),
        )
        if decision.launch or decision.terminate:
            _log.info(
                "burst.decision",
                depth=depth,
                launch=decision.launch,
                terminate=list(decision.terminate),
                reason=decision.reason,
            )
        if decision.launch:
            try:
                self._start_launch(spec, decision.launch)
            except Refusal as exc:
                _log.warning("burst.launch_refused", reason=str(exc))
        doomed = []
        for instance_id in decision.terminate:
            worker = self.pool.workers.get(instance_id)
            ready = worker is not None and worker.state is WorkerState.READY
            if ready and worker is not None and await self._claim_reap(worker):
                worker.state = WorkerState.TERMINATING
                doomed.append(worker)
        if doomed:
            self._notify()
            try:
                await self._terminate(doomed, reason="burst_scale_down")
            except CloudError:
                pass  # logged; the reaper retries
        return decision

    # --- EC2 events: spot interruptions, rebalance recommendations, state changes --------

    async def _events_loop(self) -> None:
        """Long-poll the events queue for ever; a failing queue is retried after a pause."""
        while True:
            try:
                await self.events_once(wait_seconds=EVENTS_WAIT)
                continue
            except CloudError as exc:
                _log.warning("events.receive_failed", error=str(exc))
            except Exception:
                _log.exception("events.crashed")  # logged; the next poll starts afresh
            await trio.sleep(EVENTS_RETRY)

    async def events_once(self, *, wait_seconds: int = 0) -> int:
        """Receive one batch of EC2 events, act on those about this pool's workers, delete
        them all (events about other instances included); how many were received."""
        assert self.events is not None
        received = await self.events.receive(wait_seconds=wait_seconds)
        for message in received:
            event = parse_event(message.body)
            try:
                await self._on_event(event)
            except Exception:
                _log.exception("events.handling_crashed")
        if received:
            await self.events.delete([message.receipt_handle for message in received])
        return len(received)

    async def _on_event(
        self, event: InterruptionWarning | RebalanceRecommendation | StateChange | Unrecognised
    ) -> None:
        if isinstance(event, Unrecognised):
            _log.info("events.ignored", reason=event.reason)
            return
        worker = self.pool.workers.get(event.instance_id)
        if worker is None or worker.local:
            return  # not ours (or gone already): the queue serves the whole region
        now = self.clock.now()
        if isinstance(event, StateChange):
            if not event.is_alive and worker.state is not WorkerState.TERMINATING:
                self._lose(worker, f"worker {worker.instance_id} is {event.state} (EC2 event)", now)
                self._notify()
            return
        if isinstance(event, InterruptionWarning):
            reason, deadline = "spot_interruption", event.deadline
        else:
            reason, deadline = "rebalance_recommendation", None
        previous = worker.interruption
        known = previous is not None and previous.reason != "budget"
        if known and previous is not None and (previous.deadline is not None or deadline is None):
            return  # already known (SQS delivers at least once)
        if previous is not None and previous.deadline is not None and deadline is not None:
            deadline = min(deadline, previous.deadline)  # a budget stop may come sooner
        worker.interruption = Interruption(reason, deadline, now)
        await self._persist_interruption(worker)
        holders = self.pool.holders(worker.instance_id)
        _log.warning(
            "worker.interrupted",
            instance_id=worker.instance_id,
            ip=worker.ip,
            reason=reason,
            deadline=deadline,
            holders=len(holders),
        )
        self._notify()
        if holders:
            if previous is None or previous.reason == "budget":
                self._replace(worker)
            return
        if await self._claim_interrupted(worker):
            worker.state = WorkerState.TERMINATING
            self._notify()
            try:
                await self._terminate([worker], reason=reason)
            except CloudError:
                pass  # logged; the reaper retries

    async def _claim_interrupted(self, worker: Worker) -> bool:
        """Mark an interrupted worker nobody holds terminating (booting ones too: nobody
        will be given it)."""
        if worker.state is WorkerState.READY:
            return await self._claim_reap(worker)
        if worker.state is not WorkerState.LAUNCHING:
            return False
        try:
            return await self.registry.set_worker_state(
                worker.instance_id, WorkerState.TERMINATING, expect=WorkerState.LAUNCHING
            )
        except CloudError as exc:
            _log.warning("registry.write_failed", op="terminating", error=str(exc))
            return False

    def _replace(self, worker: Worker) -> None:
        """Launch one worker like `worker` for its holders to move to (they learn of the
        interruption from PING and ask GET_WORKER again)."""
        default = self.settings.default_spec
        spec = (
            default if worker.matches(default) else LaunchSpec(worker.instance_type, worker.market)
        )
        try:
            self._start_launch(spec, 1)
        except Refusal as exc:
            _log.warning(
                "worker.replacement_refused", instance_id=worker.instance_id, reason=str(exc)
            )
            return
        _log.info("worker.replacement", instance_id=worker.instance_id, type=spec.instance_type)

    async def _price_loop(self) -> None:
        """Read current spot prices from EC2 every hour; the price table stays the fallback."""
        assert self.spot_prices is not None
        types = list(self.settings.default_spec.types)
        while True:
            try:
                found = await self.spot_prices.spot_prices(types)
            except CloudError as exc:
                _log.warning("prices.spot_history_unavailable", error=str(exc))
            except Exception:
                _log.exception("prices.crashed")  # the table stays in use
            else:
                spot = {instance_type: {"spot": price} for instance_type, price in found.items()}
                self.prices = self.prices.with_overrides(spot)
                _log.info("prices.spot_refreshed", prices=found)
            await trio.sleep(SPOT_PRICE_REFRESH)

    async def _reap_loop(self) -> None:
        while True:
            await trio.sleep(self.settings.reap_interval)
            try:
                await self.reap_once()
            except Exception:
                _log.exception("reaper.crashed")  # logged; the next pass tries again

    async def reap_once(self) -> None:
        """One reaper pass: reconcile with EC2, expire idle leases, terminate idle workers,
        retry failed terminations."""
        await self._reconcile()
        await self._check_covers(self.clock.now())
        now = self.clock.now()
        plan = self.pool.reap_plan(
            now, keep_idle=self._min_idle(now), keep_spec=self.settings.default_spec
        )
        await self._expire_leases(plan.expired_leases, now)
        doomed = [w for w in plan.idle_workers if await self._claim_reap(w)]
        doomed += [
            w
            for w in self.pool.workers.values()
            if w.instance_id in self._retry_terminate and w not in doomed
        ]
        if not doomed:
            return
        for worker in doomed:
            worker.state = WorkerState.TERMINATING
            if worker in plan.idle_workers:
                _log.info(
                    "worker.reap",
                    instance_id=worker.instance_id,
                    ip=worker.ip,
                    idle_seconds=round(now - worker.last_activity, 3),
                )
        self._notify()
        try:
            await self._terminate(doomed, reason="idle")
        except CloudError:
            pass  # logged; retried next pass

    async def _expire_leases(self, local_view: Sequence[Lease], now: float) -> None:
        """End the leases the registry says have expired (another replica may have kept one
        alive that looks idle here; a lease may have expired while the broker was down), and
        drop local copies the registry no longer has."""
        try:
            expired = await self.registry.expired_leases(now)
        except CloudError as exc:
            _log.error("registry.read_failed", op="expired_leases", error=str(exc))
            return
        for record in expired:
            ended = await self._end_lease_record(record.client, record.instance_id)
            lease = self.pool.leases.get((record.client, record.instance_id))
            if lease is not None:
                self.pool.end_lease(lease)
                if ended:
                    self._log_lease_end(lease, "expired", now)
        try:
            live = {(r.client, r.instance_id) for r in await self.registry.list_leases(now)}
        except CloudError as exc:
            _log.error("registry.read_failed", op="list_leases", error=str(exc))
            return
        for lease in local_view:
            if (lease.client, lease.instance_id) not in live:
                self.pool.end_lease(lease)  # ended or expired in the registry meanwhile

    async def _end_lease_record(self, client: str, instance_id: str) -> bool:
        try:
            return await self.registry.end_lease(client, instance_id) is not None
        except CloudError as exc:
            _log.error("registry.write_failed", op="end_lease", error=str(exc))
            return False

    async def _claim_reap(self, worker: Worker) -> bool:
        """Mark an idle worker terminating in the registry, only if it is still ready and
        nobody holds it there: of two replicas reaping it, or one reaping while another hands
        it out, exactly one wins. A loser forgets it (another replica reaps it) or keeps it."""
        try:
            won = await self.registry.set_worker_state(
                worker.instance_id, WorkerState.TERMINATING, expect=WorkerState.READY, unheld=True
            )
        except CloudError as exc:
            _log.warning("registry.write_failed", op="reap", error=str(exc))
            return False
        if not won:
            _log.info("worker.reap_skipped", instance_id=worker.instance_id)
        return won

    async def _terminate(self, workers: Sequence[Worker], *, reason: str) -> None:
        """Terminate workers already marked terminating (here and in the registry)."""
        ids = [w.instance_id for w in workers]
        try:
            await self.cloud.terminate(ids)
        except CloudError as exc:
            self._retry_terminate.update(ids)
            _log.error("terminate.failed", instance_ids=ids, reason=reason, error=str(exc))
            raise
        now = self.clock.now()
        for worker in workers:
            self._retry_terminate.discard(worker.instance_id)
            _, leases = self.pool.remove(worker.instance_id, now)
            self._settle_attempt(worker.launch_token)  # it may have been booting
            for lease in leases:
                self._log_lease_end(lease, "worker_terminated", now)
            await self._forget_worker(worker.instance_id, leases)
            _log.info(
                "worker.terminated",
                instance_id=worker.instance_id,
                ip=worker.ip,
                reason=reason,
                lifetime_seconds=round(max(0.0, now - worker.launched_at), 3),
            )
        self._notify()

    async def _reconcile(self) -> None:
        """Make the pool agree with EC2's view of this pool's tagged instances.

        A ready worker EC2 no longer runs (spot interruption, terminated by hand) is dropped
        with its leases. A live tagged instance the pool does not know is adopted: after a
        restart, or one launched by a RunInstances call cut off at launch_timeout. Adopted
        workers start their idle clock now, so an unwanted one is reaped after idle_timeout.
        """
        try:
            instances = await self.cloud.list_pool()
        except CloudError as exc:
            _log.error("reconcile.failed", error=str(exc))
            return
        now = self.clock.now()
        alive = {instance.instance_id for instance in instances}
        for worker in list(self.pool.workers.values()):
            if worker.local:
                continue  # not an EC2 instance
            if worker.state is WorkerState.READY and worker.instance_id not in alive:
                self._lose(worker, f"worker {worker.instance_id} is no longer running in EC2", now)
        # Other replicas' workers join from the registry first, so they are not "adopted"
        # (which would overwrite their records).
        intents = await self._sync_from_registry(instances, now)
        if self.pool.in_flight:
            return  # an unanswered launch's instances may be listed already: not strangers
        by_token: dict[str | None, LaunchIntent] = {i.token: i for i in intents}
        for instance in instances:
            if instance.instance_id in self.pool.workers:
                continue
            ready = instance.state == "running" and bool(instance.public_ip)
            ready = ready and not self.settings.probe
            price = self.prices.price(instance.instance_type, instance.market)
            token = instance.tags.get(LAUNCH_TOKEN_TAG)
            intent = by_token.get(token)
            if intent is not None and intent.price_per_hour is not None:
                price = intent.price_per_hour  # charged at launch: its cover comes with it
            worker = self.pool.add(instance, now, price=price, ready=ready, token=token)
            worker.paid_until = None if intent is None else intent.paid_until
            await self._persist_new(worker)
            _log.info(
                "worker.adopted",
                instance_id=instance.instance_id,
                ip=instance.public_ip,
                state=instance.state,
                type=instance.instance_type,
            )
        await self._settle_intents(instances, intents, now)
        self._watch_wakeup.set()
        self._notify()

    # --- persistence: the registry behind the pool ----------------------------------------

    async def _restore(self) -> None:
        """Load workers and leases from the registry: after a restart the pool has the same
        workers, leases and idle clocks. Workers caught mid-termination are terminated."""
        now = self.clock.now()
        try:
            records = await self.registry.list_workers(now)
            leases = await self.registry.list_leases(now)
        except CloudError as exc:
            _log.error("registry.restore_failed", error=str(exc))
            return
        for record in records:
            if record.instance_id in self.pool.workers:
                continue
            worker = _worker_from_record(record, now)
            self.pool.workers[worker.instance_id] = worker
            if worker.state is WorkerState.TERMINATING:
                self._retry_terminate.add(worker.instance_id)
        for lease in leases:
            held = self.pool.workers.get(lease.instance_id)
            if held is None:
                continue
            self.pool.leases[(lease.client, lease.instance_id)] = _lease_from_record(
                lease, held.price_per_hour
            )
            held.last_activity = max(held.last_activity, lease.last_activity)
        if records:
            _log.info("registry.restored", workers=len(records), leases=len(leases))

    async def _add_declared_local_workers(self) -> None:
        """Local workers from the config join the pool (and the registry, where leases are
        claimed), ready at once; they are never launched, reaped or terminated."""
        now = self.clock.now()
        for spec in self.settings.local_workers:
            if spec.instance_id in self.pool.workers:
                continue
            worker = Worker(
                instance_id=spec.instance_id,
                instance_type=LOCAL_TYPE,
                market=self.settings.default_spec.market,
                state=WorkerState.READY,
                ip=spec.ip,
                launched_at=now,
                last_activity=now,
                price_per_hour=None,
                ready_at=now,
                local=True,
            )
            self.pool.workers[worker.instance_id] = worker
            try:
                if await self.registry.get_worker(worker.instance_id) is None:
                    await self.registry.put_worker(_record_of(worker))
            except CloudError as exc:
                _log.error("registry.write_failed", op="local_worker", error=str(exc))

    async def _persist_new(self, worker: Worker) -> None:
        try:
            await self.registry.put_worker(_record_of(worker))
        except CloudError as exc:
            _log.error("registry.write_failed", op="put_worker", error=str(exc))

    async def _persist_launched(self, token: str, workers: Sequence[Worker]) -> None:
        """RunInstances answered: record its workers, then drop the intent they fulfil."""
        for worker in workers:
            await self._persist_new(worker)
        try:
            await self.registry.delete_intent(token)
        except CloudError as exc:
            _log.error("registry.write_failed", op="delete_intent", error=str(exc))

    async def _persist_activity(self, lease: Lease, now: float) -> bool:
        """Write a lease's activity to the registry, at most every ACTIVITY_WRITE_EVERY:
        a client asking again and again costs no write per request; a restart loses at
        most that much of the idle clock. False if the registry no longer has the lease."""
        every = min(ACTIVITY_WRITE_EVERY, self.settings.limits.idle_timeout / 10)
        if lease.persisted_activity is not None and now - lease.persisted_activity < every:
            return True
        timeout = self.settings.limits.idle_timeout
        touched = await self.registry.touch_lease(lease.client, lease.instance_id, now, timeout)
        lease.persisted_activity = now
        return touched

    async def _persist_ready(self, worker: Worker, ip: str) -> None:
        try:
            await self.registry.set_worker_state(
                worker.instance_id, WorkerState.READY, expect=WorkerState.LAUNCHING, ip=ip
            )
        except CloudError as exc:
            _log.error("registry.write_failed", op="ready", error=str(exc))

    async def _forget_lease(self, lease: Lease) -> None:
        try:
            await self.registry.end_lease(lease.client, lease.instance_id)
        except CloudError as exc:
            _log.error("registry.write_failed", op="end_lease", error=str(exc))

    async def _forget_worker(
        self, instance_id: str, leases: Sequence[Lease], reserved: bool = True
    ) -> None:
        """Drop a worker and its leases from the registry; give back its reservation."""
        self._remote_covers.pop(instance_id, None)
        for lease in leases:
            await self._forget_lease(lease)
        try:
            # Only the broker whose delete finds the record releases its reservation and
            # refunds its unused cover (two replicas may both see a spot worker vanish).
            record = await self.registry.delete_worker(instance_id)
        except CloudError as exc:
            _log.error("registry.write_failed", op="delete_worker", error=str(exc))
            return
        if record is None:
            return
        if reserved:
            await self._unreserve(1)
        await self.spending.refund_cover(record, self.clock.now())

    async def _unreserve(self, count: int) -> None:
        try:
            await self.registry.release_instances(count)
        except CloudError as exc:
            _log.error("registry.write_failed", op="release_instances", error=str(exc))

    async def _sync_from_registry(
        self, instances: Sequence[Instance], now: float
    ) -> list[LaunchIntent]:
        """Learn what other replicas did: their workers and leases join this pool (so either
        broker hands out any worker), workers they terminated leave it, and the pool-wide
        instance counter is repaired if a crash leaked a reservation."""
        try:
            records = {r.instance_id: r for r in await self.registry.list_workers(now)}
            leases = await self.registry.list_leases(now)
            intents = await self.registry.list_intents(now)
            seen = await self.registry.reserved_instances()
        except CloudError as exc:
            _log.error("registry.read_failed", op="sync", error=str(exc))
            return []
        alive = {instance.instance_id for instance in instances}
        self._remote_covers = _covers_of(list(records.values()))
        for record in records.values():
            known = record.instance_id in self.pool.workers
            local = record.provider == "local"
            joins = not known and (record.instance_id in alive or local)
            if joins and record.state is not TERMINATING:
                self.pool.workers[record.instance_id] = _worker_from_record(record, now)
                if local:
                    _log.info("worker.local_joined", instance_id=record.instance_id)
        for record in records.values():
            known_worker = self.pool.workers.get(record.instance_id)
            if known_worker is None:
                continue
            if record.paid_until is not None:  # another replica extended its cover
                cover = known_worker.paid_until
                known_worker.paid_until = max(cover or 0.0, record.paid_until)
            if known_worker.interruption is None and record.interruption is not None:
                known_worker.interruption = _interruption_of(record, now)
                _log.info("worker.interrupted_elsewhere", instance_id=record.instance_id)
        declared = {spec.instance_id for spec in self.settings.local_workers}
        for worker in list(self.pool.workers.values()):
            if worker.local:
                if worker.instance_id not in records and worker.instance_id not in declared:
                    self._lose(
                        worker, f"local worker {worker.instance_id} stopped heartbeating", now
                    )
                continue
            gone = worker.instance_id not in records or (
                records[worker.instance_id].state is WorkerState.TERMINATING
                and worker.state is not WorkerState.TERMINATING
            )
            if gone and worker.state is WorkerState.READY and not self.pool.in_flight:
                self.pool.remove(worker.instance_id, now)
                _log.info("worker.gone_elsewhere", instance_id=worker.instance_id)
        for lease in leases:
            key = (lease.client, lease.instance_id)
            held = self.pool.workers.get(lease.instance_id)
            mine = self.pool.leases.get(key)
            if mine is not None:  # kept alive through another replica?
                mine.last_activity = max(mine.last_activity, lease.last_activity)
            elif held is not None:
                self.pool.leases[key] = _lease_from_record(lease, held.price_per_hour)
        launched = {instance.tags.get(LAUNCH_TOKEN_TAG) for instance in instances}
        pending = sum(i.count for i in intents if i.token not in launched)
        actual = len(alive) + pending
        # A snapshot can be stale (another replica launched meanwhile): repair only a
        # discrepancy seen on two passes in a row with nothing of ours in flight.
        suspect = (seen, actual) if seen != actual and not self.pool.in_flight else None
        confirmed = suspect is not None and suspect == self._counter_suspect
        self._counter_suspect = None if confirmed else suspect
        if confirmed and await self.registry.correct_reserved_instances(seen, actual):
            _log.info("registry.counter_repaired", was=seen, now=actual)
        return intents

    async def _settle_intents(
        self, instances: Sequence[Instance], intents: Sequence[LaunchIntent], now: float
    ) -> None:
        """Launch intents left by a crash: their instances (found by launch-token tag) have
        been adopted above; an intent is dropped once it is answered or older than
        launch_timeout (nobody waits for it any more)."""
        launched: dict[str | None, int] = {}
        for instance in instances:
            token = instance.tags.get(LAUNCH_TOKEN_TAG)
            launched[token] = launched.get(token, 0) + 1
        for intent in intents:
            if intent.token.partition("-")[0] in self._attempts:
                continue  # a launch of ours still under way (fallbacks add "-<n>")
            if intent.token in launched or now - intent.created_at > self.settings.launch_timeout:
                _log.info("launch.intent_settled", client_token=intent.token)
                try:
                    settled = await self.registry.delete_intent(intent.token)
                except CloudError as exc:
                    _log.error("registry.write_failed", op="delete_intent", error=str(exc))
                    continue
                if settled is not None:  # only the replica that deleted it refunds
                    await self._refund_unlaunched(settled, launched.get(settled.token, 0))

    async def _refund_unlaunched(self, intent: LaunchIntent, launched: int) -> None:
        """A settled intent's charge for the instances that never came (a launch cut off at
        launch_timeout, or a broker that crashed before RunInstances answered)."""
        price, paid_until = intent.price_per_hour, intent.paid_until
        missing = intent.count - launched
        if price is None or paid_until is None or missing <= 0:
            return
        per_instance = refund(price, intent.created_at, paid_until, self.settings.budget.zone)
        await self.spending.refund({key: amount * missing for key, amount in per_instance.items()})

    # --- helpers ---------------------------------------------------------------------------

    def _notify(self) -> None:
        """Wake every task waiting for the pool to change."""
        self._changed.set()
        self._changed = trio.Event()

    def _log_lease_end(self, lease: Lease, reason: str, now: float) -> None:
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


def _worker_from_record(record: WorkerRecord, now: float) -> Worker:
    return Worker(
        local=record.provider == "local",
        instance_id=record.instance_id,
        instance_type=record.instance_type,
        market=record.market,
        state=record.state,
        ip=record.ip,
        launched_at=record.launched_at,
        last_activity=record.last_activity,
        price_per_hour=record.price_per_hour,
        ready_at=record.launched_at if record.state is WorkerState.READY else None,
        launch_token=record.launch_token,
        paid_until=record.paid_until,
        interruption=None if record.interruption is None else _interruption_of(record, now),
    )


def _covers_of(records: Sequence[WorkerRecord]) -> dict[str, tuple[float, float]]:
    return {
        r.instance_id: (r.price_per_hour, r.paid_until)
        for r in records
        if r.price_per_hour is not None and r.paid_until is not None
    }


def _interruption_of(record: WorkerRecord, now: float) -> Interruption:
    assert record.interruption is not None
    return Interruption(record.interruption, record.interruption_deadline, now)


def _lease_from_record(record: LeaseRecord, price_per_hour: float | None) -> Lease:
    return Lease(
        record.client,
        record.instance_id,
        record.ip,
        record.started_at,
        record.last_activity,
        price_per_hour,
    )


def _record_of(worker: Worker) -> WorkerRecord:
    return WorkerRecord(
        instance_id=worker.instance_id,
        provider="local" if worker.local else "ec2",
        ip=worker.ip,
        instance_type=worker.instance_type,
        market=worker.market,
        state=worker.state,
        launched_at=worker.launched_at,
        last_activity=worker.last_activity,
        price_per_hour=worker.price_per_hour,
        launch_token=worker.launch_token,
        paid_until=worker.paid_until,
        interruption=None if worker.interruption is None else worker.interruption.reason,
        interruption_deadline=None if worker.interruption is None else worker.interruption.deadline,
    )
