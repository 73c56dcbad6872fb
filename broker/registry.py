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

import enum
from collections.abc import Iterable, Mapping
from decimal import Decimal
from typing import Any, Protocol, TypeAlias

import attrs

from broker.model import Instance, Interruption, LaunchSpec, Lease, Market, Worker, WorkerState

# A record as a plain dict: what `to_item` returns and `from_item` takes.
ItemValue: TypeAlias = str | int | float | bool | list[str] | None
Item: TypeAlias = dict[str, ItemValue]

# Numbers may come back from storage as Decimal (boto3 decodes DynamoDB numbers so).
Number: TypeAlias = int | float | Decimal


class Provider(enum.StrEnum):
    """Who runs a worker: the broker launches EC2 workers; local ones are declared or
    registered by an agent and never launched or terminated by the broker."""

    EC2 = "ec2"
    LOCAL = "local"


def _float(value: Number) -> float:
    return float(value)


def _optional_float(value: Number | None) -> float | None:
    return None if value is None else float(value)


def _int(value: Number) -> int:
    return int(value)


def _expired(expires_at: float | None, now: float) -> bool:
    return expires_at is not None and expires_at < now


def _fields(cls: type[Any], item: Mapping[str, Any]) -> dict[str, Any]:
    """The record's fields out of `item`; other keys (storage keys, newer attributes) are
    ignored, so an older broker reads items a newer one wrote."""
    return {f.name: item[f.name] for f in attrs.fields(cls) if f.name in item}


@attrs.frozen
class WorkerRecord:
    """One worker of the pool. `holders` counts its open leases (kept by `claim_lease` and
    `end_lease`); `expires_at` is set for workers that must heartbeat (local agents)."""

    instance_id: str
    provider: Provider = attrs.field(converter=Provider)
    ip: str | None
    instance_type: str
    market: Market = attrs.field(converter=Market)
    state: WorkerState = attrs.field(converter=WorkerState)
    launched_at: float = attrs.field(converter=_float)
    last_activity: float = attrs.field(converter=_float)
    price_per_hour: float | None = attrs.field(converter=_optional_float)
    launch_token: str | None
    holders: int = attrs.field(default=0, converter=_int)
    expires_at: float | None = attrs.field(default=None, converter=_optional_float)
    paid_until: float | None = attrs.field(default=None, converter=_optional_float)
    interruption: str | None = None  # why EC2 (or the budget) is taking it away
    interruption_deadline: float | None = attrs.field(default=None, converter=_optional_float)

    @classmethod
    def from_instance(
        cls,
        instance: Instance,
        now: float,
        *,
        price_per_hour: float | None,
        launch_token: str | None = None,
        ready: bool = False,
        paid_until: float | None = None,
    ) -> WorkerRecord:
        """An EC2 instance (launched or adopted) as a worker; its idle clock starts now."""
        return cls(
            instance_id=instance.instance_id,
            provider=Provider.EC2,
            ip=instance.public_ip,
            instance_type=instance.instance_type,
            market=instance.market,
            state=WorkerState.READY if ready else WorkerState.LAUNCHING,
            launched_at=instance.launched_at,
            last_activity=now,
            price_per_hour=price_per_hour,
            launch_token=launch_token,
            paid_until=paid_until,
        )

    @classmethod
    def from_worker(cls, worker: Worker) -> WorkerRecord:
        """The pool's worker as a record (no holders: `claim_lease` counts them)."""
        interruption = worker.interruption
        return cls(
            instance_id=worker.instance_id,
            provider=Provider.LOCAL if worker.local else Provider.EC2,
            ip=worker.ip,
            instance_type=worker.instance_type,
            market=worker.market,
            state=worker.state,
            launched_at=worker.launched_at,
            last_activity=worker.last_activity,
            price_per_hour=worker.price_per_hour,
            launch_token=worker.launch_token,
            paid_until=worker.paid_until,
            interruption=None if interruption is None else interruption.reason,
            interruption_deadline=None if interruption is None else interruption.deadline,
        )

    def to_worker(self, now: float) -> Worker:
        """The record as a pool worker; an interruption read now counts as noticed now."""
        return Worker(
            local=self.provider is Provider.LOCAL,
            instance_id=self.instance_id,
            instance_type=self.instance_type,
            market=self.market,
            state=self.state,
            ip=self.ip,
            launched_at=self.launched_at,
            last_activity=self.last_activity,
            price_per_hour=self.price_per_hour,
            ready_at=self.launched_at if self.state is WorkerState.READY else None,
            launch_token=self.launch_token,
            paid_until=self.paid_until,
            interruption=None
            if self.interruption is None
            else Interruption(self.interruption, self.interruption_deadline, now),
        )

    @property
    def cover(self) -> tuple[float, float] | None:
        """(price per hour, paid until) when the worker's cost is committed in the ledger."""
        if self.price_per_hour is None or self.paid_until is None:
            return None
        return (self.price_per_hour, self.paid_until)

    @classmethod
    def from_item(cls, item: Mapping[str, Any]) -> WorkerRecord:
        """The record `to_item` wrote."""
        return cls(**_fields(cls, item))

    def to_item(self) -> Item:
        """The record as a plain dict."""
        return {
            "instance_id": self.instance_id,
            "provider": self.provider.value,
            "ip": self.ip,
            "instance_type": self.instance_type,
            "market": self.market.value,
            "state": self.state.value,
            "launched_at": self.launched_at,
            "last_activity": self.last_activity,
            "price_per_hour": self.price_per_hour,
            "launch_token": self.launch_token,
            "holders": self.holders,
            "expires_at": self.expires_at,
            "paid_until": self.paid_until,
            "interruption": self.interruption,
            "interruption_deadline": self.interruption_deadline,
        }

    def is_expired(self, now: float) -> bool:
        """True once `expires_at` has passed (a local worker that stopped heartbeating)."""
        return _expired(self.expires_at, now)


@attrs.frozen
class LeaseRecord:
    """A client holds a worker until it releases it or is idle past `expires_at`."""

    client: str
    instance_id: str
    ip: str
    started_at: float = attrs.field(converter=_float)
    last_activity: float = attrs.field(converter=_float)
    expires_at: float = attrs.field(converter=_float)

    @classmethod
    def start(
        cls, client: str, instance_id: str, ip: str, now: float, idle_timeout: float
    ) -> LeaseRecord:
        """A new lease starting now, expiring after `idle_timeout` without activity."""
        return cls(client, instance_id, ip, now, now, now + idle_timeout)

    @classmethod
    def from_item(cls, item: Mapping[str, Any]) -> LeaseRecord:
        """The record `to_item` wrote."""
        return cls(**_fields(cls, item))

    def to_lease(self, price_per_hour: float | None = None) -> Lease:
        """The record as a pool lease (priced as its worker is)."""
        return Lease(
            self.client,
            self.instance_id,
            self.ip,
            self.started_at,
            self.last_activity,
            price_per_hour,
        )

    def to_item(self) -> Item:
        """The record as a plain dict."""
        return {
            "client": self.client,
            "instance_id": self.instance_id,
            "ip": self.ip,
            "started_at": self.started_at,
            "last_activity": self.last_activity,
            "expires_at": self.expires_at,
        }

    def is_expired(self, now: float) -> bool:
        """True once the lease has been idle past its expiry."""
        return _expired(self.expires_at, now)


@attrs.frozen
class LeaseHistoryRecord:
    """A lease that ended: who held which worker, from when to when, and what it cost (the
    worker's price times the lease's duration; None when the price is unknown). Kept until
    `expires_at` (None: until deleted), for `compute-broker report`."""

    client: str  # the lease owner: `<identity>[/<client id>]` (broker.access.lease_owner)
    instance_id: str
    instance_type: str
    market: str  # spot, on-demand, or local for a lab machine
    started_at: float = attrs.field(converter=_float)
    ended_at: float = attrs.field(converter=_float)
    price_per_hour: float | None = attrs.field(converter=_optional_float)
    reason: str  # released, expired, worker_terminated, worker_lost, reply_undeliverable
    expires_at: float | None = attrs.field(default=None, converter=_optional_float)

    @property
    def identity(self) -> str:
        """Whom the lease counted under: a token (`token:<name>`) or the client's address."""
        return self.client.partition("/")[0]

    @property
    def hours(self) -> float:
        """How long the lease was held, in hours."""
        return max(0.0, self.ended_at - self.started_at) / 3600.0

    @property
    def cost(self) -> float | None:
        """Dollars: the worker's price per hour times the lease's hours."""
        return None if self.price_per_hour is None else self.price_per_hour * self.hours

    @classmethod
    def from_item(cls, item: Mapping[str, Any]) -> LeaseHistoryRecord:
        """The record `to_item` wrote."""
        return cls(**_fields(cls, item))

    def to_item(self) -> Item:
        """The record as a plain dict (with `identity` and `cost`, for a reader of the table)."""
        return {
            "client": self.client,
            "identity": self.identity,
            "instance_id": self.instance_id,
            "instance_type": self.instance_type,
            "market": self.market,
            "started_at": self.started_at,
            "ended_at": self.ended_at,
            "price_per_hour": self.price_per_hour,
            "cost": self.cost,
            "reason": self.reason,
            "expires_at": self.expires_at,
        }


@attrs.frozen
class LaunchIntent:
    """A RunInstances call about to be made with `token` as its ClientToken; deleted once it
    answers and its workers are recorded. After a crash, the intent tells what may be running
    (the instances carry the token as a tag)."""

    token: str
    instance_type: str
    market: Market = attrs.field(converter=Market)
    count: int = attrs.field(converter=_int)
    created_at: float = attrs.field(converter=_float)
    expires_at: float = attrs.field(converter=_float)
    # What the ledger committed for each instance: its price from `created_at` to `paid_until`
    # (None: nothing). Whoever settles the intent refunds what was not launched.
    price_per_hour: float | None = attrs.field(default=None, converter=_optional_float)
    paid_until: float | None = attrs.field(default=None, converter=_optional_float)

    @classmethod
    def begin(
        cls,
        token: str,
        spec: LaunchSpec,
        count: int,
        now: float,
        ttl: float,
        *,
        price_per_hour: float | None = None,
        paid_until: float | None = None,
    ) -> LaunchIntent:
        """The intent to launch `count` instances of `spec`, kept for `ttl` seconds, each
        charged at `price_per_hour` from `now` to `paid_until`."""
        return cls(
            token,
            spec.instance_type,
            spec.market,
            count,
            now,
            now + ttl,
            price_per_hour=price_per_hour,
            paid_until=paid_until,
        )

    @classmethod
    def from_item(cls, item: Mapping[str, Any]) -> LaunchIntent:
        """The record `to_item` wrote."""
        return cls(**_fields(cls, item))

    def to_item(self) -> Item:
        """The record as a plain dict."""
        return {
            "token": self.token,
            "instance_type": self.instance_type,
            "market": self.market.value,
            "count": self.count,
            "created_at": self.created_at,
            "expires_at": self.expires_at,
            "price_per_hour": self.price_per_hour,
            "paid_until": self.paid_until,
        }

    @property
    def spec(self) -> LaunchSpec:
        """What the intent launches."""
        return LaunchSpec(self.instance_type, self.market)

    def is_expired(self, now: float) -> bool:
        """True once the intent is past its expiry."""
        return _expired(self.expires_at, now)


@attrs.frozen
class SpendGrant:
    """What `reserve_spend` did: instances granted, and each key's committed total as the
    decision saw it (after the grant when one was made)."""

    count: int
    committed: Mapping[str, int]


class CoverOutcome(enum.Enum):
    """What `extend_cover` did."""

    EXTENDED = "extended"
    CAPPED = "capped"  # a cap would be passed
    STALE = "stale"  # the worker is gone or its cover moved meanwhile


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
        """Refresh a lease: activity at `now`, expiry `now + idle_timeout`. False if none."""
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
        self, per_instance: Mapping[str, int], count: int, limits: Mapping[str, int]
    ) -> SpendGrant:
        """Atomically commit `per_instance` for as many of `count` instances (0..count) as
        keep every key's committed total within `limits` (keys without a limit: no cap)."""
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
