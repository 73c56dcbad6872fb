"""The Python client against stub servers: wire format, replies, errors, timeouts, worker()."""

from __future__ import annotations

import logging
import random
import socket
import threading
import time
from typing import Any

import pytest
from pyclient_support import HANG, STUB_HELP, STUB_IP, STUB_STATUS, StubBroker, silent_listener

import compute_broker_client
from compute_broker_client import (
    BrokerClient,
    BrokerError,
    BrokerProtocolError,
    BrokerTimeout,
    BrokerUnavailable,
    ClientError,
)

# -- requests on the wire -------------------------------------------------------------------


def test_get_worker_sends_bare_request_with_client_id(
    stub: StubBroker, stub_client: BrokerClient
) -> None:
    """get_worker() sends `GET_WORKER client=ID` and returns the IP."""
    assert stub_client.get_worker() == STUB_IP
    assert stub.lines == ["GET_WORKER client=tester"]


def test_get_worker_sends_type_market_and_wait(stub: StubBroker, stub_client: BrokerClient) -> None:
    """type, market and wait go out as key=value words; whole seconds without a decimal point."""
    stub_client.get_worker(type="c7i.8xlarge", market="on-demand", wait=30)
    stub_client.get_worker(wait=2.5)
    assert stub.lines == [
        "GET_WORKER type=c7i.8xlarge market=on-demand wait=30 client=tester",
        "GET_WORKER wait=2.5 client=tester",
    ]


def test_empty_client_id_sends_no_client_word(stub: StubBroker) -> None:
    """client_id="" leaves identity to the broker (peer IP): no client= word at all."""
    client = BrokerClient(stub.host, stub.port, client_id="")
    client.get_worker()
    client.ping(STUB_IP)
    client.release(STUB_IP)
    assert stub.lines == ["GET_WORKER", f"PING {STUB_IP}", f"RELEASE {STUB_IP}"]


def test_ping_and_release_send_ip_and_client(stub: StubBroker, stub_client: BrokerClient) -> None:
    """ping() and release() send the IP and client id and return None on OK."""
    assert stub_client.ping(STUB_IP) is None  # type: ignore[func-returns-value]
    assert stub_client.release(STUB_IP) is None  # type: ignore[func-returns-value]
    assert stub.lines == [f"PING {STUB_IP} client=tester", f"RELEASE {STUB_IP} client=tester"]


def test_status_returns_parsed_json(stub: StubBroker, stub_client: BrokerClient) -> None:
    """status() sends STATUS and returns the JSON object as a dict."""
    assert stub_client.status() == STUB_STATUS
    assert stub.lines == ["STATUS"]


def test_burst_returns_instance_ids(stub: StubBroker, stub_client: BrokerClient) -> None:
    """burst(n) sends BURST n and returns the ids listed after `OK k`."""
    assert stub_client.burst(2) == ["i-0a1", "i-0b2"]
    assert stub.lines == ["BURST 2"]


def test_burst_accepts_1_to_max_burst(stub: StubBroker, stub_client: BrokerClient) -> None:
    """burst() sends any n from 1 to MAX_BURST (100, the broker's limit) as it is."""
    stub_client.burst(1)
    stub_client.burst(compute_broker_client.MAX_BURST)
    assert stub.lines == ["BURST 1", "BURST 100"]


def test_help_returns_the_reply_line(stub: StubBroker, stub_client: BrokerClient) -> None:
    """help() returns the broker's HELP line as it is."""
    assert stub_client.help() == STUB_HELP


def test_crlf_and_blanks_around_reply_are_stripped(
    stub: StubBroker, stub_client: BrokerClient
) -> None:
    """A reply ending in CRLF, or padded with blanks, still reads as its value."""
    stub.respond = lambda line: f"  {STUB_IP} \r"
    assert stub_client.get_worker() == STUB_IP


def test_last_line_without_lf_before_close_is_the_reply(
    stub: StubBroker, stub_client: BrokerClient
) -> None:
    """A broker that closes right after a reply without its LF is still understood."""
    stub.respond = lambda line: b"OK"
    stub_client.ping(STUB_IP)


def test_reply_split_across_packets_is_joined() -> None:
    """A reply line that arrives in several TCP segments is read whole."""
    listener = silent_listener()
    port = listener.getsockname()[1]

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.recv(1024)
            conn.sendall(b"127.77.")
            time.sleep(0.05)  # let the first segment go out on its own
            conn.sendall(b"0.9\n")
            conn.recv(1024)

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    try:
        assert BrokerClient("127.0.0.1", port, timeout=5).get_worker() == STUB_IP
    finally:
        server.join(5)
        listener.close()


# -- arguments checked before sending -------------------------------------------------------


@pytest.mark.parametrize(
    "call",
    [
        lambda c: c.get_worker(type="c7i.large\nRELEASE 127.77.0.9"),
        lambda c: c.get_worker(market="spot on-demand"),
        lambda c: c.get_worker(type=""),
        lambda c: c.get_worker(wait=0),
        lambda c: c.get_worker(wait=-1),
        lambda c: c.get_worker(wait=float("nan")),
        lambda c: c.get_worker(wait=True),
        lambda c: c.ping("127.77.0.9 client=someone-else"),
        lambda c: c.release(""),
        lambda c: c.burst(0),
        lambda c: c.burst(101),
        lambda c: c.burst(1000),
        lambda c: c.burst(True),
        lambda c: c.burst("3"),
        lambda c: c.worker(keepalive=-1).__enter__(),
    ],
)
def test_bad_arguments_raise_value_error_before_sending(
    stub: StubBroker, stub_client: BrokerClient, call: Any
) -> None:
    """An argument that is not one protocol word, or a bad number, raises ValueError unsent."""
    with pytest.raises(ValueError):
        call(stub_client)
    assert stub.lines == []


@pytest.mark.parametrize(
    "kwargs",
    [
        {"timeout": 0},
        {"timeout": None},
        {"connect_retries": -1},
        {"retry_backoff": -0.1},
        {"client_id": "has space"},
        {"client_id": "x" * 65},
        {"port": 0},
        {"port": 70000},
    ],
)
def test_bad_constructor_arguments_raise_value_error(kwargs: dict[str, Any]) -> None:
    """Constructor arguments that could mean an endless wait or a bad request are refused."""
    with pytest.raises(ValueError):
        BrokerClient("127.0.0.1", **{"port": 9000, **kwargs})


def test_host_and_port_default_to_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """COMPUTE_BROKER_HOST/PORT give the defaults; without them it is localhost:9000."""
    monkeypatch.delenv("COMPUTE_BROKER_HOST", raising=False)
    monkeypatch.delenv("COMPUTE_BROKER_PORT", raising=False)
    client = BrokerClient()
    assert (client.host, client.port) == ("localhost", 9000)
    monkeypatch.setenv("COMPUTE_BROKER_HOST", "broker.lab")
    monkeypatch.setenv("COMPUTE_BROKER_PORT", "9123")
    client = BrokerClient()
    assert (client.host, client.port) == ("broker.lab", 9123)
    assert BrokerClient("other", 1).port == 1
    monkeypatch.setenv("COMPUTE_BROKER_PORT", "nine")
    with pytest.raises(ValueError, match="COMPUTE_BROKER_PORT"):
        BrokerClient()


def test_default_client_id_is_one_random_id_per_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without client_id (or COMPUTE_BROKER_CLIENT_ID) all clients of a process share one id."""
    monkeypatch.delenv("COMPUTE_BROKER_CLIENT_ID", raising=False)
    first, second = BrokerClient(), BrokerClient()
    assert first.client_id == second.client_id
    assert compute_broker_client._CLIENT_ID.match(first.client_id)
    monkeypatch.setenv("COMPUTE_BROKER_CLIENT_ID", "rig-3")
    assert BrokerClient().client_id == "rig-3"


# -- error replies --------------------------------------------------------------------------


def test_error_reply_raises_broker_error_with_reason(
    stub: StubBroker, stub_client: BrokerClient
) -> None:
    """`ERROR: reason` raises BrokerError whose message and str are the reason."""
    with pytest.raises(BrokerError) as caught:
        stub_client.ping("10.9.9.9")
    assert caught.value.message == "Worker not found"
    assert str(caught.value) == "Worker not found"
    assert caught.value.line == "ERROR: Worker not found"
    assert isinstance(caught.value, ClientError)


def test_bare_error_reply_raises_broker_error(stub: StubBroker, stub_client: BrokerClient) -> None:
    """A bare `ERROR` line (the seed broker's) raises BrokerError with the line as message."""
    stub.respond = lambda line: "ERROR"
    with pytest.raises(BrokerError, match=r"^ERROR$"):
        stub_client.get_worker()


def test_error_reply_to_get_worker_raises_broker_error(
    stub: StubBroker, stub_client: BrokerClient
) -> None:
    """A GET_WORKER refusal (budget, max_workers, launch failure) comes back as BrokerError."""
    stub.respond = lambda line: "ERROR: max_workers reached (10)"
    with pytest.raises(BrokerError, match=r"^max_workers reached \(10\)$"):
        stub_client.get_worker()


@pytest.mark.parametrize(
    ("reply", "call"),
    [
        ("OK", lambda c: c.get_worker()),
        ("not json", lambda c: c.status()),
        ("[1, 2]", lambda c: c.status()),
        ("OK 3 i-1 i-2", lambda c: c.burst(3)),
        ("DONE", lambda c: c.burst(3)),
        ("127.77.0.9", lambda c: c.ping("127.77.0.9")),
    ],
)
def test_nonsense_reply_raises_protocol_error(
    stub: StubBroker, stub_client: BrokerClient, reply: str, call: Any
) -> None:
    """A reply that does not fit the request raises BrokerProtocolError."""
    stub.respond = lambda line: reply
    with pytest.raises(BrokerProtocolError):
        call(stub_client)


def test_overlong_reply_raises_protocol_error(
    stub: StubBroker, stub_client: BrokerClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reply line longer than MAX_REPLY_BYTES is refused instead of buffered without end."""
    monkeypatch.setattr(compute_broker_client, "MAX_REPLY_BYTES", 1000)
    stub.respond = lambda line: b"x" * 100_000
    with pytest.raises(BrokerProtocolError, match="longer than"):
        stub_client.status()


def test_close_without_reply_raises_unavailable(
    stub: StubBroker, stub_client: BrokerClient
) -> None:
    """A broker that closes the connection without a line raises BrokerUnavailable at once."""
    stub.respond = lambda line: None
    started = time.monotonic()
    with pytest.raises(BrokerUnavailable, match="without a reply"):
        stub_client.status()
    assert time.monotonic() - started < 1.5


# -- timeouts and refused connections ------------------------------------------------------


def test_silent_broker_times_out(silent_port: int) -> None:
    """A listener that accepts but never answers raises BrokerTimeout after `timeout`."""
    client = BrokerClient("127.0.0.1", silent_port, timeout=0.3)
    started = time.monotonic()
    with pytest.raises(BrokerTimeout):
        client.ping(STUB_IP)
    assert 0.3 <= time.monotonic() - started < 3


def test_get_worker_waits_for_wait_plus_timeout(silent_port: int) -> None:
    """GET_WORKER's reply is awaited for `wait` plus `timeout`, not just `timeout`."""
    client = BrokerClient("127.0.0.1", silent_port, timeout=0.2)
    started = time.monotonic()
    with pytest.raises(BrokerTimeout):
        client.get_worker(wait=0.5)
    assert 0.7 <= time.monotonic() - started < 4


def test_get_worker_without_wait_allows_launch_timeout(silent_port: int) -> None:
    """Without `wait`, GET_WORKER's reply is awaited for launch_timeout plus `timeout`."""
    client = BrokerClient("127.0.0.1", silent_port, timeout=0.2, launch_timeout=0.5)
    started = time.monotonic()
    with pytest.raises(BrokerTimeout):
        client.get_worker()
    assert 0.7 <= time.monotonic() - started < 4


def test_slow_get_worker_within_wait_succeeds(stub: StubBroker) -> None:
    """A worker that takes longer than `timeout` but less than `wait` is still handed over."""

    def slow(line: str) -> str:
        time.sleep(0.6)  # the broker booting a worker (a server-side delay, not a test sync)
        return STUB_IP

    stub.respond = slow
    client = BrokerClient(stub.host, stub.port, timeout=0.2)
    assert client.get_worker(wait=10) == STUB_IP


class _RecordingRandom(random.Random):
    """A random source that records the bounds asked of `uniform` and answers `fraction` of
    the way from the low one to the high one (1.0: the bound itself)."""

    def __init__(self, fraction: float = 1.0) -> None:
        super().__init__(0)
        self.fraction = fraction
        self.bounds: list[tuple[float, float]] = []

    def uniform(self, a: float, b: float) -> float:
        self.bounds.append((a, b))
        return a + (b - a) * self.fraction


def test_refused_connection_is_retried_with_backoff_then_unavailable(
    refused_port: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A refused connection is retried connect_retries times, each delay drawn between 0 and
    a doubling ceiling, then raises."""
    delays: list[float] = []
    monkeypatch.setattr(time, "sleep", delays.append)
    attempts = _count_connects(monkeypatch)
    rng = _RecordingRandom(fraction=0.25)
    client = BrokerClient("127.0.0.1", refused_port, connect_retries=3, retry_backoff=0.5, rng=rng)
    with pytest.raises(BrokerUnavailable, match="refused"):
        client.status()
    assert len(attempts) == 4
    assert rng.bounds == [(0.0, 0.5), (0.0, 1.0), (0.0, 2.0)]
    assert delays == [0.125, 0.25, 0.5]


def test_retry_delays_are_jittered_within_their_ceilings() -> None:
    """Full jitter: retry n waits a random time in [0, min(backoff * 2**n, 30)]; the delays
    differ from draw to draw and cover the range, not one fixed value."""
    client = BrokerClient("127.0.0.1", 9000, retry_backoff=0.5, rng=random.Random(20261129))
    for attempt, ceiling in [(0, 0.5), (1, 1.0), (2, 2.0), (5, 16.0), (6, 30.0), (400, 30.0)]:
        delays = [client._retry_delay(attempt) for _ in range(200)]
        assert all(0.0 <= delay <= ceiling for delay in delays), (attempt, delays)
        assert len(set(delays)) == len(delays), attempt
        assert min(delays) < ceiling * 0.1 and max(delays) > ceiling * 0.9, attempt


def test_retry_jitter_leaves_the_global_random_alone(
    refused_port: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """By default the jitter draws from a generator of the client's own: an experiment's
    `random.seed` sequence is not disturbed, and two clients do not retry in lockstep."""
    monkeypatch.setattr(time, "sleep", lambda seconds: None)
    first = BrokerClient("127.0.0.1", refused_port, connect_retries=2)
    second = BrokerClient("127.0.0.1", refused_port, connect_retries=2)
    random.seed(1234)
    expected = random.random()
    random.seed(1234)
    with pytest.raises(BrokerUnavailable):
        first.help()
    assert expected == random.random()
    assert [first._retry_delay(3) for _ in range(5)] != [second._retry_delay(3) for _ in range(5)]


def test_refused_connection_really_waits_and_gives_up(refused_port: int) -> None:
    """With real sleeps, a closed port gives BrokerUnavailable after the short backoff."""
    client = BrokerClient(
        "127.0.0.1", refused_port, connect_retries=2, retry_backoff=0.05, rng=_RecordingRandom()
    )
    started = time.monotonic()
    with pytest.raises(BrokerUnavailable):
        client.help()
    assert 0.15 <= time.monotonic() - started < 3


def test_refused_then_accepted_connection_succeeds(
    stub: StubBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A broker that comes up during the retries is reached."""
    monkeypatch.setattr(time, "sleep", lambda seconds: None)
    real = socket.create_connection
    refusals = [ConnectionRefusedError(111, "refused")] * 2

    def flaky(address: Any, timeout: Any = None, *args: Any) -> socket.socket:
        if refusals:
            raise refusals.pop()
        return real(address, timeout)

    monkeypatch.setattr(socket, "create_connection", flaky)
    client = BrokerClient(stub.host, stub.port, connect_retries=2)
    assert client.get_worker() == STUB_IP


def test_connect_timeout_raises_broker_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    """A connect that times out raises BrokerTimeout, without retries."""
    attempts: list[Any] = []

    def hang(address: Any, timeout: Any = None, *args: Any) -> socket.socket:
        attempts.append(address)
        raise socket.timeout("timed out")

    monkeypatch.setattr(socket, "create_connection", hang)
    with pytest.raises(BrokerTimeout, match="connecting"):
        BrokerClient("192.0.2.1", 9000).status()
    assert len(attempts) == 1


def test_unresolvable_host_raises_unavailable() -> None:
    """A host name that does not resolve raises BrokerUnavailable."""
    client = BrokerClient("no-such-host.invalid", 9000, timeout=2)
    with pytest.raises(BrokerUnavailable):
        client.status()


# -- worker() -------------------------------------------------------------------------------


def test_worker_block_pings_and_releases_under_its_lease(stub: StubBroker) -> None:
    """worker() gets a worker, PINGs it at the keepalive interval and RELEASEs it on exit."""
    client = BrokerClient(stub.host, stub.port, client_id="tester")
    with client.worker(keepalive=0.02) as ip:
        assert ip == STUB_IP
        stub.wait_for(lambda lines: sum(line.startswith("PING") for line in lines) >= 3)
    lines = stub.wait_for(lambda lines: lines[-1].startswith("RELEASE"))
    assert lines[0] == "GET_WORKER client=tester.1"
    assert set(lines[1:-1]) == {f"PING {STUB_IP} client=tester.1"}
    assert lines[-1] == f"RELEASE {STUB_IP} client=tester.1"


def test_worker_block_releases_on_exception(stub: StubBroker) -> None:
    """An exception in the block propagates unchanged and the worker is still released."""
    client = BrokerClient(stub.host, stub.port, client_id="tester")
    with pytest.raises(KeyError, match="boom"), client.worker() as ip:
        raise KeyError("boom")
    assert stub.lines[-1] == f"RELEASE {ip} client=tester.1"


def test_failed_release_is_logged_and_does_not_hide_the_exception(
    stub: StubBroker, caplog: pytest.LogCaptureFixture
) -> None:
    """A RELEASE the broker refuses is logged; the block's own exception still propagates."""

    def refuse_release(line: str) -> str:
        return "ERROR: broker shutting down" if line.startswith("RELEASE") else STUB_IP

    stub.respond = refuse_release
    client = BrokerClient(stub.host, stub.port)
    with caplog.at_level(logging.WARNING, "compute_broker_client"):
        with pytest.raises(ZeroDivisionError), client.worker(keepalive=0):
            _ = 1 / 0
        with client.worker(keepalive=0):
            pass  # a failed release after a clean block is logged, not raised
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2
    assert all("broker shutting down" in m and STUB_IP in m for m in messages)


def test_unreachable_broker_at_release_is_logged_not_raised(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A broker that vanished during the block: the exit logs the failed release and returns."""
    stub = StubBroker()
    client = BrokerClient(stub.host, stub.port, connect_retries=0)
    with caplog.at_level(logging.WARNING, "compute_broker_client"), client.worker(keepalive=0):
        stub.close()
    assert any("releasing worker" in r.getMessage() for r in caplog.records)


def test_keepalive_thread_stops_promptly(stub: StubBroker) -> None:
    """Leaving the block stops a waiting keepalive thread at once, not after its interval."""
    client = BrokerClient(stub.host, stub.port)
    started = time.monotonic()
    with client.worker(keepalive=3600):
        threads = [t for t in threading.enumerate() if t.name.startswith("compute-broker-keep")]
        assert len(threads) == 1 and threads[0].daemon
    assert time.monotonic() - started < 2
    assert not threads[0].is_alive()
    assert not any(line.startswith("PING") for line in stub.lines)


def test_keepalive_zero_sends_no_pings(stub: StubBroker) -> None:
    """keepalive=0 starts no thread and sends no PING."""
    client = BrokerClient(stub.host, stub.port)
    with client.worker(keepalive=0):
        assert not any(t.name.startswith("compute-broker-keep") for t in threading.enumerate())
    assert [line.split()[0] for line in stub.lines] == ["GET_WORKER", "RELEASE"]


def test_keepalive_stops_after_broker_refuses_ping(
    stub: StubBroker, caplog: pytest.LogCaptureFixture
) -> None:
    """When the broker no longer knows the worker, the keepalive logs it once and stops."""

    def forget_worker(line: str) -> str:
        if line.startswith("PING"):
            return "ERROR: Worker not found"
        return "OK" if line.startswith("RELEASE") else STUB_IP

    stub.respond = forget_worker
    client = BrokerClient(stub.host, stub.port)
    with caplog.at_level(logging.WARNING, "compute_broker_client"), client.worker(keepalive=0.01):
        stub.wait_for(lambda lines: any(line.startswith("PING") for line in lines))
        threads = [t for t in threading.enumerate() if t.name.startswith("compute-broker-keep")]
        for thread in threads:
            thread.join(5)
        assert not any(t.is_alive() for t in threads)
    assert sum(line.startswith("PING") for line in stub.lines) == 1
    assert any("Worker not found" in r.getMessage() for r in caplog.records)


def test_parallel_blocks_hold_separate_leases(stub: StubBroker) -> None:
    """Two worker() blocks of one client use different lease ids (ID.1, ID.2)."""
    client = BrokerClient(stub.host, stub.port, client_id="tester", timeout=5)
    with client.worker(keepalive=0), client.worker(keepalive=0):
        pass
    assert stub.lines == [
        "GET_WORKER client=tester.1",
        "GET_WORKER client=tester.2",
        f"RELEASE {STUB_IP} client=tester.2",
        f"RELEASE {STUB_IP} client=tester.1",
    ]


def test_lease_id_fits_the_protocol_limit(stub: StubBroker) -> None:
    """A 64-character client id is shortened so ID.n stays within 64 characters."""
    client = BrokerClient(stub.host, stub.port, client_id="a" * 64)
    with client.worker(keepalive=0):
        pass
    client_word = stub.lines[0].split()[-1]
    assert client_word == "client=" + "a" * 62 + ".1"


def test_get_worker_failure_in_block_releases_nothing(stub: StubBroker) -> None:
    """If GET_WORKER fails, worker() raises it and sends no RELEASE."""
    stub.respond = lambda line: "ERROR: budget: run rate 10.0/h would exceed max_hourly_cost 10.0"
    client = BrokerClient(stub.host, stub.port)
    with pytest.raises(BrokerError, match=r"^budget"), client.worker():
        pytest.fail("the block must not run")
    assert len(stub.lines) == 1


def test_hanging_reply_never_blocks_forever(stub: StubBroker) -> None:
    """A stub that reads the request and never answers: BrokerTimeout after `timeout`."""
    stub.respond = lambda line: HANG
    client = BrokerClient(stub.host, stub.port, timeout=0.3)
    with pytest.raises(BrokerTimeout):
        client.burst(1)


def _count_connects(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    attempts: list[Any] = []
    real = socket.create_connection

    def counting(address: Any, timeout: Any = None, *args: Any) -> socket.socket:
        attempts.append(address)
        return real(address, timeout)

    monkeypatch.setattr(socket, "create_connection", counting)
    return attempts
