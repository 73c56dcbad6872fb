"""Pool decisions as plain code: admission, choice, release outcomes, reaping."""

from __future__ import annotations

from broker.adaptive import ArrivalHistory, IdlePolicy, IdleRule
from broker.cloud import Instance, LaunchSpec, Market
from broker.decisions import admit, first_lease_starts, reap_plan
from broker.model import Limits, LocalWorker, ReleaseOutcome, WarmPool, Worker, WorkerState
from broker.pool import GONE_MEMORY_SECONDS, Pool
from broker.status import pool_status

SPEC = LaunchSpec("c7i.8xlarge", Market.SPOT)
T0 = 1_700_000_000.0


def instance(n: int, spec: LaunchSpec = SPEC) -> Instance:
    return Instance(f"i-{n}", spec.instance_type, spec.market, "running", f"192.0.2.{n}", T0)


def pool_with(*ns: int, max_workers: int = 10, cap: float | None = None) -> Pool:
    pool = Pool(Limits(max_workers, cap, 900.0))
    for n in ns:
        pool.adopt(instance(n), T0, price=0.5, ready=True)
    return pool


def test_admission_counts_in_flight_launches_against_max_workers() -> None:
    """A launch not yet answered already uses its share of max_workers."""
    pool = pool_with(1, max_workers=3)
    pool.launch_started("tok", SPEC, 1, 0.5, T0)
    assert admit(pool, SPEC, 5, 0.5).count == 1
    pool.launch_started("tok2", SPEC, 1, 0.5, T0)
    refused = admit(pool, SPEC, 1, 0.5)
    assert refused.count == 0
    assert refused.refusal == "max_workers reached (3)"


def test_admission_fits_the_budget_exactly() -> None:
    """With $2/h left and $0.5/h workers, four fit and the fifth does not."""
    pool = pool_with(1, cap=2.5)
    assert admit(pool, SPEC, 10, 0.5).count == 4
    pool.launch_started("tok", SPEC, 4, 0.5, T0)
    refused = admit(pool, SPEC, 1, 0.5)
    assert refused.count == 0
    assert refused.refusal is not None
    assert refused.refusal.startswith("budget: launching one c7i.8xlarge spot ($0.5/h)")
    assert "from $2.5/h to $3/h, above max_hourly_cost $2.5/h" in refused.refusal


def test_unknown_price_is_refused_only_when_a_budget_is_set() -> None:
    """No cap: unknown prices launch; with a cap they are refused with advice."""
    assert admit(pool_with(), SPEC, 1, None).count == 1
    refused = admit(pool_with(cap=5), SPEC, 1, None)
    assert refused.refusal is not None
    assert "no price known" in refused.refusal


def test_choose_ready_prefers_fewest_holders_then_most_recent_use() -> None:
    """Clients spread over workers; ties go to the most recently used."""
    pool = pool_with(1, 2, 3)
    pool.ping("192.0.2.3", "nobody", T0 + 5)  # activity changes through the pool's transitions
    assert pool.choose_ready(SPEC) is pool.workers["i-3"]
    pool.hand_out(pool.workers["i-3"], "a", T0 + 6)
    pool.ping("192.0.2.1", "nobody", T0 + 1)
    assert pool.choose_ready(SPEC) is pool.workers["i-1"]


def test_choose_ready_ignores_launching_terminating_and_other_types() -> None:
    """Only ready workers of the requested type and market are handed out."""
    pool = pool_with(1)
    pool.mark_terminating(pool.workers["i-1"])
    pool.adopt(instance(2), T0, price=0.5, ready=False)
    assert WorkerState.LAUNCHING is pool.workers["i-2"].state
    pool.adopt(instance(3, LaunchSpec("c7i.8xlarge", Market.ON_DEMAND)), T0, price=1.4, ready=True)
    assert pool.choose_ready(SPEC) is None


def test_release_outcomes() -> None:
    """Held by others: kept; last holder: terminate; gone: OK for a day; never known: not found."""
    pool = pool_with(1)
    worker = pool.workers["i-1"]
    pool.hand_out(worker, "a", T0)
    pool.hand_out(worker, "b", T0)
    assert pool.release("192.0.2.1", "a", T0).outcome is ReleaseOutcome.KEPT
    assert pool.release("192.0.2.1", "b", T0).outcome is ReleaseOutcome.TERMINATE
    assert pool.release("192.0.2.1", "b", T0).outcome is ReleaseOutcome.ALREADY_GONE
    pool.remove("i-1", T0)
    assert pool.release("192.0.2.1", "b", T0 + 10).outcome is ReleaseOutcome.ALREADY_GONE
    later = T0 + GONE_MEMORY_SECONDS
    assert pool.release("192.0.2.1", "b", later).outcome is ReleaseOutcome.NOT_FOUND
    assert pool.release("192.0.2.99", "b", T0).outcome is ReleaseOutcome.NOT_FOUND


def test_reap_plan_takes_idle_workers_and_expired_leases_only() -> None:
    """At idle_timeout a lease expires and its worker, if nobody else is active, is reaped."""
    pool = pool_with(1, 2)
    pool.hand_out(pool.workers["i-1"], "a", T0)
    pool.hand_out(pool.workers["i-2"], "b", T0)
    pool.ping("192.0.2.2", "b", T0 + 600)
    plan = reap_plan(pool, T0 + 899)
    assert plan.expired_leases == ()
    assert plan.idle_workers == ()
    plan = reap_plan(pool, T0 + 900)
    assert [lease.client for lease in plan.expired_leases] == ["a"]
    assert [w.instance_id for w in plan.idle_workers] == ["i-1"]


def test_run_rate_includes_in_flight_launches() -> None:
    """STATUS run rate counts workers and launches not yet answered."""
    pool = pool_with(1, 2)
    pool.launch_started("tok", SPEC, 3, 0.5, T0)
    assert pool.run_rate() == 2.5
    assert pool_status(pool, T0)["totals"]["launches_in_flight"] == 3


C6I = LaunchSpec("c6i.8xlarge", Market.SPOT)
ON_DEMAND = LaunchSpec("c7i.8xlarge", Market.ON_DEMAND)


def mixed_pool() -> Pool:
    """i-1: an idle c7i spot worker (the warm pool's kind); i-2 a c6i spot, i-3 a c7i on-demand
    and i-4 a c7i spot worker, each held by one client."""
    pool = pool_with(1)
    for n, spec in ((2, C6I), (3, ON_DEMAND), (4, SPEC)):
        pool.adopt(instance(n, spec), T0, price=0.5, ready=True)
        pool.hand_out(pool.workers[f"i-{n}"], f"client-{n}", T0)
    return pool


def test_release_terminates_workers_the_warm_pool_does_not_count() -> None:
    """Warm pool of one c7i spot worker, already idle: a released c6i or on-demand worker is
    terminated at once (it is not the warm pool's kind), and so is a c7i spot one (the warm
    pool is not short)."""
    pool = mixed_pool()
    warm = WarmPool(SPEC, 1)
    for n in (2, 3, 4):
        released = pool.release(f"192.0.2.{n}", f"client-{n}", T0, warm=warm)
        assert ReleaseOutcome.TERMINATE is released.outcome, n
    assert WorkerState.READY is pool.workers["i-1"].state


def test_release_keeps_a_worker_of_the_warm_pools_kind_when_it_is_short() -> None:
    """With no other idle c7i spot worker, the released one goes back to the warm pool; a
    c6i worker released in the same situation is still terminated."""
    pool = mixed_pool()
    pool.hand_out(pool.workers["i-1"], "busy", T0)  # the warm worker is taken
    warm = WarmPool(SPEC, 1)
    assert ReleaseOutcome.TERMINATE is pool.release("192.0.2.2", "client-2", T0, warm=warm).outcome
    assert ReleaseOutcome.KEPT_WARM is pool.release("192.0.2.4", "client-4", T0, warm=warm).outcome


def test_warm_pool_counts_the_default_specs_fallback_types() -> None:
    """A fallback type of the default spec serves default requests, so the warm pool counts
    it; a type the default spec does not accept it does not."""
    with_fallback = LaunchSpec("c7i.8xlarge", Market.SPOT, ("c6i.8xlarge",))
    pool = mixed_pool()
    c6i, on_demand = pool.workers["i-2"], pool.workers["i-3"]
    assert WarmPool(with_fallback, 1).wants(c6i)
    assert not WarmPool(SPEC, 1).wants(c6i)
    assert not WarmPool(with_fallback, 1).wants(on_demand)
    assert not WarmPool(SPEC, 0).wants(pool.workers["i-1"])


def test_reaper_keeps_only_idle_workers_the_warm_pool_counts() -> None:
    """Idle past idle_timeout: the c6i and on-demand workers are reaped, and of the two c7i
    spot workers the warm pool keeps the most recently used one."""
    pool = mixed_pool()
    for n in (2, 3, 4):
        pool.release(f"192.0.2.{n}", f"client-{n}", T0)  # no warm pool: marked terminating
        pool.revert_ready(pool.workers[f"i-{n}"])
    pool.ping("192.0.2.4", "nobody", T0 + 10)
    plan = reap_plan(pool, T0 + 1000, warm=WarmPool(SPEC, 1))
    assert {"i-1", "i-2", "i-3"} == {w.instance_id for w in plan.idle_workers}


def test_release_asks_the_idle_policy_with_the_workers_rank() -> None:
    """A worker RELEASE leaves unheld is kept when the policy says so; it is asked as the
    marginal one: 1 + the idle workers of its type and market."""
    pool = pool_with(1, 2, 3)
    pool.hand_out(pool.workers["i-1"], "a", T0)
    asked: list[tuple[str, int]] = []

    def keep(worker: Worker, rank: int) -> bool:
        asked.append((worker.instance_id, rank))
        return rank <= 3

    released = pool.release("192.0.2.1", "a", T0, keep=keep)
    assert released.outcome is ReleaseOutcome.KEPT_IDLE
    assert asked == [("i-1", 3)]
    assert pool.workers["i-1"].state is WorkerState.READY
    pool.hand_out(pool.workers["i-1"], "a", T0)
    assert pool.release("192.0.2.1", "a", T0, keep=lambda w, rank: False).outcome is (
        ReleaseOutcome.TERMINATE
    )


def test_reap_plan_gives_the_idle_rule_each_workers_rank_most_recent_first() -> None:
    """Under adaptive with six arrivals an hour, of three idle workers the two most recently
    used stay and the third goes (tests/test_adaptive.py has the arithmetic)."""
    pool = pool_with(1, 2, 3)
    for n, used in ((1, T0 + 20), (2, T0 + 10), (3, T0 + 30)):
        pool.ping(f"192.0.2.{n}", "x", used)
    history = ArrivalHistory.seeded(T0 + 30 - i * 600 for i in range(30))
    rule = IdleRule(
        IdlePolicy.ADAPTIVE, 900.0, 60.0, 50.0, history, boot_seconds={"c7i.8xlarge": 30.0}
    )
    plan = reap_plan(pool, T0 + 100, idle=rule)
    assert [w.instance_id for w in plan.idle_workers] == ["i-2"]


def test_first_lease_starts_are_one_per_cloud_worker_the_earliest() -> None:
    """What start-up seeds the arrival history with: each held cloud worker's first lease."""
    pool = pool_with(1, 2, 3)
    pool.hand_out(pool.workers["i-1"], "a", T0 + 50)
    pool.hand_out(pool.workers["i-1"], "b", T0 + 10)
    pool.hand_out(pool.workers["i-2"], "c", T0 + 30)
    local = pool.add_local(LocalWorker("bench", "10.0.0.9"), Market.SPOT, T0)
    assert local is not None
    pool.hand_out(local, "d", T0 + 40)
    assert sorted(first_lease_starts(pool)) == [T0 + 10, T0 + 30]
