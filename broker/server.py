"""The TCP server: Trio I/O only. Reads lines, asks the engine, writes replies.

One task per connection. A handler's failure is logged and answered with one `ERROR` line;
it never reaches another connection or the listener. `shutdown()` stops accepting and closes
idle connections; requests in progress go on to their reply (the CLI bounds how long).
"""

from __future__ import annotations

import errno
import heapq
import itertools
import json
import math
from typing import Final

import attrs
import structlog
import trio

from broker import protocol
from broker.access import Role, Session, redact_status
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

RECEIVE_SIZE: Final = 4096
ACCEPT_RETRY_SECONDS: Final = 0.1  # after EMFILE/ENFILE/ENOMEM/ENOBUFS on accept
_ACCEPT_RESOURCE_ERRORS: Final = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}
INTERNAL_ERROR: Final = Reply.error("internal error (logged by the broker)")
# A name for every connection's task: without one Trio formats one per task (~70 bytes each).
HANDLER_TASK_NAME: Final = "broker.server.Server._handle"
RENDER_IN_THREAD: Final = 1000  # leases above which STATUS all is rendered off the event loop
PRUNE_SLACK: Final = 1000  # closed connections' deadlines kept beyond twice the open ones


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
        self._deadlines: list[tuple[float, int, _Deadline]] = []  # a heap, one per connection
        self._deadline_order = itertools.count()
        self._deadline_added = trio.Event()
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
        async with trio.open_nursery() as handlers:
            with self._accept_scope:
                async with trio.open_nursery() as acceptors:
                    for listener in listeners:
                        acceptors.start_soon(self._accept_loop, listener, handlers)
                    acceptors.start_soon(self._time_out_idle)
                    task_status.started(listeners)
            for listener in listeners:
                await listener.aclose()

    async def shutdown(self) -> None:
        """Stop accepting; close idle connections; requests in progress go on to their reply."""
        self._draining = True
        self._accept_scope.cancel()
        for _, _, deadline in self._deadlines:
            if deadline.waiting:
                deadline.end()
        self._check_idle()

    async def wait_closed(self) -> None:
        """After `shutdown()`: wait until every connection has closed."""
        await self._all_closed.wait()

    async def _time_out_idle(self) -> None:
        """End each connection that waits for a line past its deadline (client_timeout). One
        task for the server, not a cancel scope per connection: a scope held ~0.8 KiB of
        Trio's state per idle connection (measured)."""
        heap = self._deadlines
        while True:
            if not heap:
                self._deadline_added = trio.Event()
                await self._deadline_added.wait()
                continue
            await trio.sleep_until(heap[0][0])
            now = trio.current_time()
            while heap and heap[0][0] <= now:
                _, _, deadline = heapq.heappop(heap)
                if deadline.closed:
                    continue
                if deadline.at <= now and deadline.waiting:
                    deadline.end()
                    continue
                # Not due yet, or busy (a request, or a reply's send under its own deadline):
                # look again at its deadline, or a client_timeout from now while it is busy.
                # An entry is never later than its connection's deadline, so none is missed.
                due = now < deadline.at < math.inf
                later = deadline.at if due else now + self.settings.client_timeout
                heapq.heappush(heap, (later, next(self._deadline_order), deadline))

    def _track(self, deadline: _Deadline) -> None:
        """Add a new connection's deadline; drop closed connections' entries once they are
        more than half the heap (each stays until its time otherwise)."""
        heap = self._deadlines
        if len(heap) > 2 * self.open_connections + PRUNE_SLACK:
            heap[:] = [entry for entry in heap if not entry[2].closed]
            heapq.heapify(heap)
        heapq.heappush(heap, (deadline.at, next(self._deadline_order), deadline))
        self._deadline_added.set()

    def _check_idle(self) -> None:
        if self._draining and self.open_connections == 0:
            self._all_closed.set()

    async def _accept_loop(self, listener: trio.SocketListener, handlers: trio.Nursery) -> None:
        while True:
            try:
                stream = await listener.accept()
            except OSError as exc:
                if exc.errno in _ACCEPT_RESOURCE_ERRORS:
                    _log.error("accept.failed", error=str(exc), retry_in=ACCEPT_RETRY_SECONDS)
                    await trio.sleep(ACCEPT_RETRY_SECONDS)
                    continue
                raise
            handlers.start_soon(self._handle, stream, name=HANDLER_TASK_NAME)

    async def _handle(self, stream: trio.SocketStream) -> None:
        """One connection from accept to close, in this one coroutine: a second one awaited
        from it (the read loop was one) held ~0.25 KiB more per idle connection (measured)."""
        peer = _peer_host(stream)
        log = _ConnectionLog(next(self._ids), peer)
        self.open_connections += 1
        metrics = self.engine.metrics
        metrics.connection_opened()
        try:
            if self.open_connections > self.settings.max_connections:
                log.warning("connection.refused", reason="too many connections")
                metrics.connection_refused("too_many_connections")
                await _send_quietly(stream, protocol.TOO_MANY_CONNECTIONS)
                return
            session = self.gate.open(peer, self.engine.pool)
            if isinstance(session, str):
                metrics.connection_refused("limit" if session else "not_allowed")
                if session:
                    await _send_quietly(stream, Reply(session, close=True))
                return
            reader = LineReader()
            # The connection's deadline bounds each wait for a complete line (set when the
            # connection opens and after each reply, not per chunk, so trickling bytes does not
            # extend it) and each reply's send (a client that stops reading); it is infinite
            # while a request is served, since a launch takes minutes. `_time_out_idle` keeps
            # the waits' deadlines, `_answer` the sends'.
            deadline = _Deadline(stream, trio.current_time() + self.settings.client_timeout)
            self._track(deadline)
            try:
                while True:
                    event = reader.next_request()
                    if isinstance(event, NeedData):
                        if self._draining:
                            return
                        deadline.waiting = True
                        try:
                            # Wait first, then read: a read tried on an idle socket fails and
                            # leaves ~1.7 KiB of heap per idle connection (measured).
                            await trio.lowlevel.wait_readable(stream.socket)
                            # Ended as it woke, its wait no longer there to be woken: no read
                            # (one that found nothing would wait on, past its deadline).
                            data = b""
                            if not deadline.ended:
                                data = await stream.receive_some(RECEIVE_SIZE)
                        except (trio.BrokenResourceError, trio.ClosedResourceError):
                            data = b""
                        finally:
                            deadline.waiting = False
                        if deadline.ended:
                            break  # the deadline or shutdown came as the data did: serve nothing
                        reader.receive_data(data)
                        continue
                    if isinstance(event, Closed):
                        return
                    deadline.at = math.inf
                    if not await self._answer(stream, event, session, log, deadline):
                        break
                if deadline.ended and not self._draining:
                    log.info("client.timeout", after_seconds=self.settings.client_timeout)
            finally:
                deadline.closed = True
                self.gate.close(peer)
        except Exception:
            log.exception("connection.crashed")
            await _send_quietly(stream, INTERNAL_ERROR)
        finally:
            self.open_connections -= 1
            metrics.connection_closed()
            self._check_idle()
            await stream.aclose()

    async def _answer(
        self,
        stream: trio.SocketStream,
        event: Request | BadRequest,
        session: Session,
        log: _ConnectionLog,
        deadline: _Deadline,
    ) -> bool:
        """Serve one request and send its reply; False when the connection is to close."""
        started = trio.current_time()
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
            seconds = trio.current_time() - started
            log.info("request", command=name, reply=reply.text[:80], ms=round(seconds * 1000, 3))
            self.engine.metrics.request(name, outcome_of(reply.text), seconds)
        deadline.at = trio.current_time() + self.settings.client_timeout
        try:
            with trio.move_on_at(deadline.at) as sending:
                await stream.send_all(reply.to_bytes())
            if sending.cancelled_caught:
                deadline.ended = True  # the client stopped reading
                return False
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            log.info("client.gone", error=str(exc) or type(exc).__name__)
            if admitted is not None and handout is not None:
                await self.engine.undeliverable(handout, admitted.owner)
            return False
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


class _Deadline:
    """A connection's deadline (trio time; inf while a request is served) and where it is."""

    __slots__ = ("at", "closed", "ended", "stream", "waiting")

    def __init__(self, stream: trio.SocketStream, at: float) -> None:
        self.stream, self.at = stream, at
        self.waiting = self.ended = self.closed = False

    def end(self) -> None:
        """Wake the connection's wait for a line (ClosedResourceError): it is to close."""
        self.ended = True
        trio.lowlevel.notify_closing(self.stream.socket)


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


def _peer_host(stream: trio.SocketStream) -> str:
    try:
        return str(stream.socket.getpeername()[0])
    except OSError:
        return "unknown"


def _json(value: object) -> object:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return str(value)


async def _send_quietly(stream: trio.SocketStream, reply: Reply) -> None:
    with trio.move_on_after(1):
        try:
            await stream.send_all(reply.to_bytes())
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
