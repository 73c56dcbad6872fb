"""`Registry` in this process's memory: one broker, no DynamoDB (and the unit tests' registry).

Behaves as `broker.dynamo.DynamoRegistry` does: tests/test_registry.py runs one contract suite
against both.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable, Mapping
from typing import Any

import attrs
import trio

from broker.ledger import admit_count
from broker.model import WorkerState
from broker.registry import (
    CoverOutcome,
    LaunchIntent,
    LeaseHistoryRecord,
    LeaseRecord,
    Registry,
    SpendGrant,
    WorkerRecord,
)


@attrs.define
class MemoryRegistry:
    """`Registry` in this process's memory: one broker, no DynamoDB.

    Each method checkpoints once, then reads and writes without awaiting, so every
    check-and-set is atomic under Trio.
    """

    pool_name: str
    _workers: dict[str, WorkerRecord] = attrs.field(factory=dict, init=False)
    _leases: dict[tuple[str, str], LeaseRecord] = attrs.field(factory=dict, init=False)
    _intents: dict[str, LaunchIntent] = attrs.field(factory=dict, init=False)
    _reserved: int = attrs.field(default=0, init=False)
    _spend: dict[str, int] = attrs.field(factory=dict, init=False)
    # In the order written; expired records leave from the front, as DynamoDB's TTL removes
    # them: lazily (a record written out of order stays until the ones before it have gone).
    _history: collections.deque[LeaseHistoryRecord] = attrs.field(
        factory=collections.deque, init=False
    )

    # --- workers -------------------------------------------------------------------------------

    async def put_worker(self, worker: WorkerRecord) -> None:
        await trio.lowlevel.checkpoint()
        self._workers[worker.instance_id] = worker

    async def add_worker(self, worker: WorkerRecord) -> bool:
        await trio.lowlevel.checkpoint()
        if worker.instance_id in self._workers:
            return False
        self._workers[worker.instance_id] = worker
        return True

    async def get_worker(self, instance_id: str) -> WorkerRecord | None:
        await trio.lowlevel.checkpoint()
        return self._workers.get(instance_id)

    async def list_workers(self, now: float) -> list[WorkerRecord]:
        await trio.lowlevel.checkpoint()
        return [w for _, w in sorted(self._workers.items()) if not w.is_expired(now)]

    async def update_worker_activity(
        self, instance_id: str, now: float, *, expires_at: float | None = None
    ) -> bool:
        await trio.lowlevel.checkpoint()
        worker = self._workers.get(instance_id)
        if worker is None:
            return False
        changes: dict[str, Any] = {"last_activity": now}
        if expires_at is not None:
            changes["expires_at"] = expires_at
        self._workers[instance_id] = attrs.evolve(worker, **changes)
        return True

    async def set_worker_state(
        self,
        instance_id: str,
        state: WorkerState,
        *,
        expect: WorkerState | None = None,
        ip: str | None = None,
        unheld: bool = False,
    ) -> bool:
        await trio.lowlevel.checkpoint()
        worker = self._workers.get(instance_id)
        if worker is None or (expect is not None and worker.state != expect):
            return False
        if unheld and worker.holders:
            return False
        new_ip = worker.ip if ip is None else ip
        self._workers[instance_id] = attrs.evolve(worker, state=state, ip=new_ip)
        return True

    async def mark_interrupted(
        self, instance_id: str, reason: str | None, deadline: float | None
    ) -> bool:
        await trio.lowlevel.checkpoint()
        worker = self._workers.get(instance_id)
        if worker is None:
            return False
        self._workers[instance_id] = attrs.evolve(
            worker, interruption=reason, interruption_deadline=deadline
        )
        return True

    async def delete_worker(self, instance_id: str) -> WorkerRecord | None:
        await trio.lowlevel.checkpoint()
        return self._workers.pop(instance_id, None)

    # --- leases --------------------------------------------------------------------------------

    async def claim_lease(self, lease: LeaseRecord, capacity: int | None) -> bool:
        await trio.lowlevel.checkpoint()
        now = lease.last_activity
        worker = self._workers.get(lease.instance_id)
        if worker is None or worker.state != WorkerState.READY or worker.is_expired(now):
            return False
        if worker.interruption is not None:
            return False
        key = (lease.instance_id, lease.client)
        held = self._leases.get(key)
        if held is not None:
            self._leases[key] = attrs.evolve(
                held, last_activity=lease.last_activity, expires_at=lease.expires_at
            )
            holders = worker.holders
        elif capacity is not None and worker.holders >= capacity:
            return False
        else:
            self._leases[key] = lease
            holders = worker.holders + 1
        self._workers[worker.instance_id] = attrs.evolve(worker, holders=holders, last_activity=now)
        return True

    async def touch_lease(
        self, client: str, instance_id: str, now: float, idle_timeout: float
    ) -> bool:
        await trio.lowlevel.checkpoint()
        key = (instance_id, client)
        lease = self._leases.get(key)
        if lease is None:
            return False
        self._leases[key] = attrs.evolve(lease, last_activity=now, expires_at=now + idle_timeout)
        worker = self._workers.get(instance_id)
        if worker is not None and worker.last_activity < now:
            self._workers[instance_id] = attrs.evolve(worker, last_activity=now)
        return True

    async def end_lease(self, client: str, instance_id: str) -> LeaseRecord | None:
        await trio.lowlevel.checkpoint()
        lease = self._leases.pop((instance_id, client), None)
        worker = self._workers.get(instance_id)
        if lease is not None and worker is not None and worker.holders > 0:
            self._workers[instance_id] = attrs.evolve(worker, holders=worker.holders - 1)
        return lease

    async def list_leases(self, now: float) -> list[LeaseRecord]:
        await trio.lowlevel.checkpoint()
        return [lease for _, lease in sorted(self._leases.items()) if not lease.is_expired(now)]

    async def expired_leases(self, now: float) -> list[LeaseRecord]:
        await trio.lowlevel.checkpoint()
        return [lease for _, lease in sorted(self._leases.items()) if lease.is_expired(now)]

    # --- launch intents ------------------------------------------------------------------------

    async def put_lease_history(self, record: LeaseHistoryRecord) -> None:
        await trio.lowlevel.checkpoint()
        history = self._history
        while history and _expired_at(history[0].expires_at, record.ended_at):
            history.popleft()
        history.append(record)

    async def lease_history(self, ended_since: float) -> list[LeaseHistoryRecord]:
        await trio.lowlevel.checkpoint()
        kept = [r for r in self._history if r.ended_at >= ended_since]
        return sorted(kept, key=lambda r: (r.ended_at, r.instance_id, r.client))

    async def put_intent(self, intent: LaunchIntent) -> None:
        await trio.lowlevel.checkpoint()
        self._intents[intent.token] = intent

    async def delete_intent(self, token: str) -> LaunchIntent | None:
        await trio.lowlevel.checkpoint()
        return self._intents.pop(token, None)

    async def list_intents(self, now: float) -> list[LaunchIntent]:
        await trio.lowlevel.checkpoint()
        return [i for _, i in sorted(self._intents.items()) if not i.is_expired(now)]

    # --- the pool-wide instance counter ---------------------------------------------------------

    async def reserve_instances(self, n: int, max_workers: int) -> int:
        await trio.lowlevel.checkpoint()
        granted = max(0, min(n, max_workers - self._reserved))
        self._reserved += granted
        return granted

    async def release_instances(self, n: int) -> None:
        await trio.lowlevel.checkpoint()
        self._reserved = max(0, self._reserved - max(0, n))

    async def reserved_instances(self) -> int:
        await trio.lowlevel.checkpoint()
        return self._reserved

    async def correct_reserved_instances(self, seen: int, actual: int) -> bool:
        await trio.lowlevel.checkpoint()
        if self._reserved != seen:
            return False
        self._reserved = max(0, actual)
        return True

    # --- the dollar ledger ---------------------------------------------------------------------

    async def reserve_spend(
        self,
        per_instance: Mapping[str, int],
        count: int,
        limits: Mapping[str, int],
        *,
        intent: LaunchIntent | None = None,
    ) -> SpendGrant:
        await trio.lowlevel.checkpoint()
        granted = admit_count(per_instance, self._spend, limits, count)
        for key, amount in per_instance.items():
            self._spend[key] = self._spend.get(key, 0) + granted * amount
        if intent is not None and granted > 0:
            self._intents[intent.token] = attrs.evolve(intent, count=granted)
        return SpendGrant(granted, {key: self._spend.get(key, 0) for key in per_instance})

    async def settle_intent(
        self, intent: LaunchIntent, refund: Mapping[str, int], *, keep: int = 0
    ) -> bool:
        await trio.lowlevel.checkpoint()
        held = self._intents.get(intent.token)
        if held is None or held.count != intent.count:
            return False
        if keep > 0:
            self._intents[intent.token] = attrs.evolve(held, count=keep)
        else:
            del self._intents[intent.token]
        self._give_back(refund)
        return True

    async def extend_cover(
        self,
        instance_id: str,
        seen: float | None,
        paid_until: float,
        charges: Mapping[str, int],
        limits: Mapping[str, int],
    ) -> CoverOutcome:
        await trio.lowlevel.checkpoint()
        worker = self._workers.get(instance_id)
        if worker is None or worker.paid_until != seen:
            return CoverOutcome.STALE
        if admit_count(charges, self._spend, limits, 1) < 1:
            return CoverOutcome.CAPPED
        for key, amount in charges.items():
            self._spend[key] = self._spend.get(key, 0) + amount
        self._workers[instance_id] = attrs.evolve(worker, paid_until=paid_until)
        return CoverOutcome.EXTENDED

    async def refund_spend(self, amounts: Mapping[str, int]) -> None:
        await trio.lowlevel.checkpoint()
        self._give_back(amounts)

    def _give_back(self, amounts: Mapping[str, int]) -> None:
        for key, amount in amounts.items():
            self._spend[key] = max(0, self._spend.get(key, 0) - amount)

    async def spend(self, keys: Iterable[str]) -> dict[str, int]:
        await trio.lowlevel.checkpoint()
        return {key: self._spend.get(key, 0) for key in keys}


def _implements_registry(registry: MemoryRegistry) -> Registry:
    """mypy checks here that `MemoryRegistry` implements `Registry`."""
    return registry


def _expired_at(expires_at: float | None, now: float) -> bool:
    """True once `expires_at` (if any) has passed: a record storage would have deleted."""
    return expires_at is not None and expires_at < now
