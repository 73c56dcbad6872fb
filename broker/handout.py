"""The hand-out room: GET_WORKER, PING and RELEASE; waiting, claiming, refreshing, ending leases.

A GET_WORKER is served from a ready worker when there is one (the warm path: no await before
the lease is claimed in the registry), else it waits for the pool to change while the launcher
launches for the unserved demand. A lease is claimed in the registry before the IP is sent;
its activity is written at most every ACTIVITY_WRITE_EVERY seconds.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Final

import attrs
import structlog
import trio

from broker.cloud import CloudError
from broker.context import Context, log_lease_end
from broker.errors import Refusal, WorkerInterrupted, WorkerNotFound
from broker.history import end_lease
from broker.launcher import LaunchAttempt, Launcher
from broker.model import (
    LaunchSpec,
    Lease,
    Market,
    Released,
    ReleaseOutcome,
    Worker,
    WorkerRequest,
)
from broker.registry import LeaseRecord
from broker.retire import Claim, Retire
from broker.spending import Cover, Spending

_log = structlog.get_logger("broker.handout")

ACTIVITY_WRITE_EVERY: Final = 30.0  # seconds; lease activity is written at most this often
WAIT_SLACK: Final = 2.0  # seconds a default GET_WORKER waits beyond launch + describe_interval


@attrs.frozen
class Handout:
    """A GET_WORKER answered: the worker's IP, and whether this request created the lease."""

    ip: str
    instance_id: str
    new_lease: bool


class HandoutDesk:
    """Serves GET_WORKER, PING and RELEASE, and ends leases."""

    def __init__(
        self, ctx: Context, launcher: Launcher, retire: Retire, spending: Spending
    ) -> None:
        self.ctx = ctx
        self.launcher = launcher
        self.retire = retire
        self.spending = spending

    # --- GET_WORKER --------------------------------------------------------------------------

    def spec_for(self, request: WorkerRequest) -> LaunchSpec:
        """What a request accepts: the default spec (with its fallbacks), or what it names.
        Refusal when it names a type or market the config does not allow."""
        settings = self.ctx.settings
        default = settings.default_spec
        if request.instance_type is None and request.market is None:
            return default
        allowed = settings.allowed_types
        if request.instance_type is not None and allowed and request.instance_type not in allowed:
            raise Refusal(
                f"not allowed: type {request.instance_type} (allowed_instance_types: "
                f"{', '.join(sorted(allowed))})"
            )
        if request.market is Market.ON_DEMAND and not settings.allow_on_demand:
            raise Refusal("not allowed: market=on-demand (allow_on_demand is off)")
        return LaunchSpec(
            request.instance_type or default.instance_type,
            request.market or default.market,
            () if request.instance_type else default.fallback_types,
            default.on_demand_fallback if request.market is None else False,
        )

    async def get_worker(
        self,
        request: WorkerRequest,
        client: str,
        *,
        may_launch: Callable[[], str | None] | None = None,
    ) -> Handout:
        """A ready worker for `client`: reuse one, join a launch in flight, or launch. A
        launch this request would start is first put to `may_launch` (the caller's launch
        limit): its refusal line (`ERROR: ...`) refuses the request."""
        ctx, launcher = self.ctx, self.launcher
        spec = self.spec_for(request)
        local_ok = request.instance_type is None and request.market is None
        prefer = ctx.settings.prefer_local
        pool = ctx.pool
        ready = pool.choose_ready(spec, client, local_ok=local_ok, prefer_local=prefer)
        if not ctx.closing and ready is not None:
            handout = await self._hand_out(ready, client, reused=True, waited=0.0)
            if handout is not None:
                return handout  # the warm path
        # Without wait=, a waiter outlives the launch it waits for by a little, so it hears the
        # launch's own verdict ("launch timed out ...") rather than a generic one.
        settings = ctx.settings
        longest = settings.launch_timeout + settings.describe_interval + WAIT_SLACK
        wait = min(request.wait, longest) if request.wait is not None else longest
        started = trio.current_time()
        joined: LaunchAttempt | None = None
        refusal: str | None = None
        refused: set[str] = set()  # workers whose registry claim failed: full elsewhere
        if ready is not None and not ctx.closing:
            refused.add(ready.instance_id)
        demand = launcher.demand
        demand[spec] = demand.get(spec, 0) + 1
        try:
            with trio.move_on_after(wait):
                while True:
                    if ctx.closing:
                        raise Refusal("broker shutting down")
                    worker = pool.choose_ready(
                        spec, client, local_ok=local_ok, prefer_local=prefer, exclude=refused
                    )
                    if worker is not None:
                        waited = trio.current_time() - started
                        reused = joined is None
                        # While its lease is written this request has a worker: it must not
                        # count as demand, or a waiter woken meanwhile launches again for it.
                        # `wait` bounds waiting for a worker, not claiming one: a claim cut off
                        # halfway would leave a lease the refused client never learns of.
                        demand[spec] -= 1
                        try:
                            with trio.CancelScope(shield=True):
                                handout = await self._hand_out(
                                    worker, client, reused=reused, waited=waited
                                )
                        finally:
                            demand[spec] += 1
                        if handout is not None:
                            return handout
                        refused.add(worker.instance_id)  # full elsewhere: launch or wait
                        continue
                    coming = pool.coming_capacity(spec)
                    if joined is not None and joined.error is not None and not coming:
                        if not joined.retry_later:
                            raise Refusal(joined.error)
                        refusal, joined = joined.error, None  # may free up: wait for it
                        await ctx.changed()
                        continue
                    if demand[spec] > coming:
                        if may_launch is not None:  # a request counts once, however long
                            limit, may_launch = may_launch(), None  # it waits and retries
                            if limit is not None:
                                raise Refusal(limit.removeprefix("ERROR: "))
                        try:
                            joined = launcher.for_demand(spec, demand[spec] - coming, client)
                        except Refusal as exc:
                            if not launcher.may_free_up(spec):
                                raise
                            refusal = str(exc)  # wait for a holder to release a worker
                    elif joined is None:
                        joined = launcher.joinable(spec)
                    await ctx.changed()
        finally:
            demand[spec] -= 1
        if refusal is not None:
            raise Refusal(f"no worker free after {wait:g}s ({refusal})")
        raise Refusal(f"no worker ready after {wait:g}s")

    async def _hand_out(
        self, worker: Worker, client: str, *, reused: bool, waited: float
    ) -> Handout | None:
        """Record the lease (pool, then registry) and return the hand-out; None if the registry
        refused the claim (the worker is full: another replica got there first)."""
        ctx = self.ctx
        now = ctx.clock.now()
        needed_worker = not worker.local and not ctx.pool.is_held(worker.instance_id)
        lease, new = ctx.pool.hand_out(worker, client, now)
        timeout = ctx.settings.limits.idle_timeout
        try:
            cover = await self.spending.ensure_cover(worker, now)
            if cover is not Cover.COVERED:
                if new:
                    ctx.pool.end_lease(lease)
                if cover is Cover.REFUSED:
                    self.spending.stop_for_budget(worker, now)
                return None  # a cap forbids keeping it longer (or it is gone): look further
            if new:
                # Noted before the await: a concurrent refresh of this lease writes nothing
                # while the claim is in flight.
                ctx.pool.note_persisted(lease, now)
                record = LeaseRecord.start(client, worker.instance_id, lease.ip, now, timeout)
                claimed = await ctx.registry.claim_lease(
                    record, ctx.settings.limits.clients_per_worker
                )
            elif not await self._persist_activity(lease, now):
                # The registry lost this lease (ended or expired elsewhere): claim it anew.
                ctx.pool.end_lease(lease)
                return await self._hand_out(worker, client, reused=reused, waited=waited)
            else:
                claimed = True
        except CloudError as exc:
            if new:
                ctx.pool.end_lease(lease)
            raise Refusal(f"registry unavailable: {exc}") from exc
        if not claimed:
            ctx.pool.end_lease(lease)
            return None
        if new and needed_worker:
            ctx.note_arrival(now)  # what idle_policy: adaptive learns from
        if ctx.settings.warm_pool_configured:
            ctx.warm_wakeup.set()  # a warm worker may just have been taken: refill
        if new:
            _log.info(
                "lease.started",
                client=client,
                instance_id=worker.instance_id,
                ip=worker.ip,
                reused=reused,
                waited_seconds=round(waited, 3),
            )
        return Handout(lease.ip, worker.instance_id, new)

    async def undeliverable(self, handout: Handout, client: str) -> None:
        """The GET_WORKER reply could not be sent: drop the lease it created, if it did."""
        if not handout.new_lease:
            return
        lease = self.ctx.pool.leases.get((client, handout.instance_id))
        if lease is not None:
            self.ctx.pool.end_lease(lease)
            log_lease_end(lease, "reply_undeliverable", self.ctx.clock.now())
            await self._forget_lease(lease, "reply_undeliverable")

    # --- PING --------------------------------------------------------------------------------

    async def ping(self, ip: str, client: str) -> Worker:
        """Restart the worker's idle clock and the caller's lease. A holder's PING writes its
        lease's activity at most every ACTIVITY_WRITE_EVERY (a registry read of a worker
        lifts its activity to its leases'); a PING from a non-holder writes the worker's."""
        ctx = self.ctx
        now = ctx.clock.now()
        worker = ctx.pool.ping(ip, client, now)
        if worker is None:
            raise WorkerNotFound(ip)
        if worker.interruption is not None:
            raise WorkerInterrupted(worker.interruption)
        try:
            lease = ctx.pool.leases.get((client, worker.instance_id))
            if lease is None:
                await ctx.registry.update_worker_activity(worker.instance_id, now)
            elif not await self._persist_activity(lease, now):
                ctx.pool.end_lease(lease)  # ended or expired in the registry
            cover = await self.spending.ensure_cover(worker, now)
        except CloudError as exc:
            raise Refusal(f"registry unavailable: {exc}") from exc
        if cover is Cover.GONE:
            ctx.pool.remove(worker.instance_id, now)  # ended through another replica
            raise WorkerNotFound(ip)
        if cover is Cover.REFUSED:
            raise WorkerInterrupted(self.spending.stop_for_budget(worker, now))
        return worker

    async def _persist_activity(self, lease: Lease, now: float) -> bool:
        """Write a lease's activity to the registry, at most every ACTIVITY_WRITE_EVERY:
        a client asking again and again costs no write per request; a restart loses at
        most that much of the idle clock. False if the registry no longer has the lease."""
        timeout = self.ctx.settings.limits.idle_timeout
        every = min(ACTIVITY_WRITE_EVERY, timeout / 10)
        if lease.persisted_activity is not None and now - lease.persisted_activity < every:
            return True
        touched = await self.ctx.registry.touch_lease(lease.client, lease.instance_id, now, timeout)
        self.ctx.pool.note_persisted(lease, now)
        return touched

    # --- RELEASE -----------------------------------------------------------------------------

    async def release(self, ip: str, client: str) -> None:
        """End the caller's lease; terminate the worker if nobody else holds it."""
        ctx = self.ctx
        now = ctx.clock.now()
        released = ctx.pool.release(ip, client, now, warm=ctx.warm(now), keep=self._keep(now))
        if released.lease is not None:
            log_lease_end(released.lease, "released", now)
            ctx.note_lease_end(released.lease, now, released=True)
            await self._forget_lease(released.lease, "released")
        if released.outcome is ReleaseOutcome.KEPT and released.worker is not None:
            released = await self._recheck_holders(released.worker, ip, client, now) or released
        if released.outcome is ReleaseOutcome.NOT_FOUND:
            raise WorkerNotFound(ip)
        if released.outcome is ReleaseOutcome.ALREADY_GONE:
            _log.info("worker.release", ip=ip, client=client, already_gone=True)
            return
        if released.outcome is ReleaseOutcome.KEPT_WARM:
            _log.info("worker.release", ip=ip, client=client, terminated=False, kept_warm=True)
            return
        if released.outcome is ReleaseOutcome.KEPT_IDLE:
            _log.info("worker.release", ip=ip, client=client, terminated=False, kept_idle=True)
            return
        worker = released.worker
        assert worker is not None
        terminate = released.outcome is ReleaseOutcome.TERMINATE
        _log.info(
            "worker.release",
            instance_id=worker.instance_id,
            ip=ip,
            client=client,
            had_lease=released.lease is not None,
            terminated=terminate,
            holders=released.holders,
        )
        if terminate:
            await self.retire.retire([worker], reason="released", claim=Claim.IDLE, strict=True)

    async def _recheck_holders(
        self, worker: Worker, ip: str, client: str, now: float
    ) -> Released | None:
        """Other holders known here may have released through another replica: if the
        registry counts none, drop the stale local leases and decide again."""
        try:
            record = await self.ctx.registry.get_worker(worker.instance_id)
        except CloudError:
            return None  # keep the worker: the safe side
        if record is None or record.holders > 0:
            return None
        for stale in self.ctx.pool.holders(worker.instance_id):
            self.ctx.pool.end_lease(stale)
        ctx = self.ctx
        return ctx.pool.release(ip, client, now, warm=ctx.warm(now), keep=self._keep(now))

    def _keep(self, now: float) -> Callable[[Worker, int], bool]:
        """Whether the idle policy keeps a worker RELEASE leaves unheld (and its rank); the
        rule is built when asked, after the release ended the lease (so it is not counted as
        held)."""
        return lambda worker, rank: self.ctx.idle_rule().keeps_released(worker, rank, now)

    # --- ending leases -----------------------------------------------------------------------

    async def expire_leases(self, local_view: Sequence[Lease], now: float) -> None:
        """End the leases the registry says have expired (another replica may have kept one
        alive that looks idle here; a lease may have expired while the broker was down), and
        drop local copies the registry no longer has."""
        ctx = self.ctx
        expired = await ctx.read("expired_leases", ctx.registry.expired_leases, now)
        if expired is None:
            return
        for record in expired:
            ended = await end_lease(ctx, record.client, record.instance_id, reason="expired")
            lease = ctx.pool.leases.get((record.client, record.instance_id))
            if lease is not None:
                ctx.pool.end_lease(lease)
                if ended is not None:
                    log_lease_end(lease, "expired", now)
                    ctx.note_lease_end(lease, now, released=False)
        live_records = await ctx.read("list_leases", ctx.registry.list_leases, now)
        if live_records is None:
            return
        live = {(r.client, r.instance_id) for r in live_records}
        for lease in local_view:
            if (lease.client, lease.instance_id) not in live:
                ctx.pool.end_lease(lease)  # ended or expired in the registry meanwhile

    async def _forget_lease(self, lease: Lease, reason: str) -> None:
        """End the lease in the registry, keeping its history (`broker.history`)."""
        await end_lease(self.ctx, lease.client, lease.instance_id, reason=reason)
