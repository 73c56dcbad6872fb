"""Lease history: the registry's record of each lease that ended, for `compute-broker report`.

The registry's `end_lease` hands an ended lease to exactly one caller (of several replicas
ending it at once, one), so whoever ends a lease in the registry ends it through `end_lease`
here, and the one that got it keeps its record: who held which worker (type, market), from
when to when, at what price. The record is written in the background, and like every
best-effort registry write through `Context.write`: a history write that fails is logged and
never fails (or slows) a RELEASE.
`broker/pool.py` says which leases ended; this module does the registry I/O.
"""

from __future__ import annotations

import functools
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
    """End the lease in the registry (best effort); if this call ended it, keep its history,
    in the background while the engine runs (a RELEASE does not wait for it). `worker` is the
    lease's worker when the pool no longer has it (terminated, lost)."""
    ended = await ctx.write("end_lease", ctx.registry.end_lease, client, instance_id)
    if ended is None or ctx.settings.lease_history_days <= 0:
        return ended
    if worker is None:
        worker = ctx.pool.workers.get(instance_id)  # as it is now, before it may go
    ended_at = ctx.clock.now()
    if reason == "expired":  # at its expiry, not when a pass (or a restart) noticed it
        ended_at = min(ended_at, ended.expires_at)
    keeping = functools.partial(keep, ctx, ended, reason=reason, ended_at=ended_at, worker=worker)
    if ctx.nursery is None:  # a one-off command (stop-all)
        await keeping()
    else:
        ctx.spawn(keeping)
    return ended


async def keep(
    ctx: Context,
    lease: LeaseRecord,
    *,
    reason: str,
    ended_at: float,
    worker: Worker | None = None,
) -> None:
    """Write the history record of `lease`, ended at `ended_at` for `reason`, kept
    lease_history_days. The worker's type, market and price come from `worker`, else the
    registry."""
    if worker is not None:
        kind, market, price = worker.instance_type, _market(worker), worker.price_per_hour
    else:
        record = await ctx.read(
            "get_worker", ctx.registry.get_worker, lease.instance_id, level="warning"
        )
        kind, market, price = _described(record)
    history = LeaseHistoryRecord(
        client=lease.client,
        instance_id=lease.instance_id,
        instance_type=kind,
        market=market,
        started_at=lease.started_at,
        ended_at=ended_at,
        price_per_hour=price,
        reason=reason,
        expires_at=ended_at + ctx.settings.lease_history_days * DAY,
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
