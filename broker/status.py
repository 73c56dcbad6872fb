"""The STATUS document (see protocol.md): the pool, its leases, money and capacity, as JSON data.

Reads only; the server renders it as one line.
"""

from __future__ import annotations

from typing import Any

from broker.launcher import Launcher
from broker.model import WorkerState
from broker.pool import Pool
from broker.spending import Spending


def pool_status(pool: Pool, now: float, owner: str | None = None) -> dict[str, Any]:
    """The workers, the leases (all of them, or only those of the identity `owner`: the part
    of a lease's client before its `/`) and the totals (with the count of every lease)."""
    workers = [
        {
            "instance_id": w.instance_id,
            "ip": w.ip,
            "type": w.instance_type,
            "market": str(w.market),
            "state": str(w.state),
            "clients": pool.holder_count(w.instance_id),
            "idle_seconds": round(max(0.0, now - w.last_activity), 3),
            "price_per_hour": w.price_per_hour,
            "launched_at": w.launched_at,
            "provider": "local" if w.local else "ec2",
            "paid_until": w.paid_until,
            "interrupted": None
            if w.interruption is None
            else {"reason": w.interruption.reason, "deadline": w.interruption.deadline},
        }
        for w in sorted(pool.workers.values(), key=lambda w: w.launched_at)
    ]
    leases = [
        {
            "client": lease.client,
            "instance_id": lease.instance_id,
            "ip": lease.ip,
            "started_at": lease.started_at,
            "idle_seconds": round(max(0.0, now - lease.last_activity), 3),
            "cost_usd": _round(lease.cost(now)),
        }
        for lease in sorted(
            pool.leases.values() if owner is None else pool.leases_of(owner),
            key=lambda lease: lease.started_at,
        )
    ]
    by_state = {str(state): 0 for state in WorkerState}
    for w in pool.workers.values():
        by_state[str(w.state)] += 1
    totals = {
        "workers": len(pool.workers),
        "by_state": by_state,
        "launches_in_flight": sum(f.count for f in pool.in_flight.values()),
        "leases": len(pool.leases),
        "run_rate_per_hour": round(pool.run_rate(), 6),
        "max_hourly_cost": pool.limits.max_hourly_cost,
        "max_workers": pool.limits.max_workers,
        "clients_per_worker": pool.limits.clients_per_worker,
    }
    return {"workers": workers, "leases": leases, "totals": totals}


def status_document(
    pool: Pool, spending: Spending, launcher: Launcher, now: float, owner: str | None = None
) -> dict[str, Any]:
    """The STATUS document: the pool (every lease, or `owner`'s only), `budget`, `capacity`."""
    document = pool_status(pool, now, owner)
    document["budget"] = spending.status(now)
    document["capacity"] = {
        "failed_offerings": [
            {
                "offering": failed.offering.describe(),
                "code": failed.code,
                "retry_after": round(failed.until, 3),
            }
            for failed in launcher.offering_memory.failed(now)
        ],
        "fallbacks": [fallback.to_status() for fallback in launcher.fallbacks],
    }
    return document


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 6)
