"""The scaling room: the warm pool's refill, bursting on the job queue, spot price refresh.

Speculative launches (nobody is waiting for them) start here; `broker.schedule` and
`broker.burst` decide, the launcher launches, the retire room scales down.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Final, Protocol

import structlog
import trio

from broker.burst import BurstDecision, WorkerView, decide
from broker.cloud import CloudError, JobQueue
from broker.context import Context
from broker.decisions import admit
from broker.errors import Refusal
from broker.launcher import Launcher
from broker.model import LaunchSpec, WorkerState
from broker.registry import LaunchIntent, WorkerRecord
from broker.retire import Claim, Retire
from broker.schedule import refill_count
from broker.spending import Spending

_log = structlog.get_logger("broker.scaling")

SPOT_PRICE_REFRESH: Final = 3600.0  # seconds between spot price history reads


class SpotPriceSource(Protocol):
    """Where current spot prices come from (`broker.ec2.Ec2Cloud`)."""

    async def spot_prices(self, instance_types: Sequence[str]) -> dict[str, float]:
        """$/hour per type; may raise CloudError (e.g. the account may not ask)."""
        ...


def warm_counts(
    records: Iterable[WorkerRecord],
    intents: Iterable[LaunchIntent],
    spec: LaunchSpec,
    *,
    idle: int,
    launching: int,
) -> tuple[int, int]:
    """Idle and launching counts for `spec` across replicas, from the registry's workers and
    unanswered launch intents; at least the local view's `idle` and `launching`."""
    shared_idle = booting = 0
    for r in records:
        if not spec.accepts(r.instance_type, r.market):
            continue
        if r.state is WorkerState.READY and r.holders == 0 and r.provider != "local":
            shared_idle += 1
        elif r.state is WorkerState.LAUNCHING:
            booting += 1
    # An intent is deleted once RunInstances answers: every one listed is still requested.
    requested = sum(i.count for i in intents if spec.accepts(i.instance_type, i.market))
    return max(idle, shared_idle), max(launching, booting + requested)


class Scaling:
    """Warm-pool refill, SQS bursting and spot prices: the loops that launch unasked."""

    def __init__(
        self,
        ctx: Context,
        launcher: Launcher,
        retire: Retire,
        spending: Spending,
        *,
        queue: JobQueue | None = None,
        spot_prices: SpotPriceSource | None = None,
    ) -> None:
        self.ctx = ctx
        self.launcher = launcher
        self.retire = retire
        self.spending = spending
        self.queue = queue
        self.spot_prices = spot_prices

    # --- the warm pool -----------------------------------------------------------------------

    async def warm_loop(self) -> None:
        """Keep min_idle ready workers of the default type: refill in the background, at each
        schedule change, after each hand-out, and at least every reap_interval."""
        ctx = self.ctx
        schedule = ctx.settings.warm_pool
        next_change = schedule.next_change_after(ctx.clock.now())
        while True:
            try:
                await self.refill_once()
            except Exception:
                _log.exception("warm_pool.crashed")  # logged; the next pass tries again
            now = ctx.clock.now()
            if next_change is not None and now >= next_change:
                next_change = schedule.next_change_after(now)
            timeout = ctx.settings.reap_interval
            if next_change is not None:
                timeout = min(timeout, max(0.0, next_change - now))
            with trio.move_on_after(timeout):
                await ctx.warm_wakeup.wait()

    async def refill_once(self) -> int:
        """Launch what the warm pool lacks now (counting launches under way); how many.

        When the local view says to launch, the registry is consulted first: other replicas'
        idle workers and their launches (intents are written before RunInstances) count too,
        so two replicas do not both refill."""
        ctx = self.ctx
        now = ctx.clock.now()
        warm = ctx.warm(now)
        if warm.count <= 0:
            return 0
        if self.spending.reached_this_period(now):
            return 0  # a cap was reached this period: no speculative launches until it ends
        spec = warm.spec
        idle = len(ctx.pool.idle_ready(spec))
        waiting = self.launcher.demand.get(spec, 0)
        per_worker = ctx.settings.limits.clients_per_worker
        promised = (1 if waiting else 0) if per_worker is None else math.ceil(waiting / per_worker)
        unpromised = max(0, ctx.pool.coming_instances(spec) - promised)
        price = ctx.prices.price(spec.instance_type, spec.market)
        room = admit(ctx.pool, spec, warm.count, price).count
        if refill_count(warm.count, idle, unpromised, room) == 0:
            return 0
        try:
            records = await ctx.registry.list_workers(now)
            intents = await ctx.registry.list_intents(now)
        except CloudError as exc:
            _log.warning("registry.read_failed", op="warm_view", error=str(exc))
        else:
            idle, unpromised = warm_counts(records, intents, spec, idle=idle, launching=unpromised)
        count = refill_count(warm.count, idle, unpromised, room)
        if count:
            _log.info(
                "warm_pool.refill",
                min_idle=warm.count,
                idle=idle,
                launching=unpromised,
                count=count,
            )
            self.launcher.start(spec, count, requested_by="warm-pool")
        return count

    # --- bursting ----------------------------------------------------------------------------

    async def burst_loop(self) -> None:
        """Every check_interval, scale the cloud pool on the job queue's depth."""
        while True:
            try:
                await self.burst_once()
            except Exception:
                _log.exception("burst.crashed")  # logged; the next check tries again
            await trio.sleep(self.ctx.settings.burst.check_interval)

    async def burst_once(self) -> BurstDecision | None:
        """One burst check: read the depth, decide (broker.burst), launch and terminate."""
        assert self.queue is not None
        try:
            depth = await self.queue.depth()
        except CloudError as exc:
            _log.warning("burst.depth_failed", error=str(exc))
            return None
        ctx = self.ctx
        pool, spec = ctx.pool, ctx.settings.default_spec
        views = [
            WorkerView(
                w.instance_id,
                w.local,
                pool.is_held(w.instance_id),
                w.last_activity,
                w.price_per_hour,
            )
            for w in pool.workers.values()
            if w.state is WorkerState.READY and (w.local or w.matches(spec))
        ]
        decision = decide(
            ctx.settings.burst,
            depth,
            views,
            ctx.clock.now(),
            launching=pool.coming_instances(spec),
            run_rate=pool.run_rate(),
            price_per_hour=ctx.prices.price(spec.instance_type, spec.market),
        )
        if decision.launch or decision.terminate:
            _log.info(
                "burst.decision",
                depth=depth,
                launch=decision.launch,
                terminate=list(decision.terminate),
                reason=decision.reason,
            )
        if decision.launch:
            try:
                self.launcher.start(spec, decision.launch, requested_by="burst")
            except Refusal as exc:
                _log.warning("burst.launch_refused", reason=str(exc))
        doomed = [
            worker
            for instance_id in decision.terminate
            if (worker := pool.workers.get(instance_id)) is not None
            and worker.state is WorkerState.READY
        ]
        await self.retire.retire(doomed, reason="burst_scale_down", claim=Claim.IDLE)
        return decision

    # --- spot prices -------------------------------------------------------------------------

    async def price_loop(self) -> None:
        """Read current spot prices from EC2 every hour; the price table stays the fallback."""
        assert self.spot_prices is not None
        types = list(self.ctx.settings.default_spec.types)
        while True:
            try:
                found = await self.spot_prices.spot_prices(types)
            except CloudError as exc:
                _log.warning("prices.spot_history_unavailable", error=str(exc))
            except Exception:
                _log.exception("prices.crashed")  # the table stays in use
            else:
                spot = {instance_type: {"spot": price} for instance_type, price in found.items()}
                self.ctx.prices = self.ctx.prices.with_overrides(spot)
                _log.info("prices.spot_refreshed", prices=found)
            await trio.sleep(SPOT_PRICE_REFRESH)
