"""`DynamoRegistry`: the boto3 adapter implementing `broker.registry.Registry` on one table.

One partition per pool (`pk = pool#<pool>`), one item per worker, lease, launch intent and the
instance counter (`sk`, see docs/registry.md). Reads are Queries on the pool's partition,
strongly consistent, with expired items filtered out (TTL deletes them late). Every check-and-set
is one conditional write or one TransactWriteItems, so replicas sharing the table agree.
Every call goes through `broker.aws.call`: off the event loop, under the limiter, with errors as
`CloudError`; a condition that does not hold is an answer (False, None, 0), not an error.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Final

import attrs
import botocore.exceptions
import trio

from broker.aws import call, make_client
from broker.cloud import CloudError
from broker.dynamo_table import (
    PARTITION_KEY,
    SORT_KEY,
    TableSetup,
    aws_code,
    decode_item,
    encode,
    encode_item,
    ensure_table,
)
from broker.ledger import admit_count
from broker.model import WorkerState
from broker.registry import (
    CoverOutcome,
    ItemValue,
    LaunchIntent,
    LeaseHistoryRecord,
    LeaseRecord,
    Registry,
    SpendGrant,
    WorkerRecord,
)
from broker.retry import Retry

WORKER_PREFIX: Final = "worker#"
LEASE_PREFIX: Final = "lease#"
INTENT_PREFIX: Final = "intent#"
COUNTER_SK: Final = "counter#instances"
COUNTER_ATTRIBUTE: Final = "reserved"
SPEND_PREFIX: Final = "spend#"  # one item per ledger period key, e.g. spend#day:2026-11-23
SPEND_ATTRIBUTE: Final = "committed"  # micro-dollars
HISTORY_PREFIX: Final = "history#"  # history#<end, ms, 15 digits>#<instance id>#<client>

# Conditional-update loops (claim, end, reserve, release) give up after this many rounds; each
# failed round means another writer changed the item, i.e. made progress.
MAX_ROUNDS: Final = 8

_CHECK_FAILED: Final = "ConditionalCheckFailed"
_CONFLICT: Final = "TransactionConflict"


def _conflicted(error: Exception) -> bool:
    return isinstance(error, CloudError) and error.code == _CONFLICT


# A write cancelled by a concurrent transaction on the same item (TransactionConflict) is sent
# again: at most 5 requests, waits of 0.02, 0.04, 0.08 and 0.16 s, each times [0.5, 1).
CONFLICT_RETRY: Final = Retry(on=_conflicted, attempts=5, wait_initial=0.02, wait_jitter=0.5)


class DynamoRegistry:
    """Implements `broker.registry.Registry` on one DynamoDB table; blocking calls run in
    threads under `limiter`."""

    def __init__(
        self,
        table_name: str,
        pool_name: str,
        limiter: trio.CapacityLimiter,
        client: Any = None,
        *,
        region: str | None = None,
    ) -> None:
        self.table_name = table_name
        self.pool_name = pool_name
        self.limiter = limiter
        self.client: Any = client if client is not None else make_client("dynamodb", region=region)
        self._pk = f"pool#{pool_name}"

    async def ensure_table(self) -> TableSetup:
        """`ensure_table` for this registry's table, off the event loop."""
        return await call(self.limiter, ensure_table, self.client, self.table_name)

    # --- workers -------------------------------------------------------------------------------

    async def put_worker(self, worker: WorkerRecord) -> None:
        await self._put(_worker_sk(worker.instance_id), worker.to_item())

    async def add_worker(self, worker: WorkerRecord) -> bool:
        request = self._put_request(
            _worker_sk(worker.instance_id), worker.to_item(), "attribute_not_exists(#sk)"
        )
        return (await self._write(self.client.put_item, **request)).ok

    async def get_worker(self, instance_id: str) -> WorkerRecord | None:
        item = await self._get(_worker_sk(instance_id))
        return None if item is None else WorkerRecord.from_item(item)

    async def list_workers(self, now: float) -> list[WorkerRecord]:
        workers = [WorkerRecord.from_item(i) for i in await self._query(WORKER_PREFIX)]
        return [w for w in workers if not w.is_expired(now)]

    async def update_worker_activity(
        self, instance_id: str, now: float, *, expires_at: float | None = None
    ) -> bool:
        changes: dict[str, ItemValue] = {"last_activity": now}
        if expires_at is not None:
            changes["expires_at"] = expires_at
        return await self._update_existing(_worker_sk(instance_id), changes)

    async def set_worker_state(
        self,
        instance_id: str,
        state: WorkerState,
        *,
        expect: WorkerState | None = None,
        ip: str | None = None,
        unheld: bool = False,
    ) -> bool:
        changes: dict[str, ItemValue] = {"state": WorkerState(state).value}
        if ip is not None:
            changes["ip"] = ip
        conditions: list[tuple[str, ItemValue]] = []
        if expect is not None:
            conditions.append(("state", WorkerState(expect).value))
        if unheld:
            conditions.append(("holders", 0))
        return await self._update_existing(_worker_sk(instance_id), changes, conditions)

    async def mark_interrupted(
        self, instance_id: str, reason: str | None, deadline: float | None
    ) -> bool:
        changes: dict[str, ItemValue] = {
            "interruption": reason,
            "interruption_deadline": deadline,
        }
        return await self._update_existing(_worker_sk(instance_id), changes)

    async def delete_worker(self, instance_id: str) -> WorkerRecord | None:
        old = await self._delete(_worker_sk(instance_id))
        return None if old is None else WorkerRecord.from_item(old)

    # --- leases --------------------------------------------------------------------------------

    async def claim_lease(self, lease: LeaseRecord, capacity: int | None) -> bool:
        sk = _lease_sk(lease.instance_id, lease.client)
        for _ in range(MAX_ROUNDS):
            # One write: count the lease on the worker (if it may take one) and create it.
            claimed = await self._transact(
                {"Update": self._claim_worker(lease, capacity)},
                {"Put": self._put_request(sk, lease.to_item(), "attribute_not_exists(#sk)")},
            )
            if claimed.ok:
                return True
            if claimed.reason(1) != _CHECK_FAILED:
                return False  # the worker is missing, not ready, expired or full
            # The client holds a lease on it already: refresh that one, uncounted.
            refreshed = await self._transact(
                {"Update": self._claim_worker(lease, None, count=False)},
                {"Update": self._refresh_lease(sk, lease)},
            )
            if refreshed.ok:
                return True
            if refreshed.reason(0) == _CHECK_FAILED:
                return False
            # The lease ended in between: claim it anew.
        return False

    async def touch_lease(
        self, client: str, instance_id: str, now: float, idle_timeout: float
    ) -> bool:
        touched = await self._update_existing(
            _lease_sk(instance_id, client),
            {"last_activity": now, "expires_at": now + idle_timeout},
        )
        if touched:  # the worker's activity, only forward (no conflict with its claims)
            worker = self._request(
                _worker_sk(instance_id),
                update="SET #last_activity = :now",
                condition="attribute_exists(#sk) AND #last_activity < :now",
                names=("sk", "last_activity"),
                values={"now": now},
            )
            try:
                await self._write(self.client.update_item, **worker)
            except CloudError:
                pass  # best effort: the lease, written, is what holds the worker
        return touched

    async def end_lease(self, client: str, instance_id: str) -> LeaseRecord | None:
        sk = _lease_sk(instance_id, client)
        for _ in range(MAX_ROUNDS):
            item = await self._get(sk)
            if item is None:
                return None
            lease = LeaseRecord.from_item(item)
            # Delete exactly the lease read (not one claimed again since) and uncount it.
            delete = self._request(
                sk,
                condition="attribute_exists(#sk) AND #started_at = :started_at",
                names=("sk", "started_at"),
                values={"started_at": lease.started_at},
            )
            uncount = self._request(
                _worker_sk(instance_id),
                update="ADD #holders :minus_one",
                condition="attribute_exists(#sk) AND #holders > :zero",
                names=("sk", "holders"),
                values={"minus_one": -1, "zero": 0},
            )
            ended = await self._transact({"Delete": delete}, {"Update": uncount})
            if ended.ok:
                return lease
            if ended.reason(0) == _CHECK_FAILED:
                continue  # ended or claimed again meanwhile: look again
            # The worker is gone or counts no holder: the lease alone goes.
            if (await self._write(self.client.delete_item, **delete)).ok:
                return lease
        return None

    async def list_leases(self, now: float) -> list[LeaseRecord]:
        leases = [LeaseRecord.from_item(i) for i in await self._query(LEASE_PREFIX)]
        return [lease for lease in leases if not lease.is_expired(now)]

    async def expired_leases(self, now: float) -> list[LeaseRecord]:
        leases = [LeaseRecord.from_item(i) for i in await self._query(LEASE_PREFIX)]
        return [lease for lease in leases if lease.is_expired(now)]

    # --- lease history -------------------------------------------------------------------------

    async def put_lease_history(self, record: LeaseHistoryRecord) -> None:
        sk = f"{_history_key(record.ended_at)}#{record.instance_id}#{record.client}"
        await self._put(sk, record.to_item())

    async def lease_history(self, ended_since: float) -> list[LeaseHistoryRecord]:
        items = await self._query(HISTORY_PREFIX, after=_history_key(ended_since))
        return [LeaseHistoryRecord.from_item(item) for item in items]

    # --- launch intents ------------------------------------------------------------------------

    async def put_intent(self, intent: LaunchIntent) -> None:
        await self._put(_intent_sk(intent.token), intent.to_item())

    async def delete_intent(self, token: str) -> LaunchIntent | None:
        old = await self._delete(_intent_sk(token))
        return None if old is None else LaunchIntent.from_item(old)

    async def list_intents(self, now: float) -> list[LaunchIntent]:
        intents = [LaunchIntent.from_item(i) for i in await self._query(INTENT_PREFIX)]
        return [intent for intent in intents if not intent.is_expired(now)]

    # --- the pool-wide instance counter ---------------------------------------------------------

    async def reserve_instances(self, n: int, max_workers: int) -> int:
        want = min(n, max_workers)
        for _ in range(MAX_ROUNDS):
            if want <= 0:
                return 0
            outcome = await self._add_to_counter(
                want,
                f"attribute_not_exists(#{COUNTER_ATTRIBUTE}) OR #{COUNTER_ATTRIBUTE} <= :limit",
                max_workers - want,
            )
            if outcome.ok:
                return want
            want = min(n, max_workers - _counter_value(outcome.old))
        return 0

    async def release_instances(self, n: int) -> None:
        give_back = n
        for _ in range(MAX_ROUNDS):
            if give_back <= 0:
                return
            outcome = await self._add_to_counter(
                -give_back, f"#{COUNTER_ATTRIBUTE} >= :limit", give_back
            )
            if outcome.ok:
                return
            give_back = min(n, _counter_value(outcome.old))

    async def reserved_instances(self) -> int:
        return _counter_value(await self._get(COUNTER_SK))

    async def correct_reserved_instances(self, seen: int, actual: int) -> bool:
        condition = f"#{COUNTER_ATTRIBUTE} = :seen"
        if seen == 0:
            condition = f"attribute_not_exists(#{COUNTER_ATTRIBUTE}) OR {condition}"
        request = self._request(
            COUNTER_SK,
            update=f"SET #{COUNTER_ATTRIBUTE} = :actual",
            condition=condition,
            names=(COUNTER_ATTRIBUTE,),
            values={"seen": seen, "actual": max(0, actual)},
        )
        return (await self._write(self.client.update_item, **request)).ok

    # --- the dollar ledger ---------------------------------------------------------------------

    async def reserve_spend(
        self,
        per_instance: Mapping[str, int],
        count: int,
        limits: Mapping[str, int],
        *,
        intent: LaunchIntent | None = None,
    ) -> SpendGrant:
        committed: dict[str, int] = {}
        for round_ in range(MAX_ROUNDS):
            committed = await self.spend(per_instance)
            granted = admit_count(per_instance, committed, limits, count)
            if granted == 0:
                return SpendGrant(0, committed)
            parts = [
                {"Update": self._charge(key, granted * amount, limits.get(key))}
                for key, amount in per_instance.items()
            ]
            token = None
            if intent is not None:
                recorded = attrs.evolve(intent, count=granted)
                parts.append(
                    {"Put": self._put_request(_intent_sk(intent.token), recorded.to_item())}
                )
                # A charge must not be applied twice: one token per launch and round.
                token = hashlib.sha256(f"{intent.token}:{round_}".encode()).hexdigest()[:36]
            if (await self._transact(*parts, request_token=token)).ok:
                after = {key: committed[key] + granted * per_instance[key] for key in committed}
                return SpendGrant(granted, after)
        return SpendGrant(0, committed)

    async def extend_cover(
        self,
        instance_id: str,
        seen: float | None,
        paid_until: float,
        charges: Mapping[str, int],
        limits: Mapping[str, int],
    ) -> CoverOutcome:
        if admit_count(charges, {}, limits, 1) < 1:
            return CoverOutcome.CAPPED  # more than a whole period's cap (no item to check)
        if seen is None:
            cover = "(attribute_not_exists(#paid_until) OR attribute_type(#paid_until, :null))"
            values: dict[str, ItemValue] = {"null": "NULL", "new": paid_until}
        else:
            cover = "#paid_until = :seen"
            values = {"seen": seen, "new": paid_until}
        worker = self._request(
            _worker_sk(instance_id),
            update="SET #paid_until = :new",
            condition=f"attribute_exists(#sk) AND {cover}",
            names=("sk", "paid_until"),
            values=values,
        )
        parts = [worker] + [
            self._charge(key, amount, limits.get(key)) for key, amount in charges.items()
        ]
        outcome = await self._transact(*({"Update": part} for part in parts))
        if outcome.ok:
            return CoverOutcome.EXTENDED
        if outcome.reason(0) != "None":
            return CoverOutcome.STALE
        return CoverOutcome.CAPPED

    async def settle_intent(
        self, intent: LaunchIntent, refund: Mapping[str, int], *, keep: int = 0
    ) -> bool:
        change: dict[str, Any] = self._request(
            _intent_sk(intent.token),
            update="SET #count = :keep" if keep > 0 else None,
            condition="attribute_exists(#sk) AND #count = :count",
            names=("sk", "count"),
            values={"count": intent.count, **({"keep": keep} if keep > 0 else {})},
        )
        parts = [{"Update" if keep > 0 else "Delete": change}] + [
            {"Update": self._charge(key, -amount, None)}
            for key, amount in refund.items()
            if amount > 0
        ]
        return (await self._transact(*parts)).ok

    async def refund_spend(self, amounts: Mapping[str, int]) -> None:
        for key, amount in amounts.items():
            if amount > 0:
                await self._write(self.client.update_item, **self._charge(key, -amount, None))

    async def spend(self, keys: Iterable[str]) -> dict[str, int]:
        committed: dict[str, int] = {}
        for key in keys:
            item = await self._get(_spend_sk(key))
            committed[key] = 0 if item is None else int(item.get(SPEND_ATTRIBUTE, 0))
        return committed

    def _charge(self, key: str, amount: int, limit: int | None) -> dict[str, Any]:
        """ADD `amount` to a period's committed total, only if it stays within `limit`."""
        values: dict[str, ItemValue] = {"amount": amount}
        condition = None
        if limit is not None and amount > 0:
            condition = f"attribute_not_exists(#{SPEND_ATTRIBUTE}) OR #{SPEND_ATTRIBUTE} <= :max"
            values["max"] = limit - amount
        return self._request(
            _spend_sk(key),
            update=f"ADD #{SPEND_ATTRIBUTE} :amount",
            condition=condition,
            names=(SPEND_ATTRIBUTE,),
            values=values,
        )

    # --- requests ------------------------------------------------------------------------------

    def _key(self, sk: str) -> dict[str, Any]:
        return {PARTITION_KEY: {"S": self._pk}, SORT_KEY: {"S": sk}}

    def _request(
        self,
        sk: str,
        *,
        update: str | None = None,
        condition: str | None = None,
        names: Iterable[str] = (),
        values: Mapping[str, ItemValue] | None = None,
    ) -> dict[str, Any]:
        """The parameters of an UpdateItem/DeleteItem (or transaction part) on one item;
        `#name` and `:value` placeholders stand for `names` and `values`."""
        request: dict[str, Any] = {"TableName": self.table_name, "Key": self._key(sk)}
        if update is not None:
            request["UpdateExpression"] = update
        if condition is not None:
            request["ConditionExpression"] = condition
        if names:
            request["ExpressionAttributeNames"] = {f"#{name}": name for name in names}
        if values:
            request["ExpressionAttributeValues"] = {
                f":{name}": encode(value) for name, value in values.items()
            }
        return request

    def _put_request(
        self, sk: str, item: Mapping[str, ItemValue], condition: str | None = None
    ) -> dict[str, Any]:
        request: dict[str, Any] = {
            "TableName": self.table_name,
            "Item": {**encode_item(item), **self._key(sk)},
        }
        if condition is not None:
            request["ConditionExpression"] = condition
            request["ExpressionAttributeNames"] = {"#sk": SORT_KEY}
        return request

    def _claim_worker(
        self, lease: LeaseRecord, capacity: int | None, *, count: bool = True
    ) -> dict[str, Any]:
        """Update the lease's worker: activity now, one more holder if `count`; only if it
        exists, is ready, is not expired and (with `capacity`) has room."""
        condition = (
            "attribute_exists(#sk) AND #state = :ready AND (attribute_not_exists(#expires_at)"
            " OR attribute_type(#expires_at, :null) OR #expires_at >= :now)"
            " AND (attribute_not_exists(#interruption) OR attribute_type(#interruption, :null))"
        )
        names = ["sk", "state", "expires_at", "last_activity", "interruption"]
        values: dict[str, ItemValue] = {
            "ready": WorkerState.READY.value,
            "null": "NULL",
            "now": lease.last_activity,
        }
        update = "SET #last_activity = :now"
        if count:
            update += " ADD #holders :one"
            names.append("holders")
            values["one"] = 1
            if capacity is not None:
                condition += " AND #holders < :capacity"
                values["capacity"] = capacity
        return self._request(
            _worker_sk(lease.instance_id),
            update=update,
            condition=condition,
            names=names,
            values=values,
        )

    def _refresh_lease(self, sk: str, lease: LeaseRecord) -> dict[str, Any]:
        return self._request(
            sk,
            update="SET #last_activity = :now, #expires_at = :expires_at",
            condition="attribute_exists(#sk)",
            names=("sk", "last_activity", "expires_at"),
            values={"now": lease.last_activity, "expires_at": lease.expires_at},
        )

    # --- calls ---------------------------------------------------------------------------------

    async def _put(self, sk: str, item: Mapping[str, ItemValue]) -> None:
        await self._write(self.client.put_item, **self._put_request(sk, item))

    async def _delete(self, sk: str) -> dict[str, Any] | None:
        """Delete an item; the item as it was (None if there was none)."""
        request = self._request(sk)
        request["ReturnValues"] = "ALL_OLD"
        response = await call(self.limiter, self.client.delete_item, **request)
        old = response.get("Attributes")
        return decode_item(old) if old else None

    async def _get(self, sk: str) -> dict[str, Any] | None:
        response = await call(
            self.limiter,
            self.client.get_item,
            TableName=self.table_name,
            Key=self._key(sk),
            ConsistentRead=True,
        )
        item = response.get("Item")
        return None if item is None else decode_item(item)

    async def _query(self, prefix: str, *, after: str | None = None) -> list[dict[str, Any]]:
        items = await call(self.limiter, self._query_all_pages, prefix, after)
        return [decode_item(item) for item in items]

    def _query_all_pages(self, prefix: str, after: str | None) -> list[dict[str, Any]]:
        """Blocking: every item of the pool's partition whose sort key starts with `prefix`
        (and, with `after`, sorts at or after it), in sort key order."""
        condition = "#pk = :pk AND begins_with(#sk, :prefix)"
        values = {":pk": {"S": self._pk}, ":prefix": {"S": prefix}}
        if after is not None:  # from `after` to the prefix's last key ("~" sorts after them)
            condition = "#pk = :pk AND #sk BETWEEN :first AND :last"
            values = {":pk": {"S": self._pk}, ":first": {"S": after}, ":last": {"S": prefix + "~"}}
        pages = self.client.get_paginator("query").paginate(
            TableName=self.table_name,
            KeyConditionExpression=condition,
            ExpressionAttributeNames={"#pk": PARTITION_KEY, "#sk": SORT_KEY},
            ExpressionAttributeValues=values,
            ConsistentRead=True,
        )
        return [item for page in pages for item in page["Items"]]

    async def _update_existing(
        self,
        sk: str,
        changes: Mapping[str, ItemValue],
        expect: Sequence[tuple[str, ItemValue]] = (),
    ) -> bool:
        """SET `changes` on an existing item (and only if each `expect` attribute has its
        value). False if the item is missing or an expectation failed."""
        names = {"sk", *changes}
        values: dict[str, ItemValue] = {f"v_{name}": value for name, value in changes.items()}
        condition = "attribute_exists(#sk)"
        for name, value in expect:
            names.add(name)
            values[f"expected_{name}"] = value
            condition += f" AND #{name} = :expected_{name}"
        request = self._request(
            sk,
            update="SET " + ", ".join(f"#{name} = :v_{name}" for name in changes),
            condition=condition,
            names=sorted(names),
            values=values,
        )
        return (await self._write(self.client.update_item, **request)).ok

    async def _add_to_counter(self, delta: int, condition: str, limit: int) -> _Outcome:
        request = self._request(
            COUNTER_SK,
            update=f"ADD #{COUNTER_ATTRIBUTE} :delta",
            condition=condition,
            names=(COUNTER_ATTRIBUTE,),
            values={"delta": delta, "limit": limit},
        )
        request["ReturnValuesOnConditionCheckFailure"] = "ALL_OLD"
        return await self._write(self.client.update_item, **request)

    async def _transact(self, *parts: dict[str, Any], request_token: str | None = None) -> _Outcome:
        """One TransactWriteItems. With `request_token`, a retry of a transaction DynamoDB
        applied but whose answer was lost (botocore retries timeouts and 5xx) is not applied
        again (DynamoDB keeps the token for 10 minutes)."""
        params: dict[str, Any] = {"TransactItems": list(parts)}
        if request_token is not None:
            params["ClientRequestToken"] = request_token
        return await self._write(self.client.transact_write_items, **params)

    @CONFLICT_RETRY
    async def _write(self, fn: Callable[..., Any], /, **params: Any) -> _Outcome:
        """One write; a conflict with a concurrent transaction is retried (`CONFLICT_RETRY`),
        and raised as `CloudError("TransactionConflict")` when it persists."""
        outcome = await call(self.limiter, _attempt, fn, **params)
        if outcome.conflict:
            raise CloudError(_CONFLICT, "a concurrent transaction kept writing the same item")
        return outcome


@attrs.frozen
class _Outcome:
    """A write's result: done, or refused by a condition (with the item as it was when the
    request asked for it, and per transaction part the reason code, "None" for parts that
    passed)."""

    ok: bool
    old: dict[str, Any] | None = None
    reasons: tuple[str, ...] = ()
    conflict: bool = False

    def reason(self, index: int) -> str:
        return self.reasons[index] if index < len(self.reasons) else "None"


def _attempt(fn: Callable[..., Any], /, **params: Any) -> _Outcome:
    """Blocking: call `fn`; a failed condition or cancelled transaction is an outcome, other
    errors propagate (`broker.aws.call` turns them into `CloudError`)."""
    try:
        fn(**params)
    except botocore.exceptions.ClientError as exc:
        code = aws_code(exc)
        response: dict[str, Any] = dict(exc.response)
        if code == "ConditionalCheckFailedException":
            item = response.get("Item")
            return _Outcome(False, old=None if item is None else decode_item(item))
        if code == "TransactionCanceledException":
            reasons = tuple(
                str(reason.get("Code") or "None")
                for reason in response.get("CancellationReasons", [])
            )
            return _Outcome(False, reasons=reasons, conflict=_CONFLICT in reasons)
        if code == "TransactionConflictException":
            return _Outcome(False, conflict=True)
        raise
    return _Outcome(True)


def _counter_value(item: Mapping[str, Any] | None) -> int:
    if item is None:
        return 0
    return int(item.get(COUNTER_ATTRIBUTE, 0))


def _worker_sk(instance_id: str) -> str:
    return f"{WORKER_PREFIX}{instance_id}"


def _lease_sk(instance_id: str, client: str) -> str:
    return f"{LEASE_PREFIX}{instance_id}#{client}"


def _intent_sk(token: str) -> str:
    return f"{INTENT_PREFIX}{token}"


def _spend_sk(key: str) -> str:
    return f"{SPEND_PREFIX}{key}"


def _history_key(ended_at: float) -> str:
    """The sort key's start for leases that ended at `ended_at`: in milliseconds, padded so
    keys sort as times do."""
    return f"{HISTORY_PREFIX}{max(0, round(ended_at * 1000)):015d}"


def _implements_registry(registry: DynamoRegistry) -> Registry:
    """mypy checks here that `DynamoRegistry` implements `Registry`."""
    return registry
