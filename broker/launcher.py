"""The launch room: coalesced launch attempts, capacity fallback, charge before launch, intents.

A launch attempt is one RunInstances call (or one per offering when EC2 has no capacity) that
every request waiting for a worker of its spec can join. In order, an attempt: charges the
ledger for the new workers' covers (every dollar cap at once) and writes its launch intent in
the same registry transaction, reserves slots on the pool-wide instance counter (max_workers
across replicas), then calls RunInstances; once it answers, the workers are recorded and the
intent is deleted with a refund for any worker that did not come, again in one write. What
fails is undone in reverse. A crash at any point leaves a charge only where an intent holds
it, and the reconciler settles intents (`broker.reconcile`). The boot watcher
(`broker.bootwatch`) takes it from there.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Sequence
from typing import Any, Final

import attrs
import structlog
import trio

from broker.cloud import CloudError, Instance
from broker.context import Context
from broker.decisions import admit, rate_check
from broker.errors import Refusal
from broker.model import LaunchSpec, Worker, WorkerState
from broker.offerings import Offering, OfferingMemory, offerings
from broker.registry import INTENT_TTL, LaunchIntent, WorkerRecord
from broker.spending import LaunchCharge, OverBudget, Spending

_log = structlog.get_logger("broker.launcher")

FALLBACKS_SHOWN: Final = 20  # the latest capacity fallbacks STATUS lists


class AllReserved(Exception):
    """The pool-wide instance counter is at max_workers (other replicas' launches count)."""


@attrs.define
class LaunchAttempt:
    """One launch and the workers it produced, for the requests waiting on it."""

    token: str
    spec: LaunchSpec
    requested_by: str  # who caused it (a lease owner, warm-pool, burst): tagged on instances
    answered: trio.Event = attrs.field(factory=trio.Event)
    instances: list[Instance] = attrs.field(factory=list)
    error: str | None = None
    retry_later: bool = False  # refused for now (counter or cap): room may come
    reserved: int = 0  # instances reserved on the pool-wide counter, not yet launched
    intent: str | None = None  # the intent written for the offering being tried
    charged: bool = False  # the offering being tried was charged (its intent holds the charge)


@attrs.frozen
class Pause:
    """After a refusal that may lift (counter full, cap reached while workers may free up),
    no new launch of a spec is tried before `until`, so waiters do not hammer the registry."""

    until: float
    reason: str
    by_counter: bool  # the pool-wide counter refused (other replicas' workers may free up)


@attrs.frozen
class Launched:
    """What one offering's RunInstances produced, with what it cost and the intent's token."""

    instances: list[Instance]
    offering: Offering
    price: float | None
    paid_until: float | None
    token: str


@attrs.frozen
class Fallback:
    """A launch that got its workers from a later offering, for STATUS."""

    at: float
    wanted: str
    got: str
    after: tuple[str, ...]

    def to_status(self) -> dict[str, Any]:
        """As STATUS shows it under capacity.fallbacks."""
        return {
            "at": round(self.at, 3),
            "wanted": self.wanted,
            "got": self.got,
            "after": list(self.after),
        }


class Launcher:
    """Starts, joins and settles launch attempts."""

    def __init__(self, ctx: Context, spending: Spending) -> None:
        self.ctx = ctx
        self.spending = spending
        self.attempts: dict[str, LaunchAttempt] = {}
        self.demand: dict[LaunchSpec, int] = {}  # requests waiting for a worker, per spec
        self.paused: dict[LaunchSpec, Pause] = {}
        self.offering_memory = OfferingMemory()
        self.fallbacks: list[Fallback] = []  # the latest, for STATUS
        # Launched workers whose record this broker failed to write: the boot watcher writes
        # it when they are ready (a record that is missing for any other reason was deleted
        # by whoever ended the worker, and stays deleted).
        self.unrecorded: set[str] = set()

    # --- what the hand-out asks ------------------------------------------------------------

    def for_demand(self, spec: LaunchSpec, unserved: float, client: str) -> LaunchAttempt:
        """Launch enough workers for `unserved` waiting clients (one in shared mode), on behalf
        of `client`, the request that found too few; a paused spec is refused until its pause
        ends."""
        pause = self.paused.get(spec)
        if pause is not None and trio.current_time() < pause.until:
            raise Refusal(pause.reason)
        self.paused.pop(spec, None)  # past its pause: this launch decides afresh
        capacity = self.ctx.settings.limits.clients_per_worker
        count = 1 if capacity is None else max(1, math.ceil(unserved / capacity))
        return self.start(spec, count, requested_by=client)

    def joinable(self, spec: LaunchSpec) -> LaunchAttempt | None:
        """An attempt under way for `spec` that has not failed."""
        for attempt in self.attempts.values():
            if attempt.spec == spec and attempt.error is None:
                return attempt
        return None

    def may_free_up(self, spec: LaunchSpec) -> bool:
        """In exclusive mode, while the pool has workers (held, launching or on their way out),
        a release or a termination may soon make room: a refused request waits for that. So
        it does after the pool-wide counter refused (other replicas' workers may free up)."""
        pause = self.paused.get(spec)
        if pause is not None and pause.by_counter:
            return True
        if self.ctx.settings.limits.clients_per_worker is None:
            return False
        pool = self.ctx.pool
        return bool(pool.in_flight or pool.workers)

    # --- starting a launch -----------------------------------------------------------------

    def start(self, spec: LaunchSpec, count: int, *, requested_by: str) -> LaunchAttempt:
        """Admit and start a launch of up to `count` workers of `spec` for `requested_by` (a
        lease owner, `warm-pool`, `burst`, `replacement`); Refusal if the caps admit none."""
        ctx = self.ctx
        price = ctx.prices.price(spec.instance_type, spec.market)
        if price is None:  # uncharged, uncounted: never, capped or not
            reason = (
                f"budget: no price known for {spec.instance_type} {spec.market}; "
                "add it under prices in the config"
            )
            _log.warning("launch.refused", reason=reason, type=spec.instance_type)
            raise Refusal(reason)
        admission = admit(ctx.pool, spec, count, price)
        if admission.refusal is not None:
            _log.warning("launch.refused", reason=admission.refusal, type=spec.instance_type)
            raise Refusal(admission.refusal)
        token = uuid.uuid4().hex
        ctx.pool.launch_started(token, spec, admission.count, price, ctx.clock.now())
        attempt = LaunchAttempt(token, spec, requested_by)
        self.attempts[token] = attempt
        ctx.spawn(self._run, attempt, admission.count)
        return attempt

    async def _run(self, attempt: LaunchAttempt, count: int) -> None:
        ctx, spec = self.ctx, attempt.spec
        _log.info(
            "worker.launch",
            type=spec.instance_type,
            market=str(spec.market),
            count=count,
            client_token=attempt.token,
        )
        started = trio.current_time()
        try:
            with trio.fail_after(ctx.settings.launch_timeout):
                launched = await self._try_offerings(attempt, count)
        except Exception as exc:
            await self._failed(attempt, exc)
            return
        now = ctx.clock.now()
        instances = launched.instances
        attempt.instances = instances
        self.paused.pop(spec, None)
        attempt.reserved -= len(instances)
        workers = ctx.pool.launch_answered(
            attempt.token, instances, now, price=launched.price, paid_until=launched.paid_until
        )
        await self._persist_launched(attempt, workers)
        await self._undo_reservations(attempt)  # the counter's slots for what was not launched
        for worker in workers:
            _log.info(
                "worker.launched",
                instance_id=worker.instance_id,
                type=worker.instance_type,
                market=str(worker.market),
                subnet=launched.offering.subnet,
                price_per_hour=launched.price,
                api_seconds=round(trio.current_time() - started, 3),
            )
        if instances:
            ctx.metrics.launched(
                launched.offering.instance_type, str(launched.offering.market), len(instances)
            )
        else:
            attempt.error = "launch failed: EC2 launched no instance"
            self.attempts.pop(attempt.token, None)
        attempt.answered.set()
        ctx.boot_wakeup.set()
        ctx.notify()

    async def _failed(self, attempt: LaunchAttempt, exc: Exception) -> None:
        known = CloudError | trio.TooSlowError | AllReserved | OverBudget
        if not isinstance(exc, known):
            _log.exception("launch.crashed", client_token=attempt.token)
        if attempt.intent is not None:
            # Cut off with its intent written (a timeout, a registry error or a bug):
            # RunInstances may have launched or may still. The intent keeps the
            # charge and the counter its reservation; the reconciler adopts what came with
            # the intent's cover and refunds what did not when it settles the intent.
            self.spending.abandon_launch(attempt.token)
        else:
            await self._undo_reservations(attempt)  # nothing was launched (or no intent)
        spec = attempt.spec
        attempt.error = self.describe_error(exc)
        self.ctx.metrics.launch_failed(_failure_kind(exc))
        self.ctx.pool.launch_failed(attempt.token)
        self.attempts.pop(attempt.token, None)
        by_counter = isinstance(exc, AllReserved)
        # Exclusive mode with workers: a release refunds their cover; wait for it.
        attempt.retry_later = by_counter or (isinstance(exc, OverBudget) and self.may_free_up(spec))
        if attempt.retry_later:
            until = trio.current_time() + self.ctx.settings.describe_interval
            self.paused[spec] = Pause(until, attempt.error, by_counter)
        _log.error(
            "launch.failed",
            reason=attempt.error,
            type=spec.instance_type,
            market=str(spec.market),
            client_token=attempt.token,
        )
        attempt.answered.set()
        self.ctx.notify()

    async def _try_offerings(self, attempt: LaunchAttempt, count: int) -> Launched:
        """Try the spec's offerings in order until EC2 has capacity for one. Each is charged to
        the ledger first (every cap, max_hourly_cost included, in one conditional write); the
        first charge that goes through reserves the slots on the pool-wide counter, so a
        launch the budget refuses never holds one. A capacity error refunds the charge and is
        remembered, so the next launches skip that offering for a while. When no offering
        launched and a cap refused one, the launch fails with that cap's refusal."""
        ctx, spec = self.ctx, attempt.spec
        now = ctx.clock.now()
        candidates = offerings(spec, ctx.settings.subnets)
        tried = self.offering_memory.available(candidates, now)
        if not tried:
            skipped = ", ".join(f.offering.describe() for f in self.offering_memory.failed(now))
            raise CloudError("InsufficientInstanceCapacity", f"no capacity recently: {skipped}")
        failures: list[str] = []
        last: CloudError | None = None
        refused: str | None = None  # the first cap's refusal
        refused_at = math.inf  # a cap refused this price: any dearer offering is refused too
        for index, offering in enumerate(tried):
            price = ctx.prices.price(offering.instance_type, offering.market)
            over_rate = rate_check(ctx.pool, attempt.token, offering.spec, price)
            if price is None:
                over_rate = f"budget: no price known for {offering.describe()}"
            if over_rate is None and price is not None and price >= refused_at:
                over_rate = "refused by the budget at a lower price"
            if over_rate is not None:  # a fallback dearer than the caps allow
                refused = refused or over_rate
                failures.append(f"{offering.describe()}: {over_rate}")
                continue
            token = attempt.token if index == 0 else f"{attempt.token}-{index}"
            try:
                charged = await self._charge(attempt, offering, price, token, count)
            except OverBudget as exc:
                refused = refused or str(exc)
                refused_at = min(refused_at, math.inf if price is None else price)
                failures.append(f"{offering.describe()}: {exc}")
                continue
            await self._reserve(attempt, charged, count)
            if charged is None:  # nothing charged: the intent is written on its own
                intent = LaunchIntent.begin(token, offering.spec, attempt.reserved, now, INTENT_TTL)
                await ctx.registry.put_intent(intent)  # written before it is acted on
                attempt.intent = token
            try:
                instances = await ctx.cloud.launch(
                    offering.spec,
                    attempt.reserved,
                    token,
                    subnet=offering.subnet,
                    requested_by=attempt.requested_by,
                )
            except CloudError as exc:
                # Even when EC2 was unreachable (the call may have landed), the charge is given
                # back now: kept with the intent until EC2 answers again, an outage's retries
                # would fill the day's cap. An instance that did launch is adopted by the
                # reconciler and charged when it is used (`Spending.ensure_cover`).
                await self._drop_intent(attempt, token)
                if not exc.capacity:
                    raise
                now, last = ctx.clock.now(), exc
                self.offering_memory.fail(offering, exc.code, now)
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
            self.offering_memory.succeeded(offering)
            if index > 0:
                self._note_fallback(spec, offering, failures, now)
            paid_until = None if charged is None else charged.paid_until
            return Launched(instances, offering, price, paid_until, token)
        if refused is not None:
            raise OverBudget(refused)  # what bound was a cap, not EC2's capacity
        if last is not None and len(failures) == 1:
            raise last  # AWS's own words when there was nothing to fall back to
        raise CloudError(
            "InsufficientInstanceCapacity", "no offering had capacity: " + "; ".join(failures)
        )

    async def _drop_intent(self, attempt: LaunchAttempt, token: str) -> None:
        """The offering failed: delete its intent and refund its whole charge, in one write
        (`Spending.settle_launch`). If that write fails, or the reconciler settled the intent
        already, whoever settles the intent refunds: never both."""
        attempt.intent = None
        await self._settle_intent(attempt, token, launched=0)

    async def _settle_intent(self, attempt: LaunchAttempt, token: str, *, launched: int) -> None:
        if attempt.charged:  # the charge and its intent settle together
            attempt.charged = False
            await self.spending.settle_launch(attempt.token, launched=launched)
        else:
            await self.ctx.write("delete_intent", self.ctx.registry.delete_intent, token)

    async def _charge(
        self,
        attempt: LaunchAttempt,
        offering: Offering,
        price: float | None,
        token: str,
        count: int,
    ) -> LaunchCharge | None:
        """Charge the offering's workers at its price, and record its launch intent `token`
        in the same write: `count` workers, or as many as already hold slots; fewer if only
        fewer fit under the caps (slots reserved for the rest are given back). Raises
        OverBudget."""
        charged = await self.spending.charge_launch(
            attempt.token,
            token,
            offering.spec,
            price,
            attempt.reserved or count,
            # Only the default type and market's own price reaching a cap pauses the warm pool
            # (not a dearer one-off request, nor a dearer fallback offering).
            reaches_cap=attempt.spec == self.ctx.settings.default_spec
            and offering.instance_type == attempt.spec.instance_type
            and offering.market == attempt.spec.market,
        )
        attempt.charged = charged is not None
        if charged is not None:  # before any await: from now on the intent holds the charge
            attempt.intent = token
        if charged is not None and 0 < charged.count < attempt.reserved:
            await self.unreserve(attempt.reserved - charged.count)
            attempt.reserved = charged.count
        return charged

    async def _reserve(
        self, attempt: LaunchAttempt, charged: LaunchCharge | None, count: int
    ) -> None:
        """The first charge went through: reserve its workers' slots on the pool-wide counter
        (max_workers across replicas); fewer slots shrink the charge, none refunds it."""
        if attempt.reserved:
            return
        wanted = count if charged is None else charged.count
        max_workers = self.ctx.settings.limits.max_workers
        attempt.reserved = await self.ctx.registry.reserve_instances(wanted, max_workers)
        if attempt.reserved == 0:
            if attempt.intent is not None:
                await self._drop_intent(attempt, attempt.intent)
            raise AllReserved(f"max_workers reached ({max_workers}) across replicas")
        if attempt.reserved < wanted:
            await self.spending.shrink_launch(attempt.token, attempt.reserved)

    async def _undo_reservations(self, attempt: LaunchAttempt) -> None:
        """Nothing more will be launched: settle the intent (if one is left) with its charge,
        and give back the counter's slots."""
        if attempt.intent is not None:
            await self._drop_intent(attempt, attempt.intent)
        if attempt.reserved > 0:
            await self.unreserve(attempt.reserved)
            attempt.reserved = 0

    async def unreserve(self, count: int) -> None:
        """Give back slots on the pool-wide instance counter."""
        await self.ctx.write("release_instances", self.ctx.registry.release_instances, count)

    async def _persist_launched(self, attempt: LaunchAttempt, workers: Sequence[Worker]) -> None:
        """RunInstances answered: record its workers (each holds its own cover from now on),
        then settle the intent they fulfil, refunding any charged worker EC2 did not launch."""
        registry = self.ctx.registry

        async def put(record: WorkerRecord) -> bool:
            await registry.put_worker(record)
            return True

        for worker in workers:
            record = WorkerRecord.from_worker(worker)
            if not await self.ctx.write("put_worker", put, record, default=False):
                self.unrecorded.add(worker.instance_id)
        if attempt.intent is not None:
            token, attempt.intent = attempt.intent, None
            await self._settle_intent(attempt, token, launched=len(workers))

    def _note_fallback(
        self, spec: LaunchSpec, offering: Offering, failures: Sequence[str], now: float
    ) -> None:
        wanted = f"{spec.instance_type} {spec.market}"
        self.fallbacks.append(Fallback(now, wanted, offering.describe(), tuple(failures)))
        self.ctx.metrics.fallback()
        del self.fallbacks[:-FALLBACKS_SHOWN]
        _log.info("launch.fell_back", got=offering.describe(), after=list(failures))

    def describe_error(self, exc: Exception) -> str:
        """The reason a failed launch gives its waiters."""
        if isinstance(exc, AllReserved | OverBudget):
            return str(exc)
        if isinstance(exc, trio.TooSlowError):
            # RunInstances may still complete in its abandoned thread: the reconciler adopts
            # (and later reaps) whatever it launched.
            return f"launch timed out after {self.ctx.settings.launch_timeout:g}s"
        if isinstance(exc, CloudError):
            if exc.unreachable:
                return f"cloud unreachable: {exc.message or exc.code}"
            return f"launch failed: {exc}"
        return "launch failed: internal error (logged by the broker)"

    # --- settling --------------------------------------------------------------------------

    def fail(self, token: str | None, reason: str) -> None:
        """Its waiters are told `reason` (a worker of the attempt was lost or timed out)."""
        attempt = self.attempts.get(token or "")
        if attempt is not None:
            attempt.error = reason

    def settle(self, token: str | None) -> None:
        """Forget an attempt once none of its workers is still launching."""
        attempt = self.attempts.get(token or "")
        if attempt is None:
            return
        if not any(
            w.launch_token == token and w.state is WorkerState.LAUNCHING
            for w in self.ctx.pool.workers.values()
        ):
            del self.attempts[attempt.token]

    def under_way(self, token: str) -> bool:
        """True if the intent `token` belongs to a launch of ours still under way (fallback
        offerings add "-<n>" to the attempt's token)."""
        return token.partition("-")[0] in self.attempts


def _failure_kind(exc: Exception) -> str:
    """The launch-failure label for metrics: AWS's error code, or what refused."""
    if isinstance(exc, CloudError):
        return exc.code
    if isinstance(exc, trio.TooSlowError):
        return "timeout"
    if isinstance(exc, AllReserved):
        return "max_workers"
    if isinstance(exc, OverBudget):
        return "budget"
    return "internal"
