"""End to end: the `compute-broker` process, over TCP, against the session's moto server.

The broker runs as a real subprocess (`python -m broker serve`) with the production boto3
path; only AWS_ENDPOINT_URL points at moto on loopback. The test process owns moto, so it can
look at EC2 directly and a broker restart keeps the cloud.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
import yaml

from broker.aws import make_client
from broker.checks import EXIT_CONFIG
from broker.dynamo import DynamoRegistry
from broker.dynamo_table import ensure_table
from broker.sandbox import MotoHandle, SandboxResources, prepare_resources
from tests.harness import listening_port, wait_for_blocking

ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT = 60.0

pytestmark = pytest.mark.slow  # every test starts the broker (or another command) as a process


@pytest.fixture(scope="module")
def resources(moto_server: MotoHandle) -> SandboxResources:
    ensure_table(make_client("dynamodb", region="us-east-1"), "compute-broker")
    return prepare_resources()


class BrokerProcess:
    """A `compute-broker serve` subprocess; stdout is read for `listening on`, stderr logged."""

    def __init__(self, config: dict[str, Any], env: dict[str, str], workdir: Path) -> None:
        self.config_path = workdir / f"config-{uuid.uuid4().hex[:8]}.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.log_path = workdir / f"broker-{uuid.uuid4().hex[:8]}.log"
        self._log = self.log_path.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "broker", "serve", "--config", str(self.config_path),
             "--host", "127.0.0.1", "--port", "0"],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=self._log, text=True,
        )  # fmt: skip
        self.port = self._wait_listening()

    def _wait_listening(self) -> int:
        port = listening_port(self.proc, START_TIMEOUT)
        if port is None:
            self.proc.kill()
            raise AssertionError(f"broker did not start:\n{self.log_path.read_text()[-3000:]}")
        return port

    def ask(self, line: str, timeout: float = 30.0) -> str:
        """One request on its own connection, as the seed clients do."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=timeout) as sock:
            sock.sendall(line.encode() + b"\n")
            return read_line(sock)

    def events(self) -> list[dict[str, Any]]:
        self._log.flush()
        lines = self.log_path.read_text().splitlines()
        return [json.loads(line) for line in lines if line.startswith("{")]

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
            self._log.close()


def read_line(sock: socket.socket) -> str:
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return data.decode().rstrip("\n")


@pytest.fixture
def pool_name() -> str:
    return f"e2e-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def start_broker(
    resources: SandboxResources,
    aws_env: dict[str, str],
    pool_name: str,
    tmp_path: Path,
) -> Iterator[Callable[..., BrokerProcess]]:
    """Start brokers on the session's moto server, one pool per test; stop them afterwards."""
    started: list[BrokerProcess] = []
    env = {**os.environ, **aws_env}

    def start(**overrides: Any) -> BrokerProcess:
        config = {
            "pool_name": pool_name,
            "ami_id": resources.ami_id,
            "security_group_ids": [resources.security_group_id],
            "key_name": resources.key_name,
            "subnet_id": resources.subnet_id,
            "region": "us-east-1",
            "describe_interval": 0.1,
            "log_format": "json",
            **overrides,
        }
        broker = BrokerProcess(config, env, tmp_path)
        started.append(broker)
        return broker

    yield start
    for broker in started:
        broker.stop(signal.SIGKILL)


def pool_instances(pool_name: str, states: tuple[str, ...] = ("pending", "running")) -> list[str]:
    """Instance ids EC2 (moto) has for this pool in these states."""
    client = make_client("ec2", region="us-east-1")
    pages = client.get_paginator("describe_instances").paginate(
        Filters=[
            {"Name": "tag:compute-broker:pool", "Values": [pool_name]},
            {"Name": "instance-state-name", "Values": list(states)},
        ]
    )
    return [i["InstanceId"] for p in pages for r in p["Reservations"] for i in r["Instances"]]


def test_cold_storm_of_fifty_one_shot_clients_launches_one_instance(
    start_broker: Callable[..., BrokerProcess],
    pool_name: str,
    boot_delay: Callable[[float], None],
) -> None:
    """50 concurrent GET_WORKERs on an empty pool: one RunInstances, one worker, one IP."""
    boot_delay(1.0)
    broker = start_broker()
    replies: list[str] = []

    def client() -> None:
        replies.append(broker.ask("GET_WORKER"))

    threads = [threading.Thread(target=client) for _ in range(50)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(replies) == 50
    assert len(set(replies)) == 1
    assert re.fullmatch(r"127\.77\.\d+\.\d+", replies[0])
    assert len(pool_instances(pool_name)) == 1
    launches = [e for e in broker.events() if e["event"] == "worker.launch"]
    assert len(launches) == 1


def test_every_command_against_ec2(
    start_broker: Callable[..., BrokerProcess], pool_name: str
) -> None:
    """GET_WORKER, PING, STATUS, BURST, RELEASE act on real (moto) EC2 instances."""
    broker = start_broker()
    ip = broker.ask("GET_WORKER")
    (first,) = pool_instances(pool_name)
    assert broker.ask(f"PING {ip}") == "OK"
    status = json.loads(broker.ask("STATUS"))
    assert status["workers"][0]["instance_id"] == first
    assert status["workers"][0]["market"] == "spot"
    burst = broker.ask("BURST 2").split()
    assert burst[:2] == ["OK", "2"]
    assert sorted(pool_instances(pool_name)) == sorted([first, *burst[2:]])
    assert broker.ask(f"RELEASE {ip}") == "OK"
    assert first not in pool_instances(pool_name)
    assert broker.ask(f"RELEASE {ip}") == "OK"
    assert broker.ask("RELEASE 203.0.113.5") == "ERROR: Worker not found"
    client = make_client("ec2", region="us-east-1")
    described = client.describe_instances(InstanceIds=burst[2:])
    lifecycles = {
        i.get("InstanceLifecycle") for r in described["Reservations"] for i in r["Instances"]
    }
    assert lifecycles == {"spot"}


def test_idle_worker_is_terminated_in_ec2(
    start_broker: Callable[..., BrokerProcess], pool_name: str
) -> None:
    """After idle_timeout without activity the instance is terminated, not just forgotten."""
    broker = start_broker(idle_timeout=1, reap_interval=0.2)
    broker.ask("GET_WORKER")
    assert len(pool_instances(pool_name)) == 1
    wait_for_blocking(lambda: pool_instances(pool_name) == [])

    def reaps() -> list[dict[str, Any]]:
        return [e for e in broker.events() if e["event"] == "worker.reap"]

    wait_for_blocking(reaps)  # info lines reach the log within 0.1 s (written in batches)
    assert len(reaps()) == 1


def test_restart_adopts_running_workers_instead_of_launching(
    start_broker: Callable[..., BrokerProcess], pool_name: str
) -> None:
    """SIGTERM leaves workers running; the next broker hands out the same worker."""
    first = start_broker()
    ip = first.ask("GET_WORKER")
    assert first.stop() == 0
    assert len(pool_instances(pool_name)) == 1
    second = start_broker()
    assert second.ask("GET_WORKER") == ip
    assert len(pool_instances(pool_name, ("pending", "running", "terminated"))) == 1
    assert any(e["event"] == "registry.restored" for e in second.events())


def test_sigterm_lets_a_waiting_request_finish(
    start_broker: Callable[..., BrokerProcess],
    boot_delay: Callable[[float], None],
) -> None:
    """A GET_WORKER waiting for a boot when SIGTERM arrives still gets its IP."""
    boot_delay(2.0)
    broker = start_broker()
    with socket.create_connection(("127.0.0.1", broker.port), timeout=30) as sock:
        sock.sendall(b"GET_WORKER\n")
        wait_for_blocking(lambda: any(e["event"] == "worker.launch" for e in broker.events()))
        broker.proc.send_signal(signal.SIGTERM)
        assert re.fullmatch(r"127\.77\.\d+\.\d+", read_line(sock))
    assert broker.proc.wait(30) == 0
    events = [e["event"] for e in broker.events()]
    assert "broker.stopping" in events
    assert events[-1] == "broker.stopped"


def test_request_lines_held_for_the_next_write_are_all_logged_by_exit(
    start_broker: Callable[..., BrokerProcess],
) -> None:
    """Info lines are written in batches while serving; SIGTERM right after a burst of
    requests still leaves one `request` line per request in the log, before `broker.stopped`."""
    broker = start_broker()
    for _ in range(30):
        assert broker.ask("STATUS").startswith("{")
    broker.proc.send_signal(signal.SIGTERM)
    assert broker.proc.wait(30) == 0
    events = [e["event"] for e in broker.events()]
    assert events.count("request") == 30
    assert events[-1] == "broker.stopped"


def test_connection_that_sends_nothing_launches_nothing(
    start_broker: Callable[..., BrokerProcess], pool_name: str
) -> None:
    """A health probe that connects and closes is not a GET_WORKER (the seed launched one)."""
    broker = start_broker()
    for _ in range(3):
        socket.create_connection(("127.0.0.1", broker.port), timeout=5).close()
    assert broker.ask("HELP").startswith("OK commands:")
    assert pool_instances(pool_name) == []


def test_seed_python_snippet_works_unchanged(
    start_broker: Callable[..., BrokerProcess], pool_name: str
) -> None:
    """The setup guide's Python client, as written (host and port filled in), gets a worker
    and releases it."""
    broker = start_broker()
    snippet = textwrap.dedent(
        """
        import socket

        # Get worker
        sock = socket.socket()
        sock.connect(('broker_host', 9000))
        sock.send(b'GET_WORKER\\n')
        worker_ip = sock.recv(1024).decode().strip()
        sock.close()

        print(f"Worker IP: {worker_ip}")

        # ... do work on worker_ip:2560 ...

        # Release worker
        sock = socket.socket()
        sock.connect(('broker_host', 9000))
        sock.send(f'RELEASE {worker_ip}\\n'.encode())
        sock.close()
        """
    )
    snippet = snippet.replace("'broker_host', 9000", f"'127.0.0.1', {broker.port}")
    result = subprocess.run(
        [sys.executable, "-c", snippet], capture_output=True, text=True, timeout=60, check=True
    )
    assert re.fullmatch(r"Worker IP: 127\.77\.\d+\.\d+\n", result.stdout)
    wait_for_blocking(lambda: pool_instances(pool_name) == [])


@pytest.mark.skipif(
    shutil.which("nc") is None and not os.environ.get("CI"), reason="nc not installed"
)
def test_netcat_one_liner_gets_a_worker(start_broker: Callable[..., BrokerProcess]) -> None:
    """`printf 'GET_WORKER\\n' | nc -N host port` prints the worker's IP."""
    broker = start_broker()
    result = subprocess.run(
        f"printf 'GET_WORKER\\n' | nc -N 127.0.0.1 {broker.port}",
        shell=True, capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    assert re.fullmatch(r"127\.77\.\d+\.\d+\n", result.stdout)


def test_bad_config_stops_the_broker_with_one_line_naming_the_key(tmp_path: Path) -> None:
    """An unknown key: exit status 78 (systemd does not restart it) and one line on stderr
    naming it; nothing listens."""
    config = tmp_path / "bad.yaml"
    config.write_text("listen_prot: 9000\n")
    result = subprocess.run(
        [sys.executable, "-m", "broker", "serve", "--sandbox", "--config", str(config)],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == EXIT_CONFIG
    assert result.stdout == ""
    (line,) = result.stderr.splitlines()
    assert line.startswith("config: listen_prot: unknown key")
    check = subprocess.run(
        [sys.executable, "-m", "broker", "check-config", str(config)],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert check.returncode == EXIT_CONFIG
    assert check.stderr == result.stderr


def test_serving_aws_without_an_ami_is_refused_at_start(tmp_path: Path) -> None:
    """Outside the sandbox, ami_id is required: the broker says so instead of failing later."""
    # Even if the check regressed, nothing may reach real AWS: no credentials, and the
    # endpoint is a closed loopback port.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COMPUTE_BROKER_", "AWS_"))}
    env["AWS_ENDPOINT_URL"] = "http://127.0.0.1:9"
    env["AWS_CONFIG_FILE"] = env["AWS_SHARED_CREDENTIALS_FILE"] = os.devnull
    result = subprocess.run(
        [sys.executable, "-m", "broker", "serve", "--host", "127.0.0.1", "--port", "0"],
        cwd=ROOT, capture_output=True, text=True, timeout=60, env=env,
    )  # fmt: skip
    assert result.returncode == EXIT_CONFIG
    assert "ami_id" in result.stderr


def test_sandbox_mode_serves_a_worker_with_no_aws_setup(tmp_path: Path) -> None:
    """`compute-broker serve --sandbox` alone (embedded moto) hands out a loopback worker."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    config = tmp_path / "sandbox.yaml"
    config.write_text("sandbox_boot_time: 0.2\ndescribe_interval: 0.1\nlog_format: json\n")
    proc = subprocess.Popen(
        [sys.executable, "-m", "broker", "serve", "--sandbox", "--host", "127.0.0.1",
         "--port", "0", "--config", str(config)],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        match = re.fullmatch(r"listening on 127\.0\.0\.1:(\d+)\n", line)
        assert match, line
        with socket.create_connection(("127.0.0.1", int(match.group(1))), timeout=30) as sock:
            sock.sendall(b"GET_WORKER\n")
            assert re.fullmatch(r"127\.77\.\d+\.\d+", read_line(sock))
    finally:
        proc.terminate()
        assert proc.wait(30) == 0


def status_of(broker: BrokerProcess) -> dict[str, Any]:
    status: dict[str, Any] = json.loads(broker.ask("STATUS"))
    return status


def test_sigkill_with_leases_held_loses_nothing(
    start_broker: Callable[..., BrokerProcess], pool_name: str
) -> None:
    """kill -9 with leases held: the restarted broker has the same workers, the same leases
    and the same idle clocks (they kept running while it was down), and launches nothing."""
    first = start_broker()
    ip = first.ask("GET_WORKER client=alice")
    assert first.ask("GET_WORKER client=bob") == ip
    before = status_of(first)
    last_active = time.time()  # the worker's last activity was before this
    first.stop(signal.SIGKILL)  # returns once the process is gone
    second = start_broker()  # the downtime: from the kill until the new one listens
    asked = time.time()
    after = status_of(second)
    assert [w["instance_id"] for w in after["workers"]] == [
        w["instance_id"] for w in before["workers"]
    ]
    assert sorted((le["client"], le["started_at"]) for le in after["leases"]) == sorted(
        (le["client"], le["started_at"]) for le in before["leases"]
    )
    # Idle since before the kill: a clock restarted at the restore would be short by the
    # whole downtime (a process start, over half a second).
    assert after["workers"][0]["idle_seconds"] >= asked - last_active - 0.001  # rounded to ms
    assert after["workers"][0]["clients"] == 2
    assert second.ask(f"RELEASE {ip} client=alice") == "OK"
    assert len(pool_instances(pool_name)) == 1  # bob still holds it
    assert len(pool_instances(pool_name, ("pending", "running", "terminated"))) == 1


def test_sigkill_while_idle_keeps_the_worker_and_its_idle_clock(
    start_broker: Callable[..., BrokerProcess], pool_name: str
) -> None:
    """kill -9 with an idle worker: after the restart the worker is reaped on the original
    schedule, not idle_timeout after the restart."""
    first = start_broker(idle_timeout=6, reap_interval=0.2)
    ip = first.ask("GET_WORKER")
    assert first.ask(f"RELEASE {ip}") == "OK"  # terminated: nobody holds it
    ip = first.ask("GET_WORKER client=x")
    first.stop(signal.SIGKILL)
    time.sleep(6)  # the scenario, not synchronisation: down for a whole idle_timeout
    second = start_broker(idle_timeout=6, reap_interval=0.2)
    restarted = time.monotonic()
    wait_for_blocking(lambda: pool_instances(pool_name) == [], timeout=15)
    # Restored idle since before the kill: reaped at once. Adopted as a stranger (or with
    # its idle clock restarted), it would live idle_timeout (6 s) after the restart.
    assert time.monotonic() - restarted < 5
    assert second.ask(f"PING {ip}") == "ERROR: Worker not found"


def test_crash_between_run_instances_and_the_registry_write_is_adopted(
    start_broker: Callable[..., BrokerProcess],
    pool_name: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The broker is killed after EC2 launched but before the worker reached DynamoDB: the
    next broker adopts that instance (launch-token tag + intent) and launches no other, and
    settles the intent once it is older than launch_timeout."""
    from moto.dynamodb.responses import DynamoHandler

    broker = start_broker()
    original = DynamoHandler.put_item
    killed: list[bool] = []

    def put_item_then_crash(handler: Any) -> Any:
        if "worker#" in str(handler.body) and not killed:  # the worker item, after RunInstances
            killed.append(True)
            os.kill(broker.proc.pid, signal.SIGKILL)  # dies before this write lands
            raise ConnectionAbortedError("broker killed")
        return original(handler)

    monkeypatch.setattr(DynamoHandler, "put_item", put_item_then_crash)
    with socket.create_connection(("127.0.0.1", broker.port), timeout=30) as sock:
        sock.sendall(b"GET_WORKER\n")
        assert read_line(sock) == ""  # the broker died mid-request
    assert broker.proc.wait(10) == -signal.SIGKILL
    monkeypatch.setattr(DynamoHandler, "put_item", original)
    (launched,) = pool_instances(pool_name)
    second = start_broker(launch_timeout=5, reap_interval=1)
    assert [w["instance_id"] for w in status_of(second)["workers"]] == [launched]
    assert re.fullmatch(r"127\.77\.\d+\.\d+", second.ask("GET_WORKER"))
    assert pool_instances(pool_name, ("pending", "running", "terminated")) == [launched]
    assert "worker.adopted" in [e["event"] for e in second.events()]
    wait_for_blocking(
        lambda: "launch.intent_settled" in [e["event"] for e in second.events()],
        timeout=30,
        what="the intent settled",
    )


def test_two_replicas_share_one_pool_without_double_leasing_or_overshooting(
    start_broker: Callable[..., BrokerProcess],
    pool_name: str,
    boot_delay: Callable[[float], None],
) -> None:
    """Two brokers on one table, exclusive mode, max_workers 10: of 40 concurrent requests
    split across them, 10 get distinct workers, none is leased twice, at most 10 instances
    are ever launched, and every other request gets an ERROR line."""
    boot_delay(0.5)
    settings = {"sharing": "exclusive", "clients_per_worker": 1, "max_workers": 10}
    brokers = [start_broker(**settings), start_broker(**settings)]
    replies: list[str] = []

    def client(n: int) -> None:
        replies.append(brokers[n % 2].ask(f"GET_WORKER wait=10 client=c{n}", timeout=60))

    threads = [threading.Thread(target=client, args=(n,)) for n in range(40)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(90)
    assert len(replies) == 40
    ips = [r for r in replies if not r.startswith("ERROR")]
    errors = [r for r in replies if r.startswith("ERROR")]
    assert len(ips) == 10, sorted(set(errors))
    assert len(set(ips)) == 10
    assert all(e.startswith("ERROR: ") for e in errors)
    assert len(pool_instances(pool_name, ("pending", "running", "terminated"))) <= 10


def test_agent_registers_a_local_worker_that_is_preferred_and_expires(
    start_broker: Callable[..., BrokerProcess],
    pool_name: str,
    aws_env: dict[str, str],
    tmp_path: Path,
) -> None:
    """`compute-broker agent` registers a lab machine through the broker's port (no AWS
    credentials): brokers hand it out before launching; after the agent dies (no
    deregistration) its entry expires and a cloud worker is used."""
    broker = start_broker(reap_interval=0.2, agent_heartbeat=0.5)
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    agent = subprocess.Popen(
        [sys.executable, "-m", "broker", "agent", "--name", "lab-ws-1", "--ip", "10.20.30.40",
         "--broker", f"127.0.0.1:{broker.port}"],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_for_blocking(
            lambda: any(w["provider"] == "local" for w in status_of(broker)["workers"])
        )
        assert broker.ask("GET_WORKER client=a") == "10.20.30.40"
        assert broker.ask("RELEASE 10.20.30.40 client=a") == "OK"
        time.sleep(2)  # heartbeats keep it registered past its 1.5 s expiry
        assert broker.ask("GET_WORKER client=a") == "10.20.30.40"
        assert pool_instances(pool_name) == []
        agent.kill()  # no deregistration: the entry must expire
        agent.wait(10)
        wait_for_blocking(
            lambda: all(w["provider"] != "local" for w in status_of(broker)["workers"])
        )
        assert re.fullmatch(r"127\.77\.\d+\.\d+", broker.ask("GET_WORKER client=b"))
    finally:
        agent.kill()


def test_stop_all_terminates_only_this_pools_tagged_instances(
    start_broker: Callable[..., BrokerProcess],
    pool_name: str,
    resources: SandboxResources,
    aws_env: dict[str, str],
) -> None:
    """`compute-broker stop-all`: --dry-run lists and keeps; the real run terminates every
    instance of the pool, even with the broker down; an untagged instance survives."""
    broker = start_broker()
    broker.ask("GET_WORKER")
    assert broker.ask("BURST 2").startswith("OK 2 ")
    ec2 = make_client("ec2", region="us-east-1")
    stranger = ec2.run_instances(ImageId=resources.ami_id, MinCount=1, MaxCount=1)
    stranger_id = stranger["Instances"][0]["InstanceId"]
    broker.stop(signal.SIGKILL)  # works with the broker down
    env = {**os.environ, **aws_env, "COMPUTE_BROKER_POOL_NAME": pool_name}
    command = [sys.executable, "-m", "broker", "stop-all"]
    dry = subprocess.run(
        [*command, "--dry-run"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert dry.returncode == 0, dry.stderr
    assert f"3 instance(s) in pool {pool_name}" in dry.stdout
    assert len(pool_instances(pool_name)) == 3
    real = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert real.returncode == 0, real.stderr
    assert pool_instances(pool_name) == []

    async def registry_view() -> tuple[int, list[str]]:
        registry = DynamoRegistry(
            "compute-broker", pool_name, trio.CapacityLimiter(1), region="us-east-1"
        )
        workers = await registry.list_workers(time.time())
        return await registry.reserved_instances(), [w.instance_id for w in workers]

    # The broker's own retire path: the pool-wide counter and the registry are right at once,
    # not two reconciliations later.
    assert trio.run(registry_view) == (0, [])
    described = ec2.describe_instances(InstanceIds=[stranger_id])
    assert described["Reservations"][0]["Instances"][0]["State"]["Name"] == "running"
