"""The EC2 events room: spot interruption warnings, rebalance recommendations, state changes.

Events arrive from EventBridge through an SQS queue (`broker.cloud.EventQueue`) and are parsed
by `broker.interruptions`. A warned worker is handed out no more; its holders learn of it from
PING and get one replacement launched; an unheld one is terminated at once. A worker EC2
reports stopped or terminated is lost. See docs/interruptions.md.
"""

from __future__ import annotations

from typing import Final

import structlog
import trio

from broker.cloud import CloudError, EventQueue
from broker.context import Context
from broker.errors import Refusal
from broker.interruptions import (
    InterruptionWarning,
    RebalanceRecommendation,
    StateChange,
    Unrecognised,
    parse_event,
)
from broker.launcher import Launcher
from broker.model import Interruption, LaunchSpec, Worker, WorkerState
from broker.retire import Claim, Retire

_log = structlog.get_logger("broker.ec2_events")

EVENTS_WAIT: Final = 20  # seconds an SQS long poll for EC2 events waits
EVENTS_RETRY: Final = 10.0  # seconds before polling again after the events queue failed


def next_interruption(
    previous: Interruption | None, reason: str, deadline: float | None, now: float
) -> Interruption | None:
    """The worker's interruption after an EC2 warning (`reason`, `deadline`), or None when
    the warning adds nothing (SQS delivers at least once; a rebalance recommendation after a
    spot warning says less). A budget stop is replaced, keeping the sooner deadline."""
    known = previous is not None and previous.reason != "budget"
    if known and previous is not None and (previous.deadline is not None or deadline is None):
        return None  # already known
    if previous is not None and previous.deadline is not None:
        # A budget stop's deadline stands: a warning may come sooner, a recommendation (no
        # deadline of its own) does not lift it.
        deadline = previous.deadline if deadline is None else min(deadline, previous.deadline)
    return Interruption(reason, deadline, now)


class Ec2Events:
    """Receives EC2 events and acts on those about this pool's workers."""

    def __init__(
        self, ctx: Context, launcher: Launcher, retire: Retire, events: EventQueue
    ) -> None:
        self.ctx = ctx
        self.launcher = launcher
        self.retire = retire
        self.events = events

    async def run(self) -> None:
        """Long-poll the events queue for ever; a failing queue is retried after a pause."""
        while True:
            try:
                await self.once(wait_seconds=EVENTS_WAIT)
                continue
            except CloudError as exc:
                _log.warning("events.receive_failed", error=str(exc))
            except Exception:
                _log.exception("events.crashed")  # logged; the next poll starts afresh
            await trio.sleep(EVENTS_RETRY)

    async def once(self, *, wait_seconds: int = 0) -> int:
        """Receive one batch of EC2 events, act on those about this pool's workers, delete
        them all (events about other instances included); how many were received."""
        received = await self.events.receive(wait_seconds=wait_seconds)
        for message in received:
            event = parse_event(message.body)
            try:
                await self._on_event(event)
            except Exception:
                _log.exception("events.handling_crashed")
        if received:
            await self.events.delete([message.receipt_handle for message in received])
        return len(received)

    async def _on_event(
        self, event: InterruptionWarning | RebalanceRecommendation | StateChange | Unrecognised
    ) -> None:
        if isinstance(event, Unrecognised):
            _log.info("events.ignored", reason=event.reason)
            return
        ctx = self.ctx
        worker = ctx.pool.workers.get(event.instance_id)
        if worker is None or worker.local:
            return  # not ours (or gone already): the queue serves the whole region
        if isinstance(event, StateChange):
            if not event.is_alive and worker.state is not WorkerState.TERMINATING:
                reason = f"worker {worker.instance_id} is {event.state} (EC2 event)"
                self.retire.lose(worker, reason)
                ctx.notify()
            elif event.state == "running" and worker.state is WorkerState.LAUNCHING:
                ctx.boot_now = True  # describe it now: it is handed out at once
                ctx.boot_wakeup.set()
            return
        if isinstance(event, InterruptionWarning):
            reason, deadline = "spot_interruption", event.deadline
        else:
            reason, deadline = "rebalance_recommendation", None
        previous = worker.interruption
        interruption = next_interruption(previous, reason, deadline, ctx.clock.now())
        if interruption is None:
            return
        ctx.pool.interrupt(worker, interruption)
        ctx.metrics.interrupted(reason)
        await ctx.persist_interruption(worker)
        holders = ctx.pool.holder_count(worker.instance_id)
        _log.warning(
            "worker.interrupted",
            instance_id=worker.instance_id,
            ip=worker.ip,
            reason=reason,
            deadline=interruption.deadline,
            holders=holders,
        )
        ctx.notify()
        if holders:
            if previous is None or previous.reason == "budget":
                self._replace(worker)
            return
        await self.retire.retire([worker], reason=reason, claim=Claim.INTERRUPTED)

    def _replace(self, worker: Worker) -> None:
        """Launch one worker like `worker` for its holders to move to (they learn of the
        interruption from PING and ask GET_WORKER again)."""
        default = self.ctx.settings.default_spec
        spec = (
            default if worker.matches(default) else LaunchSpec(worker.instance_type, worker.market)
        )
        try:
            self.launcher.start(spec, 1, requested_by="replacement")
        except Refusal as exc:
            _log.warning(
                "worker.replacement_refused", instance_id=worker.instance_id, reason=str(exc)
            )
            return
        _log.info("worker.replacement", instance_id=worker.instance_id, type=spec.instance_type)
