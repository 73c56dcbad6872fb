"""What a sandbox worker runs: an echo service on `worker_port` of its loopback address.

A sandbox worker is a moto instance with a 127.77.x.y address (broker/sandbox.py). Like a real
worker's job service, it answers on its port from the moment it boots until it is terminated,
so a client that connects to the worker it was handed, and the readiness probe
(`probe: true`), work as they would against EC2. The service sends back every byte it
receives: each line comes back as it was sent, and it never speaks first.

The port is bound (not listened on) when the worker's address is drawn, so an address that
another process already serves on that port is skipped; it listens once the worker boots and
closes, with every connection, when the worker is terminated or stopped.

The services run on a Trio loop of their own in a daemon thread, not on the broker's loop:
moto's request threads call `boot` and `close` (and never wait on the broker), and echo
traffic costs the broker no more than sharing the GIL does.
"""

from __future__ import annotations

import enum
import errno
import socket
import threading

import attrs
import structlog
import trio

# How long terminating a worker waits for its port to close (the services' loop answers in
# milliseconds; this only bounds a wedged loop).
CLOSE_TIMEOUT = 5.0
START_TIMEOUT = 10.0
BACKLOG = 128
RECEIVE_SIZE = 65536

_log = structlog.get_logger("broker.sandbox")


class Phase(enum.Enum):
    """A worker's port: bound, then listening from boot, then closed for good."""

    RESERVED = "reserved"
    LISTENING = "listening"
    CLOSED = "closed"


@attrs.define(eq=False)
class WorkerService:
    """One sandbox worker's port. `boot` and `close` may be called from any thread."""

    ip: str
    port: int
    _sock: socket.socket
    _token: trio.lowlevel.TrioToken
    _phase: Phase = Phase.RESERVED
    _lock: threading.Lock = attrs.Factory(threading.Lock)
    _scope: trio.CancelScope = attrs.Factory(trio.CancelScope)
    _booted: trio.Event = attrs.Factory(trio.Event)
    _done: threading.Event = attrs.Factory(threading.Event)

    @property
    def phase(self) -> Phase:
        return self._phase

    def boot(self) -> bool:
        """Start listening, if not yet; False once closed. Connections are accepted (into the
        backlog) as soon as this returns True."""
        with self._lock:
            if self._phase is Phase.RESERVED:
                try:
                    self._sock.listen(BACKLOG)
                except OSError as exc:
                    _log.warning("sandbox.worker_port_failed", ip=self.ip, error=str(exc))
                    return False
                self._phase = Phase.LISTENING
                try:  # accept now, even if the boot timer has not fired yet
                    self._token.run_sync_soon(self._booted.set)
                except trio.RunFinishedError:
                    pass
            return self._phase is Phase.LISTENING

    def close(self) -> None:
        """Stop answering: close the port and every connection to it; returns once they are
        closed. Idempotent; after it, `boot` does nothing."""
        with self._lock:
            phase, self._phase = self._phase, Phase.CLOSED
            if phase is Phase.RESERVED:
                self._sock.close()  # never handed to Trio
        if phase is Phase.CLOSED:
            return
        try:
            self._token.run_sync_soon(self._scope.cancel)
        except trio.RunFinishedError:
            self._sock.close()  # the services' loop has ended: nothing else holds it
            return
        if not self._done.wait(CLOSE_TIMEOUT):
            _log.warning("sandbox.worker_close_slow", ip=self.ip, timeout=CLOSE_TIMEOUT)

    async def run(self, boot_delay: float) -> None:
        """Wait `boot_delay` seconds, boot, serve until closed (on the services' loop)."""
        served = False
        try:
            with self._scope:
                with trio.move_on_after(boot_delay):
                    await self._booted.wait()
                if not self.boot():
                    return
                served = True
                listener = trio.SocketListener(trio.socket.from_stdlib_socket(self._sock))
                async with trio.open_nursery() as connections:
                    await trio.serve_listeners(_echo, [listener], handler_nursery=connections)
        except Exception:  # one worker's failure must not end every worker's service
            _log.exception("sandbox.worker_service_failed", ip=self.ip, port=self.port)
        finally:
            if not served:
                with self._lock:
                    self._phase = Phase.CLOSED
                    self._sock.close()
            self._done.set()


async def _echo(stream: trio.SocketStream) -> None:
    """Send back what arrives until the client closes its side."""
    try:
        while data := await stream.receive_some(RECEIVE_SIZE):
            await stream.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass  # the client went away (or the worker was terminated): nothing to answer


class WorkerServices:
    """Every sandbox worker's service, on one Trio loop in a daemon thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._reserved: dict[str, socket.socket] = {}
        self._warned = False
        self._token: trio.lowlevel.TrioToken | None = None
        self._nursery: trio.Nursery | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the loop's thread; returns once it takes workers."""
        started = threading.Event()
        self._thread = threading.Thread(
            target=trio.run, args=(self._main, started), name="sandbox-workers", daemon=True
        )
        self._thread.start()
        if not started.wait(START_TIMEOUT):
            raise RuntimeError("the sandbox workers' loop did not start")

    async def _main(self, started: threading.Event) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            self._token = trio.lowlevel.current_trio_token()
            started.set()
            await trio.sleep_forever()

    def stop(self) -> None:
        """Close every port and end the loop's thread."""
        with self._lock:
            reserved, self._reserved = list(self._reserved.values()), {}
        for sock in reserved:
            sock.close()
        if self._token is not None and self._nursery is not None:
            try:
                self._token.run_sync_soon(self._nursery.cancel_scope.cancel)
            except trio.RunFinishedError:
                pass
        if self._thread is not None:
            self._thread.join(CLOSE_TIMEOUT)

    def reserve(self, ip: str, port: int) -> bool:
        """Bind `ip`:`port` for a worker about to get that address; False when another socket
        holds it (skip that address). True without a reservation when the address cannot be
        bound at all (say, 127.77.x.y is not configured on this system): that worker will not
        answer, and a warning says so once."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.bind((ip, port))
        except OSError as exc:
            sock.close()
            if exc.errno == errno.EADDRINUSE:
                return False
            if not self._warned:
                self._warned = True
                _log.warning("sandbox.worker_port_unavailable", ip=ip, port=port, error=str(exc))
            return True
        with self._lock:
            old = self._reserved.pop(ip, None)
            self._reserved[ip] = sock
        if old is not None:
            old.close()
        return True

    def claim(self, ip: str | None, boot_delay: float) -> WorkerService | None:
        """The service of the worker that was given `ip` (reserved before), booting in
        `boot_delay` seconds; None when the address has no reservation."""
        with self._lock:
            sock = self._reserved.pop(ip, None) if ip is not None else None
        if sock is None or ip is None:
            return None
        assert self._token is not None and self._nursery is not None, "start() first"
        service = WorkerService(ip, sock.getsockname()[1], sock, self._token)
        nursery = self._nursery
        try:
            self._token.run_sync_soon(nursery.start_soon, service.run, boot_delay)
        except trio.RunFinishedError:
            service.close()
            return None
        return service
