"""The monitoring listener over real loopback sockets: routes, limits and the allowlist."""

from __future__ import annotations

import errno
import ipaddress
from collections.abc import AsyncIterator, Mapping
from typing import Any

import attrs
import h11
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families
from trio.testing import MockClock

from broker.metrics import CONTENT_TYPE, Metrics
from broker.monitor import Monitor, MonitorSettings, allowed, parse_listen, parse_networks
from broker.statuspage import History
from tests.test_statuspage import INTERRUPTED_IP, NOW, READY_IP, sample_status

DEADLINE = 10


@attrs.define
class Broker:
    """What the monitor asks: a STATUS document (or a failure) and the health verdict."""

    document: Mapping[str, Any] = attrs.field(factory=sample_status)
    healthy: tuple[bool, str] = (True, "ok")
    fail_status: bool = False
    status_calls: int = 0

    async def status(self) -> Mapping[str, Any]:
        self.status_calls += 1
        if self.fail_status:
            raise RuntimeError("status exploded")
        return self.document

    def health(self) -> tuple[bool, str]:
        return self.healthy


@attrs.frozen
class Running:
    monitor: Monitor
    broker: Broker
    port: int


@attrs.frozen
class HttpReply:
    status: int
    headers: dict[str, str]
    body: bytes


async def start(nursery: trio.Nursery, **settings: Any) -> Running:
    """A monitor on a free loopback port (no history sampling unless asked)."""
    broker = Broker()
    monitor = Monitor(
        MonitorSettings(**{"host": "127.0.0.1", "port": 0, "sample_interval": 0, **settings}),
        status=broker.status,
        health=broker.health,
        metrics=Metrics(),
        history=History(),
        now=lambda: NOW,
    )
    listeners = await nursery.start(monitor.run)
    return Running(monitor, broker, listeners[0].socket.getsockname()[1])


@pytest.fixture
async def running() -> AsyncIterator[Running]:
    with trio.fail_after(DEADLINE):
        async with trio.open_nursery() as nursery:
            yield await start(nursery)
            nursery.cancel_scope.cancel()


async def connect(port: int, source: str = "127.0.0.1") -> trio.SocketStream:
    """A TCP connection to the monitor from `source` (any 127/8 address is this machine)."""
    sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_STREAM)
    await sock.bind((source, 0))
    await sock.connect(("127.0.0.1", port))
    return trio.SocketStream(sock)


async def read_reply(stream: trio.SocketStream, conn: h11.Connection) -> HttpReply:
    """One whole response from `stream` as the h11 client `conn` parses it."""
    response: h11.Response | None = None
    body = bytearray()
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await stream.receive_some(65536))
        elif isinstance(event, h11.Response):
            response = event
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            assert response is not None
            headers = {k.decode(): v.decode() for k, v in response.headers}
            return HttpReply(response.status_code, headers, bytes(body))
        else:
            raise AssertionError(f"unexpected {event!r}")


async def send_request(
    stream: trio.SocketStream, conn: h11.Connection, method: str, target: str
) -> None:
    request = h11.Request(method=method, target=target, headers=[("Host", "monitor")])
    await stream.send_all(conn.send(request) + conn.send(h11.EndOfMessage()))


async def fetch(port: int, target: str = "/", method: str = "GET") -> HttpReply:
    """One request on a new connection."""
    stream = await connect(port)
    try:
        conn = h11.Connection(h11.CLIENT)
        await send_request(stream, conn, method, target)
        return await read_reply(stream, conn)
    finally:
        await stream.aclose()


async def raw_exchange(port: int, data: bytes, source: str = "127.0.0.1") -> bytes:
    """Send bytes, then read until the monitor closes; what came back (b"" if nothing)."""
    stream = await connect(port, source)
    received = bytearray()
    try:
        try:
            await stream.send_all(data)
        except trio.BrokenResourceError:
            return b""  # closed (and reset) before the request was even sent
        while chunk := await stream.receive_some(65536):
            received += chunk
    except trio.BrokenResourceError:
        pass  # a reset after the close: nothing more was coming
    finally:
        await stream.aclose()
    return bytes(received)


def samples(body: bytes) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of a /metrics body, parsed by prometheus-client's own parser."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(body.decode())
        for s in family.samples
    }


async def test_metrics_are_prometheus_text_with_counters_and_status_gauges(
    running: Running,
) -> None:
    """/metrics: the text format's content type; counters as recorded, gauges from STATUS."""
    running.monitor.metrics.request("GET_WORKER", "ok", 0.25)
    reply = await fetch(running.port, "/metrics")
    assert reply.status == 200
    assert reply.headers["content-type"] == CONTENT_TYPE
    got = samples(reply.body)
    labels = frozenset({("command", "GET_WORKER"), ("outcome", "ok")})
    assert got[("compute_broker_requests_total", labels)] == 1
    ready = frozenset({("state", "ready"), ("type", "c7i.8xlarge"), ("market", "spot")})
    assert got[("compute_broker_workers", ready)] == 2
    assert got[("compute_broker_leases", frozenset())] == 2
    assert got[("compute_broker_budget_limit_dollars", frozenset({("period", "day")}))] == 50
    assert got[("compute_broker_healthy", frozenset())] == 1
    assert running.broker.status_calls == 1  # a fresh STATUS for each scrape


async def test_healthz_is_200_ok_then_503_with_the_reason_when_health_flips(
    running: Running,
) -> None:
    """/healthz follows the health callable, and asks nothing else."""
    reply = await fetch(running.port, "/healthz")
    assert (reply.status, reply.body) == (200, b"ok\n")
    running.broker.healthy = (False, "registry: last call failed: ResourceNotFoundException")
    reply = await fetch(running.port, "/healthz")
    assert reply.status == 503
    assert reply.body == b"registry: last call failed: ResourceNotFoundException\n"
    assert running.broker.status_calls == 0


async def test_health_check_that_raises_is_unhealthy(running: Running) -> None:
    """A health callable that fails answers 503, not a crash."""

    def broken() -> tuple[bool, str]:
        raise RuntimeError("boom")

    running.monitor.health = broken
    reply = await fetch(running.port, "/healthz")
    assert (reply.status, reply.body) == (503, b"health check failed: RuntimeError\n")


async def test_status_page_is_html_with_every_worker_ip_and_no_scripts_allowed(
    running: Running,
) -> None:
    """/ is the status page of the current STATUS, served with a no-script policy."""
    reply = await fetch(running.port, "/")
    assert reply.status == 200
    assert reply.headers["content-type"] == "text/html; charset=utf-8"
    assert "default-src 'none'" in reply.headers["content-security-policy"]
    page = reply.body.decode()
    assert READY_IP in page and INTERRUPTED_IP in page


async def test_unknown_path_is_404_and_other_methods_are_405(running: Running) -> None:
    """Only /, /healthz and /metrics exist; only GET and HEAD are allowed on them."""
    assert (await fetch(running.port, "/nope")).status == 404
    assert (await fetch(running.port, "/metrics/extra")).status == 404
    post = await fetch(running.port, "/metrics", method="POST")
    assert post.status == 405
    assert post.headers["allow"] == "GET, HEAD"
    assert (await fetch(running.port, "/healthz", method="DELETE")).status == 405


async def test_head_gets_the_headers_without_the_body(running: Running) -> None:
    """HEAD / answers GET's status and length and no body."""
    reply = await fetch(running.port, "/", method="HEAD")
    assert reply.status == 200
    assert int(reply.headers["content-length"]) > 1000
    assert reply.body == b""


async def test_one_connection_serves_several_requests(running: Running) -> None:
    """A kept-alive connection (as Prometheus uses) gets a reply to each request in turn."""
    stream = await connect(running.port)
    conn = h11.Connection(h11.CLIENT)
    for target, status in (("/healthz", 200), ("/nope", 404), ("/metrics", 200)):
        await send_request(stream, conn, "GET", target)
        assert (await read_reply(stream, conn)).status == status
        conn.start_next_cycle()
    await stream.aclose()


async def test_a_failing_status_answers_500_and_the_listener_goes_on(running: Running) -> None:
    """The page's STATUS failing is that request's 500; /metrics still has the counters."""
    running.broker.fail_status = True
    assert (await fetch(running.port, "/")).status == 500
    reply = await fetch(running.port, "/metrics")
    assert reply.status == 200
    assert ("compute_broker_fallbacks_total", frozenset()) in samples(reply.body)
    running.broker.fail_status = False
    assert (await fetch(running.port, "/")).status == 200


async def test_client_outside_the_allowlist_is_closed_without_a_reply() -> None:
    """With only 127.0.0.1/32 allowed, a client from 127.0.0.2 gets nothing; 127.0.0.1 does."""
    with trio.fail_after(DEADLINE):
        async with trio.open_nursery() as nursery:
            running = await start(nursery, allow=parse_networks(["127.0.0.1/32"]))
            request = b"GET /healthz HTTP/1.1\r\nHost: m\r\nConnection: close\r\n\r\n"
            assert await raw_exchange(running.port, request, source="127.0.0.2") == b""
            allowed_reply = await raw_exchange(running.port, request, source="127.0.0.1")
            assert allowed_reply.startswith(b"HTTP/1.1 200 ")
            nursery.cancel_scope.cancel()


async def test_headers_too_large_answer_431_and_close(running: Running) -> None:
    """A request whose head exceeds max_request_bytes is refused and the connection closed."""
    big = b"GET / HTTP/1.1\r\nHost: m\r\nX-Filler: " + b"a" * 9000 + b"\r\n\r\n"
    reply = await raw_exchange(running.port, big)
    assert reply.startswith(b"HTTP/1.1 431 ")
    assert b"connection: close" in reply.lower()


async def test_body_too_large_answers_413(running: Running) -> None:
    """A body past max_request_bytes is refused, even on a GET."""
    body = b"x" * 10_000
    request = b"GET / HTTP/1.1\r\nHost: m\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    assert (await raw_exchange(running.port, request)).startswith(b"HTTP/1.1 413 ")


async def test_garbage_answers_400(running: Running) -> None:
    """Bytes that are not HTTP get a 400 and the connection is closed."""
    assert (await raw_exchange(running.port, b"HELLO\r\n\r\n")).startswith(b"HTTP/1.1 400 ")


async def test_a_silent_connection_is_closed_after_the_timeout() -> None:
    """A client that sends nothing is closed after `timeout` seconds, with no reply."""
    with trio.fail_after(DEADLINE):
        async with trio.open_nursery() as nursery:
            running = await start(nursery, timeout=0.2)
            stream = await connect(running.port)
            started = trio.current_time()
            assert await stream.receive_some(100) == b""
            assert trio.current_time() - started >= 0.2
            await stream.aclose()
            nursery.cancel_scope.cancel()


async def test_a_port_in_use_is_a_plain_oserror(running: Running) -> None:
    """Listening on a taken port raises OSError(EADDRINUSE), not an exception group."""
    taken = attrs.evolve(running.monitor.settings, port=running.port)
    second = Monitor(
        taken,
        status=running.broker.status,
        health=running.broker.health,
        metrics=Metrics(),
        history=History(),
        now=lambda: NOW,
    )
    with pytest.raises(OSError) as caught:
        await second.run()
    assert caught.value.errno == errno.EADDRINUSE


async def test_history_gets_a_sample_each_interval(autojump_clock: MockClock) -> None:
    """While the monitor runs, STATUS is sampled into the history every sample_interval."""
    broker = Broker()
    monitor = Monitor(
        MonitorSettings(port=0, sample_interval=60),
        status=broker.status,
        health=broker.health,
        metrics=Metrics(),
        history=History(),
        now=lambda: NOW + trio.current_time(),
    )
    with trio.move_on_after(60 * 3 + 30):
        await monitor.sample_history()
    kept = monitor.history.samples(NOW + trio.current_time())
    assert [s.at - NOW for s in kept] == [0, 60, 120, 180]
    assert kept[-1].run_rate == 1.8064


def test_parse_listen_accepts_host_port_forms() -> None:
    """host:port for IPv4, [IPv6]:port; anything else is a ValueError naming the value."""
    assert parse_listen("127.0.0.1:9100") == ("127.0.0.1", 9100)
    assert parse_listen("[::1]:9100") == ("::1", 9100)
    assert parse_listen("0.0.0.0:0") == ("0.0.0.0", 0)
    for bad in ("9100", ":9100", "host:", "host:http", "127.0.0.1:70000"):
        with pytest.raises(ValueError, match="host:port"):
            parse_listen(bad)


def test_allowlist_matches_networks_and_ipv4_mapped_peers() -> None:
    """Peers match by network; an IPv4 peer on a dual-stack socket matches its IPv4 net."""
    networks = parse_networks(["10.1.0.0/16", "::1", "192.0.2.7"])
    assert networks[1] == ipaddress.ip_network("::1/128")
    assert allowed("10.1.200.3", networks)
    assert allowed("::ffff:10.1.0.9", networks)
    assert allowed("::1", networks)
    assert allowed("192.0.2.7", networks)
    assert not allowed("10.2.0.1", networks)
    assert not allowed("unknown", networks)
    with pytest.raises(ValueError, match=r"10\.0\.0\.300"):
        parse_networks(["10.0.0.300/8"])
