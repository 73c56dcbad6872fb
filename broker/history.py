"""Lease history: the registry's record of each lease that ended, for `compute-broker report`.

The registry's `end_lease` hands an ended lease to exactly one caller (of several replicas
ending it at once, one), so whoever ends a lease in the registry ends it through `end_lease`
here, and the one that got it keeps its record: who held which worker (type, market), from
when to when, at what price. Like every best-effort registry write it goes through
`Context.write`: a history write that fails is logged and never fails a RELEASE.
`broker/pool.py` says which leases ended; this module does the registry I/O.
"""

from __future__ import annotations

from typing import Final

from broker.context import Context
from broker.model import Worker
from broker.registry import LeaseHistoryRecord, LeaseRecord, Provider, WorkerRecord

DAY: Final = 86400.0
LOCAL_MARKET: Final = "local"  # the market a lab machine's leases are recorded under
UNKNOWN_TYPE: Final = "unknown"  # the worker was gone before its lease's end was recorded


async def end_lease(
    ctx: Context, client: str, instance_id: str, *, reason: str, worker: Worker | None = None
) -> LeaseRecord | None:
    """End the lease in the registry (best effort); if this call ended it, keep its history.
    `worker` is the lease's worker when the pool no longer has it (terminated, lost)."""
    ended = await ctx.write("end_lease", ctx.registry.end_lease, client, instance_id)
    if ended is not None:
        await keep(ctx, ended, reason=reason, worker=worker)
    return ended


async def keep(
    ctx: Context, lease: LeaseRecord, *, reason: str, worker: Worker | None = None
) -> None:
    """Write the history record of `lease`, ended now for `reason` (nothing when
    lease_history_days is 0). The worker's type, market and price come from `worker`, else the
    pool, else the registry."""
    days = ctx.settings.lease_history_days
    if days <= 0:
        return
    held = worker or ctx.pool.workers.get(lease.instance_id)
    if held is not None:
        kind, market, price = held.instance_type, _market(held), held.price_per_hour
    else:
        record = await ctx.read(
            "get_worker", ctx.registry.get_worker, lease.instance_id, level="warning"
        )
        kind, market, price = _described(record)
    now = ctx.clock.now()
    history = LeaseHistoryRecord(
        client=lease.client,
        instance_id=lease.instance_id,
        instance_type=kind,
        market=market,
        started_at=lease.started_at,
        ended_at=now,
        price_per_hour=price,
        reason=reason,
        expires_at=now + days * DAY,
    )
    await ctx.write("put_lease_history", ctx.registry.put_lease_history, history)


def _market(worker: Worker) -> str:
    return LOCAL_MARKET if worker.local else str(worker.market)


def _described(record: WorkerRecord | None) -> tuple[str, str, float | None]:
    """Type, market and price of a worker as the registry has it (unknown when it has not)."""
    if record is None:
        return UNKNOWN_TYPE, UNKNOWN_TYPE, None
    market = LOCAL_MARKET if record.provider is Provider.LOCAL else str(record.market)
    return record.instance_type, market, record.price_per_hour
