"""The registry's records: what the pool's durable state is made of, as frozen values with
`to_item`/`from_item` conversions (plain dicts, the same for every storage). Time is Unix
seconds. `broker.registry` is the port that stores them and re-exports these names.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from decimal import Decimal
from typing import Any, Final, TypeAlias

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


INTENT_TTL: Final = 7 * 24 * 3600.0  # seconds an intent outlives a crash if nobody settles it


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
