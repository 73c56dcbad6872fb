"""The dollar ledger at work: commit covers in the registry, refund unused ones, keep totals.

`broker.ledger` is the arithmetic (periods, charges, admission); the `Registry` stores the
committed totals atomically; this module joins them for the engine, which decides what to do
when a cap refuses (refuse the request, interrupt the worker, terminate idle ones).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping

import attrs
import structlog

from broker.cloud import CloudError
from broker.ledger import Budget, CoverPolicy, PeriodSpend, charge, outstanding, refund
from broker.pool import Worker
from broker.registry import CoverOutcome, Registry, WorkerRecord

_log = structlog.get_logger("broker.spending")

MAX_COVER_ROUNDS = 3  # extend_cover attempts when other replicas move the same cover


class Cover(enum.Enum):
    """Whether a worker's cost is committed as far as it needs."""

    COVERED = "covered"
    CAPPED = "capped"  # a cap forbids extending it
    GONE = "gone"  # the registry no longer has the worker


@attrs.frozen
class LaunchCharge:
    """Spend committed for `count` new workers: `per_instance` micro-dollars by ledger key,
    covering each from `start` until `paid_until`."""

    per_instance: Mapping[str, int]
    count: int
    paid_until: float
    start: float  # when the cover begins (the charge's time)

    def total(self, count: int | None = None) -> dict[str, int]:
        """Micro-dollars by key for `count` of the workers (default: all)."""
        n = self.count if count is None else count
        return {key: amount * n for key, amount in self.per_instance.items()}


@attrs.frozen
class Refused:
    """A launch the caps do not allow: the cap's key and what one more worker needs."""

    key: str
    per_instance: int


class Spending:
    """Commits and refunds spend for one engine; `committed` holds the totals last seen."""

    def __init__(self, registry: Registry, budget: Budget, cover: CoverPolicy) -> None:
        self.registry = registry
        self.budget = budget
        self.policy = cover
        self.committed: dict[str, int] = {}

    def covered(self, worker: Worker, now: float) -> bool:
        """True if the worker's cover is long enough already (no registry call): the check
        every hand-out and PING makes before `cover`."""
        if worker.local or worker.price_per_hour is None:
            return True
        paid = worker.paid_until
        return paid is not None and paid >= self.policy.needed(worker.last_activity, now)

    async def charge_launch(self, price: float, count: int, now: float) -> LaunchCharge | Refused:
        """Commit the cost of up to `count` workers launched at `now` at `price` until they
        could first be reaped (as many as fit under the caps). May raise CloudError."""
        paid_until = self.policy.initial(now)
        per_instance = charge(price, now, paid_until, self.budget.zone)
        limits = self.budget.limits(per_instance)
        grant = await self.registry.reserve_spend(per_instance, count, limits)
        self.committed.update(grant.committed)
        if grant.count > 0:
            return LaunchCharge(per_instance, grant.count, paid_until, now)
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
        return Refused(binding, per_instance[binding])

    async def cover(self, worker: Worker, now: float) -> Cover:
        """Make sure the worker's cost is committed until it could next be reaped, extending
        its cover when its activity lets it live longer. May raise CloudError."""
        price = worker.price_per_hour
        if worker.local or price is None:
            return Cover.COVERED
        needed = self.policy.needed(worker.last_activity, now)
        zone = self.budget.zone
        for _ in range(MAX_COVER_ROUNDS):
            seen = worker.paid_until
            if seen is not None and seen >= needed:
                return Cover.COVERED
            start = worker.launched_at if seen is None else seen
            if start < now:
                # Time already run without cover (adopted, or the broker was down): spent,
                # so charged whatever the caps say.
                spent = charge(price, start, now, zone)
                outcome = await self.registry.extend_cover(worker.instance_id, seen, now, spent, {})
                if outcome is not CoverOutcome.EXTENDED:
                    if not await self._reload(worker):
                        return Cover.GONE
                    continue
                self._add(spent)
                worker.paid_until = seen = start = now
            target = self.policy.extended(now)
            charges = charge(price, start, target, zone)
            outcome = await self.registry.extend_cover(
                worker.instance_id, seen, target, charges, self.budget.limits(charges)
            )
            if outcome is CoverOutcome.EXTENDED:
                self._add(charges)
                worker.paid_until = target
                return Cover.COVERED
            if outcome is CoverOutcome.CAPPED:
                return Cover.CAPPED
            if not await self._reload(worker):
                return Cover.GONE
        covered = worker.paid_until is not None and worker.paid_until >= needed
        return Cover.COVERED if covered else Cover.CAPPED

    async def refund(self, amounts: Mapping[str, int]) -> None:
        """Give back committed micro-dollars (logged, not raised, if the registry fails)."""
        if not any(amount > 0 for amount in amounts.values()):
            return
        try:
            await self.registry.refund_spend(amounts)
        except CloudError as exc:
            _log.error("registry.write_failed", op="refund_spend", error=str(exc))
            return
        self._add({key: -amount for key, amount in amounts.items()})

    async def refund_cover(self, record: WorkerRecord, now: float) -> None:
        """A worker ended at `now`, before its cover ran out: give back the unused part."""
        price, paid_until = record.price_per_hour, record.paid_until
        if price is None or paid_until is None or paid_until <= now:
            return
        await self.refund(refund(price, now, paid_until, self.budget.zone))

    async def refresh(self, now: float) -> None:
        """Read the current periods' totals (other replicas commit too)."""
        try:
            self.committed.update(await self.registry.spend(self.budget.current_keys(now)))
        except CloudError as exc:
            _log.warning("registry.read_failed", op="spend", error=str(exc))

    def period(
        self, key: str, now: float, covers: Iterable[tuple[float, float]], pending: int = 0
    ) -> PeriodSpend:
        """One period's numbers: `covers` are the running workers' (price, paid until),
        `pending` the micro-dollars charged for launches not answered yet."""
        unused = outstanding(covers, now, key, self.budget.zone) + pending
        limit = self.budget.limits([key]).get(key)
        return PeriodSpend(key, self.committed.get(key, 0), unused, limit)

    async def _reload(self, worker: Worker) -> bool:
        """Another replica moved the worker's cover: read it. False if the worker is gone."""
        record = await self.registry.get_worker(worker.instance_id)
        if record is None:
            return False
        worker.paid_until = record.paid_until
        return True

    def _add(self, amounts: Mapping[str, int]) -> None:
        for key, amount in amounts.items():
            if key in self.committed:
                self.committed[key] = max(0, self.committed[key] + amount)
