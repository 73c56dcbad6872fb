"""The boot room: one batched DescribeInstances for every launching worker, readiness probes,
and launch timeouts.

Describes are scheduled by `broker.boottimes`: dense where each type's learned boots say
`running` is likely, sparse before, so a worker is handed out within a fraction of a second
of EC2's `running` with fewer calls than polling every describe_interval. A launch only
reschedules them (a describe at the launch cannot see it running); an EC2 `running`
state-change event (broker.ec2_events) describes at once.

A launched worker is handed out once EC2 reports it running with a public IP (and, with
`probe: true`, once its `worker_port` accepts a connection). It is ready in the registry
before it is ready here, since hand-outs claim leases there. A worker still launching after
`launch_timeout` is terminated and its waiters told why.
"""

from __future__ import annotations

from typing import Final

import attrs
import structlog
import trio

from broker.boottimes import next_check
from broker.cloud import CloudError, Instance
from broker.context import Context
from broker.launcher import Launcher
from broker.model import Worker, WorkerState
from broker.registry import WorkerRecord
from broker.retire import Claim, Retire

_log = structlog.get_logger("broker.bootwatch")

MIN_PAUSE: Final = 0.05  # seconds at least between two describe passes
COALESCE: Final = 0.1  # seconds: a check due this soon after a describe is served by it


class BootWatch:
    """Watches launching workers until they are ready, lost or overdue."""

    def __init__(self, ctx: Context, launcher: Launcher, retire: Retire) -> None:
        self.ctx = ctx
        self.launcher = launcher
        self.retire = retire
        self._probing: set[str] = set()
        self.boot_times = ctx.boot_times
        self._pending_at: dict[str, float] = {}  # when each was last described not running
        self._observed: set[str] = set()  # workers whose boot time was taken
        self._described_at = float("-inf")  # when the last describe pass ran

    async def run(self) -> None:
        """Describe launching workers when their schedule says; sleep while there are none.
        A wakeup (a launch answered, a reconcile pass) only reschedules; an EC2 `running`
        event (`ctx.boot_now`) describes at once."""
        ctx = self.ctx
        while True:
            now = ctx.clock.now()
            due = self.next_due(now)
            if ctx.boot_now or (due is not None and due <= now):
                ctx.boot_now = False
                try:
                    await self.watch_once()
                except Exception:
                    _log.exception("watcher.crashed")  # logged; the next pass starts afresh
                    self._described_at = ctx.clock.now() + ctx.settings.describe_interval
                await trio.sleep(MIN_PAUSE)
            elif due is None:
                await ctx.boot_wakeup.wait()
            else:
                with trio.move_on_after(due - now):
                    await ctx.boot_wakeup.wait()

    def next_due(self, now: float) -> float | None:
        """When the next describe is due (Unix seconds; `now` or earlier: at once); None with
        nothing launching. Each worker's next check is the first its schedule makes after the
        last describe (one covers every launching worker), a check due within COALESCE of it
        being served by it."""
        interval = self.ctx.settings.describe_interval
        since = self._described_at + COALESCE
        times = []
        for w in self.ctx.pool.launching():
            elapsed = max(0.0, since - w.boot_started)
            plan = self.boot_times.plan(w.instance_type)
            times.append(w.boot_started + next_check(elapsed, plan, interval))
        return min(times, default=None)

    async def watch_once(self) -> float | None:
        """One pass over the launching workers; when the next is due (None: none left)."""
        ctx = self.ctx
        waiting = ctx.pool.launching()
        if not waiting:
            return None
        try:
            described = await ctx.cloud.describe([w.instance_id for w in waiting])
        except CloudError as exc:
            _log.warning("describe.failed", error=str(exc), pending=len(waiting))
            described = []
        by_id = {instance.instance_id: instance for instance in described}
        seen_at = self._described_at = ctx.clock.now()
        running = []
        pending_at = {}
        for worker in waiting:
            instance = by_id.get(worker.instance_id)
            if self._running(worker, instance):
                # Learned only from launches this broker watched from RunInstances' answer (an
                # adopted one may have booted long before it was first described).
                if worker.answered_at is not None and worker.instance_id not in self._observed:
                    self._observed.add(worker.instance_id)
                    # It became running between the last check that saw it pending and now.
                    started = worker.boot_started
                    before = max(self._pending_at.get(worker.instance_id, started), started)
                    kind = worker.instance_type
                    boot = self.boot_times.estimate(kind, before - started, seen_at - started)
                    self.boot_times.observe(kind, boot)
            elif instance is not None:
                pending_at[worker.instance_id] = seen_at
            elif worker.instance_id in self._pending_at:  # not described (a failed call)
                pending_at[worker.instance_id] = self._pending_at[worker.instance_id]
            ip = self._advance(worker, instance)
            if ip is not None:
                running.append((worker, ip))
        self._pending_at = pending_at
        self._observed &= {w.instance_id for w in waiting}
        for worker, ip in running:
            await self._ready(worker, ip)
        ctx.notify()
        await self._fail_overdue(ctx.clock.now())
        return self.next_due(ctx.clock.now())

    @staticmethod
    def _running(worker: Worker, instance: Instance | None) -> bool:
        launching = worker.state is WorkerState.LAUNCHING
        return launching and instance is not None and instance.state == "running"

    def _advance(self, worker: Worker, instance: Instance | None) -> str | None:
        """The IP to make the worker ready with now, if any (probes start in the background)."""
        if worker.state is not WorkerState.LAUNCHING or instance is None:
            return None  # just launched instances may not be visible yet (eventual consistency)
        if instance.state == "running" and instance.public_ip:
            if not self.ctx.settings.probe:
                return instance.public_ip
            if worker.instance_id not in self._probing:
                self._probing.add(worker.instance_id)
                self.ctx.spawn(self._probe, worker, instance.public_ip)
        elif not instance.is_alive:
            self.retire.lose(
                worker, f"worker {worker.instance_id} was {instance.state} while booting"
            )
        return None

    async def _probe(self, worker: Worker, ip: str) -> None:
        """Hand the worker out only once its port accepts a TCP connection."""
        ok = False
        try:
            with trio.move_on_after(self.ctx.settings.probe_timeout):
                stream = await trio.open_tcp_stream(ip, self.ctx.settings.worker_port)
                await stream.aclose()
                ok = True
        except OSError as exc:
            _log.debug("probe.failed", instance_id=worker.instance_id, ip=ip, error=str(exc))
        finally:
            self._probing.discard(worker.instance_id)
        if ok:
            await self._ready(worker, ip)
            self.ctx.notify()

    async def _ready(self, worker: Worker, ip: str) -> None:
        """Ready in the registry first (hand-outs claim leases there), then here. If the
        registry cannot be told, the worker stays launching here and the next pass tries
        again: a worker ready here but launching there could be neither leased nor reaped.
        A record this broker failed to write after RunInstances is written now, ready (EC2
        says the instance runs); a record missing for any other reason was deleted by whoever
        ended the worker, and is not brought back."""
        ctx = self.ctx
        try:
            written = await ctx.registry.set_worker_state(
                worker.instance_id, WorkerState.READY, expect=WorkerState.LAUNCHING, ip=ip
            )
            if not written:  # another replica made it ready first, or it was never written
                record = await ctx.registry.get_worker(worker.instance_id)
                if record is not None:
                    written = record.state is WorkerState.READY
                elif worker.instance_id in self.launcher.unrecorded:
                    ready = WorkerRecord.from_worker(worker)
                    written = await ctx.registry.add_worker(
                        attrs.evolve(ready, state=WorkerState.READY, ip=ip)
                    )
                    self.launcher.unrecorded.discard(worker.instance_id)
        except CloudError as exc:
            _log.error("registry.write_failed", op="ready", error=str(exc))
            ctx.metrics.registry_error("ready")
            return
        if not written:
            return
        now = ctx.clock.now()
        if ctx.pool.mark_ready(worker.instance_id, ip, now) is None:
            return
        _log.info(
            "worker.ready",
            instance_id=worker.instance_id,
            ip=ip,
            boot_seconds=round(max(0.0, now - worker.launched_at), 3),
        )
        self.launcher.settle(worker.launch_token)

    async def _fail_overdue(self, now: float) -> None:
        """Terminate launching workers older than launch_timeout (booting or failing probes)."""
        timeout = self.ctx.settings.launch_timeout
        overdue = [w for w in self.ctx.pool.launching() if now - w.launched_at > timeout]
        if not overdue:
            return
        reason = f"launch timed out after {timeout:g}s"
        for worker in overdue:
            self.launcher.fail(worker.launch_token, reason)
            self.launcher.unrecorded.discard(worker.instance_id)
            _log.error("worker.boot_timeout", instance_id=worker.instance_id, reason=reason)
        await self.retire.retire(overdue, reason="boot_timeout", claim=Claim.FORCE)
