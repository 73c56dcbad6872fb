"""The server over real loopback sockets, with the in-memory cloud and real (short) time."""

from __future__ import annotations

import json
import socket
import struct
from collections.abc import AsyncIterator

import pytest
import structlog
import trio

from broker.clock import Clock
from broker.protocol import HELP_TEXT
from tests.engines import make_engine
from tests.fakes import FakeCloud
from tests.harness import LineClient, RunningBroker, ask_once, running_broker, wait_for
from tests.test_protocol import tls_client_hello

FAST = {"describe_interval": 0.02, "launch_timeout": 20.0}  # real time: poll EC2 often


@pytest.fixture
async def broker() -> AsyncIterator[RunningBroker]:
    cloud = FakeCloud(Clock(), boot_time=0.1)
    async with running_broker(make_engine(cloud, **FAST), client_timeout=1.0) as running:
        with trio.fail_after(20):
            yield running


def cloud_of(broker: RunningBroker) -> FakeCloud:
    cloud = broker.engine.cloud
    assert isinstance(cloud, FakeCloud)
    return cloud


async def test_every_command_on_one_persistent_connection(broker: RunningBroker) -> None:
    """GET_WORKER, PING, STATUS, BURST, HELP, RELEASE, QUIT on one connection, in order."""
    client = await LineClient.connect(broker.port)
    ip = await client.ask("GET_WORKER")
    assert ip.startswith("198.51.100.")
    assert await client.ask("PING " + ip) == "OK"
    status = json.loads(await client.ask("STATUS"))
    assert status["workers"][0]["ip"] == ip
    assert status["leases"][0]["client"] == "127.0.0.1"
    burst = (await client.ask("BURST 2")).split()
    assert burst[:2] == ["OK", "2"]
    assert len(burst) == 4
    assert await client.ask("HELP") == HELP_TEXT
    assert await client.ask("RELEASE " + ip) == "OK"
    assert await client.ask("PING " + ip) == "ERROR: Worker not found"
    assert await client.ask("QUIT") == "OK bye"
    assert await client.at_eof()


async def test_seed_one_shot_clients_work_byte_for_byte(broker: RunningBroker) -> None:
    """One request per connection, as the seed's Tcl and Python snippets do."""
    ip = await ask_once(broker.port, "GET_WORKER")
    assert await ask_once(broker.port, "") == ip
    assert await ask_once(broker.port, f"PING {ip}") == "OK"
    assert await ask_once(broker.port, "FROB") == "ERROR: Unknown command"
    assert await ask_once(broker.port, f"RELEASE {ip}") == "OK"
    assert await ask_once(broker.port, "RELEASE 203.0.113.7") == "ERROR: Worker not found"


async def test_release_sent_without_reading_the_reply_still_releases(
    broker: RunningBroker,
) -> None:
    """The seed Python client sends RELEASE and closes at once; the worker is still released."""
    ip = await ask_once(broker.port, "GET_WORKER")
    stream = await trio.open_tcp_stream("127.0.0.1", broker.port)
    await stream.send_all(f"RELEASE {ip}\n".encode())
    await stream.aclose()
    await wait_for(lambda: cloud_of(broker).alive() == [])


async def test_half_closed_client_gets_its_reply(broker: RunningBroker) -> None:
    """`nc -N`: the client shuts its write side after the request and still reads the reply."""
    stream = await trio.open_tcp_stream("127.0.0.1", broker.port)
    await stream.send_all(b"HELP")  # no LF either: the EOF ends the line
    await stream.send_eof()
    data = b""
    while chunk := await stream.receive_some(4096):
        data += chunk
    assert data == HELP_TEXT.encode() + b"\n"


async def test_connection_closed_without_a_line_launches_nothing(broker: RunningBroker) -> None:
    """A port check is not a GET_WORKER (the seed launched a worker for it)."""
    for _ in range(5):
        stream = await trio.open_tcp_stream("127.0.0.1", broker.port)
        await stream.aclose()
    assert await ask_once(broker.port, "STATUS")
    assert cloud_of(broker).launch_calls == []


async def test_pipelined_requests_are_answered_in_order(broker: RunningBroker) -> None:
    """Several lines in one packet: one reply each, in request order."""
    client = await LineClient.connect(broker.port)
    await client.send(b"HELP\r\nPING 203.0.113.1\nFROB\n")
    assert [await client.readline() for _ in range(3)] == [
        HELP_TEXT.encode(),
        b"ERROR: Worker not found",
        b"ERROR: Unknown command",
    ]


async def test_line_too_long_is_answered_and_the_connection_closed(broker: RunningBroker) -> None:
    """Over 1 KiB: `ERROR: line too long`, then the broker closes; other clients unaffected."""
    other = await LineClient.connect(broker.port)
    client = await LineClient.connect(broker.port)
    await client.send(b"GET_WORKER " + b"x" * 2000 + b"\n")
    assert await client.readline() == b"ERROR: line too long"
    assert await client.at_eof()
    assert await other.ask("HELP") == HELP_TEXT
    assert cloud_of(broker).launch_calls == []


@pytest.mark.parametrize(
    ("opening", "kind"),
    [
        (
            b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1:9000\r\nUser-Agent: Prometheus/2.53.0\r\n"
            b"Accept: text/plain;version=0.0.4\r\n\r\n",
            "HTTP",
        ),
        (tls_client_hello(), "TLS"),
        (b"SSH-2.0-OpenSSH_9.6p1 Ubuntu-3ubuntu13\r\n", "SSH"),
    ],
    ids=["http", "tls", "ssh"],
)
async def test_http_tls_and_ssh_openings_get_one_error_line_and_launch_nothing(
    broker: RunningBroker, opening: bytes, kind: str
) -> None:
    """A Prometheus scrape, a TLS ClientHello or an SSH banner: one ERROR line naming the
    protocol, the connection closed, no worker launched (the scrape's empty line is no
    GET_WORKER)."""
    client = await LineClient.connect(broker.port)
    with structlog.testing.capture_logs() as logs:
        await client.send(opening)
        reply = await client.readline()
        assert await client.at_eof()
    assert reply == f"ERROR: not a compute-broker client ({kind}); see protocol.md".encode()
    bad_lines = [event["reason"] for event in logs if event["event"] == "client.bad_line"]
    assert bad_lines == [f"{kind.lower()} probe"]
    status = json.loads(await ask_once(broker.port, "STATUS"))
    assert status["workers"] == []
    assert status["totals"]["launches_in_flight"] == 0
    assert cloud_of(broker).launch_calls == []


async def test_non_utf8_gets_an_error_and_the_connection_goes_on(broker: RunningBroker) -> None:
    """Invalid UTF-8 is answered; the next request on the same connection works."""
    client = await LineClient.connect(broker.port)
    await client.send(b"\xff\xfe\xfd\n")
    assert await client.readline() == b"ERROR: line is not valid UTF-8"
    assert await client.ask("HELP") == HELP_TEXT


async def test_silent_connection_is_closed_after_client_timeout(broker: RunningBroker) -> None:
    """No complete line within client_timeout (1 s here): the broker hangs up, no reply."""
    client = await LineClient.connect(broker.port)
    await client.send(b"GET_WOR")
    start = trio.current_time()
    assert await client.readline() == b""
    assert 0.9 <= trio.current_time() - start < 5
    assert cloud_of(broker).launch_calls == []


async def test_a_client_that_stops_reading_is_closed_after_client_timeout(
    broker: RunningBroker,
) -> None:
    """Replies the client never reads fill the socket: the broker gives up on the send after
    client_timeout (1 s here) and closes, logging client.timeout."""
    client = await LineClient.connect(broker.port)
    with structlog.testing.capture_logs() as logs:
        await client.send(b"HELP\n" * 20_000)  # ~30 MB of replies, never read
        await wait_for(lambda: broker.server.open_connections == 0, timeout=10)
    assert [e["event"] for e in logs if e["event"] == "client.timeout"] == ["client.timeout"]


async def test_closed_connections_leave_no_timer_behind() -> None:
    """A churn of one-shot clients leaves no timer in the server's set: only open
    connections are checked for their client_timeout."""
    engine = make_engine(FakeCloud(Clock(), boot_time=0.1), **FAST)
    async with running_broker(engine, client_timeout=3600.0) as broker:
        for _ in range(300):
            assert await ask_once(broker.port, "HELP") == HELP_TEXT
        await wait_for(lambda: broker.server.open_connections == 0)
        assert broker.server._timers == set()


async def test_two_hundred_silent_connections_do_not_delay_a_request(
    broker: RunningBroker,
) -> None:
    """Idle connections cost nothing: a normal request is answered at once."""
    silent = [await LineClient.connect(broker.port) for _ in range(200)]
    await wait_for(lambda: broker.server.open_connections == 200)
    start = trio.current_time()
    assert await ask_once(broker.port, "HELP") == HELP_TEXT
    assert trio.current_time() - start < 0.5
    for client in silent:
        await client.aclose()


async def test_connections_over_the_cap_are_refused_politely() -> None:
    """Past max_connections a new client gets `ERROR: too many connections`, then close."""
    engine = make_engine(FakeCloud(Clock(), boot_time=0.1), **FAST)
    async with running_broker(engine, max_connections=3) as broker:
        held = [await LineClient.connect(broker.port) for _ in range(3)]
        await wait_for(lambda: broker.server.open_connections == 3)
        extra = await LineClient.connect(broker.port)
        assert await extra.readline() == b"ERROR: too many connections"
        assert await extra.at_eof()
        assert await held[0].ask("HELP") == HELP_TEXT


async def test_a_crash_while_serving_one_client_reaches_no_other(
    broker: RunningBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug in one request is logged and answered with one ERROR line; the server lives on."""

    def broken_status() -> dict[str, object]:
        raise RuntimeError("bug")

    bystander = await LineClient.connect(broker.port)
    monkeypatch.setattr(broker.engine, "status", broken_status)
    with structlog.testing.capture_logs() as logs:
        reply = await ask_once(broker.port, "STATUS")
    assert reply == "ERROR: internal error (logged by the broker)"
    assert "Traceback" not in reply
    assert any(event["event"] == "connection.crashed" for event in logs)
    assert await bystander.ask("HELP") == HELP_TEXT
    assert await ask_once(broker.port, "HELP") == HELP_TEXT


async def test_concurrent_cold_storm_over_tcp_launches_once(broker: RunningBroker) -> None:
    """50 one-shot clients at once on an empty pool: one launch, one IP for all."""
    replies: list[str] = []

    async def client() -> None:
        replies.append(await ask_once(broker.port, "GET_WORKER"))

    async with trio.open_nursery() as nursery:
        for _ in range(50):
            nursery.start_soon(client)
    assert len(cloud_of(broker).launch_calls) == 1
    assert len(set(replies)) == 1


async def test_shutdown_lets_the_current_request_finish_and_closes_idle_connections() -> None:
    """After shutdown(): idle connections close, a request in progress gets its reply."""
    cloud = FakeCloud(Clock(), boot_time=0.5)
    async with running_broker(make_engine(cloud, **FAST)) as broker:
        idle = await LineClient.connect(broker.port)
        busy = await LineClient.connect(broker.port)
        await busy.send(b"GET_WORKER\n")
        await wait_for(lambda: bool(cloud.launch_calls))
        await broker.server.shutdown()
        assert await idle.at_eof()
        assert (await busy.readline()).startswith(b"198.51.100.")
        assert await busy.at_eof()
        with trio.fail_after(5):
            await broker.server.wait_closed()


async def test_abandoned_get_worker_leaves_no_lease(broker: RunningBroker) -> None:
    """A client that resets the connection while waiting (Ctrl-C) does not keep a lease."""
    sock = trio.socket.socket()
    await sock.connect(("127.0.0.1", broker.port))
    await sock.send(b"GET_WORKER client=gone\n")
    await wait_for(lambda: bool(cloud_of(broker).launch_calls))
    # SO_LINGER 0: close() sends RST, so the broker's reply fails as it would after Ctrl-C.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()
    await wait_for(lambda: bool(broker.engine.pool.workers))
    await wait_for(
        lambda: not any(w.state == "launching" for w in broker.engine.pool.workers.values())
    )
    await wait_for(lambda: broker.engine.pool.leases == {})
    assert len(broker.engine.pool.workers) == 1


async def test_trickling_bytes_does_not_extend_client_timeout(broker: RunningBroker) -> None:
    """A line sent one byte at a time must still be complete within client_timeout (1 s)."""
    client = await LineClient.connect(broker.port)
    start = trio.current_time()
    with trio.move_on_after(5):
        for byte in b"STATUS-and-more-and-more":
            try:
                await client.send(bytes([byte]))
            except trio.BrokenResourceError:
                break
            await trio.sleep(0.2)
    assert await client.readline() == b""
    assert trio.current_time() - start < 2


async def test_budget_refusal_reaches_the_client_as_one_error_line() -> None:
    """Over max_hourly_cost, GET_WORKER answers `ERROR: budget: ...` naming the numbers."""
    engine = make_engine(FakeCloud(Clock(), boot_time=0.05), **FAST, max_hourly_cost=0.4)
    async with running_broker(engine) as broker:
        reply = await ask_once(broker.port, "GET_WORKER")
    assert reply == (
        "ERROR: budget: launching one c7i.8xlarge spot ($0.5/h) would raise the run rate "
        "from $0/h to $0.5/h, above max_hourly_cost $0.4/h"
    )
