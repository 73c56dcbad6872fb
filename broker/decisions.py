"""The pool's admission and reaping decisions, as plain code over a `Pool` (time passed in):
how many launches the caps admit, whether a fallback offering's price fits the run rate,
and what a reaper pass takes. They read the pool; the one change they make (re-pricing a
launch in flight) is the pool's own transition."""

from __future__ import annotations

import math

from broker.adaptive import IdleRule
from broker.ledger import rate_refusal
from broker.model import NO_WARM_POOL, Admission, LaunchSpec, ReapPlan, WarmPool, WorkerState
from broker.pool import Pool


def admit(pool: Pool, spec: LaunchSpec, count: int, price_per_hour: float | None) -> Admission:
    """How many of `count` new instances of `spec` the caps allow (all or some or none)."""
    room = pool.limits.max_workers - pool.instance_count()
    if room <= 0:
        return Admission(0, f"max_workers reached ({pool.limits.max_workers})")
    allowed = min(count, room)
    cap = pool.limits.max_hourly_cost
    if cap is None:
        return Admission(allowed)
    if price_per_hour is None:
        return Admission(
            0,
            f"budget: no price known for {spec.instance_type} {spec.market}; "
            "add it under prices in the config",
        )
    rate = pool.run_rate()
    by_budget = math.floor((cap - rate) / price_per_hour + 1e-9) if price_per_hour else count
    if by_budget <= 0:
        description = f"{spec.instance_type} {spec.market}"
        return Admission(0, rate_refusal(description, price_per_hour, rate, cap))
    return Admission(min(allowed, by_budget))


def rate_check(
    pool: Pool, token: str, spec: LaunchSpec, price_per_hour: float | None
) -> str | None:
    """Why the in-flight launch `token` may not go ahead as `spec` at `price_per_hour`
    (a fallback offering) under max_hourly_cost; None if it may. The launch is re-priced
    when it may, so later decisions count it at that price."""
    flight = pool.in_flight.get(token)
    cap = pool.limits.max_hourly_cost
    if flight is None or cap is None:
        return None
    description = f"{spec.instance_type} {spec.market}"
    if price_per_hour is None:
        return f"budget: no price known for {description}; add it under prices in the config"
    others = pool.run_rate() - (flight.price_per_hour or 0.0) * flight.count
    if others + price_per_hour * flight.count > cap + 1e-9:
        return rate_refusal(description, price_per_hour, others, cap)
    pool.reprice(token, price_per_hour)
    return None


def reap_plan(
    pool: Pool, now: float, *, warm: WarmPool = NO_WARM_POOL, idle: IdleRule | None = None
) -> ReapPlan:
    """Leases idle for `idle_timeout` or longer, and the ready workers (no holders) the idle
    rule takes now (default: idle for `idle_timeout` or longer).

    The `warm.count` most recently used idle workers the warm pool counts are kept. The rule
    sees each other idle worker's rank among the idle ones of its type and market, most
    recently used first (the order hand-out takes them in), warm ones included."""
    timeout = pool.limits.idle_timeout
    rule = idle if idle is not None else IdleRule.fixed(timeout)
    expired = tuple(lease for lease in pool.leases.values() if now - lease.last_activity >= timeout)
    expired_keys = {(lease.client, lease.instance_id) for lease in expired}
    still_held = {
        lease.instance_id for key, lease in pool.leases.items() if key not in expired_keys
    }
    unheld = [
        worker
        for worker in pool.workers.values()
        if worker.state is WorkerState.READY
        and worker.instance_id not in still_held
        and not worker.local
    ]
    warm_idle = sorted(
        (w for w in unheld if w.available and warm.wants(w)), key=lambda w: -w.last_activity
    )
    kept = {w.instance_id for w in warm_idle[: warm.count]}
    ranks: dict[str, int] = {}
    seen: dict[tuple[str, str], int] = {}
    for worker in sorted(unheld, key=lambda w: -w.last_activity):
        if worker.available:
            kind = (worker.instance_type, str(worker.market))
            seen[kind] = ranks[worker.instance_id] = seen.get(kind, 0) + 1
    # An interrupted worker nobody holds goes at once: it is handed out no more.
    reaped = tuple(
        worker
        for worker in unheld
        if worker.instance_id not in kept
        and (
            worker.interruption is not None
            or rule.reaps(worker, ranks.get(worker.instance_id, 1), now)
        )
    )
    return ReapPlan(expired, reaped)


def first_lease_starts(pool: Pool) -> list[float]:
    """When each cloud worker's earliest open lease began: the arrivals that needed an idle or
    a new worker, as far as the leases the pool holds (restored from the registry) tell."""
    first: dict[str, float] = {}
    for lease in pool.leases.values():
        worker = pool.workers.get(lease.instance_id)
        if worker is not None and not worker.local:
            first[lease.instance_id] = min(
                first.get(lease.instance_id, lease.started_at), lease.started_at
            )
    return list(first.values())
