"""The retire room: the one path by which a worker leaves the pool.

Release, the reaper, budget stops, interruptions, bursting's scale-down, boot timeouts and
`compute-broker stop-all` all retire workers the same way: claim the termination in the
registry (so of two replicas exactly one terminates, and nobody hands it out meanwhile), mark
it terminating in the pool, terminate it in EC2, then forget it: its leases end, its record is
deleted, its slot on the pool-wide counter and its unused cover are given back. A worker that
vanished on its own (spot interruption, terminated by hand) is `lose`-d: forgotten the same way.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence

import structlog

from broker.cloud import CloudError
from broker.context import Context, log_lease_end
from broker.errors import Refusal
from broker.history import end_lease
from broker.launcher import Launcher
from broker.model import Lease, Worker, WorkerState
from broker.spending import Spending

_log = structlog.get_logger("broker.retire")


class Claim(enum.Enum):
    """How a termination is claimed in the registry before it is carried out."""

    IDLE = "idle"  # only if still ready and unheld there (reaping, release, scale-down)
    INTERRUPTED = "interrupted"  # ready and unheld, or still launching (nobody got it)
    FORCE = "force"  # unconditionally (boot timeout, budget stop, stop-all)


class Retire:
    """Claims, terminates and forgets workers; retries terminations that failed."""

    def __init__(self, ctx: Context, spending: Spending, launcher: Launcher) -> None:
        self.ctx = ctx
        self.spending = spending
        self.launcher = launcher
        self.retry: set[str] = set()  # terminations that failed: the reaper tries again

    async def retire(
        self, workers: Sequence[Worker], *, reason: str, claim: Claim, strict: bool = False
    ) -> list[Worker]:
        """Claim, mark terminating and terminate `workers`; the ones retired. A worker whose
        claim the registry refuses (held or reaped through another replica) stays. A failed
        termination is logged and retried by the reaper; with `strict` it raises Refusal."""
        pool = self.ctx.pool
        if claim is Claim.FORCE:
            for worker in workers:  # handed out no more while the registry is told
                pool.mark_terminating(worker)
        claimed = [w for w in workers if await self._claim(w, claim)]
        if claim is Claim.IDLE:
            for worker in workers:
                if worker not in claimed:
                    pool.revert_ready(worker)  # RELEASE marked it already: it stays
        if not claimed:
            return []
        for worker in claimed:
            pool.mark_terminating(worker)
            self.launcher.settle(worker.launch_token)  # it may have been booting
        self.ctx.notify()  # waiters hear of it before the termination call returns
        try:
            await self.terminate(claimed, reason=reason)
        except CloudError as exc:
            if strict:
                raise Refusal(f"terminate failed: {exc}; the broker will retry") from exc
        return claimed

    async def _claim(self, worker: Worker, claim: Claim) -> bool:
        registry, terminating = self.ctx.registry, WorkerState.TERMINATING
        if claim is Claim.FORCE:
            await self.ctx.write(
                "terminating",
                registry.set_worker_state,
                worker.instance_id,
                terminating,
                level="warning",
            )
            return True
        if claim is Claim.INTERRUPTED and worker.state is WorkerState.LAUNCHING:
            return bool(
                await self.ctx.write(
                    "terminating",
                    registry.set_worker_state,
                    worker.instance_id,
                    terminating,
                    expect=WorkerState.LAUNCHING,
                    default=False,
                    level="warning",
                )
            )
        if claim is Claim.INTERRUPTED and worker.state is not WorkerState.READY:
            return False
        won = await self.ctx.write(
            "reap",
            registry.set_worker_state,
            worker.instance_id,
            terminating,
            expect=WorkerState.READY,
            unheld=True,
            default=False,
            level="warning",
        )
        if not won:
            _log.info("worker.reap_skipped", instance_id=worker.instance_id)
        return bool(won)

    async def terminate(self, workers: Sequence[Worker], *, reason: str) -> None:
        """Terminate workers already claimed, then forget them. Raises CloudError (logged;
        the reaper retries) if EC2 refused."""
        ids = [w.instance_id for w in workers]
        try:
            await self.ctx.cloud.terminate(ids)
        except CloudError as exc:
            self.retry.update(ids)
            _log.error("terminate.failed", instance_ids=ids, reason=reason, error=str(exc))
            raise
        now = self.ctx.clock.now()
        for worker in workers:
            self.retry.discard(worker.instance_id)
            _, leases = self.ctx.pool.retire(worker.instance_id, now)
            self.launcher.settle(worker.launch_token)  # it may have been booting
            for lease in leases:
                log_lease_end(lease, "worker_terminated", now)
            await self.forget(worker, leases, reason="worker_terminated")
            _log.info(
                "worker.terminated",
                instance_id=worker.instance_id,
                ip=worker.ip,
                reason=reason,
                lifetime_seconds=round(max(0.0, now - worker.launched_at), 3),
            )
        self.ctx.notify()

    async def reap(self, idle: Sequence[Worker], now: float) -> None:
        """The reaper's pass: retire the idle workers it chose, and terminate again what
        failed to terminate before (or what a restart found mid-termination)."""
        pool = self.ctx.pool
        doomed = [w for w in idle if await self._claim(w, Claim.IDLE)]
        for worker in doomed:
            _log.info(
                "worker.reap",
                instance_id=worker.instance_id,
                ip=worker.ip,
                idle_seconds=round(now - worker.last_activity, 3),
            )
        doomed += [w for w in pool.workers.values() if w.instance_id in self.retry]
        doomed = list({w.instance_id: w for w in doomed}.values())
        if not doomed:
            return
        for worker in doomed:
            pool.mark_terminating(worker)
        self.ctx.notify()
        try:
            await self.terminate(doomed, reason="idle")
        except CloudError:
            pass  # logged; retried next pass

    async def terminate_idle(self, reason: str) -> None:
        """Retire every idle ready cloud worker now (a cap reached with on_cap:
        terminate_idle)."""
        await self.retire(self.ctx.pool.unheld_ready(), reason=reason, claim=Claim.IDLE)

    def lose(self, worker: Worker, reason: str) -> None:
        """The worker is gone without us (EC2 ended it, its agent stopped): drop it, tell its
        launch's waiters, forget it in the registry in the background."""
        now = self.ctx.clock.now()
        _, leases = self.ctx.pool.remove(worker.instance_id, now)
        for lease in leases:
            log_lease_end(lease, "worker_lost", now)
        self.ctx.spawn(self.forget, worker, leases, not worker.local, "worker_lost")
        _log.error("worker.lost", instance_id=worker.instance_id, reason=reason)
        self.launcher.fail(worker.launch_token, reason)
        self.launcher.settle(worker.launch_token)

    async def forget(
        self,
        worker: Worker,
        leases: Sequence[Lease],
        reserved: bool = True,
        reason: str = "worker_terminated",
    ) -> None:
        """Drop a worker and its leases (ended for `reason`, their history kept) from the
        registry; give back its slot on the pool-wide counter and its unused cover."""
        ctx, instance_id = self.ctx, worker.instance_id
        self.spending.forget(instance_id)
        for lease in leases:
            await end_lease(ctx, lease.client, instance_id, reason=reason, worker=worker)
        try:
            # Only the broker whose delete finds the record releases its reservation and
            # refunds its unused cover (two replicas may both see a spot worker vanish).
            record = await ctx.registry.delete_worker(instance_id)
        except CloudError as exc:
            _log.error("registry.write_failed", op="delete_worker", error=str(exc))
            return
        if record is None:
            return
        if reserved:
            await self.launcher.unreserve(1)
        await self.spending.refund_cover(record, ctx.clock.now())
