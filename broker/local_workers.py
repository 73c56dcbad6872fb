"""The local-workers room: lab machines that `compute-broker agent` registers through the
broker's own port (REGISTER, HEARTBEAT, DEREGISTER; the `agent` role), so the agent needs no
AWS credentials. The broker writes the registry entry for it; the entry expires after
MISSED_BEATS missed heartbeats, and every broker drops the worker at its next reconciliation.
"""

from __future__ import annotations

from typing import Final

import attrs
import structlog

from broker.context import Context
from broker.errors import Refusal
from broker.model import LOCAL_TYPE, LocalWorker, Market, WorkerState
from broker.registry import Provider, WorkerRecord
from broker.retire import Retire

MISSED_BEATS: Final = 3

_log = structlog.get_logger("broker.local_workers")


def local_record(worker: LocalWorker, now: float, interval: float) -> WorkerRecord:
    """The registry entry of a local worker, expiring after MISSED_BEATS missed beats."""
    return WorkerRecord(
        instance_id=worker.instance_id,
        provider=Provider.LOCAL,
        ip=worker.ip,
        instance_type=LOCAL_TYPE,
        market=Market.ON_DEMAND,
        state=WorkerState.READY,
        launched_at=now,
        last_activity=now,
        price_per_hour=None,
        launch_token=None,
        expires_at=now + MISSED_BEATS * interval,
    )


class LocalWorkers:
    """Registers, refreshes and drops agents' local workers. May raise CloudError."""

    def __init__(self, ctx: Context, retire: Retire, interval: float) -> None:
        self.ctx = ctx
        self.retire = retire
        self.interval = interval  # the agents' heartbeat, as told in REGISTER's reply

    def _undeclared(self, name: str) -> None:
        """A worker declared in the config is the config's, not an agent's to change."""
        if any(local.name == name for local in self.ctx.settings.local_workers):
            raise Refusal(f"not allowed: local worker {name} is declared in the config")

    async def register(self, name: str, ip: str) -> None:
        """Register the worker (or keep it registered: a restarted agent keeps its entry and
        the count of clients holding it; a new IP replaces the old); it joins this broker's
        pool at once."""
        self._undeclared(name)
        ctx, worker = self.ctx, LocalWorker(name, ip)
        now = ctx.clock.now()
        expires = now + MISSED_BEATS * self.interval
        record = await ctx.registry.get_worker(worker.instance_id)
        if record is not None and record.ip == ip:
            await ctx.registry.update_worker_activity(worker.instance_id, now, expires_at=expires)
        elif record is not None:  # the machine has a new address (DHCP)
            moved = attrs.evolve(record, ip=ip, last_activity=now, expires_at=expires)
            await ctx.registry.put_worker(moved)
            ctx.pool.remove(worker.instance_id, now)
            _log.info("agent.moved", instance_id=worker.instance_id, ip=ip, was=record.ip)
        else:
            await ctx.registry.put_worker(local_record(worker, now, self.interval))
            _log.info("agent.registered", instance_id=worker.instance_id, ip=ip)
        if ctx.pool.add_local(worker, ctx.settings.default_spec.market, now) is not None:
            ctx.notify()

    async def heartbeat(self, name: str) -> bool:
        """Refresh the worker's expiry; False if it expired meanwhile (register again)."""
        now = self.ctx.clock.now()
        expires = now + MISSED_BEATS * self.interval
        return await self.ctx.registry.update_worker_activity(
            LocalWorker(name, "0.0.0.0").instance_id, now, expires_at=expires
        )

    async def deregister(self, name: str) -> None:
        """The agent stops: the worker leaves the pool and the registry."""
        self._undeclared(name)
        instance_id = LocalWorker(name, "0.0.0.0").instance_id
        worker = self.ctx.pool.workers.get(instance_id)
        if worker is not None and worker.local:
            self.retire.lose(worker, f"local worker {instance_id} deregistered by its agent")
        else:
            await self.ctx.registry.delete_worker(instance_id)
        _log.info("agent.deregistered", instance_id=instance_id)
