"""The floor: servers that do nothing but the wire, to measure the broker against.

    .venv/bin/python bench/floor.py trio [--port 0] [--cpu 0]
    .venv/bin/python bench/floor.py seed [--port 0] [--cpu 0] [--backlog 128]

- `trio`: a bare Trio line server. One task per connection; it reads lines and answers each
  with a fixed IP, nothing else (no parsing, no logging, no state). No Trio broker can be
  faster than this on the same machine, so broker/floor is the broker's efficiency.
- `trio-direct`: the same line server on the broker's own socket layer (broker/connection.py:
  accept every waiting connection at once, wait until readable then read, write directly).
  The broker is measured against `trio`, as issue #12 asks; this one shows how much of the
  difference is the I/O technique and how much the broker's work per request.
- `seed`: the seed guide's server pattern (its "Full Broker Code"), without AWS: a blocking
  accept loop, a thread per connection, one `recv(1024)`, one reply, close. It serves one
  request per connection, as the seed's clients (one-shot) expect; its backlog is 128, not
  the seed's 5, so 50 concurrent connects measure the pattern rather than SYN retries
  (`--backlog 5` to see those).

Each prints `listening on HOST:PORT` (flushed) once it accepts connections, like
`compute-broker serve`, and runs until SIGTERM or SIGINT. Loopback only.
"""

from __future__ import annotations

import argparse
import functools
import os
import signal
import socket
import sys
import threading
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the broker's package
from broker.connection import Acceptor, Connection, ConnectionLost

HOST = "127.0.0.1"
REPLY = b"127.77.0.1\n"  # what a warm GET_WORKER answers in the sandbox


def _complete_lines(buffer: bytes) -> tuple[int, bytes]:
    """How many complete lines `buffer` holds, and what follows the last one."""
    lines = buffer.count(b"\n")
    return lines, buffer[buffer.rindex(b"\n") + 1 :] if lines else buffer


async def _serve_line_client(stream: trio.SocketStream) -> None:
    buffer = b""
    try:
        while True:
            data = await stream.receive_some(4096)
            if not data:
                return
            lines, buffer = _complete_lines(buffer + data)
            if lines:
                await stream.send_all(REPLY * lines)
    except trio.BrokenResourceError:
        return
    finally:
        await stream.aclose()


async def _serve_direct_client(connection: Connection) -> None:
    buffer = b""
    first = True
    try:
        while True:
            data = await connection.receive(ready=first)
            first = False
            if not data:
                return
            lines, buffer = _complete_lines(buffer + data)
            if lines:
                await connection.send(REPLY * lines)
    except ConnectionLost:
        return
    finally:
        connection.close()


async def serve_trio_direct(port: int) -> None:
    (listener,) = await trio.open_tcp_listeners(port, host=HOST)
    host, bound = listener.socket.getsockname()[:2]
    acceptor = Acceptor(listener)
    print(f"listening on {host}:{bound}", flush=True)
    async with trio.open_nursery() as nursery:

        async def accept_forever() -> None:
            while True:
                for connection in await acceptor.accept():
                    nursery.start_soon(_serve_direct_client, connection)

        nursery.start_soon(accept_forever)
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for _ in signals:
                break
        nursery.cancel_scope.cancel()
    acceptor.close()
    await listener.aclose()


async def serve_trio(port: int) -> None:
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            functools.partial(trio.serve_tcp, _serve_line_client, port, host=HOST)
        )
        host, bound = listeners[0].socket.getsockname()[:2]
        print(f"listening on {host}:{bound}", flush=True)
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for _ in signals:
                break
        nursery.cancel_scope.cancel()


def _seed_handle(conn: socket.socket) -> None:
    try:
        conn.recv(1024)
        conn.send(REPLY)
    except OSError:
        pass
    finally:
        conn.close()


def serve_seed(port: int, backlog: int) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((HOST, port))
    sock.listen(backlog)
    host, bound = sock.getsockname()[:2]
    print(f"listening on {host}:{bound}", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        while True:
            conn, _ = sock.accept()
            threading.Thread(target=_seed_handle, args=(conn,), daemon=True).start()
    except KeyboardInterrupt:
        pass
    finally:
        sock.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=["trio", "trio-direct", "seed"])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--cpu", type=int, help="pin this process to this CPU")
    parser.add_argument("--backlog", type=int, default=128, help="seed: listen() backlog")
    args = parser.parse_args()
    if args.cpu is not None:
        os.sched_setaffinity(0, {args.cpu})
    if args.kind == "trio":
        trio.run(serve_trio, args.port)
    elif args.kind == "trio-direct":
        trio.run(serve_trio_direct, args.port)
    else:
        serve_seed(args.port, args.backlog)


if __name__ == "__main__":
    main()
