"""The engine: builds the rooms around one pool, starts their loops, and is what the server calls.

Each concern has its own room (see docs/architecture.md):

- `broker.handout`: GET_WORKER, PING, RELEASE; waiting, claiming and ending leases;
- `broker.launcher`: coalesced launch attempts, capacity fallback, charges, intents;
- `broker.bootwatch`: batched DescribeInstances, readiness probes, launch timeouts;
- `broker.retire`: the one path by which a worker leaves the pool;
- `broker.reconcile`: restore from the registry, sync with replicas, agree with EC2;
- `broker.spending`: the dollar ledger, caps and budget stops;
- `broker.scaling`: warm-pool refill, SQS bursting, spot prices;
- `broker.ec2_events`: spot interruptions, rebalance recommendations, state changes.

They share one `broker.context.Context`; `broker.pool.Pool` is the only writer of worker and
lease state. Every decision that matters is written to the `Registry` before it is acted on or
answered: a launch intent before RunInstances, a lease before the IP is sent.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Final

import structlog
import trio

from broker.adaptive import IdlePolicy
from broker.bootwatch import BootWatch
from broker.burst import BurstDecision
from broker.clock import Clock
from broker.cloud import Cloud, CloudError, EventQueue, Instance, JobQueue
from broker.context import Context, EngineSettings
from broker.decisions import first_lease_starts, reap_plan
from broker.ec2_events import Ec2Events
from broker.errors import Refusal, WorkerInterrupted, WorkerNotFound
from broker.handout import WAIT_SLACK, Handout, HandoutDesk
from broker.health import Health
from broker.history import LOCAL_MARKET
from broker.launcher import Launcher
from broker.local_workers import LocalWorkers
from broker.memory_registry import MemoryRegistry
from broker.metrics import Metrics
from broker.model import Worker, WorkerRequest
from broker.pool import Pool
from broker.prices import PriceTable
from broker.reconcile import Reconciler
from broker.registry import Registry
from broker.retire import Claim, Retire
from broker.scaling import Scaling, SpotPriceSource
from broker.spending import Spending
from broker.status import status_document

_log = structlog.get_logger("broker.engine")

ARRIVALS_READ: Final = 7 * 24 * 3600.0  # seconds of ended leases the arrival history reads

STATUS_LEDGER_AGE = 1.0  # seconds a STATUS may show the ledger as read before

__all__ = [
    "WAIT_SLACK",
    "Engine",
    "EngineSettings",
    "Handout",
    "Refusal",
    "WorkerInterrupted",
    "WorkerNotFound",
]


class Engine:
    """Owns the pool; serves GET_WORKER/PING/RELEASE/BURST/STATUS; runs the background loops."""

    def __init__(
        self,
        cloud: Cloud,
        settings: EngineSettings,
        clock: Clock,
        prices: PriceTable,
        registry: Registry | None = None,
        queue: JobQueue | None = None,
        *,
        events: EventQueue | None = None,
        spot_prices: SpotPriceSource | None = None,
    ) -> None:
        self.ctx = ctx = Context(
            pool=Pool(settings.limits),
            registry=registry if registry is not None else MemoryRegistry("default"),
            cloud=cloud,
            clock=clock,
            settings=settings,
            prices=prices,
        )
        self.health = Health(settings.reap_interval, clock.now())
        self.spending = Spending(ctx)
        self.launcher = Launcher(ctx, self.spending)
        self.retire = Retire(ctx, self.spending, self.launcher)
        self.spending.terminate_idle = self.retire.terminate_idle
        self.bootwatch = BootWatch(ctx, self.launcher, self.retire)
        self.handout = HandoutDesk(ctx, self.launcher, self.retire, self.spending)
        self.reconciler = Reconciler(ctx, self.launcher, self.retire, self.spending)
        self.scaling = Scaling(
            ctx, self.launcher, self.retire, self.spending, queue=queue, spot_prices=spot_prices
        )
        self.local_workers = LocalWorkers(ctx, self.retire, settings.agent_heartbeat)
        self.ec2_events = (
            None if events is None else Ec2Events(ctx, self.launcher, self.retire, events)
        )

    # --- what the rooms share, for callers and tests ---------------------------------------

    @property
    def pool(self) -> Pool:
        """The pool (read it; only its transitions change it)."""
        return self.ctx.pool

    @property
    def cloud(self) -> Cloud:
        """The EC2 port."""
        return self.ctx.cloud

    @property
    def registry(self) -> Registry:
        """The registry port."""
        return self.ctx.registry

    @property
    def settings(self) -> EngineSettings:
        """The engine's knobs."""
        return self.ctx.settings

    @property
    def clock(self) -> Clock:
        """The clock seam."""
        return self.ctx.clock

    @property
    def metrics(self) -> Metrics:
        """The counters the rooms and the server keep (served by broker.monitor)."""
        return self.ctx.metrics

    @property
    def prices(self) -> PriceTable:
        """The price table in use (spot prices refreshed from EC2 when configured)."""
        return self.ctx.prices

    # --- lifecycle ---------------------------------------------------------------------------

    async def _seed_arrivals(self) -> None:
        """Start the arrival history from the registry: the open leases, and with
        `idle_policy: adaptive` the leases that ended in the last ARRIVALS_READ seconds (as
        arrivals at their starts, and for how long leases last)."""
        ctx = self.ctx
        arrivals = first_lease_starts(ctx.pool)
        if ctx.settings.idle_policy is IdlePolicy.ADAPTIVE and ctx.settings.lease_history_days:
            since = ctx.clock.now() - ARRIVALS_READ
            found = await ctx.read("lease_history", ctx.registry.lease_history, since)
            # Cloud workers' leases only, as hand-outs count them (a lab machine's do not).
            ended = sorted(
                (r for r in found or () if r.market != LOCAL_MARKET), key=lambda r: r.ended_at
            )
            arrivals += [record.started_at for record in ended]
            for record in ended:
                if record.reason in ("released", "expired"):
                    released = record.reason == "released"
                    ctx.note_ended(record.ended_at, record.hours * 3600, released=released)
        ctx.seed_arrivals(arrivals)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Adopt the pool's existing instances, then run the background loops forever."""
        ctx, scaling = self.ctx, self.scaling
        async with trio.open_nursery() as nursery:
            ctx.nursery = nursery
            await self.reconciler.restore()  # the pool as the registry has it (after a restart)
            await self._seed_arrivals()  # idle_policy: adaptive learns from them
            await self.reconciler.add_declared_local_workers()
            await self.reconciler.reconcile()  # then as EC2 has it
            nursery.start_soon(self.bootwatch.run)
            nursery.start_soon(self._reap_loop)
            if ctx.settings.warm_pool_configured:
                nursery.start_soon(scaling.warm_loop)
            if ctx.settings.burst.mode == "auto" and scaling.queue is not None:
                nursery.start_soon(scaling.burst_loop)
            if self.ec2_events is not None:
                nursery.start_soon(self.ec2_events.run)
            if scaling.spot_prices is not None:
                nursery.start_soon(scaling.price_loop)
            task_status.started()

    def stop_handing_out(self) -> None:
        """Shutdown begins: waiting requests answer `ERROR: broker shutting down`."""
        self.ctx.closing = True
        self.ctx.notify()

    # --- requests ----------------------------------------------------------------------------

    async def get_worker(
        self,
        request: WorkerRequest,
        client: str,
        *,
        may_launch: Callable[[], str | None] | None = None,
    ) -> Handout:
        """A ready worker for `client`: reuse one, join a launch in flight, or launch (when
        `may_launch`, asked first, answers no refusal)."""
        return await self.handout.get_worker(request, client, may_launch=may_launch)

    async def ping(self, ip: str, client: str) -> Worker:
        """Restart the worker's idle clock and the caller's lease."""
        return await self.handout.ping(ip, client)

    async def release(self, ip: str, client: str) -> None:
        """End the caller's lease; terminate the worker if nobody else holds it."""
        await self.handout.release(ip, client)

    async def alive(self, instance_id: str) -> bool:
        """ALIVE from a worker's watchdog: False only when neither this replica nor the
        registry has a worker, a launch or an intent it could be (no write, no lease effect)."""
        return await self.reconciler.wanted(instance_id)

    async def register_local(self, name: str, ip: str) -> float:
        """An agent registers (or keeps registered) a local worker; the heartbeat interval it
        must keep. May raise Refusal (the registry is unavailable)."""
        try:
            await self.local_workers.register(name, ip)
        except CloudError as exc:
            raise Refusal(f"registry unavailable: {exc}") from exc
        return self.local_workers.interval

    async def heartbeat_local(self, name: str) -> None:
        """An agent's heartbeat; WorkerNotFound if its entry expired (it registers again)."""
        try:
            known = await self.local_workers.heartbeat(name)
        except CloudError as exc:
            raise Refusal(f"registry unavailable: {exc}") from exc
        if not known:
            raise WorkerNotFound(name)

    async def deregister_local(self, name: str) -> None:
        """An agent stops: its local worker leaves the pool."""
        try:
            await self.local_workers.deregister(name)
        except CloudError as exc:
            raise Refusal(f"registry unavailable: {exc}") from exc

    async def undeliverable(self, handout: Handout, client: str) -> None:
        """The GET_WORKER reply could not be sent: drop the lease it created, if it did."""
        await self.handout.undeliverable(handout, client)

    async def burst(self, count: int) -> list[str]:
        """Launch up to `count` workers of the default spec now; their instance ids."""
        attempt = self.launcher.start(self.ctx.settings.default_spec, count, requested_by="burst")
        await attempt.answered.wait()
        if attempt.error is not None:
            raise Refusal(attempt.error)
        return [instance.instance_id for instance in attempt.instances]

    def status(self, owner: str | None = None) -> dict[str, Any]:
        """The STATUS document, as this replica knows it now: every lease, or only those of
        the identity `owner` (a lease client's part before its `/`)."""
        ctx = self.ctx
        return status_document(ctx.pool, self.spending, self.launcher, ctx.clock.now(), owner)

    async def report(self, owner: str | None = None) -> dict[str, Any]:
        """The STATUS document, with the ledger's totals and every replica's covers as read
        from the registry within the last second (else as last seen): a STATUS costs at most
        three registry reads a second, however many clients ask."""
        await self.spending.read_ledger(self.ctx.clock.now(), max_age=STATUS_LEDGER_AGE)
        return self.status(owner)

    # --- one pass of each loop (the loops call these; so do tests) ---------------------------

    async def reap_once(self) -> None:
        """One reaper pass: reconcile with EC2, enforce covers, expire idle leases, terminate
        idle workers, retry failed terminations."""
        ctx = self.ctx
        await self.reconciler.reconcile()
        doomed = await self.spending.check_covers(ctx.clock.now())
        await self.retire.retire(doomed, reason="budget", claim=Claim.FORCE)
        now = ctx.clock.now()
        plan = reap_plan(ctx.pool, now, warm=ctx.warm(now), idle=ctx.idle_rule())
        await self.handout.expire_leases(plan.expired_leases, now)
        await self.retire.reap(plan.idle_workers, now)

    async def refill_once(self) -> int:
        """Launch what the warm pool lacks now; how many."""
        return await self.scaling.refill_once()

    async def burst_once(self) -> BurstDecision | None:
        """One burst check against the job queue."""
        return await self.scaling.burst_once()

    async def events_once(self, *, wait_seconds: int = 0) -> int:
        """Receive and act on one batch of EC2 events; how many were received."""
        assert self.ec2_events is not None
        return await self.ec2_events.once(wait_seconds=wait_seconds)

    async def stop_all(self, instances: Sequence[Instance]) -> list[str]:
        """Retire every listed instance of the pool now (`compute-broker stop-all`): the same
        path as the broker's own terminations, so leases end, records go, and the pool-wide
        counter and the ledger get back what the workers held. Raises Refusal if EC2 refused."""
        await self.reconciler.restore()
        now = self.ctx.clock.now()
        workers = [
            self.ctx.pool.workers.get(instance.instance_id)
            or self.ctx.pool.adopt(instance, now, price=None)
            for instance in instances
        ]
        retired = await self.retire.retire(
            workers, reason="stop_all", claim=Claim.FORCE, strict=True
        )
        return [worker.instance_id for worker in retired]

    async def _reap_loop(self) -> None:
        while True:
            await trio.sleep(self.ctx.settings.reap_interval)
            try:
                await self.reap_once()
            except Exception:
                _log.exception("reaper.crashed")  # logged; the next pass tries again
            else:
                self.health.reaper_pass(self.ctx.clock.now())
