"""Helpers for tests that run a broker in-process and talk to it over real TCP sockets, and the
one way tests wait for a condition: `wait_for` (in Trio) and `wait_for_blocking` (in plain
threads, e.g. against a subprocess)."""

from __future__ import annotations

import inspect
import re
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import TypeVar

import attrs
import trio

from broker.engine import Engine
from broker.server import Server, ServerSettings

T = TypeVar("T")

_LISTENING = re.compile(r"listening on 127\.0\.0\.1:(\d+)\n")


def listening_port(proc: subprocess.Popen[str], timeout: float) -> int | None:
    """The port a `compute-broker serve --port 0` subprocess prints on stdout once it
    listens; None if it does not within `timeout` (read on a thread, so a broker that never
    prints cannot hang the caller)."""
    found: list[int] = []

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            match = _LISTENING.fullmatch(line)
            if match:
                found.append(int(match.group(1)))
                return

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout)
    return found[0] if found else None


@attrs.frozen
class RunningBroker:
    server: Server
    engine: Engine
    port: int


@asynccontextmanager
async def running_broker(
    engine: Engine, **settings: float | int | str
) -> AsyncIterator[RunningBroker]:
    """Run `engine` and a server on a free loopback port for the duration of the block."""
    async with trio.open_nursery() as nursery:
        await nursery.start(engine.run)
        server = Server(engine, ServerSettings(host="127.0.0.1", port=0, **settings))  # type: ignore[arg-type]
        listeners = await nursery.start(server.run)
        port = listeners[0].socket.getsockname()[1]
        yield RunningBroker(server, engine, port)
        nursery.cancel_scope.cancel()


class LineClient:
    """A persistent connection: send lines, read reply lines."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self._buffer = bytearray()

    @classmethod
    async def connect(cls, port: int) -> LineClient:
        return cls(await trio.open_tcp_stream("127.0.0.1", port))

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def readline(self) -> bytes:
        """One reply line without its LF; b"" if the broker closed the connection."""
        while b"\n" not in self._buffer:
            chunk = await self.stream.receive_some(4096)
            if not chunk:
                return b""
            self._buffer += chunk
        line, _, rest = bytes(self._buffer).partition(b"\n")
        self._buffer[:] = rest
        return line

    async def ask(self, line: str) -> str:
        await self.send(line.encode() + b"\n")
        return (await self.readline()).decode()

    async def at_eof(self) -> bool:
        """True once the broker has closed its side."""
        return await self.readline() == b"" and not self._buffer

    async def aclose(self) -> None:
        await self.stream.aclose()


async def ask_once(port: int, line: str) -> str:
    """One-shot: connect, send one line, read one reply, close (the seed clients' way)."""
    client = await LineClient.connect(port)
    try:
        return await client.ask(line)
    finally:
        await client.aclose()


async def wait_for(
    condition: Callable[[], T | Awaitable[T]],
    timeout: float = 10.0,
    *,
    poll: float = 0.01,
    what: str = "the condition",
) -> T:
    """Call `condition` (plain or async) until it returns something truthy; return that.

    Fails with AssertionError after `timeout` seconds of Trio's clock (virtual seconds under
    MockClock)."""
    with trio.move_on_after(timeout):
        while True:
            result = condition()
            if inspect.isawaitable(result):
                result = await result
            if result:
                return result  # type: ignore[return-value]
            await trio.sleep(poll)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def wait_for_blocking(
    condition: Callable[[], T],
    timeout: float = 15.0,
    *,
    poll: float = 0.05,
    what: str = "the condition",
) -> T:
    """`wait_for` outside Trio: poll `condition` in this thread until it returns something
    truthy; return that. Fails with AssertionError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(poll)
