"""The STATUS document (broker/status.py): `pool_status` as plain code, and the whole document
from a running engine on Trio's MockClock. (Its wire form is in protocol.md; the budget and
capacity parts are in tests/test_spending.py and tests/test_launcher.py.)"""

from __future__ import annotations

import pytest
import trio
from trio.testing import MockClock

from broker.cloud import Instance
from broker.engine import Engine
from broker.model import Interruption, LaunchSpec, Limits, LocalWorker, Market, WorkerRequest
from broker.pool import Pool
from broker.status import pool_status
from tests.engines import BIG, SPEC, T0, get_ip


def instance(n: int, spec: LaunchSpec = SPEC, launched_at: float = T0) -> Instance:
    return Instance(
        f"i-{n}", spec.instance_type, spec.market, "running", f"192.0.2.{n}", launched_at
    )


def test_pool_status_lists_workers_oldest_first_with_holders_and_idle_time() -> None:
    """Each worker with its id, IP, type, market, state, holder count, idle seconds (never
    negative) and price, the oldest launch first."""
    pool = Pool(Limits(10, None, 900.0))
    pool.adopt(instance(2, BIG, launched_at=T0 + 5), T0 + 10, price=1.0, ready=True)
    first = pool.adopt(instance(1, launched_at=T0), T0 + 10, price=0.5, ready=True)
    pool.hand_out(first, "alice", T0 + 20)
    pool.hand_out(first, "bob", T0 + 20)
    status = pool_status(pool, T0 + 30.0004)
    assert [
        (w["instance_id"], w["ip"], w["type"], w["market"], w["state"], w["clients"])
        for w in status["workers"]
    ] == [
        ("i-1", "192.0.2.1", "c7i.8xlarge", "spot", "ready", 2),
        ("i-2", "192.0.2.2", "c7i.16xlarge", "spot", "ready", 0),
    ]
    assert [w["idle_seconds"] for w in status["workers"]] == [10.0, 20.0]
    assert [w["price_per_hour"] for w in status["workers"]] == [0.5, 1.0]
    assert pool_status(pool, T0)["workers"][0]["idle_seconds"] == 0.0  # clock skew: not < 0


def test_pool_status_marks_local_and_interrupted_workers() -> None:
    """A lab machine is `provider: local`; an interrupted worker carries its reason and
    deadline, others `interrupted: null`."""
    pool = Pool(Limits(10, None, 900.0))
    pool.add_local(LocalWorker("ws1", "10.1.2.3"), Market.SPOT, T0 - 1)
    cloud = pool.adopt(instance(1), T0, price=0.5, ready=True)
    pool.interrupt(cloud, Interruption("spot_interruption", T0 + 120, T0))
    workers = pool_status(pool, T0)["workers"]
    assert [(w["ip"], w["provider"], w["interrupted"]) for w in workers] == [
        ("10.1.2.3", "local", None),
        ("192.0.2.1", "ec2", {"reason": "spot_interruption", "deadline": T0 + 120}),
    ]


def test_pool_status_lists_leases_with_their_cost_so_far() -> None:
    """Each lease with its client, worker, start, idle seconds and cost at the worker's price:
    $0.50/h for two hours is $1; earliest lease first."""
    pool = Pool(Limits(10, None, 900.0))
    worker = pool.adopt(instance(1), T0, price=0.5, ready=True)
    pool.hand_out(worker, "bob", T0 + 60)
    pool.hand_out(worker, "alice", T0)
    pool.ping("192.0.2.1", "alice", T0 + 7000)
    leases = pool_status(pool, T0 + 7200)["leases"]
    assert [(le["client"], le["instance_id"], le["ip"], le["started_at"]) for le in leases] == [
        ("alice", "i-1", "192.0.2.1", T0),
        ("bob", "i-1", "192.0.2.1", T0 + 60),
    ]
    assert [le["idle_seconds"] for le in leases] == [200.0, 7140.0]
    assert [le["cost_usd"] for le in leases] == [1.0, pytest.approx(0.991667)]


def test_pool_status_totals_count_states_launches_in_flight_run_rate_and_caps() -> None:
    """Totals: workers, a count for every state (zeros included), instances requested and
    not answered, the run rate with in-flight launches, and the configured caps."""
    pool = Pool(Limits(10, 5.0, 900.0, clients_per_worker=2))
    pool.adopt(instance(1), T0, price=0.5, ready=True)
    pool.adopt(instance(2), T0, price=0.5)
    pool.launch_started("token", BIG, 3, 1.0, T0)
    totals = pool_status(pool, T0)["totals"]
    assert totals == {
        "workers": 2,
        "by_state": {"launching": 1, "ready": 1, "terminating": 0},
        "launches_in_flight": 3,
        "leases": 0,
        "run_rate_per_hour": 4.0,
        "max_hourly_cost": 5.0,
        "max_workers": 10,
        "clients_per_worker": 2,
    }


async def test_status_reports_workers_leases_and_totals(
    autojump_clock: MockClock, engine: Engine
) -> None:
    """STATUS from a running engine carries each worker, each lease and the run rate."""
    ip = await get_ip(engine, WorkerRequest(), "a")
    await trio.sleep(12)
    status = engine.status()
    (worker,) = status["workers"]
    assert worker["ip"] == ip
    assert worker["state"] == "ready"
    assert worker["clients"] == 1
    assert worker["idle_seconds"] == pytest.approx(12, abs=0.01)
    assert worker["price_per_hour"] == 0.5
    assert status["leases"][0]["client"] == "a"
    assert status["totals"]["run_rate_per_hour"] == 0.5
    assert status["totals"]["by_state"]["ready"] == 1


def test_status_for_one_identity_lists_only_its_leases() -> None:
    """The bounded STATUS: an identity's leases (its client= ids included), every lease
    counted in totals."""
    pool = Pool(Limits(10, None, 900.0))
    worker = pool.adopt(instance(1), T0, price=0.5, ready=True)
    for client in ("10.0.0.5", "10.0.0.5/job1", "10.0.0.6/job2"):
        pool.hand_out(worker, client, T0)
    document = pool_status(pool, T0, owner="10.0.0.5")
    assert sorted(lease["client"] for lease in document["leases"]) == ["10.0.0.5", "10.0.0.5/job1"]
    assert document["totals"]["leases"] == 3
    assert len(pool_status(pool, T0)["leases"]) == 3
