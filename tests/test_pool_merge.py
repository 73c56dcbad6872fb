"""`Pool.merge` (broker/pool.py): what a replica learns from the registry's workers and leases
and EC2's live instance ids, as plain code. (The reconcile room calls it on every reaper pass:
tests/test_reconcile.py.)"""

from __future__ import annotations

import attrs

from broker.cloud import Instance
from broker.model import (
    Interruption,
    Lease,
    Limits,
    LocalWorker,
    Market,
    Worker,
    WorkerState,
)
from broker.pool import Pool
from tests.engines import SPEC, T0

NOW = T0 + 100


def instance(n: int) -> Instance:
    return Instance(f"i-{n}", SPEC.instance_type, SPEC.market, "running", f"192.0.2.{n}", T0)


def pool_with(*ready: int, launching: tuple[int, ...] = ()) -> Pool:
    """A pool with ready workers i-<n> for each of `ready`, launching ones for `launching`."""
    pool = Pool(Limits(10, None, 900.0))
    for n in ready:
        pool.adopt(instance(n), T0, price=0.5, ready=True)
    for n in launching:
        pool.adopt(instance(n), T0, price=0.5)
    return pool


def theirs(n: int, state: WorkerState = WorkerState.READY, **changes: object) -> Worker:
    """Worker i-<n> as another replica wrote it to the registry."""
    worker = pool_with(n).workers[f"i-{n}"]
    return attrs.evolve(worker, state=state, **changes)


def registry(*workers: Worker) -> dict[str, Worker]:
    return {worker.instance_id: worker for worker in workers}


def lease(client: str, n: int, last_activity: float = T0) -> Lease:
    return Lease(client, f"i-{n}", f"192.0.2.{n}", T0, last_activity)


def test_merge_joins_workers_the_registry_has_and_ec2_runs() -> None:
    """Another replica's worker joins if EC2 runs it (a local one whatever EC2 says), as a
    copy; one EC2 no longer runs, or one being terminated, does not."""
    pool = pool_with()
    local = theirs(9, local=True, instance_id="local:ws1", instance_type="local")
    records = registry(theirs(1), theirs(2), theirs(3, WorkerState.TERMINATING), local)
    plan = pool.merge(records, [], alive={"i-1", "i-3"}, declared_local=(), now=NOW)
    assert sorted(pool.workers) == ["i-1", "local:ws1"]
    assert [w.instance_id for w in plan.joined] == ["i-1", "local:ws1"]
    assert pool.workers["i-1"] is not records["i-1"]
    assert (plan.interrupted, plan.gone, plan.lost_local) == ((), (), ())


def test_merge_only_extends_covers() -> None:
    """A cover another replica extended is extended here; a shorter one changes nothing."""
    pool = pool_with(1, 2)
    pool.set_cover(pool.workers["i-1"], T0 + 100)
    pool.set_cover(pool.workers["i-2"], T0 + 100)
    records = registry(theirs(1, paid_until=T0 + 50), theirs(2, paid_until=T0 + 200))
    pool.merge(records, [], alive={"i-1", "i-2"}, declared_local=(), now=NOW)
    assert pool.workers["i-1"].paid_until == T0 + 100
    assert pool.workers["i-2"].paid_until == T0 + 200


def test_merge_learns_an_interruption_once() -> None:
    """An interruption another replica heard of is learned and reported once."""
    pool = pool_with(1)
    warned = Interruption("spot_interruption", T0 + 120, T0)
    records = registry(theirs(1, interruption=warned))
    first = pool.merge(records, [], alive={"i-1"}, declared_local=(), now=NOW)
    second = pool.merge(records, [], alive={"i-1"}, declared_local=(), now=NOW)
    assert [w.instance_id for w in first.interrupted] == ["i-1"]
    assert pool.workers["i-1"].interruption == warned
    assert second.interrupted == ()


def test_merge_removes_ready_workers_gone_through_another_replica() -> None:
    """A ready worker the registry no longer has, or has as terminating, is removed with its
    leases; a launching worker (its record may not be written yet) and one this replica is
    terminating itself stay."""
    pool = pool_with(1, 2, 3, launching=(4,))
    pool.hand_out(pool.workers["i-1"], "alice", T0)
    pool.mark_terminating(pool.workers["i-3"])
    records = registry(theirs(2, WorkerState.TERMINATING), theirs(3, WorkerState.TERMINATING))
    plan = pool.merge(records, [], alive={"i-1", "i-2", "i-3", "i-4"}, declared_local=(), now=NOW)
    assert sorted(w.instance_id for w in plan.gone) == ["i-1", "i-2"]
    assert sorted(pool.workers) == ["i-3", "i-4"]
    assert pool.leases == {}
    assert pool.gone_ips == {"192.0.2.1": NOW, "192.0.2.2": NOW}


def test_merge_removes_nothing_while_a_launch_of_ours_is_in_flight() -> None:
    """With a RunInstances call of ours unanswered, a ready worker missing from the registry
    may be one whose record is being written: it stays."""
    pool = pool_with(1)
    pool.launch_started("token", SPEC, 1, 0.5, T0)
    plan = pool.merge({}, [], alive={"i-1"}, declared_local=(), now=NOW)
    assert plan.gone == ()
    assert list(pool.workers) == ["i-1"]


def test_merge_reports_local_workers_nobody_declares_any_more() -> None:
    """A local worker neither the registry (its agent's heartbeat) nor the config has is
    reported lost, for the caller to retire; a declared one is not."""
    pool = pool_with()
    gone_agent = pool.add_local(LocalWorker("ws1", "10.1.2.3"), Market.SPOT, T0)
    pool.add_local(LocalWorker("ws2", "10.1.2.4"), Market.SPOT, T0)
    plan = pool.merge({}, [], alive=(), declared_local={"local:ws2"}, now=NOW)
    assert plan.lost_local == (gone_agent,)
    assert sorted(pool.workers) == ["local:ws1", "local:ws2"]


def test_merge_adds_other_replicas_leases_and_their_later_activity() -> None:
    """A lease taken through another replica joins (at the worker's price); activity seen
    there moves ours forward, never back; a lease on a worker unknown here is ignored."""
    pool = pool_with(1, 2)
    pool.hand_out(pool.workers["i-1"], "alice", T0 + 10)
    pool.hand_out(pool.workers["i-2"], "carol", T0 + 10)
    leases = [
        lease("alice", 1, last_activity=T0 + 50),
        lease("carol", 2, last_activity=T0 + 5),
        lease("bob", 1, last_activity=T0 + 20),
        lease("dave", 7),
    ]
    records = registry(theirs(1), theirs(2))
    pool.merge(records, leases, alive={"i-1", "i-2"}, declared_local=(), now=NOW)
    assert sorted(pool.leases) == [("alice", "i-1"), ("bob", "i-1"), ("carol", "i-2")]
    assert pool.leases[("alice", "i-1")].last_activity == T0 + 50
    assert pool.leases[("carol", "i-2")].last_activity == T0 + 10
    assert pool.leases[("bob", "i-1")].price_per_hour == 0.5
    assert pool.holder_count("i-1") == 2


def test_a_worker_terminated_here_is_not_taken_back_from_a_stale_view() -> None:
    """A registry snapshot (and EC2 view) read before this broker terminated i-1 still shows
    it: the merge does not bring it back, as it would bring back any other replica's worker."""
    pool = pool_with(1)
    pool.retire("i-1", NOW)
    plan = pool.merge(
        {"i-1": theirs(1), "i-2": theirs(2)},
        [],
        alive={"i-1", "i-2"},
        declared_local=(),
        now=NOW + 1,
    )
    assert [w.instance_id for w in plan.joined] == ["i-2"]
    assert "i-1" not in pool.workers
    assert pool.recently_retired("i-1")


def test_merge_keeps_a_worker_that_joined_after_the_registry_was_read() -> None:
    """A worker launched here while the registry was being read is missing from that read:
    it is not gone elsewhere, and its lease stays. One the pool had before the read is."""
    pool = pool_with(1)
    known = set(pool.workers)  # the registry is read now...
    pool.adopt(instance(2), T0, price=0.5, ready=True)  # ...while a launch completes
    pool.hand_out(pool.workers["i-2"], "a", NOW)
    plan = pool.merge({}, [], alive={"i-1", "i-2"}, declared_local=(), now=NOW, known=known)
    assert [w.instance_id for w in plan.gone] == ["i-1"]
    assert list(pool.workers) == ["i-2"]
    assert [lease.client for lease in pool.holders("i-2")] == ["a"]
