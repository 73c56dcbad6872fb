"""Interrupted workers (`ERROR: Worker interrupted [deadline]` to PING), against stub servers.

The live sandbox broker cannot be made to interrupt a worker on demand, so a stub answers
like a broker whose workers EC2 takes away: PING of an interrupted worker gets the notice,
and GET_WORKER hands out the next address.
"""

from __future__ import annotations

import datetime
import logging
import pickle
import threading

import pytest
from pyclient_support import STUB_IP, StubBroker, run_cli, wait_until

from compute_broker_client import (
    BrokerClient,
    BrokerError,
    ClientError,
    Worker,
    WorkerInterrupted,
)

FIRST, SECOND, THIRD = STUB_IP, "127.77.0.10", "127.77.0.11"
NOTICE = "ERROR: Worker interrupted 2026-11-23T12:34:56Z"
DEADLINE = datetime.datetime(2026, 11, 23, 12, 34, 56, tzinfo=datetime.timezone.utc)
REBALANCE = "ERROR: Worker interrupted"


class SpotBroker:
    """A stub responder: GET_WORKER hands out FIRST, SECOND, THIRD in turn (then THIRD again);
    PING of an address in `interrupted` answers `notice`, other known addresses OK."""

    def __init__(self, notice: str = NOTICE) -> None:
        self.notice = notice
        self.interrupted: set[str] = set()
        self.refuse_gets = 0  # this many GET_WORKERs answer a budget error first
        self.hold_get: threading.Event | None = None  # a GET_WORKER waits for this first
        self._next = [FIRST, SECOND, THIRD]
        self._lock = threading.Lock()

    def __call__(self, line: str) -> str:
        words = line.split()
        command = words[0].upper()
        if command == "GET_WORKER":
            return self._get()
        ip = words[1]
        with self._lock:
            if command == "PING" and ip in self.interrupted:
                return self.notice
        return "OK"

    def _get(self) -> str:
        with self._lock:
            hold = self.hold_get
            if self.refuse_gets:
                self.refuse_gets -= 1
                return "ERROR: budget: run rate 10.0/h would exceed max_hourly_cost 10.0"
        if hold is not None:
            hold.wait(30)  # the broker still waiting for a launch (released by the test)
        with self._lock:
            return self._next.pop(0) if len(self._next) > 1 else self._next[0]

    def interrupt(self, ip: str) -> None:
        with self._lock:
            self.interrupted.add(ip)


@pytest.fixture
def spot(stub: StubBroker) -> SpotBroker:
    responder = SpotBroker()
    stub.respond = responder
    return responder


@pytest.fixture
def client(stub: StubBroker) -> BrokerClient:
    return BrokerClient(stub.host, stub.port, timeout=2.0, retry_backoff=0.01, client_id="tester")


def _pings(lines: list[str], ip: str) -> int:
    return sum(line.startswith(f"PING {ip} ") for line in lines)


# -- ping() -----------------------------------------------------------------------------------


def test_ping_raises_worker_interrupted_with_deadline(
    stub: StubBroker, spot: SpotBroker, client: BrokerClient
) -> None:
    """The notice with a deadline: WorkerInterrupted (a BrokerError) with ip and UTC deadline."""
    spot.interrupt(FIRST)
    with pytest.raises(WorkerInterrupted) as caught:
        client.ping(FIRST)
    exc = caught.value
    assert isinstance(exc, BrokerError) and isinstance(exc, ClientError)
    assert exc.ip == FIRST
    assert exc.deadline == DEADLINE
    assert exc.deadline.utcoffset() == datetime.timedelta(0)
    assert exc.message == "Worker interrupted 2026-11-23T12:34:56Z"
    assert exc.line == NOTICE
    assert str(exc) == f"worker {FIRST} interrupted: it goes away at 2026-11-23T12:34:56Z"
    assert stub.lines == [f"PING {FIRST} client=tester"]


def test_ping_raises_worker_interrupted_without_deadline(
    spot: SpotBroker, client: BrokerClient
) -> None:
    """The bare notice (a rebalance recommendation): WorkerInterrupted, deadline None."""
    spot.notice = REBALANCE
    spot.interrupt(FIRST)
    with pytest.raises(WorkerInterrupted) as caught:
        client.ping(FIRST)
    assert (caught.value.ip, caught.value.deadline) == (FIRST, None)
    assert caught.value.line == REBALANCE
    assert str(caught.value) == f"worker {FIRST} interrupted (no deadline given)"


@pytest.mark.parametrize(
    ("reply", "deadline"),
    [
        (NOTICE + "\r", DEADLINE),
        ("ERROR:Worker interrupted\t2026-11-23T12:34:56Z", DEADLINE),
        (
            "ERROR: Worker interrupted 2026-11-23T12:34:56.250Z",
            DEADLINE.replace(microsecond=250000),
        ),
        ("ERROR: Worker interrupted 2026-11-23T13:34:56+01:00", DEADLINE),
        ("ERROR: Worker interrupted 2026-11-23T12:34:56Z (spot)", DEADLINE),
        ("ERROR: Worker interrupted soon", None),
        ("ERROR: Worker interrupted 2026-13-23T12:34:56Z", None),
        ("ERROR: Worker interrupted 2026-11-23T12:34:56", None),
        ("ERROR: Worker interrupted 2026-11-23", None),
        ("ERROR: Worker interrupted 2026-11-23T12:34:56+24:00", None),
        ("ERROR: Worker interrupted 2026-11-23T12:34:56+01:60", None),
    ],
)
def test_deadline_forms(
    stub: StubBroker, client: BrokerClient, reply: str, deadline: object
) -> None:
    """Odd spacing, fractions and offsets are read; an unreadable deadline is None."""
    stub.respond = lambda line: reply
    with pytest.raises(WorkerInterrupted) as caught:
        client.ping(FIRST)
    assert caught.value.deadline == deadline
    if deadline is None:
        assert "unreadable deadline" in str(caught.value)


@pytest.mark.parametrize(
    "reply", ["ERROR: Worker not found", "ERROR: Worker interruptedness", "ERROR", "ERROR: budget"]
)
def test_other_errors_are_plain_broker_errors(
    stub: StubBroker, client: BrokerClient, reply: str
) -> None:
    """Only the interruption notice raises WorkerInterrupted."""
    stub.respond = lambda line: reply
    with pytest.raises(BrokerError) as caught:
        client.ping(FIRST)
    assert type(caught.value) is BrokerError


def test_release_of_an_interrupted_worker_is_ok(spot: SpotBroker, client: BrokerClient) -> None:
    """RELEASE of an interrupted worker answers OK as usual."""
    spot.interrupt(FIRST)
    client.release(FIRST)


def test_worker_interrupted_pickles_and_builds_by_hand() -> None:
    """The exception survives pickling (multiprocessing) and can be made for tests."""
    exc = WorkerInterrupted(FIRST, DEADLINE)
    assert exc.message == "Worker interrupted 2026-11-23T12:34:56Z"
    assert exc.line == NOTICE
    copy = pickle.loads(pickle.dumps(exc))
    assert type(copy) is WorkerInterrupted
    assert (copy.ip, copy.deadline, copy.message, copy.line) == (
        exc.ip,
        exc.deadline,
        exc.message,
        exc.line,
    )
    assert WorkerInterrupted(FIRST).line == REBALANCE


# -- worker(): the keep-alive notices, replace() switches -------------------------------------


def test_keepalive_notices_interruption_and_replace_switches(
    stub: StubBroker, spot: SpotBroker, client: BrokerClient, caplog: pytest.LogCaptureFixture
) -> None:
    """The handle's `interrupted` is set by the keep-alive; replace() gets SECOND, drops FIRST."""
    handle = client.worker(keepalive=0.01)
    assert isinstance(handle, Worker)
    with caplog.at_level(logging.WARNING, "compute_broker_client"), handle as ip:
        assert ip == FIRST == handle.ip
        assert handle.interrupted is None
        spot.interrupt(FIRST)
        exc = wait_until(lambda: handle.interrupted, what="the keep-alive to see the notice")
        assert (exc.ip, exc.deadline) == (FIRST, DEADLINE)
        # The keep-alive carries on PINGing; the worker is still held until replaced.
        stub.wait_for(lambda lines: _pings(lines, FIRST) >= 3)
        assert handle.replace() == SECOND
        assert (handle.ip, handle.interrupted) == (SECOND, None)
        stub.wait_for(lambda lines: _pings(lines, SECOND) >= 1)
    lines = stub.wait_for(lambda lines: lines[-1].startswith(f"RELEASE {SECOND}"))
    assert lines[0] == "GET_WORKER client=tester.1"
    assert "GET_WORKER client=tester.2" in lines
    assert lines.index("GET_WORKER client=tester.2") < lines.index(
        f"RELEASE {FIRST} client=tester.1"
    )
    assert lines[-1] == f"RELEASE {SECOND} client=tester.2"
    assert [r.getMessage() for r in caplog.records if "interrupted" in r.getMessage()] == [
        f"keepalive: worker {FIRST} interrupted: it goes away at 2026-11-23T12:34:56Z"
    ]


def test_on_interrupt_true_replaces_automatically(
    stub: StubBroker, spot: SpotBroker, client: BrokerClient
) -> None:
    """on_interrupt(exc) is called once; returning True switches the handle to SECOND."""
    calls: list[WorkerInterrupted] = []

    def on_interrupt(exc: WorkerInterrupted) -> bool:
        calls.append(exc)
        return True

    handle = client.worker(keepalive=0.01, on_interrupt=on_interrupt)
    with handle as ip:
        spot.interrupt(FIRST)
        wait_until(lambda: handle.ip == SECOND, what="the automatic replacement")
        stub.wait_for(lambda lines: _pings(lines, SECOND) >= 2)
        assert handle.interrupted is None
        assert [(c.ip, c.deadline) for c in calls] == [(FIRST, DEADLINE)]
        assert ip == FIRST  # the value given by `as` stays; the handle has the current one
    lines = stub.wait_for(lambda lines: lines[-1].startswith("RELEASE"))
    assert f"RELEASE {FIRST} client=tester.1" in lines
    assert lines[-1] == f"RELEASE {SECOND} client=tester.2"
    assert len(calls) == 1


def test_on_interrupt_false_only_reports_once(
    stub: StubBroker, spot: SpotBroker, client: BrokerClient
) -> None:
    """A callback that returns nothing is told once; the worker is kept and still PINGed."""
    spot.notice = REBALANCE
    calls: list[WorkerInterrupted] = []
    handle = client.worker(keepalive=0.01, on_interrupt=calls.append)
    with handle:
        spot.interrupt(FIRST)
        stub.wait_for(lambda lines: _pings(lines, FIRST) >= 5)
        assert handle.ip == FIRST
        assert handle.interrupted is not None and handle.interrupted.deadline is None
    assert [c.ip for c in calls] == [FIRST]
    assert [line.split()[0] for line in stub.lines].count("GET_WORKER") == 1


def test_failed_replace_keeps_the_worker(
    stub: StubBroker, spot: SpotBroker, client: BrokerClient
) -> None:
    """If GET_WORKER fails, replace() raises it and the block keeps its interrupted worker."""
    handle = client.worker(keepalive=0.01)
    with handle:
        spot.interrupt(FIRST)
        wait_until(lambda: handle.interrupted, what="the keep-alive to see the notice")
        spot.refuse_gets = 1
        with pytest.raises(BrokerError, match=r"^budget"):
            handle.replace()
        assert handle.ip == FIRST and handle.interrupted is not None
        assert handle.replace() == SECOND
    assert stub.lines[-1] == f"RELEASE {SECOND} client=tester.3"
    assert f"RELEASE {FIRST} client=tester.1" in stub.lines


def test_automatic_replacement_is_retried_after_a_failure(
    stub: StubBroker, spot: SpotBroker, client: BrokerClient
) -> None:
    """A replacement the broker refuses is tried again after the next PING's notice."""
    handle = client.worker(keepalive=0.01, on_interrupt=lambda exc: True)
    with handle:
        spot.refuse_gets = 1
        spot.interrupt(FIRST)
        wait_until(lambda: handle.ip == SECOND, what="the retried replacement")
    gets = [line for line in stub.lines if line.startswith("GET_WORKER")]
    assert len(gets) == 3  # the block's, the refused one, the one that worked


def test_block_ending_during_a_replacement_releases_the_new_worker(
    stub: StubBroker, spot: SpotBroker
) -> None:
    """Leaving the block while the keep-alive waits for a replacement: both get released."""
    client = BrokerClient(stub.host, stub.port, timeout=0.2, client_id="tester")
    handle = client.worker(keepalive=0.01, on_interrupt=lambda exc: True)
    with handle:
        spot.hold_get = threading.Event()
        spot.interrupt(FIRST)
        stub.wait_for(lambda lines: "GET_WORKER client=tester.2" in lines)
    # The block has ended and released FIRST; now the broker answers the replacement.
    assert f"RELEASE {FIRST} client=tester.1" in stub.lines
    assert spot.hold_get is not None
    spot.hold_get.set()
    stub.wait_for(lambda lines: f"RELEASE {SECOND} client=tester.2" in lines)
    assert handle.ip == FIRST


def test_replace_outside_the_block_is_an_error(client: BrokerClient, spot: SpotBroker) -> None:
    """replace() needs the block; ip before the block too; a handle serves one block."""
    handle = client.worker(keepalive=0)
    with pytest.raises(RuntimeError):
        handle.replace()
    with pytest.raises(RuntimeError):
        _ = handle.ip
    with handle:
        pass
    with pytest.raises(RuntimeError):
        handle.replace()
    with pytest.raises(RuntimeError), handle:
        pass
    assert handle.ip == FIRST


def test_on_interrupt_must_be_callable(client: BrokerClient) -> None:
    """A non-callable on_interrupt is refused before anything is sent."""
    with pytest.raises(TypeError):
        client.worker(on_interrupt=True)  # type: ignore[arg-type]


def test_failing_callback_is_logged_and_the_worker_kept(
    stub: StubBroker, spot: SpotBroker, client: BrokerClient, caplog: pytest.LogCaptureFixture
) -> None:
    """An exception in on_interrupt is logged; no replacement, pings go on."""

    def broken(exc: WorkerInterrupted) -> bool:
        raise ValueError("callback bug")

    with caplog.at_level(logging.ERROR, "compute_broker_client"):
        handle = client.worker(keepalive=0.01, on_interrupt=broken)
        with handle:
            spot.interrupt(FIRST)
            wait_until(
                lambda: any("on_interrupt" in r.getMessage() for r in caplog.records),
                what="the callback's error to be logged",
            )
            stub.wait_for(lambda lines: _pings(lines, FIRST) >= 3)
            assert handle.ip == FIRST
    assert [line.split()[0] for line in stub.lines].count("GET_WORKER") == 1


# -- the command line -------------------------------------------------------------------------


@pytest.mark.slow  # runs the CLI as a process
@pytest.mark.parametrize(
    ("notice", "expected"),
    [
        (NOTICE, f"worker {FIRST} interrupted: it goes away at 2026-11-23T12:34:56Z"),
        (REBALANCE, f"worker {FIRST} interrupted (no deadline given)"),
    ],
)
def test_cli_ping_of_interrupted_worker_exits_4(
    stub: StubBroker, spot: SpotBroker, notice: str, expected: str
) -> None:
    """`ping` of an interrupted worker exits 4 and says so on stderr."""
    spot.notice = notice
    spot.interrupt(FIRST)
    result = run_cli("--host", stub.host, "--port", str(stub.port), "ping", FIRST)
    assert (result.returncode, result.stdout) == (4, "")
    assert result.stderr == f"compute-broker-client: {expected}; get another worker\n"
