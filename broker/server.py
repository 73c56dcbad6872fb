"""The TCP server: Trio I/O only. Reads lines, asks the engine, writes replies.

One task per connection. A handler's failure is logged and answered with one `ERROR` line;
it never reaches another connection or the listener. `shutdown()` stops accepting and closes
idle connections; requests in progress go on to their reply (the CLI bounds how long).
"""

from __future__ import annotations

import errno
import itertools
import json
import math
from typing import Final

import attrs
import structlog
import trio

from broker import protocol
from broker.access import Role, Session, redact_status
from broker.connection import Acceptor, Connection, ConnectionLost, Interrupted
from broker.engine import Engine, Handout, Refusal, WorkerInterrupted, WorkerNotFound
from broker.framing import Closed, LineReader, NeedData
from broker.gate import WIRE_NAMES, Admitted, Gate
from broker.metrics import outcome_of
from broker.model import WorkerRequest
from broker.protocol import (
    Alive,
    BadRequest,
    Burst,
    Command,
    Deregister,
    GetWorker,
    Heartbeat,
    Help,
    Ping,
    Quit,
    Register,
    Release,
    Reply,
    Request,
    Status,
    WithToken,
)
from broker.redact import public_error

_log = structlog.get_logger("broker.server")

ACCEPT_RETRY_SECONDS: Final = 0.1  # after EMFILE/ENFILE/ENOMEM/ENOBUFS on accept
_ACCEPT_RESOURCE_ERRORS: Final = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}
INTERNAL_ERROR: Final = Reply.error("internal error (logged by the broker)")
# One name for every connection's task: Trio would format one string per task otherwise.
HANDLER_TASK_NAME: Final = "broker.server.Server._handle"
RENDER_IN_THREAD: Final = 1000  # leases above which STATUS all is rendered off the event loop


@attrs.frozen
class ServerSettings:
    """The server's knobs (a subset of the config)."""

    host: str = "0.0.0.0"
    port: int = 9000
    client_timeout: float = 30.0
    max_connections: int = 1024


class Server:
    """Serves the line protocol for one `Engine` on one or more listeners."""

    def __init__(self, engine: Engine, settings: ServerSettings, gate: Gate | None = None) -> None:
        self.engine = engine
        self.settings = settings
        self.gate = gate if gate is not None else Gate()
        self.open_connections = 0
        self._ids = itertools.count(1)
        self._draining = False
        self._timers: set[_Timer] = set()
        self._accept_scope = trio.CancelScope()
        self._all_closed = trio.Event()

    async def run(
        self,
        *,
        listeners: list[trio.SocketListener] | None = None,
        task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Listen (on `listeners`, else on the settings' host and port) and serve; after
        `shutdown()`, return once every connection has closed."""
        if listeners is None:
            listeners = await trio.open_tcp_listeners(self.settings.port, host=self.settings.host)
        async with trio.open_nursery() as timeouts:
            timeouts.start_soon(self._expire_timers)
            async with trio.open_nursery() as handlers:
                with self._accept_scope:
                    async with trio.open_nursery() as acceptors:
                        for listener in listeners:
                            acceptors.start_soon(self._accept_loop, listener, handlers)
                        task_status.started(listeners)
                for listener in listeners:
                    await listener.aclose()
            timeouts.cancel_scope.cancel()

    async def shutdown(self) -> None:
        """Stop accepting; close idle connections; requests in progress go on to their reply."""
        self._draining = True
        self._accept_scope.cancel()
        for timer in self._timers:
            if timer.waiting:
                timer.connection.interrupt()
        self._check_idle()

    async def wait_closed(self) -> None:
        """After `shutdown()`: wait until every connection has closed."""
        await self._all_closed.wait()

    async def _expire_timers(self) -> None:
        """Interrupt each connection whose deadline has passed, checking every tenth of the
        client timeout (at most a second): a client is closed at most that late. One task for
        all connections: a cancel scope per connection, with its deadline moved twice per
        request, was ~10 µs of CPU per connection and ~4 µs per request (measured)."""
        tick = min(1.0, max(0.01, self.settings.client_timeout / 10))
        while True:
            await trio.sleep(tick)
            now = trio.current_time()
            for timer in self._timers:
                if timer.deadline <= now:
                    timer.connection.interrupt()

    def _check_idle(self) -> None:
        if self._draining and self.open_connections == 0:
            self._all_closed.set()

    async def _accept_loop(self, listener: trio.SocketListener, handlers: trio.Nursery) -> None:
        acceptor: Acceptor | None = None
        try:
            while True:
                try:
                    if acceptor is None:  # a socket of its own: EMFILE is possible here too
                        acceptor = Acceptor(listener)
                    batch = await acceptor.accept()
                except OSError as exc:
                    if exc.errno in _ACCEPT_RESOURCE_ERRORS:
                        _log.error("accept.failed", error=str(exc), retry_in=ACCEPT_RETRY_SECONDS)
                        await trio.sleep(ACCEPT_RETRY_SECONDS)
                        continue
                    raise
                for connection in batch:
                    handlers.start_soon(self._handle, connection, name=HANDLER_TASK_NAME)
        finally:
            if acceptor is not None:
                acceptor.close()

    async def _handle(self, stream: Connection) -> None:
        """Serve one connection, in this one coroutine (a second one, awaited for the
        connection's whole life, cost every idle connection its frame)."""
        log = _ConnectionLog(next(self._ids), stream.peer)
        self.open_connections += 1
        metrics = self.engine.metrics
        metrics.connection_opened()
        admitted: Session | None = None
        # The timer's deadline bounds each wait for a complete line (set when the connection
        # opens and after each reply, not per chunk, so trickling bytes does not extend it)
        # and each reply's send (a client that stops reading); it is infinite while a request
        # is served (a launch takes minutes). Timeouts and shutdown interrupt the waits.
        timer = _Timer(stream, trio.current_time() + self.settings.client_timeout)
        try:
            session = self._admit(stream.peer, log)
            if not isinstance(session, Session):
                if session is not None:
                    await stream.send_quietly(session.to_bytes())
                return
            admitted = session
            self._timers.add(timer)
            reader = LineReader()
            first = True
            while True:
                event = reader.next_request()
                if isinstance(event, NeedData):
                    if self._draining:
                        return
                    timer.waiting = True
                    try:
                        data = await stream.receive(ready=first)
                    finally:
                        timer.waiting = False
                    first = False
                    if stream.interrupted:
                        raise Interrupted  # the deadline or shutdown came as the data did
                    reader.receive_data(data)
                    continue
                if isinstance(event, Closed):
                    return
                timer.deadline = math.inf
                if not await self._answer(stream, event, session, log, timer):
                    return
        except Interrupted:
            if not self._draining:
                log.info("client.timeout", after_seconds=self.settings.client_timeout)
        except Exception:
            log.exception("connection.crashed")
            await stream.send_quietly(INTERNAL_ERROR.to_bytes())
        finally:
            self._timers.discard(timer)
            if admitted is not None:
                self.gate.close(stream.peer)
            self.open_connections -= 1
            metrics.connection_closed()
            self._check_idle()
            stream.close()

    def _admit(self, peer: str, log: _ConnectionLog) -> Session | Reply | None:
        """A new connection's session, or the reply to close it with (None: close without a
        word: a peer outside the allowlist learns nothing)."""
        metrics = self.engine.metrics
        if self.open_connections > self.settings.max_connections:
            log.warning("connection.refused", reason="too many connections")
            metrics.connection_refused("too_many_connections")
            return protocol.TOO_MANY_CONNECTIONS
        session = self.gate.open(peer, self.engine.pool)
        if isinstance(session, str):
            metrics.connection_refused("limit" if session else "not_allowed")
            return Reply(session, close=True) if session else None
        return session

    async def _answer(
        self,
        stream: Connection,
        event: Request | BadRequest,
        session: Session,
        log: _ConnectionLog,
        timer: _Timer,
    ) -> bool:
        """Serve one request and send its reply; False when the connection is to close."""
        started = finished = trio.current_time()
        handout: Handout | None = None
        admitted: Admitted | None = None
        if isinstance(event, BadRequest):
            reply = event.reply
            self.gate.limiter.request(session.identity.key, started)
            log.warning("client.bad_line", reason=event.reason, reply=reply.text)
            self.engine.metrics.request("other", "bad_request", 0.0)
        else:
            checked = self.gate.check(session, event, started, self.engine.pool)
            if isinstance(checked, Reply):
                reply, name = checked, WIRE_NAMES[type(_command(event))]
            else:
                admitted, name = checked, WIRE_NAMES[type(checked.command)]
                reply, handout = await self._dispatch(checked, started)
            finished = trio.current_time()
            seconds = finished - started
            log.info("request", command=name, reply=reply.text[:80], ms=round(seconds * 1000, 3))
            self.engine.metrics.request(name, outcome_of(reply.text), seconds)
        timer.deadline = finished + self.settings.client_timeout
        try:
            await stream.send(reply.to_bytes())
        except ConnectionLost as exc:
            log.info("client.gone", error=str(exc))
            if admitted is not None and handout is not None:
                await self.engine.undeliverable(handout, admitted.owner)
            return False
        except Interrupted:  # the client timeout (it does not read) or shutdown, mid-reply
            if admitted is not None and handout is not None:
                await self.engine.undeliverable(handout, admitted.owner)
            raise
        return not reply.close

    async def _dispatch(self, admitted: Admitted, now: float) -> tuple[Reply, Handout | None]:
        """The reply to an admitted command, and the hand-out when it was a GET_WORKER."""
        command, owner = admitted.command, admitted.owner
        try:
            if isinstance(command, GetWorker):
                request = WorkerRequest(command.instance_type, command.market, command.wait)
                handout = await self.engine.get_worker(
                    request, owner, may_launch=lambda: self.gate.launched(admitted.identity, now)
                )
                return Reply(handout.ip), handout
            return await self._execute(admitted), None
        except Refusal as exc:
            detail = str(exc)
            shown = public_error(detail)
            if shown != detail:
                _log.info("request.refused", detail=detail)  # AWS's full words: the log only
            return Reply.error(shown), None
        except WorkerNotFound:
            return protocol.WORKER_NOT_FOUND, None
        except WorkerInterrupted as exc:
            return protocol.worker_interrupted(exc.interruption.deadline), None

    async def _execute(self, admitted: Admitted) -> Reply:
        owner = admitted.owner
        match admitted.command:
            case Alive(instance_id=instance_id):
                wanted = await self.engine.alive(instance_id)
                return Reply.ok() if wanted else protocol.WORKER_NOT_WANTED
            case Ping(ip=ip):
                await self.engine.ping(ip, owner)
                return Reply.ok()
            case Release(ip=ip):
                await self.engine.release(ip, owner)
                return Reply.ok()
            case Status(all=everything):
                identity = admitted.identity
                # The caller's own leases (a bounded line), or every lease: that line is
                # built in a thread, off the event loop (20,000 leases are ~3 MB).
                document = await self.engine.report(None if everything else identity.key)
                if identity.role is not Role.ADMIN:
                    document = redact_status(document, identity)
                if everything and len(document.get("leases", ())) > RENDER_IN_THREAD:
                    return Reply(await trio.to_thread.run_sync(_render, document))
                return Reply(_render(document))
            case Burst(count=count):
                ids = await self.engine.burst(count)
                return Reply.ok(" ".join([str(len(ids)), *ids]))
            case Register(name=name, ip=ip):
                interval = await self.engine.register_local(name, ip)
                return Reply.ok(f"heartbeat={interval:g}")
            case Heartbeat(name=name):
                await self.engine.heartbeat_local(name)
                return Reply.ok()
            case Deregister(name=name):
                await self.engine.deregister_local(name)
                return Reply.ok()
            case Help():
                return Reply(protocol.HELP_TEXT)
            case Quit():
                return protocol.BYE
        raise AssertionError(f"unhandled command {admitted.command!r}")


class _Timer:
    """A connection, its deadline (infinite while a request is served) and whether it waits
    for the client (what `shutdown` interrupts)."""

    __slots__ = ("connection", "deadline", "waiting")

    def __init__(self, connection: Connection, deadline: float) -> None:
        self.connection = connection
        self.deadline = deadline
        self.waiting = False


class _ConnectionLog:
    """A connection's logger, its id and peer bound at its first event: most idle connections
    log nothing, and a bound logger per connection held ~0.3 KiB of heap each (measured)."""

    __slots__ = ("_bound", "_conn", "_peer")

    def __init__(self, conn: int, peer: str) -> None:
        self._conn, self._peer = conn, peer
        self._bound: structlog.typing.FilteringBoundLogger | None = None

    @property
    def _log(self) -> structlog.typing.FilteringBoundLogger:
        if self._bound is None:
            self._bound = _log.bind(conn=self._conn, peer=self._peer)
        return self._bound

    def info(self, event: str, **kw: object) -> None:
        self._log.info(event, **kw)

    def warning(self, event: str, **kw: object) -> None:
        self._log.warning(event, **kw)

    def exception(self, event: str, **kw: object) -> None:
        self._log.exception(event, **kw)


def _render(document: object) -> str:
    return json.dumps(document, separators=(",", ":"), default=_json)


def _command(request: Request) -> Command:
    return request.command if isinstance(request, WithToken) else request


def _json(value: object) -> object:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return str(value)
