"""The reconcile room: restore from the registry, sync with other replicas, agree with EC2.

At start the pool is restored from the registry (after a restart it has the same workers,
leases and idle clocks), then reconciled with EC2's tagged instances. Every reaper pass does
the same: workers EC2 no longer runs are lost, other replicas' workers and leases join, live
tagged instances nobody knows are adopted (a launch cut off at launch_timeout, a crash between
RunInstances and writing the worker), launch intents left by a crash are settled, and the
pool-wide instance counter is repaired if a crash leaked a reservation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import structlog
import trio

from broker.cloud import CloudError, Instance
from broker.context import Context
from broker.errors import Refusal
from broker.launcher import Launcher
from broker.ledger import MICROS, RATE_KEY, to_micros
from broker.model import WorkerState
from broker.registry import LaunchIntent, Provider, WorkerRecord
from broker.retire import Retire
from broker.spending import Spending

_log = structlog.get_logger("broker.reconcile")

# EC2 describes a terminated instance for about an hour: an intent settled later than this
# cannot count the instances it produced, so none of its charge is refunded (the safe side).
EC2_REMEMBERS_TERMINATED = 3000.0
INTENTS_MAX_AGE = 1.0  # seconds ALIVE may rely on a read of the launch intents


class Reconciler:
    """Keeps the pool in agreement with the registry and with EC2."""

    def __init__(
        self, ctx: Context, launcher: Launcher, retire: Retire, spending: Spending
    ) -> None:
        self.ctx = ctx
        self.launcher = launcher
        self.retire = retire
        self.spending = spending
        self._counter_suspect: tuple[int, int] | None = None
        self._rate_suspect: tuple[int, int] | None = None
        self._intents_read_at = -math.inf
        self._intents_seen = False

    async def restore(self) -> None:
        """Load workers and leases from the registry; workers caught mid-termination are
        terminated by the next reaper pass."""
        ctx = self.ctx
        now = ctx.clock.now()
        try:
            records = await ctx.registry.list_workers(now)
            leases = await ctx.registry.list_leases(now)
        except CloudError as exc:
            _log.error("registry.restore_failed", error=str(exc))
            return
        added = ctx.pool.restore(
            [record.to_worker(now) for record in records], [lease.to_lease() for lease in leases]
        )
        self.retire.retry.update(w.instance_id for w in added if w.state is WorkerState.TERMINATING)
        if records:
            _log.info("registry.restored", workers=len(records), leases=len(leases))

    async def add_declared_local_workers(self) -> None:
        """Local workers from the config join the pool (and the registry, where leases are
        claimed), ready at once; they are never launched, reaped or terminated."""
        ctx = self.ctx
        now = ctx.clock.now()
        for local in ctx.settings.local_workers:
            worker = ctx.pool.add_local(local, ctx.settings.default_spec.market, now)
            if worker is None:
                continue
            try:
                if await ctx.registry.get_worker(worker.instance_id) is None:
                    await ctx.registry.put_worker(WorkerRecord.from_worker(worker))
            except CloudError as exc:
                _log.error("registry.write_failed", op="local_worker", error=str(exc))

    async def wanted(self, instance_id: str) -> bool:
        """Whether the pool still wants the instance (a worker's watchdog asks, `ALIVE`):
        known here (any state: a terminating one goes anyway), or, when not, the registry
        has its worker or any launch not answered yet (another replica's fresh worker may
        not be known here). Costs no registry call for a known worker and writes nothing.
        Raises Refusal when the registry cannot be asked: the worker hears no verdict."""
        ctx = self.ctx
        if instance_id in ctx.pool.workers or ctx.pool.in_flight:
            return True
        now = ctx.clock.now()
        try:
            if await ctx.registry.get_worker(instance_id) is not None:
                return True
            # Any launch under way anywhere: asked at most once a second, however many
            # strangers send ALIVE.
            if trio.current_time() - self._intents_read_at >= INTENTS_MAX_AGE:
                self._intents_read_at = trio.current_time()
                self._intents_seen = bool(await ctx.registry.list_intents(now))
            return self._intents_seen
        except CloudError as exc:
            raise Refusal(f"registry unavailable: {exc}") from exc

    async def reconcile(self) -> None:
        """Make the pool agree with EC2's view of this pool's tagged instances (and with the
        registry). Adopted workers start their idle clock now, so an unwanted one is reaped
        after idle_timeout."""
        ctx = self.ctx
        try:
            instances = await ctx.cloud.list_pool()
        except CloudError as exc:
            _log.error("reconcile.failed", error=str(exc))
            return
        now = ctx.clock.now()
        alive = {instance.instance_id for instance in instances}
        for worker in list(ctx.pool.workers.values()):
            vanished = worker.state is WorkerState.READY and worker.instance_id not in alive
            if vanished and not worker.local:
                self.retire.lose(worker, f"worker {worker.instance_id} is no longer running in EC2")
        # Other replicas' workers join from the registry first, so they are not "adopted"
        # (which would overwrite their records).
        intents = await self._sync(instances, now)
        if ctx.pool.in_flight:
            return  # an unanswered launch's instances may be listed already: not strangers
        by_token = {i.token: i for i in intents}
        strangers = [
            instance
            for instance in instances
            if instance.instance_id not in ctx.pool.workers
            # terminated here after EC2 was asked: not a stranger
            and not ctx.pool.recently_retired(instance.instance_id)
        ]
        for instance in await self._still_live(strangers):
            if instance.instance_id in ctx.pool.workers:
                continue
            ready = instance.state == "running" and bool(instance.public_ip)
            ready = ready and not ctx.settings.probe
            price = ctx.prices.price(instance.instance_type, instance.market)
            intent = by_token.get(instance.launch_token or "")
            if intent is not None and intent.price_per_hour is not None:
                price = intent.price_per_hour  # charged at launch: its cover comes with it
            worker = ctx.pool.adopt(
                instance,
                now,
                price=price,
                ready=ready,
                token=instance.launch_token,
                paid_until=None if intent is None else intent.paid_until,
            )
            record = WorkerRecord.from_worker(worker)
            if not await ctx.write("add_worker", ctx.registry.add_worker, record, default=True):
                # Another replica wrote it since the registry was read: its record (and its
                # holders) stand, its launch was charged; the next pass learns its cover.
                _log.info("worker.adopted_known", instance_id=instance.instance_id)
                continue
            if intent is None:  # no launch of ours charged it: it runs, so it counts now
                await self.spending.add_to_run_rate(price)
            _log.info(
                "worker.adopted",
                instance_id=instance.instance_id,
                ip=instance.public_ip,
                state=instance.state,
                type=instance.instance_type,
            )
        await self._settle_intents(instances, intents, now)
        ctx.boot_wakeup.set()
        ctx.notify()

    async def _still_live(self, strangers: Sequence[Instance]) -> list[Instance]:
        """The strangers as EC2 describes them now, those still pending or running. The
        snapshot predates the registry reads: another replica may have terminated one and
        deleted its record in between, and adopting it from the snapshot would put a dying
        instance back in the pool. None on an EC2 error (the next pass tries again)."""
        if not strangers:
            return []
        try:
            fresh = await self.ctx.cloud.describe([i.instance_id for i in strangers])
        except CloudError as exc:
            _log.error("reconcile.failed", error=str(exc))
            return []
        return [i for i in fresh if i.state in ("pending", "running")]

    async def _sync(self, instances: Sequence[Instance], now: float) -> list[LaunchIntent]:
        """Learn what other replicas did (`Pool.merge`), and repair the pool-wide instance
        counter if a crash leaked a reservation. The registry's launch intents."""
        ctx = self.ctx
        registry = ctx.registry
        known = set(ctx.pool.workers)  # a worker that joins during the reads is not in them
        known_leases = set(ctx.pool.leases)  # a lease that ends during them is still in them
        try:
            records = await registry.list_workers(now)
            leases = await registry.list_leases(now)
            intents = await registry.list_intents(now)
            seen = await registry.reserved_instances()
        except CloudError as exc:
            _log.error("registry.read_failed", op="sync", error=str(exc))
            return []
        alive = {instance.instance_id for instance in instances}
        self.spending.remember_covers(records)
        plan = ctx.pool.merge(
            {record.instance_id: record.to_worker(now) for record in records},
            [lease.to_lease() for lease in leases],
            alive=alive,
            declared_local={local.instance_id for local in ctx.settings.local_workers},
            now=now,
            known=known,
            known_leases=known_leases,
        )
        for worker in plan.joined:
            if worker.local:
                _log.info("worker.local_joined", instance_id=worker.instance_id)
        for worker in plan.interrupted:
            _log.info("worker.interrupted_elsewhere", instance_id=worker.instance_id)
        for worker in plan.lost_local:
            self.retire.lose(worker, f"local worker {worker.instance_id} stopped heartbeating")
        for worker in plan.gone:
            _log.info("worker.gone_elsewhere", instance_id=worker.instance_id)
        launched = {instance.launch_token for instance in instances}
        pending = sum(i.count for i in intents if i.token not in launched)
        actual = len(alive) + pending
        # A snapshot can be stale (another replica launched meanwhile): repair only a
        # discrepancy seen on two passes in a row with nothing of ours in flight.
        suspect = (seen, actual) if seen != actual and not ctx.pool.in_flight else None
        confirmed = suspect is not None and suspect == self._counter_suspect
        self._counter_suspect = None if confirmed else suspect
        if confirmed and await ctx.write(
            "correct_reserved_instances",
            registry.correct_reserved_instances,
            seen,
            actual,
            default=False,
        ):
            _log.info("registry.counter_repaired", was=seen, now=actual)
        await self._check_run_rate(records, intents, launched)
        return intents

    async def _check_run_rate(
        self,
        records: Sequence[WorkerRecord],
        intents: Sequence[LaunchIntent],
        launched: set[str | None],
    ) -> None:
        """With max_hourly_cost, the pool-wide run rate in the registry should be the prices of
        every replica's workers and unanswered launches; a crash (or a cap set while workers
        ran) can leave it off. Repaired like the instance counter: on two passes in a row."""
        if self.spending.hourly_cap is None:
            return
        ctx = self.ctx
        actual = sum(
            to_micros(r.price_per_hour)
            for r in records
            if r.provider is Provider.EC2 and r.price_per_hour is not None
        ) + sum(
            i.count * to_micros(i.price_per_hour)
            for i in intents
            if i.token not in launched and i.price_per_hour is not None
        )
        committed = await ctx.read("spend", ctx.registry.spend, [RATE_KEY])
        if committed is None:
            return
        seen = committed.get(RATE_KEY, 0)
        suspect = (seen, actual) if seen != actual and not ctx.pool.in_flight else None
        confirmed = suspect is not None and suspect == self._rate_suspect
        self._rate_suspect = None if confirmed else suspect
        if not confirmed:
            return
        try:
            if actual > seen:
                await ctx.registry.reserve_spend({RATE_KEY: actual - seen}, 1, {})
            else:
                await ctx.registry.refund_spend({RATE_KEY: seen - actual})
        except CloudError as exc:
            _log.error("registry.write_failed", op="run_rate", error=str(exc))
            return
        _log.info("registry.run_rate_repaired", was=seen / MICROS, now=actual / MICROS)

    async def _settle_intents(
        self, instances: Sequence[Instance], intents: Sequence[LaunchIntent], now: float
    ) -> None:
        """Launch intents left by a crash (or a failed settle): their instances (found by
        launch-token tag) have been adopted above with the intent's cover. An intent no launch
        of ours has under way is settled once it is older than launch_timeout (a replica's
        launch settles its own intent before that), refunding the instances it never
        produced: counted by EC2 in every state, so a worker that came and has already ended
        is not refunded twice (its own end refunded its unused cover)."""
        # Past launch_timeout a launch's own settle has run, or an abandoned RunInstances
        # thread may still land: twice that leaves room for its timeouts and clock skew.
        due_after = 2 * self.ctx.settings.launch_timeout
        due = [
            intent
            for intent in intents
            if not self.launcher.under_way(intent.token) and now - intent.created_at > due_after
        ]
        if not due:
            return
        try:
            launched = await self.ctx.cloud.launched([intent.token for intent in due])
        except CloudError as exc:
            _log.error("reconcile.failed", error=str(exc))
            return
        for intent in due:
            came = launched.get(intent.token, 0)
            if now - intent.created_at > EC2_REMEMBERS_TERMINATED:
                came = intent.count  # EC2 may have forgotten them: refund nothing (over-count)
            _log.info("launch.intent_settled", client_token=intent.token, launched=came)
            try:  # only the replica whose delete takes the intent refunds
                await self.spending.settle_intent(intent, came)
            except CloudError as exc:
                _log.error("registry.write_failed", op="settle_intent", error=str(exc))
