"""The Python client against the real broker in sandbox mode (see conftest.live_broker)."""

from __future__ import annotations

import logging
import threading
import uuid
from typing import Any

import pytest
from pyclient_support import (
    LIVE_TOKENS,
    LiveBroker,
    cli_env,
    iter_status_leases,
    run_cli,
    wait_until,
)

from compute_broker_client import AuthError, BrokerClient, BrokerError

SANDBOX_PREFIX = "127.77."

pytestmark = pytest.mark.slow  # the broker runs as a process (conftest.live_broker)


@pytest.fixture
def client(live_broker: LiveBroker) -> BrokerClient:
    """A client of the live broker with its own client id."""
    return BrokerClient(
        live_broker.host, live_broker.port, timeout=10, client_id=f"t-{uuid.uuid4().hex[:12]}"
    )


def _worker(status: dict[str, Any], ip: str) -> dict[str, Any] | None:
    return next((w for w in status["workers"] if w["ip"] == ip), None)


def _my_leases(client: BrokerClient, ip: str, client_id: str | None = None) -> list[Any]:
    me = client_id or client.client_id
    return [
        lease
        for lease in iter_status_leases(client.status(), ip)
        if str(lease["client"]).endswith("/" + me)
    ]


def _assert_released(client: BrokerClient, ip: str, client_id: str | None = None) -> None:
    """Our lease on `ip` is gone, and so is the worker unless another client still holds it."""
    assert _my_leases(client, ip, client_id) == []
    if not list(iter_status_leases(client.status(), ip)):
        wait_until(lambda: _worker(client.status(), ip) is None, what=f"worker {ip} to go")


def test_get_ping_release_cycle(client: BrokerClient) -> None:
    """get_worker hands out a ready worker under our lease; ping keeps it; release ends it."""
    ip = client.get_worker(wait=25)
    assert ip.startswith(SANDBOX_PREFIX)
    status = client.status()
    worker = _worker(status, ip)
    assert worker is not None and worker["state"] == "ready"
    assert len(_my_leases(client, ip)) == 1
    client.ping(ip)
    client.release(ip)
    _assert_released(client, ip)


def test_get_worker_with_explicit_arguments(client: BrokerClient) -> None:
    """type, market and wait are accepted by the broker."""
    ip = client.get_worker(type="c7i.large", market="spot", wait=25)
    try:
        worker = _worker(client.status(), ip)
        assert worker is not None
        assert (worker["type"], worker["market"]) == ("c7i.large", "spot")
    finally:
        client.release(ip)


def test_bad_market_is_a_broker_usage_error(client: BrokerClient) -> None:
    """A value the broker refuses comes back as BrokerError with its usage message."""
    with pytest.raises(BrokerError, match="usage"):
        client.get_worker(market="cheap")


def test_ping_unknown_ip_raises_broker_error(client: BrokerClient) -> None:
    """PING of an IP the broker does not manage raises BrokerError('Worker not found')."""
    with pytest.raises(BrokerError) as caught:
        client.ping("10.9.9.9")
    assert caught.value.message == "Worker not found"


def test_release_unknown_ip_raises_broker_error(client: BrokerClient) -> None:
    """RELEASE of an IP the broker never knew raises BrokerError('Worker not found')."""
    with pytest.raises(BrokerError, match=r"^Worker not found$"):
        client.release("10.9.9.9")


def test_help_lists_the_commands(client: BrokerClient) -> None:
    """help() returns the broker's `OK commands: ...` line."""
    reply = client.help()
    assert reply.startswith("OK commands:")
    for command in ("GET_WORKER", "PING", "RELEASE", "STATUS", "BURST"):
        assert command in reply


def test_status_has_the_documented_shape(client: BrokerClient) -> None:
    """status() returns the documented top-level keys."""
    status = client.status()
    assert {"workers", "leases", "totals"} <= status.keys()
    assert status["totals"]["max_workers"] == 10


def test_burst_launches_workers(client: BrokerClient) -> None:
    """burst(2) returns two instance ids that STATUS then lists; cleaned up by RELEASE."""
    ids = client.burst(2)
    assert len(ids) == 2 and all(i.startswith("i-") for i in ids)
    assert {w["instance_id"] for w in client.status()["workers"]} >= set(ids)

    def ips() -> list[str]:
        workers = [w for w in client.status()["workers"] if w["instance_id"] in ids]
        ready = [w["ip"] for w in workers if w["state"] == "ready" and w["ip"]]
        return ready if len(ready) == len(ids) else []

    for ip in wait_until(ips, what="the burst workers to be ready"):
        client.release(ip)  # nobody holds them: this terminates them
    wait_until(
        lambda: not {w["instance_id"] for w in client.status()["workers"]} & set(ids),
        what="the burst workers to go",
    )


def test_worker_block_holds_a_lease_and_releases_on_exit(client: BrokerClient) -> None:
    """worker() holds a lease (ID.n) during the block and releases it on normal exit."""
    with client.worker(wait=25, keepalive=0.05) as ip:
        assert ip.startswith(SANDBOX_PREFIX)
        leases = [
            lease
            for lease in iter_status_leases(client.status(), ip)
            if f"/{client.client_id}." in str(lease["client"])
        ]
        assert len(leases) == 1
        lease_id = str(leases[0]["client"]).split("/", 1)[1]
        client.ping(ip)  # a keepalive in parallel with the pinger thread is fine
    _assert_released(client, ip, lease_id)


def test_worker_block_releases_on_exception(client: BrokerClient) -> None:
    """worker() releases the lease when the block raises, and the exception propagates."""
    with pytest.raises(RuntimeError, match="job failed"), client.worker(wait=25) as ip:
        assert [
            lease
            for lease in iter_status_leases(client.status(), ip)
            if f"/{client.client_id}." in str(lease["client"])
        ]
        raise RuntimeError("job failed")
    assert not [
        lease
        for lease in iter_status_leases(client.status(), ip)
        if f"/{client.client_id}." in str(lease["client"])
    ]
    _assert_released(client, ip, "no-such-lease")


def test_parallel_blocks_share_a_worker_safely(client: BrokerClient) -> None:
    """Two blocks sharing one worker: the first exit keeps it running, the second ends it."""
    first_in = threading.Event()
    first_may_leave = threading.Event()
    seen: dict[str, str] = {}

    def first() -> None:
        with client.worker(wait=25, keepalive=0) as ip:
            seen["first"] = ip
            first_in.set()
            first_may_leave.wait(30)

    thread = threading.Thread(target=first)
    thread.start()
    try:
        assert first_in.wait(30)
        with client.worker(wait=25, keepalive=0) as ip:
            if ip != seen["first"]:
                pytest.skip("the broker handed out a second worker (another ready one existed)")
            first_may_leave.set()
            thread.join(30)
            status = client.status()
            assert _worker(status, ip) is not None, "released from under the second block"
            assert len(list(iter_status_leases(status, ip))) >= 1
    finally:
        first_may_leave.set()
        thread.join(30)
    _assert_released(client, ip, "no-such-lease")


def test_cli_get_and_release_with_host_identity(live_broker: LiveBroker) -> None:
    """The command's `get` and a later `release` (no client id: host identity) pair up."""
    env = cli_env(COMPUTE_BROKER_HOST=live_broker.host, COMPUTE_BROKER_PORT=str(live_broker.port))
    got = run_cli("get", "--wait", "25", env=env)
    assert got.returncode == 0, got.stderr
    ip = got.stdout.strip()
    assert ip.startswith(SANDBOX_PREFIX)
    observer = BrokerClient(live_broker.host, live_broker.port)
    leases = [lease["client"] for lease in iter_status_leases(observer.status(), ip)]
    assert live_broker.host in leases
    released = run_cli("release", ip, env=env)
    assert (released.returncode, released.stdout) == (0, "OK\n")
    assert live_broker.host not in [
        lease["client"] for lease in iter_status_leases(observer.status(), ip)
    ]


def test_cli_ping_unknown_ip_exits_1(live_broker: LiveBroker) -> None:
    """The command exits 1 with the broker's error line on stderr."""
    result = run_cli(
        "--host", live_broker.host, "--port", str(live_broker.port), "ping", "10.9.9.9"
    )
    assert result.returncode == 1
    assert result.stderr.strip() == "ERROR: Worker not found"


def test_cli_status_exits_0(live_broker: LiveBroker) -> None:
    """The command prints the live STATUS as JSON and exits 0."""
    result = run_cli("--host", live_broker.host, "--port", str(live_broker.port), "status")
    assert result.returncode == 0
    assert '"totals"' in result.stdout


def test_tokens_against_a_broker_with_access_control(
    live_token_broker: LiveBroker, caplog: pytest.LogCaptureFixture
) -> None:
    """Tokens on: none or a wrong one is an AuthError; `use` holds leases as its own, no BURST."""
    (_, _, alice), (_, _, admin) = LIVE_TOKENS
    at = (live_token_broker.host, live_token_broker.port)
    client_id = f"t-{uuid.uuid4().hex[:12]}"

    with pytest.raises(AuthError) as anonymous:
        BrokerClient(*at, token="", client_id=client_id).get_worker()
    assert (anonymous.value.line, anonymous.value.token_sent) == ("ERROR: auth required", False)
    wrong = "Tk-live-wrong-" + "w" * 20
    with pytest.raises(AuthError) as refused:
        BrokerClient(*at, token=wrong, client_id=client_id).status()
    assert refused.value.line == "ERROR: auth required (token not accepted)"

    client = BrokerClient(*at, timeout=10, token=alice, client_id=client_id)
    with caplog.at_level(logging.DEBUG, "compute_broker_client"):
        ip = client.get_worker()
        client.ping(ip)
        status = client.status()
        assert status["view"] == "own"
        owners = [lease["client"] for lease in iter_status_leases(status, ip)]
        assert owners == [f"token:alice/{client_id}"]
        with pytest.raises(BrokerError) as not_allowed:
            client.burst(1)
        assert not_allowed.value.message == "not allowed: BURST needs the admin role"
        client.release(ip)
    assert list(iter_status_leases(client.status(), ip)) == []
    assert "view" not in BrokerClient(*at, token=admin).status()
    shown = caplog.text + repr(client) + str(anonymous.value) + str(refused.value)
    assert alice not in shown and wrong not in shown
