"""The registry port: the pool's durable state as records, and the interface that stores it.

Workers, leases, launch intents, the pool-wide instance counter, the dollar ledger and the
history of ended leases. Two
implementations behave the same (tests/test_registry.py runs one contract suite against both):
`broker.memory_registry.MemoryRegistry`, for a single broker without DynamoDB and for unit
tests, and `broker.dynamo.DynamoRegistry`,
which lets replicas share one pool (see docs/registry.md). No boto3 here; time is always
passed in (Unix seconds).

An item "expires" when its `expires_at` is set and `expires_at < now`. Lists leave expired
items out: storage deletes them late (DynamoDB's TTL takes hours or days), so readers filter.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Protocol

from broker.model import WorkerState
from broker.records import (
    INTENT_TTL,
    CoverOutcome,
    Item,
    ItemValue,
    LaunchIntent,
    LeaseHistoryRecord,
    LeaseRecord,
    Number,
    Provider,
    SpendGrant,
    WorkerRecord,
)

__all__ = [
    "INTENT_TTL",
    "CoverOutcome",
    "Item",
    "ItemValue",
    "LaunchIntent",
    "LeaseHistoryRecord",
    "LeaseRecord",
    "Number",
    "Provider",
    "Registry",
    "SpendGrant",
    "WorkerRecord",
]


class Registry(Protocol):
    """Where the pool's state lives. Several brokers (replicas) may share one registry: every
    check-and-set below is atomic, so a lease, a state change or a reservation happens once.

    Methods may raise `broker.cloud.CloudError` (storage unreachable or refusing); a condition
    that does not hold is an answer (False, None, 0), not an error.
    """

    # --- workers -------------------------------------------------------------------------------

    async def put_worker(self, worker: WorkerRecord) -> None:
        """Create or replace a worker. Replacing overwrites `holders`: use it for new or
        adopted workers, and `set_worker_state` / `update_worker_activity` for changes."""
        ...

    async def add_worker(self, worker: WorkerRecord) -> bool:
        """Create a worker unless the registry has it already (another replica wrote it
        since it was read: its `holders` stand); False then, and nothing changes."""
        ...

    async def get_worker(self, instance_id: str) -> WorkerRecord | None:
        """The worker, expired or not; None if there is none."""
        ...

    async def list_workers(self, now: float) -> list[WorkerRecord]:
        """Every worker not expired at `now`, by instance id."""
        ...

    async def update_worker_activity(
        self, instance_id: str, now: float, *, expires_at: float | None = None
    ) -> bool:
        """Restart the worker's idle clock at `now`; with `expires_at`, also move its expiry
        (a local agent's heartbeat). False if there is no such worker."""
        ...

    async def set_worker_state(
        self,
        instance_id: str,
        state: WorkerState,
        *,
        expect: WorkerState | None = None,
        ip: str | None = None,
        unheld: bool = False,
    ) -> bool:
        """Set the worker's state (and its IP when given: launching -> ready). With `expect`,
        only if the state is `expect` now; with `unheld`, only if nobody holds it (a reap must
        not take a worker another replica has just leased). False if a condition failed or
        there is no such worker: of several replicas racing to reap a worker, one gets True."""
        ...

    async def mark_interrupted(
        self, instance_id: str, reason: str | None, deadline: float | None
    ) -> bool:
        """Record that the worker is being taken away: no lease can be claimed on it any more
        (other replicas learn it here); reason None lifts that. False if there is no such
        worker."""
        ...

    async def delete_worker(self, instance_id: str) -> WorkerRecord | None:
        """Forget a worker (idempotent). Its leases stay until `end_lease`. Returns the record
        deleted; None if there was none (so of several callers, one gets it and settles its
        cover and reservation)."""
        ...

    # --- leases --------------------------------------------------------------------------------

    async def claim_lease(self, lease: LeaseRecord, capacity: int | None) -> bool:
        """Atomically create `lease` and count it in the worker's `holders`, if the worker
        exists, is ready, is not interrupted, has not expired at `lease.last_activity`, and
        (unless `capacity` is None) has fewer than `capacity` holders. Also sets the worker's
        `last_activity`.

        If the client already holds a lease on the worker (expired or not), it is refreshed
        (`last_activity`, `expires_at`) and not counted again. False when the condition fails.
        """
        ...

    async def touch_lease(
        self, client: str, instance_id: str, now: float, idle_timeout: float
    ) -> bool:
        """Refresh a lease: activity at `now`, expiry `now + idle_timeout`; then move its
        worker's activity forward to `now` (a restart and other replicas learn the worker's
        idle clock from its record). False if the lease is gone."""
        ...

    async def end_lease(self, client: str, instance_id: str) -> LeaseRecord | None:
        """Atomically delete the lease and uncount it from its worker's `holders` (never
        below 0). The lease ended; None if there was none (so only one caller gets it)."""
        ...

    async def list_leases(self, now: float) -> list[LeaseRecord]:
        """Every lease not expired at `now`, by instance id then client."""
        ...

    async def expired_leases(self, now: float) -> list[LeaseRecord]:
        """The leases expired at `now` that storage still holds: end them (`end_lease`) to
        uncount them; storage deleting them by TTL would not."""
        ...

    # --- lease history -------------------------------------------------------------------------

    async def put_lease_history(self, record: LeaseHistoryRecord) -> None:
        """Keep the record of a lease that ended (storage deletes it after `expires_at`)."""
        ...

    async def lease_history(self, ended_since: float) -> list[LeaseHistoryRecord]:
        """Every kept record of a lease that ended at or after `ended_since`, by end time.
        Records past `expires_at` may still be listed until storage deletes them."""
        ...

    # --- launch intents ------------------------------------------------------------------------

    async def put_intent(self, intent: LaunchIntent) -> None:
        """Record a launch before RunInstances is called."""
        ...

    async def delete_intent(self, token: str) -> LaunchIntent | None:
        """Forget a launch intent (idempotent). Returns the intent deleted; None if there was
        none (so of several callers, one settles its charge)."""
        ...

    async def list_intents(self, now: float) -> list[LaunchIntent]:
        """Every launch intent not expired at `now`, by token."""
        ...

    # --- the pool-wide instance counter ---------------------------------------------------------

    async def reserve_instances(self, n: int, max_workers: int) -> int:
        """Atomically reserve up to `n` instances without the counter exceeding
        `max_workers`; how many were reserved (0..n)."""
        ...

    async def release_instances(self, n: int) -> None:
        """Give back `n` reserved instances (the counter never goes below 0)."""
        ...

    async def reserved_instances(self) -> int:
        """The counter's value."""
        ...

    async def correct_reserved_instances(self, seen: int, actual: int) -> bool:
        """Set the counter to `actual` if it is still `seen` (the reconciler's repair after a
        crash leaked a reservation). False if it changed meanwhile."""
        ...

    # --- the dollar ledger (micro-dollars per period key, see broker.ledger) -------------------

    async def reserve_spend(
        self,
        per_instance: Mapping[str, int],
        count: int,
        limits: Mapping[str, int],
        *,
        intent: LaunchIntent | None = None,
    ) -> SpendGrant:
        """Atomically commit `per_instance` for as many of `count` instances (0..count) as
        keep every key's committed total within `limits` (keys without a limit: no cap).
        With `intent`, the same write records it with its count set to the instances granted
        (nothing when none is): no crash can leave a charge that no intent holds."""
        ...

    async def settle_intent(
        self, intent: LaunchIntent, refund: Mapping[str, int], *, keep: int = 0
    ) -> bool:
        """Atomically give back `refund` micro-dollars and delete the intent (or, with `keep`,
        lower its count to `keep`), only if the intent is still there with `intent.count`.
        False (nothing refunded) when it is not: someone else settled it."""
        ...

    async def extend_cover(
        self,
        instance_id: str,
        seen: float | None,
        paid_until: float,
        charges: Mapping[str, int],
        limits: Mapping[str, int],
    ) -> CoverOutcome:
        """Atomically move the worker's `paid_until` from `seen` to `paid_until` and commit
        `charges`, within `limits`. STALE if the worker is gone or its cover is no longer
        `seen` (another replica extended it); CAPPED if a limit would be passed."""
        ...

    async def refund_spend(self, amounts: Mapping[str, int]) -> None:
        """Give back committed micro-dollars (cover a worker did not use)."""
        ...

    async def spend(self, keys: Iterable[str]) -> dict[str, int]:
        """The committed micro-dollars of each key (0 for keys never charged)."""
        ...
