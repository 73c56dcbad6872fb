"""The registry contract: `MemoryRegistry` and `DynamoRegistry` (on the session's moto server)
behave the same. Every test taking `registry` runs against both; each gets a fresh pool (and,
for DynamoDB, a fresh table). Concurrency tests run the calls in one Trio nursery, so DynamoDB
requests really overlap (one thread each)."""

from __future__ import annotations

import random
import uuid
from collections.abc import Callable
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import attrs
import botocore.exceptions
import pytest
import trio

from broker.aws import make_client
from broker.cloud import CloudError, Instance, LaunchSpec, Market
from broker.dynamo import DynamoRegistry
from broker.dynamo_table import decode_item, encode_item, ensure_table
from broker.memory_registry import MemoryRegistry
from broker.model import WorkerState
from broker.registry import (
    CoverOutcome,
    LaunchIntent,
    LeaseHistoryRecord,
    LeaseRecord,
    Provider,
    Registry,
    WorkerRecord,
)

if TYPE_CHECKING:
    from broker.sandbox import MotoHandle  # moto is an optional extra

NOW = 1_700_000_000.25
IDLE = 600.0
SPEC = LaunchSpec("c7i.large", Market.SPOT)
DEADLINE = 10
# One thread per concurrent caller, so concurrent requests reach moto at the same time.
THREADS = 32

# Floats whose decimal form is awkward: repeating, tiny, huge, many digits, integral.
AWKWARD_FLOATS = (0.1, 1e-05, 1e16, 1712345678.123456, 2.0, 0.0416, 1 / 3)


@pytest.fixture(scope="module")
def atomic_moto(moto_server: MotoHandle) -> None:
    """moto's DynamoDB serialised like DynamoDB's per-item atomicity (`start_moto` installs
    it; without it the concurrency tests would test moto, not the registry)."""
    from broker.sandbox import install_atomic_dynamodb

    install_atomic_dynamodb()


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def dynamo_client() -> Any:
    return make_client("dynamodb", region=None)


def dynamo_registry(table: str | None = None, pool: str | None = None) -> DynamoRegistry:
    """A registry on a fresh table (or `table`), for a fresh pool (or `pool`)."""
    client = dynamo_client()
    if table is None:
        table = unique("registry")
        ensure_table(client, table)
    return DynamoRegistry(table, pool or unique("pool"), trio.CapacityLimiter(THREADS), client)


@pytest.fixture(params=["memory", pytest.param("dynamo", marks=pytest.mark.slow)])
def registry(request: pytest.FixtureRequest) -> Registry:
    if request.param == "memory":
        return MemoryRegistry(unique("pool"))
    request.getfixturevalue("atomic_moto")
    return dynamo_registry()


@pytest.fixture
def dynamo(atomic_moto: None) -> DynamoRegistry:
    return dynamo_registry()


def worker(
    instance_id: str = "i-0a",
    *,
    state: WorkerState = WorkerState.READY,
    expires_at: float | None = None,
    price: float | None = 0.0416,
    provider: Provider = Provider.EC2,
) -> WorkerRecord:
    return WorkerRecord(
        instance_id=instance_id,
        provider=provider,
        ip=None if state is WorkerState.LAUNCHING else "198.51.100.7",
        instance_type="c7i.large",
        market=Market.SPOT,
        state=state,
        launched_at=NOW - 120.5,
        last_activity=NOW - 60.125,
        price_per_hour=price,
        launch_token="token-1" if provider is Provider.EC2 else None,
        expires_at=expires_at,
    )


def lease(client: str, instance_id: str = "i-0a", now: float = NOW) -> LeaseRecord:
    return LeaseRecord.start(client, instance_id, "198.51.100.7", now, IDLE)


async def holders(registry: Registry, instance_id: str = "i-0a") -> int:
    found = await registry.get_worker(instance_id)
    assert found is not None
    return found.holders


async def gather(calls: list[Callable[[], Any]]) -> list[Any]:
    """Run the calls concurrently; their results in order."""
    results: list[Any] = [None] * len(calls)

    async def run(index: int) -> None:
        results[index] = await calls[index]()

    with trio.fail_after(DEADLINE):
        async with trio.open_nursery() as nursery:
            for index in range(len(calls)):
                nursery.start_soon(run, index)
    return results


# --- records -----------------------------------------------------------------------------------


@pytest.mark.parametrize("value", AWKWARD_FLOATS)
def test_records_round_trip_through_items_and_dynamodb_values(value: float) -> None:
    """to_item/from_item, and DynamoDB's encoding (numbers back as Decimal), are exact."""
    records = [
        worker(price=value, expires_at=NOW + value),
        worker(price=None, provider=Provider.LOCAL, state=WorkerState.LAUNCHING),
        LeaseRecord("10.0.0.1:5000", "i-0a", "198.51.100.7", value, NOW + value, NOW + IDLE),
        LaunchIntent("t-1", "c7i.large", Market.ON_DEMAND, 3, value, NOW),
        LaunchIntent.begin("t-2", SPEC, 1, value, IDLE),
        ended("token:a/job", NOW - value, NOW, price=value),
        ended("10.0.0.1", NOW, NOW + value, price=None, expires_at=None),
    ]
    for record in records:
        item = record.to_item()
        from_dynamodb = decode_item(encode_item(item))
        assert record == type(record).from_item(item)
        assert record == type(record).from_item(from_dynamodb)
        assert _plain(item) == _plain(type(record).from_item(from_dynamodb).to_item())
        assert any(isinstance(v, Decimal) for v in from_dynamodb.values())


def test_from_item_ignores_storage_keys_and_unknown_attributes() -> None:
    """Items carry pk/sk and maybe attributes of a newer broker: from_item skips them."""
    record = worker()
    item = {**record.to_item(), "pk": "pool#p", "sk": "worker#i-0a", "future": 1}
    assert record == WorkerRecord.from_item(item)


def test_worker_from_instance_starts_launching_or_ready_with_its_idle_clock_now() -> None:
    """from_instance copies the instance and starts the idle clock at `now`."""
    instance = Instance("i-9", "c7i.large", Market.SPOT, "pending", None, NOW - 5)
    launching = WorkerRecord.from_instance(instance, NOW, price_per_hour=0.5, launch_token="t")
    adopted = WorkerRecord.from_instance(instance, NOW, price_per_hour=None, ready=True)

    assert (launching.state, launching.last_activity, launching.holders) == (
        WorkerState.LAUNCHING,
        NOW,
        0,
    )
    assert (launching.launched_at, launching.launch_token) == (NOW - 5, "t")
    assert adopted.state is WorkerState.READY


# --- workers -----------------------------------------------------------------------------------


async def test_workers_round_trip_and_list_by_instance_id(registry: Registry) -> None:
    """Stored workers read back equal, floats and None included; lists are by instance id."""
    local = worker("lab-01", provider=Provider.LOCAL, price=None, expires_at=NOW + 90.5)
    ec2 = worker("i-0b", price=1 / 3)
    launching = worker("i-0a", state=WorkerState.LAUNCHING)
    for record in (local, ec2, launching):
        await registry.put_worker(record)

    assert ec2 == await registry.get_worker("i-0b")
    assert await registry.get_worker("i-missing") is None
    assert [launching, ec2, local] == await registry.list_workers(NOW)


async def test_add_worker_never_overwrites_a_worker_the_registry_has(registry: Registry) -> None:
    """An adoption racing another replica's launch: the first record stands, holders too."""
    assert await registry.add_worker(worker("i-0a"))
    assert await registry.claim_lease(lease("a:1"), 1)
    assert not await registry.add_worker(worker("i-0a", price=2.0))
    found = await registry.get_worker("i-0a")
    assert found is not None
    assert (found.holders, found.price_per_hour) == (1, worker("i-0a").price_per_hour)


async def test_expired_workers_are_not_listed_but_still_readable(registry: Registry) -> None:
    """A worker past expires_at leaves list_workers (TTL deletes late); a heartbeat revives it."""
    await registry.put_worker(worker("lab-01", provider=Provider.LOCAL, expires_at=NOW + 30))
    await registry.put_worker(worker("i-0a"))

    assert [w.instance_id for w in await registry.list_workers(NOW + 30)] == ["i-0a", "lab-01"]
    assert [w.instance_id for w in await registry.list_workers(NOW + 30.5)] == ["i-0a"]
    assert await registry.get_worker("lab-01") is not None

    assert await registry.update_worker_activity("lab-01", NOW + 31, expires_at=NOW + 121)
    assert [w.instance_id for w in await registry.list_workers(NOW + 31)] == ["i-0a", "lab-01"]
    revived = await registry.get_worker("lab-01")
    assert revived is not None
    assert (revived.last_activity, revived.expires_at) == (NOW + 31, NOW + 121)


async def test_update_worker_activity_restarts_the_idle_clock_only(registry: Registry) -> None:
    """update_worker_activity sets last_activity, keeps the rest; unknown workers: False."""
    await registry.put_worker(worker())

    assert await registry.update_worker_activity("i-0a", NOW + 5.5)
    assert not await registry.update_worker_activity("i-missing", NOW)
    assert await registry.get_worker("i-missing") is None
    assert await registry.get_worker("i-0a") == attrs.evolve(worker(), last_activity=NOW + 5.5)


async def test_set_worker_state_checks_the_expected_state(registry: Registry) -> None:
    """With expect, the state changes only from that state; an IP can come with it."""
    await registry.put_worker(worker(state=WorkerState.LAUNCHING))

    assert not await registry.set_worker_state(
        "i-0a", WorkerState.TERMINATING, expect=WorkerState.READY
    )
    assert await registry.set_worker_state(
        "i-0a", WorkerState.READY, expect=WorkerState.LAUNCHING, ip="198.51.100.9"
    )
    ready = await registry.get_worker("i-0a")
    assert ready is not None
    assert (ready.state, ready.ip) == (WorkerState.READY, "198.51.100.9")
    assert await registry.set_worker_state("i-0a", WorkerState.TERMINATING)
    assert not await registry.set_worker_state("i-missing", WorkerState.READY)
    assert await registry.get_worker("i-missing") is None


async def test_set_worker_state_with_expect_succeeds_once_among_10(registry: Registry) -> None:
    """Ten replicas racing to move ready -> terminating: exactly one wins."""
    await registry.put_worker(worker())
    results = await gather(
        [
            lambda: registry.set_worker_state(
                "i-0a", WorkerState.TERMINATING, expect=WorkerState.READY
            )
            for _ in range(10)
        ]
    )

    assert results.count(True) == 1
    found = await registry.get_worker("i-0a")
    assert found is not None
    assert found.state == WorkerState.TERMINATING


async def test_delete_worker_is_idempotent(registry: Registry) -> None:
    """Deleting a worker twice is not an error; only the first delete returns the record."""
    await registry.put_worker(worker())
    deleted = await registry.delete_worker("i-0a")
    assert worker() == deleted
    assert await registry.delete_worker("i-0a") is None

    assert await registry.get_worker("i-0a") is None
    assert await registry.list_workers(NOW) == []


# --- leases ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("capacity", "winners"), [(1, 1), (3, 3), (None, 20)])
async def test_claim_lease_respects_capacity_among_20_clients(
    registry: Registry, capacity: int | None, winners: int
) -> None:
    """Twenty clients claim one ready worker at once: exactly `capacity` of them get it."""
    await registry.put_worker(worker())
    results = await gather(
        [lambda n=n: registry.claim_lease(lease(f"10.0.0.{n}:5000"), capacity) for n in range(20)]
    )

    assert winners == results.count(True)
    assert winners == await holders(registry)
    leases = await registry.list_leases(NOW)
    assert winners == len(leases)
    assert {f"10.0.0.{n}:5000" for n, won in enumerate(results) if won} == {
        lease.client for lease in leases
    }


async def test_claim_lease_sets_the_workers_last_activity(registry: Registry) -> None:
    """A claim restarts the worker's idle clock at the lease's time (a local worker that
    has not expired yet is claimable like an EC2 one)."""
    await registry.put_worker(worker(provider=Provider.LOCAL, expires_at=NOW + 7.5))
    assert await registry.claim_lease(lease("a:1", now=NOW + 7.5), 1)

    found = await registry.get_worker("i-0a")
    assert found is not None
    assert (found.last_activity, found.holders) == (NOW + 7.5, 1)


async def test_same_client_claiming_again_refreshes_without_counting_twice(
    registry: Registry,
) -> None:
    """A second claim by the holder refreshes its lease, even at capacity, holders stay 1."""
    await registry.put_worker(worker())
    assert await registry.claim_lease(lease("a:1"), 1)
    assert await registry.claim_lease(lease("a:1", now=NOW + 50), 1)
    assert not await registry.claim_lease(lease("b:2", now=NOW + 60), 1)

    assert await holders(registry) == 1
    assert [LeaseRecord("a:1", "i-0a", "198.51.100.7", NOW, NOW + 50, NOW + 50 + IDLE)] == (
        await registry.list_leases(NOW)
    )


@pytest.mark.parametrize(
    "stored",
    [
        None,
        worker(state=WorkerState.LAUNCHING),
        worker(state=WorkerState.TERMINATING),
        worker(provider=Provider.LOCAL, expires_at=NOW - 1),
    ],
    ids=["missing", "launching", "terminating", "expired"],
)
async def test_claim_lease_on_a_worker_not_ready_fails(
    registry: Registry, stored: WorkerRecord | None
) -> None:
    """No lease on a missing, launching, terminating or expired worker; nothing is counted."""
    if stored is not None:
        await registry.put_worker(stored)

    assert not await registry.claim_lease(lease("a:1"), None)
    assert await registry.list_leases(NOW) == []
    assert await registry.expired_leases(NOW + 2 * IDLE) == []
    if stored is not None:
        assert await holders(registry) == 0


async def test_reclaim_on_a_worker_no_longer_ready_fails(registry: Registry) -> None:
    """The holder's own re-claim fails once the worker is terminating."""
    await registry.put_worker(worker())
    assert await registry.claim_lease(lease("a:1"), None)
    assert await registry.set_worker_state("i-0a", WorkerState.TERMINATING)

    assert not await registry.claim_lease(lease("a:1", now=NOW + 5), None)
    assert [lease("a:1")] == await registry.list_leases(NOW)


async def test_end_lease_uncounts_once_and_is_idempotent(registry: Registry) -> None:
    """end_lease returns the lease and decrements holders; again, it returns None."""
    await registry.put_worker(worker())
    assert await registry.claim_lease(lease("a:1"), None)
    assert await registry.claim_lease(lease("b:2"), None)

    assert lease("a:1") == await registry.end_lease("a:1", "i-0a")
    assert await registry.end_lease("a:1", "i-0a") is None
    assert await registry.end_lease("never:1", "i-0a") is None
    assert await holders(registry) == 1
    assert [lease("b:2")] == await registry.list_leases(NOW)


async def test_concurrent_end_lease_ends_it_once(registry: Registry) -> None:
    """Ten replicas ending the same lease: one gets it, holders drop by exactly one."""
    await registry.put_worker(worker())
    assert await registry.claim_lease(lease("a:1"), None)
    assert await registry.claim_lease(lease("b:2"), None)
    results = await gather([lambda: registry.end_lease("a:1", "i-0a") for _ in range(10)])

    assert [lease("a:1")] == [r for r in results if r is not None]
    assert await holders(registry) == 1


async def test_ended_leases_make_room_for_new_claims(registry: Registry) -> None:
    """At capacity 1, a worker is claimable again once its lease ended."""
    await registry.put_worker(worker())
    assert await registry.claim_lease(lease("a:1"), 1)
    assert await registry.end_lease("a:1", "i-0a") is not None

    assert await registry.claim_lease(lease("b:2", now=NOW + 1), 1)
    assert await holders(registry) == 1


async def test_touching_a_lease_moves_its_workers_activity_forward_only(
    registry: Registry,
) -> None:
    """touch_lease also moves the worker's activity to the touch (a restart or another replica
    reads the worker's idle clock there), never back; a worker without a record is no error."""
    await registry.put_worker(worker())
    assert await registry.claim_lease(lease("a:1"), None)

    assert await registry.touch_lease("a:1", "i-0a", NOW + 100, IDLE)
    assert await registry.touch_lease("a:1", "i-0a", NOW + 50, IDLE)  # a late write
    record = await registry.get_worker("i-0a")
    assert record is not None
    assert record.last_activity == NOW + 100

    await registry.delete_worker("i-0a")
    assert await registry.touch_lease("a:1", "i-0a", NOW + 200, IDLE)


async def test_end_lease_of_a_deleted_worker_still_ends_the_lease(registry: Registry) -> None:
    """A lease whose worker is gone is ended (and returned) without resurrecting the worker."""
    await registry.put_worker(worker())
    assert await registry.claim_lease(lease("a:1"), None)
    await registry.delete_worker("i-0a")

    assert lease("a:1") == await registry.end_lease("a:1", "i-0a")
    assert await registry.list_leases(NOW) == []
    assert await registry.get_worker("i-0a") is None


async def test_expired_leases_are_not_listed_until_touched(registry: Registry) -> None:
    """A lease idle past expires_at leaves list_leases and shows in expired_leases; touching
    it renews it; touching a missing lease is False."""
    await registry.put_worker(worker())
    assert await registry.claim_lease(lease("a:1"), None)
    end = NOW + IDLE

    assert len(await registry.list_leases(end)) == 1
    assert await registry.list_leases(end + 0.5) == []
    assert [lease("a:1")] == await registry.expired_leases(end + 0.5)

    assert await registry.touch_lease("a:1", "i-0a", end + 1, IDLE)
    assert not await registry.touch_lease("b:2", "i-0a", end + 1, IDLE)
    assert [LeaseRecord("a:1", "i-0a", "198.51.100.7", NOW, end + 1, end + 1 + IDLE)] == (
        await registry.list_leases(end + 1)
    )
    assert await registry.expired_leases(end + 1) == []
    assert await holders(registry) == 1


# --- lease history -----------------------------------------------------------------------------


def ended(
    client: str,
    started_at: float,
    ended_at: float,
    *,
    instance_id: str = "i-0a",
    price: float | None = 0.5,
    expires_at: float | None = NOW + 90 * 86400,
) -> LeaseHistoryRecord:
    return LeaseHistoryRecord(
        client, instance_id, "c7i.large", "spot", started_at, ended_at, price, "released",
        expires_at,
    )  # fmt: skip


def _plain(item: dict[str, Any]) -> dict[str, Any]:
    """An item with its numbers as floats (a derived `cost` may come back as an exact Decimal
    whose float is the same)."""
    return {k: float(v) if isinstance(v, Decimal) else v for k, v in item.items()}


def test_a_lease_history_record_knows_its_identity_hours_and_cost() -> None:
    """Identity is the owner before its `/`; cost is price times hours (None: no price)."""
    record = ended("token:alice/job-3", NOW, NOW + 5400, price=0.5)
    assert (record.identity, record.hours, record.cost) == ("token:alice", 1.5, 0.75)
    assert ended("10.1.2.7", NOW, NOW + 60, price=None).cost is None
    assert ended("10.1.2.7", NOW, NOW + 60).identity == "10.1.2.7"


async def test_lease_history_lists_what_ended_since_by_end_time(registry: Registry) -> None:
    """Records come back equal, those that ended at or after the time asked, by end time; two
    leases of one worker ending at once are both kept."""
    late = ended("b", NOW, NOW + 7200)
    first = ended("a", NOW - 3600, NOW - 10.5)
    same_end = [ended("c/1", NOW, NOW + 60), ended("c/2", NOW, NOW + 60)]
    for record in (late, first, *same_end):
        await registry.put_lease_history(record)

    assert [first, *same_end, late] == await registry.lease_history(0.0)
    assert [*same_end, late] == await registry.lease_history(NOW + 60)
    assert [late] == await registry.lease_history(NOW + 61)
    assert await registry.lease_history(NOW + 7201) == []


# --- launch intents ----------------------------------------------------------------------------


async def test_intents_round_trip_expire_and_delete(registry: Registry) -> None:
    """An intent reads back equal, expires, and is deleted."""
    first = LaunchIntent.begin("token-b", SPEC, 3, NOW, 3600.0)
    second = LaunchIntent.begin("token-a", LaunchSpec("t3.micro", Market.ON_DEMAND), 1, NOW, 60.0)
    await registry.put_intent(first)
    await registry.put_intent(second)

    assert [second, first] == await registry.list_intents(NOW)
    assert [i.token for i in await registry.list_intents(NOW + 61)] == ["token-b"]

    await registry.delete_intent("token-b")
    await registry.delete_intent("token-b")
    assert [second] == await registry.list_intents(NOW)


async def test_a_charge_and_its_intent_are_one_write(registry: Registry) -> None:
    """reserve_spend records the intent with the count it granted, and none when it granted
    nothing; so a crash never leaves a charge without the intent that refunds it."""
    intent = LaunchIntent.begin("t-charged", SPEC, 5, NOW, 600.0, price_per_hour=1.0)
    grant = await registry.reserve_spend({DAY: 300}, 5, {DAY: 1000}, intent=intent)
    assert grant.count == 3
    assert [attrs.evolve(intent, count=3)] == await registry.list_intents(NOW)

    refused = LaunchIntent.begin("t-refused", SPEC, 1, NOW, 600.0, price_per_hour=1.0)
    assert (await registry.reserve_spend({DAY: 300}, 1, {DAY: 1000}, intent=refused)).count == 0
    assert [i.token for i in await registry.list_intents(NOW)] == ["t-charged"]


async def test_settling_an_intent_refunds_once(registry: Registry) -> None:
    """settle_intent shrinks or deletes the intent and refunds in one write, only while the
    intent is there with the count the caller saw: of two settlers, one refunds."""
    intent = LaunchIntent.begin("t-1", SPEC, 3, NOW, 600.0, price_per_hour=1.0)
    await registry.reserve_spend({DAY: 100}, 3, {}, intent=intent)

    assert await registry.settle_intent(intent, {DAY: 100}, keep=2)
    assert not await registry.settle_intent(intent, {DAY: 100}, keep=1)  # it holds 2 now
    shrunk = attrs.evolve(intent, count=2)
    assert [shrunk] == await registry.list_intents(NOW)
    assert await registry.spend([DAY]) == {DAY: 200}

    assert await registry.settle_intent(shrunk, {DAY: 200})
    assert not await registry.settle_intent(shrunk, {DAY: 200})
    assert await registry.list_intents(NOW) == []
    assert await registry.spend([DAY]) == {DAY: 0}


# --- the instance counter ----------------------------------------------------------------------


async def test_reserve_instances_grants_what_fits(registry: Registry) -> None:
    """Reservations are granted up to max_workers, in part when only part fits."""
    assert await registry.reserve_instances(4, 10) == 4
    assert await registry.reserve_instances(10, 10) == 6
    assert await registry.reserve_instances(1, 10) == 0
    assert await registry.reserve_instances(0, 10) == 0
    assert await registry.reserved_instances() == 10


async def test_release_instances_never_goes_below_zero(registry: Registry) -> None:
    """Releasing more than is reserved leaves 0; releasing from nothing is not an error."""
    await registry.release_instances(5)
    assert await registry.reserved_instances() == 0
    assert await registry.reserve_instances(3, 10) == 3
    await registry.release_instances(1)
    assert await registry.reserved_instances() == 2
    await registry.release_instances(10)
    assert await registry.reserved_instances() == 0


async def test_reserve_never_exceeds_max_workers_under_30_callers(registry: Registry) -> None:
    """Thirty concurrent reservations of 1-5 never exceed max_workers; releases bring it to 0."""
    rng = random.Random(30)
    sizes = [rng.randint(1, 5) for _ in range(30)]
    granted = await gather([lambda n=n: registry.reserve_instances(n, 25) for n in sizes])

    assert all(0 <= g <= n for g, n in zip(granted, sizes, strict=True))
    assert sum(granted) == await registry.reserved_instances()
    assert 0 < sum(granted) <= 25
    await gather([lambda g=g: registry.release_instances(g) for g in granted])
    assert await registry.reserved_instances() == 0


# --- the dollar ledger -------------------------------------------------------------------------

DAY = "day:2026-11-23"
MONTH = "month:2026-11"


async def test_reserve_spend_grants_what_fits_under_the_caps(registry: Registry) -> None:
    """Spend is committed per instance while every capped key stays within its limit."""
    per = {DAY: 300, MONTH: 300}
    first = await registry.reserve_spend(per, 2, {DAY: 1000})
    assert (first.count, dict(first.committed)) == (2, {DAY: 600, MONTH: 600})
    second = await registry.reserve_spend(per, 5, {DAY: 1000})
    assert (second.count, dict(second.committed)) == (1, {DAY: 900, MONTH: 900})
    refused = await registry.reserve_spend(per, 1, {DAY: 1000})
    assert (refused.count, dict(refused.committed)) == (0, {DAY: 900, MONTH: 900})
    assert await registry.spend([DAY, MONTH, "day:other"]) == {DAY: 900, MONTH: 900, "day:other": 0}


async def test_reserve_spend_never_passes_a_cap_under_30_callers(registry: Registry) -> None:
    """Thirty concurrent reservations commit at most the cap, and exactly what they granted."""
    per = {DAY: 70, MONTH: 70}
    grants = await gather(
        [lambda: registry.reserve_spend(per, 2, {DAY: 1000, MONTH: 5000}) for _ in range(30)]
    )
    granted = sum(grant.count for grant in grants)
    assert granted == 14  # 14 * 70 = 980 <= 1000 < 15 * 70
    assert await registry.spend([DAY, MONTH]) == {DAY: 980, MONTH: 980}


async def test_refund_spend_gives_back(registry: Registry) -> None:
    """A refund lowers the committed total, so a launch fits again."""
    await registry.reserve_spend({DAY: 600}, 1, {DAY: 1000})
    assert (await registry.reserve_spend({DAY: 600}, 1, {DAY: 1000})).count == 0
    await registry.refund_spend({DAY: 250})
    assert (await registry.reserve_spend({DAY: 600}, 1, {DAY: 1000})).count == 1
    assert await registry.spend([DAY]) == {DAY: 950}


async def test_extend_cover_moves_paid_until_once(registry: Registry) -> None:
    """Of two replicas extending the same cover, one wins; the other sees STALE."""
    await registry.put_worker(worker())
    outcomes = await gather(
        [
            lambda: registry.extend_cover("i-0a", None, NOW + 600, {DAY: 100}, {DAY: 1000})
            for _ in range(2)
        ]
    )
    assert sorted(outcomes, key=lambda o: o.value) == [CoverOutcome.EXTENDED, CoverOutcome.STALE]
    stored = await registry.get_worker("i-0a")
    assert stored is not None
    assert stored.paid_until == NOW + 600
    assert await registry.spend([DAY]) == {DAY: 100}
    again = await registry.extend_cover("i-0a", NOW + 600, NOW + 1200, {DAY: 100}, {DAY: 1000})
    assert again == CoverOutcome.EXTENDED


async def test_extend_cover_refuses_past_a_cap_and_for_unknown_workers(
    registry: Registry,
) -> None:
    """A cover that would pass a cap is CAPPED (nothing changes); an unknown worker is STALE."""
    await registry.put_worker(worker())
    capped = await registry.extend_cover("i-0a", None, NOW + 600, {DAY: 1001}, {DAY: 1000})
    assert capped == CoverOutcome.CAPPED
    stored = await registry.get_worker("i-0a")
    assert stored is not None
    assert stored.paid_until is None
    assert await registry.spend([DAY]) == {DAY: 0}
    gone = await registry.extend_cover("i-0b", None, NOW + 600, {DAY: 1}, {})
    assert gone == CoverOutcome.STALE


async def test_correct_reserved_instances_only_from_the_value_seen(registry: Registry) -> None:
    """The reconciler's correction applies only if the counter did not move meanwhile."""
    assert await registry.correct_reserved_instances(0, 4)
    assert not await registry.correct_reserved_instances(0, 1)
    assert await registry.reserved_instances() == 4
    assert await registry.correct_reserved_instances(4, 2)
    assert await registry.reserved_instances() == 2


# --- DynamoDB only -----------------------------------------------------------------------------


def test_ensure_table_twice_is_idempotent_with_ttl_enabled(atomic_moto: None) -> None:
    """The second ensure_table changes nothing; the table has pk/sk keys and TTL on expires_at."""
    client = dynamo_client()
    table = unique("setup")

    first = ensure_table(client, table)
    second = ensure_table(client, table)

    assert (first.created, first.ttl_enabled) == (True, True)
    assert (second.created, second.ttl_enabled) == (False, False)
    described = client.describe_table(TableName=table)["Table"]
    assert described["BillingModeSummary"]["BillingMode"] == "PAY_PER_REQUEST"
    assert [(k["AttributeName"], k["KeyType"]) for k in described["KeySchema"]] == [
        ("pk", "HASH"),
        ("sk", "RANGE"),
    ]
    ttl = client.describe_time_to_live(TableName=table)["TimeToLiveDescription"]
    assert ttl == {"TimeToLiveStatus": "ENABLED", "AttributeName": "expires_at"}


def test_ensure_table_accepts_ttl_already_enabled_by_another_setup(atomic_moto: None) -> None:
    """AWS's "TimeToLive is already enabled" (a concurrent setup won) is not an error."""
    client = dynamo_client()
    table = unique("setup")
    client.create_table(
        TableName=table,
        AttributeDefinitions=[
            {"AttributeName": "pk", "AttributeType": "S"},
            {"AttributeName": "sk", "AttributeType": "S"},
        ],
        KeySchema=[
            {"AttributeName": "pk", "KeyType": "HASH"},
            {"AttributeName": "sk", "KeyType": "RANGE"},
        ],
        BillingMode="PAY_PER_REQUEST",
    )

    def already_enabled(**_: Any) -> None:
        raise botocore.exceptions.ClientError(
            {"Error": {"Code": "ValidationException", "Message": "TimeToLive is already enabled"}},
            "UpdateTimeToLive",
        )

    client.meta.events.register("before-call.dynamodb.UpdateTimeToLive", already_enabled)
    setup = ensure_table(client, table)

    assert (setup.created, setup.ttl_enabled) == (False, False)


def test_ensure_table_refuses_a_table_with_other_keys(atomic_moto: None) -> None:
    """A same-named table keyed otherwise is a CloudError, not silently used."""
    client = dynamo_client()
    table = unique("setup")
    client.create_table(
        TableName=table,
        AttributeDefinitions=[{"AttributeName": "id", "AttributeType": "S"}],
        KeySchema=[{"AttributeName": "id", "KeyType": "HASH"}],
        BillingMode="PAY_PER_REQUEST",
    )

    with pytest.raises(CloudError) as caught:
        ensure_table(client, table)
    assert caught.value.code == "TableMismatch"


async def test_async_ensure_table_runs_off_the_event_loop(atomic_moto: None) -> None:
    """DynamoRegistry.ensure_table creates its table through the limiter."""
    registry = DynamoRegistry(unique("registry"), "p", trio.CapacityLimiter(1), dynamo_client())
    with trio.fail_after(DEADLINE):
        setup = await registry.ensure_table()
        await registry.put_worker(worker())

    assert setup.created
    assert worker() == await registry.get_worker("i-0a")


async def test_pools_on_one_table_do_not_see_each_other(dynamo: DynamoRegistry) -> None:
    """Two pools share a table but not workers, leases, intents or counters."""
    other = dynamo_registry(table=dynamo.table_name)
    await dynamo.put_worker(worker())
    assert await dynamo.claim_lease(lease("a:1"), 1)
    await dynamo.put_intent(LaunchIntent.begin("t", SPEC, 1, NOW, 60))
    assert await dynamo.reserve_instances(2, 5) == 2

    assert await other.list_workers(NOW) == []
    assert await other.list_leases(NOW) == []
    assert await other.list_intents(NOW) == []
    assert await other.reserved_instances() == 0
    assert not await other.claim_lease(lease("b:2"), 1)


async def test_lease_history_expires_by_the_table_s_ttl_attribute(
    dynamo: DynamoRegistry,
) -> None:
    """A history item carries its expiry in `expires_at`, the attribute the table's TTL reads,
    as a number of Unix seconds; readers of the table see identity and cost too."""
    await dynamo.put_lease_history(ended("token:a/j", NOW, NOW + 3600, expires_at=NOW + 86400))
    [item] = dynamo.client.query(
        TableName=dynamo.table_name,
        KeyConditionExpression="pk = :pk AND begins_with(sk, :h)",
        ExpressionAttributeValues={":pk": {"S": dynamo._pk}, ":h": {"S": "history#"}},
    )["Items"]
    assert item["expires_at"] == {"N": str(Decimal(repr(NOW + 86400)))}
    assert (item["identity"], item["cost"]) == ({"S": "token:a"}, {"N": "0.5"})


def record_operations(registry: DynamoRegistry) -> list[str]:
    """The DynamoDB operations the registry's client makes from now on."""
    operations: list[str] = []

    def hook(model: Any, **_: Any) -> None:
        operations.append(model.name)

    registry.client.meta.events.register("before-call.dynamodb", hook)
    return operations


async def test_a_new_lease_is_one_transactwriteitems(dynamo: DynamoRegistry) -> None:
    """The warm GET_WORKER path writes once: claim_lease is one TransactWriteItems call."""
    await dynamo.put_worker(worker())
    operations = record_operations(dynamo)

    assert await dynamo.claim_lease(lease("a:1"), 1)
    assert operations == ["TransactWriteItems"]


async def test_a_transaction_conflict_is_retried(dynamo: DynamoRegistry) -> None:
    """A claim cancelled by a concurrent transaction (TransactionConflict) is tried again."""
    await dynamo.put_worker(worker())
    conflicts = [1]

    def conflict(**_: Any) -> None:
        if conflicts:
            conflicts.pop()
            raise botocore.exceptions.ClientError(
                {
                    "Error": {"Code": "TransactionCanceledException", "Message": "conflict"},
                    "CancellationReasons": [{"Code": "TransactionConflict"}, {"Code": "None"}],
                },
                "TransactWriteItems",
            )

    dynamo.client.meta.events.register("before-call.dynamodb.TransactWriteItems", conflict)
    with trio.fail_after(DEADLINE):
        assert await dynamo.claim_lease(lease("a:1"), 1)
    assert conflicts == []
    assert await holders(dynamo) == 1


async def test_errors_other_than_conditions_are_cloud_errors(atomic_moto: None) -> None:
    """A missing table is a CloudError with AWS's code, not False."""
    registry = DynamoRegistry(unique("absent"), "p", trio.CapacityLimiter(1), dynamo_client())
    with trio.fail_after(DEADLINE), pytest.raises(CloudError) as caught:
        await registry.claim_lease(lease("a:1"), 1)

    assert caught.value.code == "ResourceNotFoundException"


async def test_a_reap_condition_fails_once_the_worker_is_held(registry: Registry) -> None:
    """set_worker_state(unheld=True) refuses a worker with holders: a replica cannot reap a
    worker another replica has just leased; once released, the reap goes through."""
    await registry.put_worker(worker())
    assert await registry.claim_lease(lease("a"), None)
    assert not await registry.set_worker_state(
        "i-0a", WorkerState.TERMINATING, expect=WorkerState.READY, unheld=True
    )
    await registry.end_lease("a", "i-0a")
    assert await registry.set_worker_state(
        "i-0a", WorkerState.TERMINATING, expect=WorkerState.READY, unheld=True
    )


async def test_an_interrupted_worker_takes_no_new_lease(registry: Registry) -> None:
    """After mark_interrupted, claims fail (other replicas stop handing it out) and the
    record carries the reason and the deadline."""
    await registry.put_worker(worker())
    assert await registry.claim_lease(lease("a"), None)
    assert await registry.mark_interrupted("i-0a", "spot_interruption", NOW + 120)
    assert not await registry.claim_lease(lease("b"), None)
    stored = await registry.get_worker("i-0a")
    assert stored is not None
    assert (stored.interruption, stored.interruption_deadline) == ("spot_interruption", NOW + 120)
    assert not await registry.mark_interrupted("i-0b", "rebalance_recommendation", None)


async def test_a_lifted_interruption_lets_leases_be_claimed_again(registry: Registry) -> None:
    """mark_interrupted with no reason (a budget stop lifted in a new period) lifts it."""
    await registry.put_worker(worker())
    assert await registry.mark_interrupted("i-0a", "budget", NOW + 60)
    assert await registry.mark_interrupted("i-0a", None, None)
    assert await registry.claim_lease(lease("b"), None)
