"""The server's client sockets (broker/connection.py): reads, writes that wait for a slow
reader, end of stream, and accepting every waiting connection at once."""

from __future__ import annotations

import socket

import pytest
import trio
import trio.testing

from broker.connection import Acceptor, Connection, ConnectionLost, Interrupted


def pair() -> tuple[Connection, socket.socket]:
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    return Connection(ours, "peer"), theirs


async def test_receive_waits_for_bytes_and_reads_end_of_stream_as_empty() -> None:
    connection, client = pair()
    with client, connection.sock:
        for ready in (True, False):
            async with trio.open_nursery() as nursery:
                got: list[bytes] = []

                async def read(ready: bool = ready, got: list[bytes] = got) -> None:
                    got.append(await connection.receive(ready=ready))

                nursery.start_soon(read)
                await trio.testing.wait_all_tasks_blocked()
                assert got == []  # nothing sent yet: it waits (ready= only tries first)
                client.sendall(b"PING 10.0.0.1\n")
            assert got == [b"PING 10.0.0.1\n"]
        client.shutdown(socket.SHUT_WR)
        assert await connection.receive() == b""


async def test_a_reply_larger_than_the_socket_takes_waits_for_the_reader() -> None:
    """A send the socket cannot take at once waits until the client reads; every byte
    arrives, in order."""
    connection, client = pair()
    payload = bytes(range(256)) * 40_000  # ~10 MB: far beyond the socket buffers
    received = bytearray()
    with client, connection.sock:
        client.setblocking(False)

        async def drain() -> None:
            while len(received) < len(payload):
                await trio.lowlevel.wait_readable(client)
                received.extend(client.recv(1 << 16))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(connection.send, payload)
            await trio.testing.wait_all_tasks_blocked()
            assert not received  # the sender is blocked on a full buffer
            nursery.start_soon(drain)
    assert received == payload


async def test_a_client_that_never_reads_is_cut_off_by_the_cancel_scope() -> None:
    connection, client = pair()
    with client, connection.sock:
        with trio.move_on_after(0.2) as scope:
            await connection.send(b"x" * 10_000_000)
        assert scope.cancelled_caught


async def test_sending_to_a_closed_peer_raises_connection_lost() -> None:
    connection, client = pair()
    client.close()
    with connection.sock, pytest.raises(ConnectionLost):
        for _ in range(3):  # the first send may still land in the buffer
            await connection.send(b"OK\n")
    connection.close()
    assert connection.sock.fileno() == -1


async def test_every_waiting_connection_is_accepted_in_one_batch() -> None:
    (listener,) = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listener.socket.getsockname()[1]
    clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(5)]
    acceptor = Acceptor(listener)
    try:
        batch = await acceptor.accept()
        assert len(batch) == 5
        assert {c.peer for c in batch} == {"127.0.0.1"}
        for connection in batch:
            assert connection.sock.getblocking() is False
            assert connection.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
            connection.close()
    finally:
        acceptor.close()
        for client in clients:
            client.close()
        await listener.aclose()


async def test_interrupt_ends_a_waiting_receive_or_send_and_every_later_wait() -> None:
    """What the client timeout and shutdown use: the wait in progress ends with
    `Interrupted`, and so does any later one; data already there is still read."""
    connection, client = pair()
    with client, connection.sock:
        outcome: list[str] = []

        async def wait_for_a_line() -> None:
            try:
                await connection.receive()
            except Interrupted:
                outcome.append("interrupted")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(wait_for_a_line)
            await trio.testing.wait_all_tasks_blocked()
            connection.interrupt()
        assert outcome == ["interrupted"]
        with pytest.raises(Interrupted):
            await connection.send(b"x" * 10_000_000)  # would have to wait: interrupted
        client.sendall(b"QUIT\n")
        assert await connection.receive(ready=True) == b"QUIT\n"  # no wait needed
