"""`compute-broker agent`: a lab machine registers itself as a local worker, through a broker's
own port, and heartbeats.

It sends `REGISTER <name> <ip>` (the broker writes the registry entry and answers the heartbeat
interval), then `HEARTBEAT <name>` every interval, one short connection each (with `AUTH` first
when it has a token: the `agent` role). The entry expires after three missed heartbeats and the
brokers drop the worker; an expired one is registered again. On SIGTERM/SIGINT it sends
`DEREGISTER <name>`. It needs no AWS credentials and no registry access.
"""

from __future__ import annotations

import signal

import attrs
import structlog
import trio

from broker.model import LocalWorker

DEFAULT_INTERVAL = 30.0  # seconds, until REGISTER says otherwise
RETRY = 5.0  # seconds between attempts while no broker answers
TIMEOUT = 10.0  # seconds one request may take

_log = structlog.get_logger("broker.agent")


class BrokerSaid(Exception):
    """The broker answered an ERROR line (its text, never a token)."""


@attrs.frozen
class AgentSettings:
    """What the agent registers, where, and as whom."""

    worker: LocalWorker
    broker: tuple[str, int]
    token: str | None = attrs.field(default=None, repr=False)


async def ask(settings: AgentSettings, line: str) -> str:
    """One request on its own connection: the reply line. Raises OSError (no broker),
    trio.TooSlowError, or BrokerSaid."""
    host, port = settings.broker
    with trio.fail_after(TIMEOUT):
        stream = await trio.open_tcp_stream(host, port)
        async with stream:
            lines = [f"AUTH {settings.token}", line] if settings.token else [line]
            await stream.send_all("".join(f"{text}\n" for text in lines).encode())
            replies: list[str] = []
            buffer = b""
            while len(replies) < len(lines):
                chunk = await stream.receive_some(4096)
                if not chunk:
                    raise BrokerSaid("the broker closed the connection")
                buffer += chunk
                while b"\n" in buffer and len(replies) < len(lines):
                    answer, _, buffer = buffer.partition(b"\n")
                    replies.append(answer.decode("ascii", "replace"))
    for reply in replies:
        if not reply.startswith("OK"):
            raise BrokerSaid(reply)
    return replies[-1]


async def register(settings: AgentSettings) -> float:
    """REGISTER until a broker accepts it; the heartbeat interval it answers."""
    worker = settings.worker
    while True:
        try:
            reply = await ask(settings, f"REGISTER {worker.name} {worker.ip}")
        except (OSError, trio.TooSlowError, BrokerSaid) as exc:
            _log.warning("agent.register_failed", error=str(exc) or type(exc).__name__)
            await trio.sleep(RETRY)
            continue
        _log.info("agent.registered", instance_id=worker.instance_id, ip=worker.ip)
        _, _, value = reply.partition("heartbeat=")
        try:
            return float(value) if value else DEFAULT_INTERVAL
        except ValueError:
            return DEFAULT_INTERVAL


async def run_agent(
    settings: AgentSettings, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """Register, heartbeat until SIGTERM/SIGINT, deregister."""
    worker = settings.worker
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        interval = await register(settings)
        task_status.started()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_heartbeat, settings, interval)
            async for signum in signals:
                _log.info("agent.stopping", signal=signal.Signals(signum).name)
                break
            nursery.cancel_scope.cancel()
    try:
        await ask(settings, f"DEREGISTER {worker.name}")
    except (OSError, trio.TooSlowError, BrokerSaid) as exc:
        _log.warning("agent.deregister_failed", error=str(exc) or type(exc).__name__)
        return  # the entry expires by itself
    _log.info("agent.deregistered", instance_id=worker.instance_id)


async def _heartbeat(settings: AgentSettings, interval: float) -> None:
    worker = settings.worker
    while True:
        await trio.sleep(interval)
        try:
            await ask(settings, f"HEARTBEAT {worker.name}")
            _log.debug("agent.heartbeat", instance_id=worker.instance_id)
        except BrokerSaid as exc:
            if str(exc).startswith("ERROR: Worker not found"):  # expired meanwhile
                interval = await register(settings)
            else:
                _log.warning("agent.heartbeat_failed", error=str(exc))
        except (OSError, trio.TooSlowError) as exc:
            _log.warning("agent.heartbeat_failed", error=str(exc) or type(exc).__name__)
