"""`compute-broker agent`: a lab machine registers itself as a local worker and heartbeats.

The agent writes a local worker to the registry, then refreshes its expiry every `interval`
seconds; the entry expires after three missed heartbeats (the hybrid guide's scheme), and the
brokers drop the worker at their next reconciliation. On SIGTERM/SIGINT it deregisters.
"""

from __future__ import annotations

import signal

import attrs
import structlog
import trio

from broker.clock import Clock
from broker.cloud import CloudError, Market
from broker.model import LOCAL_TYPE, LocalWorker, WorkerState
from broker.registry import Registry, WorkerRecord

MISSED_BEATS: int = 3

_log = structlog.get_logger("broker.agent")


@attrs.frozen
class AgentSettings:
    """What the agent registers, and how often it heartbeats."""

    worker: LocalWorker
    interval: float = 30.0


def local_record(worker: LocalWorker, now: float, interval: float) -> WorkerRecord:
    """The registry entry of a local worker, expiring after MISSED_BEATS missed beats."""
    return WorkerRecord(
        instance_id=worker.instance_id,
        provider="local",
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


async def run_agent(
    registry: Registry,
    settings: AgentSettings,
    clock: Clock,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Register, heartbeat until SIGTERM/SIGINT, deregister."""
    worker = settings.worker
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        now = clock.now()
        expires = now + MISSED_BEATS * settings.interval
        # A restarted agent keeps its entry (and the count of clients holding it).
        if not await registry.update_worker_activity(worker.instance_id, now, expires_at=expires):
            await registry.put_worker(local_record(worker, now, settings.interval))
        _log.info("agent.registered", instance_id=worker.instance_id, ip=worker.ip)
        task_status.started()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_heartbeat, registry, settings, clock)
            async for signum in signals:
                _log.info("agent.stopping", signal=signal.Signals(signum).name)
                break
            nursery.cancel_scope.cancel()
    await registry.delete_worker(worker.instance_id)
    _log.info("agent.deregistered", instance_id=worker.instance_id)


async def _heartbeat(registry: Registry, settings: AgentSettings, clock: Clock) -> None:
    worker = settings.worker
    while True:
        await trio.sleep(settings.interval)
        now = clock.now()
        expires = now + MISSED_BEATS * settings.interval
        try:
            known = await registry.update_worker_activity(
                worker.instance_id, now, expires_at=expires
            )
            if not known:  # expired and dropped meanwhile: register again
                await registry.put_worker(local_record(worker, now, settings.interval))
            _log.debug("agent.heartbeat", instance_id=worker.instance_id)
        except CloudError as exc:
            _log.warning("agent.heartbeat_failed", error=str(exc))  # retried next beat
