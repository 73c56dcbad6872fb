"""Client sockets for the server: accepting, reading, writing, closing, on Trio's I/O waits.

The server spends most of a warm request here, so this is Trio's lowest level used directly:
wait until the socket is ready (`trio.lowlevel.wait_readable` / `wait_writable`), then one
non-blocking call. Against `SocketListener.accept`, `SocketStream.receive_some` and
`send_all`, that is one pass through Trio's scheduler per request instead of three, no
failed read on an idle socket (which left ~1.7 KiB of heap per idle connection behind), and
every connection waiting on a listener accepted in one go. Every wait is a checkpoint (cancel
scopes interrupt it); the server's client timeout and shutdown use `Connection.interrupt`.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Awaitable, Callable
from typing import Final

import trio

RECEIVE_SIZE: Final = 4096
ACCEPT_BATCH: Final = 64  # connections accepted per wake-up before others get the loop
# What accept(2) may report for one connection that died in the queue (Trio's own list):
# skip it and take the next.
_ABORTED: Final = frozenset(
    getattr(errno, name)
    for name in (
        "EPERM",
        "ECONNABORTED",
        "EPROTO",
        "ENETDOWN",
        "ENOPROTOOPT",
        "EHOSTDOWN",
        "ENONET",
        "EHOSTUNREACH",
        "EOPNOTSUPP",
        "ENETUNREACH",
        "ENOSR",
        "ESOCKTNOSUPPORT",
        "EPROTONOSUPPORT",
        "ETIMEDOUT",
        "ECONNRESET",
    )
    if hasattr(errno, name)
)


class ConnectionLost(Exception):
    """The client is gone (reset, broken pipe, or the socket closed)."""


class Interrupted(Exception):
    """`Connection.interrupt()` was called: the wait for the client ended (a timeout, a
    shutdown), and no other wait on this connection will start."""


class Connection:
    """One accepted client socket (non-blocking), and where it came from."""

    __slots__ = ("interrupted", "peer", "sock")

    def __init__(self, sock: socket.socket, peer: str) -> None:
        self.sock = sock
        self.peer = peer
        self.interrupted = False

    def interrupt(self) -> None:
        """End the current wait for the client, if any, and every later one, with
        `Interrupted` (what a cancel scope per connection did, at a tenth of its cost)."""
        if not self.interrupted:
            self.interrupted = True
            trio.lowlevel.notify_closing(self.sock)

    async def _wait(self, wait: Callable[[socket.socket], Awaitable[None]]) -> None:
        if self.interrupted:
            raise Interrupted
        try:
            await wait(self.sock)
        except trio.ClosedResourceError:  # notify_closing, from interrupt()
            raise Interrupted from None

    async def receive(self, *, ready: bool = False) -> bytes:
        """The next bytes from the client; b"" at its end of stream (or a reset); raises
        `Interrupted` after `interrupt()`. With
        `ready`, try a read before waiting: a new connection's first line is usually there
        already (a client connects and sends), and that saves a pass through the scheduler."""
        sock = self.sock
        if ready:
            try:
                return sock.recv(RECEIVE_SIZE)
            except BlockingIOError:
                pass
            except OSError:
                return b""
        while True:
            # _wait, inlined: an idle connection waits here, and a frame less is ~0.4 KiB less
            if self.interrupted:
                raise Interrupted
            try:
                await trio.lowlevel.wait_readable(sock)
            except trio.ClosedResourceError:  # notify_closing, from interrupt()
                raise Interrupted from None
            try:
                return sock.recv(RECEIVE_SIZE)
            except BlockingIOError:
                continue  # woken with nothing to read after all: wait again
            except OSError:
                return b""  # reset, or closed under us: the same as its end of stream

    async def send(self, data: bytes) -> None:
        """Send all of `data`, waiting while the client does not read. Raises
        `ConnectionLost`, or `Interrupted` after `interrupt()`. A reply line nearly always
        goes in one call, without a wait."""
        sock = self.sock
        view = memoryview(data)
        while view:
            try:
                sent = sock.send(view)
            except BlockingIOError:
                await self._wait(trio.lowlevel.wait_writable)
                continue
            except OSError as exc:
                raise ConnectionLost(exc.strerror or type(exc).__name__) from exc
            view = view[sent:]

    async def send_quietly(self, data: bytes, *, seconds: float = 1.0) -> None:
        """Send `data` if the client takes it within `seconds`; never raises for the client."""
        with trio.move_on_after(seconds):
            try:
                await self.send(data)
            except (ConnectionLost, Interrupted):
                pass

    def close(self) -> None:
        """Close the socket (no task waits on it: only its own handler uses it)."""
        self.sock.close()


def accepted(sock: socket.socket, address: object) -> Connection:
    """A freshly accepted socket made ready: non-blocking, Nagle off (a reply is one small
    write the client waits for)."""
    sock.setblocking(False)
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:  # some systems refuse it on a connection already reset (as Trio)
            pass
    peer = address[0] if isinstance(address, tuple) and address else "unknown"
    return Connection(sock, str(peer))


class Acceptor:
    """Accepts the connections waiting on a listener, in batches. Works on its own duplicate
    of the listening socket (`close()` closes it); the listener stays its owner's."""

    def __init__(self, listener: trio.SocketListener) -> None:
        sock = listener.socket
        self._sock = socket.fromfd(sock.fileno(), sock.family, sock.type)
        self._sock.setblocking(False)

    async def accept(self) -> list[Connection]:
        """Wait for connections; every one waiting (up to `ACCEPT_BATCH`). Connections lost in
        the queue are skipped; other errors (EMFILE, ...) are raised, unless some connections
        came first (the error comes back at the next call)."""
        own = self._sock
        while True:
            await trio.lowlevel.wait_readable(own)
            batch: list[Connection] = []
            while len(batch) < ACCEPT_BATCH:
                try:
                    sock, address = own.accept()
                except BlockingIOError:
                    break
                except OSError as exc:
                    if exc.errno in _ABORTED:
                        continue
                    if batch:
                        break
                    raise
                batch.append(accepted(sock, address))
            if batch:
                return batch

    def close(self) -> None:
        """Close the duplicate socket."""
        self._sock.close()
