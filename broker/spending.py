"""The budget room: covers, charges, refunds, caps reached, budget stops, and STATUS's money.

`broker.ledger` is the arithmetic (periods, charges, admission); the `Registry` stores the
committed totals atomically; this room joins them for the engine. Its words, used the same
way everywhere:

- a **cap** is a configured limit (`max_daily_cost`, `max_monthly_cost`);
- a **cover** is what a worker may cost until it can next be reaped, committed in advance;
- a cap **refuses** a charge (a launch's covers, or a cover's extension); the first refusal
  in a period means the cap is **reached** for that period: the warm pool pauses until the
  period ends, and with `on_cap: terminate_idle` idle workers go at once;
- a worker whose cover a cap refuses to extend gets a **budget stop** (an `Interruption`
  with reason "budget") and is terminated before its cover runs out; the stop is **lifted**
  when a new period begins.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

import attrs
import structlog
import trio

from broker.cloud import CloudError
from broker.context import Context
from broker.ledger import (
    MICROS,
    RATE_KEY,
    CoverPolicy,
    OnCap,
    PeriodSpend,
    charge,
    outstanding,
    rate_refusal,
    refund,
    refusal,
    to_micros,
)
from broker.model import Interruption, LaunchSpec, Worker, WorkerState
from broker.registry import INTENT_TTL, CoverOutcome, LaunchIntent, Provider, WorkerRecord

_log = structlog.get_logger("broker.spending")

MAX_COVER_ROUNDS = 3  # extend_cover attempts when other replicas move the same cover


class Cover(enum.Enum):
    """Whether a worker's cost is committed as far as it needs."""

    COVERED = "covered"
    REFUSED = "refused"  # a cap refuses extending it
    GONE = "gone"  # the registry no longer has the worker


class OverBudget(Exception):
    """A cap refused a launch's charge; `str()` is the `budget: ...` refusal."""


@attrs.frozen
class LaunchCharge:
    """Spend committed for `count` new workers: `per_instance` micro-dollars by ledger key,
    covering each from `start` until `paid_until`."""

    per_instance: Mapping[str, int]
    count: int
    paid_until: float
    start: float  # when the cover begins (the charge's time)
    intent: LaunchIntent  # recorded with the charge, in the same write; holds it after a crash

    def total(self, count: int | None = None) -> dict[str, int]:
        """Micro-dollars by key for `count` of the workers (default: all)."""
        n = self.count if count is None else count
        return {key: amount * n for key, amount in self.per_instance.items()}


def covers_of(records: Iterable[WorkerRecord]) -> dict[str, tuple[float, float]]:
    """(price, paid until) of each record whose cost is committed, by instance id."""
    return {r.instance_id: r.cover for r in records if r.cover is not None}


class Spending:
    """Commits and refunds spend for one engine; `committed` holds the totals last seen."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        settings = ctx.settings
        self.budget = settings.budget
        self.policy = CoverPolicy(
            settings.limits.idle_timeout, settings.reap_interval, settings.launch_timeout
        )
        self.hourly_cap = settings.limits.max_hourly_cost  # pool-wide, through RATE_KEY
        self.committed: dict[str, int] = {}
        self.cap_reached: str | None = None  # the ledger key whose cap was last reached
        # With on_cap: terminate_idle, how idle workers are terminated (set by the engine).
        self.terminate_idle: Callable[[str], Awaitable[Any]] | None = None
        self._others: dict[str, tuple[float, float]] = {}  # other replicas' covers, last read
        # Other replicas' launches charged and not answered, as last read: (price, paid until)
        # once per instance.
        self._others_launching: list[tuple[float, float]] = []
        self._launches: dict[str, LaunchCharge] = {}  # charged, RunInstances not answered
        self._ledger_read_at = -math.inf

    # --- covers --------------------------------------------------------------------------------

    def covered(self, worker: Worker, now: float) -> bool:
        """True if the worker's cover is long enough already (no registry call): the check
        every hand-out and PING makes before `ensure_cover`."""
        if worker.local or worker.price_per_hour is None:
            return True
        paid = worker.paid_until
        return paid is not None and paid >= self.policy.needed(worker.last_activity, now)

    async def ensure_cover(self, worker: Worker, now: float) -> Cover:
        """Make sure the worker's cost is committed until it could next be reaped, extending
        its cover when its activity lets it live longer. May raise CloudError."""
        if self.covered(worker, now):
            return Cover.COVERED
        cover = await self._extend(worker, now)
        if cover is Cover.REFUSED:
            self.on_cap(now)
        return cover

    async def _extend(self, worker: Worker, now: float) -> Cover:
        price = worker.price_per_hour
        if worker.local or price is None:
            return Cover.COVERED
        pool, registry, zone = self.ctx.pool, self.ctx.registry, self.budget.zone
        needed = self.policy.needed(worker.last_activity, now)
        for _ in range(MAX_COVER_ROUNDS):
            seen = worker.paid_until
            if seen is not None and seen >= needed:
                return Cover.COVERED
            start = worker.launched_at if seen is None else seen
            if start < now:
                # Time already run without cover (adopted, or the broker was down): spent,
                # so charged whatever the caps say.
                spent = charge(price, start, now, zone)
                outcome = await registry.extend_cover(worker.instance_id, seen, now, spent, {})
                if outcome is not CoverOutcome.EXTENDED:
                    if not await self._reload(worker):
                        return Cover.GONE
                    continue
                self._add(spent)
                pool.set_cover(worker, now)
                seen = start = now
            target = self.policy.extended(now)
            charges = charge(price, start, target, zone)
            outcome = await registry.extend_cover(
                worker.instance_id, seen, target, charges, self.budget.limits(charges)
            )
            if outcome is CoverOutcome.EXTENDED:
                self._add(charges)
                pool.set_cover(worker, target)
                return Cover.COVERED
            if outcome is CoverOutcome.CAPPED:
                return Cover.REFUSED
            if not await self._reload(worker):
                return Cover.GONE
        covered = worker.paid_until is not None and worker.paid_until >= needed
        return Cover.COVERED if covered else Cover.REFUSED

    async def _reload(self, worker: Worker) -> bool:
        """Another replica moved the worker's cover: read it. False if the worker is gone."""
        record = await self.ctx.registry.get_worker(worker.instance_id)
        if record is None:
            return False
        self.ctx.pool.set_cover(worker, record.paid_until)
        return True

    def stop_for_budget(self, worker: Worker, now: float) -> Interruption:
        """A cap refuses extending the worker's cover: it goes when the cover runs out."""
        if worker.interruption is None:
            self.ctx.pool.interrupt(worker, Interruption("budget", worker.paid_until, now))
            self.ctx.metrics.interrupted("budget")
            if self.ctx.nursery is not None:
                self.ctx.spawn(self.ctx.persist_interruption, worker)
            _log.warning(
                "worker.budget_exhausted",
                instance_id=worker.instance_id,
                ip=worker.ip,
                paid_until=worker.paid_until,
            )
            self.ctx.notify()
        assert worker.interruption is not None
        return worker.interruption

    async def check_covers(self, now: float) -> list[Worker]:
        """Each reaper pass: extend the covers running workers need, lift budget stops of a
        past period; the workers whose cover a cap refuses to extend and that must go before
        the next pass can come (the caller terminates them)."""
        await self.refresh(now)
        keys = self.budget.current_keys(now)
        doomed: list[Worker] = []
        for worker in list(self.ctx.pool.workers.values()):
            if worker.local or worker.state is not WorkerState.READY:
                continue
            stop = worker.interruption
            budget_stop = stop is not None and stop.reason == "budget"
            if (
                budget_stop
                and stop is not None
                and self.budget.current_keys(stop.noticed_at) != keys
            ):
                # A new day or month began since the stop: its cap may allow it again.
                self.ctx.pool.lift(worker)
                await self.ctx.persist_interruption(worker)
            try:
                cover = await self.ensure_cover(worker, now)
            except CloudError as exc:
                _log.warning("registry.write_failed", op="extend_cover", error=str(exc))
                continue
            if cover is not Cover.REFUSED:
                continue  # covered, or gone (the reconciliation drops it)
            self.stop_for_budget(worker, now)
            ends = worker.paid_until if worker.paid_until is not None else now
            # Before the next pass can come (a pass takes time too): two intervals of margin.
            margin = 2 * self.ctx.settings.reap_interval
            if ends <= now + margin and worker.state is WorkerState.READY:
                doomed.append(worker)
        return doomed

    # --- launches --------------------------------------------------------------------------

    async def charge_launch(
        self,
        token: str,
        intent_token: str,
        spec: LaunchSpec,
        price: float | None,
        count: int,
        *,
        reaches_cap: bool,
    ) -> LaunchCharge | None:
        """Commit the cost of up to `count` new workers of `spec` at `price` until they could
        first be reaped (fewer if only fewer fit under the caps), for the launch `token`, and
        in the same registry write its launch intent `intent_token` for the workers granted.
        None when the price is unknown and no cap is set (nothing is charged, no intent is
        written). Raises OverBudget when a cap refuses even one; a refusal of a launch that
        `reaches_cap` (not a dearer one-off request) means the cap is reached. May raise
        CloudError."""
        description = f"{spec.instance_type} {spec.market}"
        if price is None:
            if self.budget.has_caps or self.hourly_cap is not None:
                raise OverBudget(
                    f"budget: no price known for {description}; add it under prices in the config"
                )
            return None
        now = self.ctx.clock.now()
        paid_until = self.policy.initial(now)
        per_instance = charge(price, now, paid_until, self.budget.zone)
        limits = self.budget.limits(per_instance)
        if self.hourly_cap is not None:
            per_instance[RATE_KEY] = to_micros(price)
            limits[RATE_KEY] = to_micros(self.hourly_cap)
        intent = LaunchIntent.begin(
            intent_token, spec, count, now, INTENT_TTL, price_per_hour=price, paid_until=paid_until
        )
        grant = await self.ctx.registry.reserve_spend(per_instance, count, limits, intent=intent)
        self.committed.update(grant.committed)
        if grant.count > 0:
            intent = attrs.evolve(intent, count=grant.count)
            charged = LaunchCharge(per_instance, grant.count, paid_until, now, intent)
            self._launches[token] = charged
            return charged
        binding = next(
            (
                key
                for key, limit in limits.items()
                if grant.committed.get(key, 0) + per_instance[key] > limit
            ),
            None,
        )
        if binding is None:  # every attempt lost a race with other writers: not a cap
            raise CloudError("LedgerContention", "the dollar ledger stayed busy; try again")
        if binding == RATE_KEY and self.hourly_cap is not None:
            rate = grant.committed.get(RATE_KEY, 0) / MICROS  # every replica's workers
            raise OverBudget(rate_refusal(description, price, rate, self.hourly_cap))
        if reaches_cap:
            self.on_cap(now, binding)
        # The refusal's figures are the pool's as they are now: read the ledger, every
        # replica's covers and unanswered launches (the totals first: a charge made after
        # that read cannot then count as spent).
        await self.read_ledger(now)
        raise OverBudget(refusal(self.period_spend(binding, now), per_instance[binding]))

    def charged(self, token: str) -> LaunchCharge | None:
        """The launch's charge, while it is held here (not settled, shrunk or abandoned)."""
        return self._launches.get(token)

    async def settle_launch(self, token: str, launched: int = 0) -> None:
        """The launch answered (or failed): delete its intent and give back the charge for
        the workers not launched, in one registry write. If the write fails, or another
        replica's reconciliation settled the intent first, the intent's settler refunds."""
        charged = self._launches.pop(token, None)
        if charged is not None:
            await self._settle(charged, charged.count - launched, keep=0)

    async def shrink_launch(self, token: str, count: int) -> None:
        """Only `count` of the launch's charged workers will be launched: lower its intent's
        count and refund the rest, in one write."""
        charged = self._launches.get(token)
        if charged is None or count >= charged.count:
            return
        if await self._settle(charged, charged.count - count, keep=count):
            intent = attrs.evolve(charged.intent, count=count)
            self._launches[token] = attrs.evolve(charged, count=count, intent=intent)
        else:
            self._launches.pop(token, None)  # the intent's settler has the charge now

    def abandon_launch(self, token: str) -> None:
        """The launch was cut off (it may still launch): its intent keeps the charge."""
        self._launches.pop(token, None)

    async def _settle(self, charged: LaunchCharge, unlaunched: int, *, keep: int) -> bool:
        amounts = charged.total(max(0, unlaunched))
        try:
            settled = await self.ctx.registry.settle_intent(charged.intent, amounts, keep=keep)
        except CloudError as exc:
            _log.error("registry.write_failed", op="settle_intent", error=str(exc))
            return False
        if settled:
            self._add({key: -amount for key, amount in amounts.items()})
        return settled

    async def refund(self, amounts: Mapping[str, int]) -> None:
        """Give back committed micro-dollars (logged, not raised, if the registry fails)."""
        if not any(amount > 0 for amount in amounts.values()):
            return
        try:
            await self.ctx.registry.refund_spend(amounts)
        except CloudError as exc:
            _log.error("registry.write_failed", op="refund_spend", error=str(exc))
            return
        self._add({key: -amount for key, amount in amounts.items()})

    def forget(self, instance_id: str) -> None:
        """The worker has ended: its cover no longer counts as outstanding."""
        self._others.pop(instance_id, None)

    async def refund_cover(self, record: WorkerRecord, now: float) -> None:
        """A worker ended at `now`: give back the unused part of its cover, and its price to
        the pool-wide run rate."""
        price, paid_until = record.price_per_hour, record.paid_until
        amounts: dict[str, int] = {}
        if price is not None and paid_until is not None and paid_until > now:
            amounts = refund(price, now, paid_until, self.budget.zone)
        if self.hourly_cap is not None and price is not None and record.provider is Provider.EC2:
            amounts[RATE_KEY] = to_micros(price)
        await self.refund(amounts)

    async def add_to_run_rate(self, price: float | None) -> None:
        """An instance joined that no launch of ours charged (adopted): its price counts in
        the pool-wide run rate whatever the cap says (it runs already)."""
        if self.hourly_cap is None or price is None:
            return
        try:
            grant = await self.ctx.registry.reserve_spend({RATE_KEY: to_micros(price)}, 1, {})
        except CloudError as exc:
            _log.error("registry.write_failed", op="run_rate", error=str(exc))
            return
        self.committed.update(grant.committed)

    async def settle_intent(self, intent: LaunchIntent, launched: int) -> bool:
        """Delete an intent left unanswered (a launch cut off at launch_timeout, or a broker
        that crashed before RunInstances answered) and, in the same write, refund its charge
        for the instances that never came. False if someone else settled it first."""
        price, paid_until = intent.price_per_hour, intent.paid_until
        missing = intent.count - launched
        amounts: dict[str, int] = {}
        if price is not None and paid_until is not None and missing > 0:
            per_instance = refund(price, intent.created_at, paid_until, self.budget.zone)
            if self.hourly_cap is not None:
                per_instance[RATE_KEY] = to_micros(price)
            amounts = {key: amount * missing for key, amount in per_instance.items()}
        settled = await self.ctx.registry.settle_intent(intent, amounts)
        if settled:
            self._add({key: -amount for key, amount in amounts.items()})
        return settled

    # --- caps reached ----------------------------------------------------------------------

    def on_cap(self, now: float, key: str | None = None) -> None:
        """A cap (of the period `key`, else the one with least room) refused a charge: the
        warm pool stops refilling for the rest of that period, and with on_cap:
        terminate_idle the idle workers go at once."""
        keys = self.budget.current_keys(now)
        if key is None:
            limits = self.budget.limits(keys)
            committed = self.committed
            key = min(limits, key=lambda k: limits[k] - committed.get(k, 0), default=keys[0])
        first = self.cap_reached not in keys
        self.cap_reached = key
        if first:
            _log.warning("budget.cap_reached", period=key, on_cap=str(self.budget.on_cap))
        terminate = self.terminate_idle
        if self.budget.on_cap is OnCap.TERMINATE_IDLE and terminate and self.ctx.nursery:
            self.ctx.spawn(terminate, "budget_cap")

    def reached_this_period(self, now: float) -> bool:
        """True if a cap was reached in the current day or month (no speculative launches)."""
        return self.cap_reached in self.budget.current_keys(now)

    # --- reading and reporting -------------------------------------------------------------

    async def refresh(self, now: float) -> None:
        """Read the current periods' totals and the run rate (other replicas commit too)."""
        keys = self.budget.current_keys(now)
        if self.hourly_cap is not None:
            keys = (*keys, RATE_KEY)
        try:
            self.committed.update(await self.ctx.registry.spend(keys))
        except CloudError as exc:
            _log.warning("registry.read_failed", op="spend", error=str(exc))

    async def read_ledger(self, now: float, *, max_age: float = 0.0) -> None:
        """Read the totals, then every replica's unanswered launches and covers (for STATUS
        and refusals), unless they were read less than `max_age` seconds ago. Launches are
        read before workers: a launch answered in between is then counted twice as unused
        (the safe side), never as spent."""
        if trio.current_time() - self._ledger_read_at < max_age:
            return
        self._ledger_read_at = trio.current_time()
        await self.refresh(now)
        try:
            intents = await self.ctx.registry.list_intents(now)
            records = await self.ctx.registry.list_workers(now)
        except CloudError as exc:
            _log.warning("registry.read_failed", op="ledger", error=str(exc))
            return
        self.remember_covers(records, intents)

    def remember_covers(
        self, records: Iterable[WorkerRecord], intents: Iterable[LaunchIntent] = ()
    ) -> None:
        """Every replica's workers' covers, and the charges of launches not answered, as just
        read from the registry (this replica's own launches are counted from memory)."""
        self._others = covers_of(records)
        self._others_launching = [
            (intent.price_per_hour, intent.paid_until)
            for intent in intents
            if intent.price_per_hour is not None
            and intent.paid_until is not None
            and intent.token.partition("-")[0] not in self._launches
            for _ in range(intent.count)
        ]

    def period_spend(self, key: str, now: float) -> PeriodSpend:
        """One period's numbers: committed as last seen; unused cover of every known worker
        (this replica's as they are, others' as last read) and of launches not answered."""
        covers = dict(self._others)
        for w in self.ctx.pool.workers.values():
            if w.price_per_hour is not None and w.paid_until is not None and not w.local:
                covers[w.instance_id] = (w.price_per_hour, w.paid_until)
        pending = sum(c.total().get(key, 0) for c in self._launches.values())
        launching = outstanding(self._others_launching, now, key, self.budget.zone)
        unused = outstanding(covers.values(), now, key, self.budget.zone) + pending + launching
        limit = self.budget.limits([key]).get(key)
        return PeriodSpend(key, self.committed.get(key, 0), unused, limit)

    def status(self, now: float) -> dict[str, Any]:
        """STATUS's `budget`: each period's spend against its cap, the run rate."""
        periods = {
            key.partition(":")[0]: self.period_spend(key, now).to_status()
            for key in self.budget.current_keys(now)
        }
        pool_rate = self.committed.get(RATE_KEY)
        return {
            **periods,
            "timezone": self.budget.timezone,
            "on_cap": str(self.budget.on_cap),
            "run_rate_per_hour": round(self.ctx.pool.run_rate(), 6),
            # Every replica's, as committed in the registry (only with max_hourly_cost).
            "pool_run_rate_per_hour": None if pool_rate is None else pool_rate / MICROS,
            # No dollar cap at all: nothing bounds what the pool may spend (warned at start).
            "uncapped": not self.budget.has_caps and self.hourly_cap is None,
            "max_hourly_cost": self.hourly_cap,
        }

    def _add(self, amounts: Mapping[str, int]) -> None:
        for key, amount in amounts.items():
            if key in self.committed:
                self.committed[key] = max(0, self.committed[key] + amount)
