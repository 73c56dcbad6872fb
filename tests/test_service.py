"""`compute-broker serve` as a systemd service and a monitored one: sd_notify READY, STATUS=
and WATCHDOG=1 to a datagram socket the test owns, socket activation (LISTEN_FDS), and the
HTTP monitor's /metrics and /healthz as the real process serves them (against moto)."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from broker.aws import make_client
from broker.dynamo_table import ensure_table
from broker.health import Health
from broker.sandbox import SandboxResources
from broker.service import activated_sockets, status_line
from tests.aws_support import full_client
from tests.harness import wait_for_blocking

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 30.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def ask(port: int, line: str) -> str:
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
        sock.sendall(line.encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    return data.decode().rstrip("\n")


@pytest.fixture
def env(aws_env: dict[str, str]) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "COMPUTE_BROKER_"))}
    return {**base, **aws_env, "AWS_CONFIG_FILE": os.devnull}


def config_file(tmp_path: Path, resources: SandboxResources, **overrides: Any) -> Path:
    config = {
        "pool_name": f"service-{uuid.uuid4().hex[:8]}",
        "ami_id": resources.ami_id,
        "security_group_ids": [resources.security_group_id],
        "key_name": resources.key_name,
        "subnet_id": resources.subnet_id,
        "region": "us-east-1",
        "registry": "memory",
        "describe_interval": 0.1,
        "log_format": "json",
        **overrides,
    }
    path = tmp_path / f"config-{uuid.uuid4().hex[:8]}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify"))
    sock.settimeout(TIMEOUT)
    yield sock
    sock.close()


def start(command: list[str], env: dict[str, str], **popen: Any) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "broker", *command],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, **popen,
    )  # fmt: skip


def stop(proc: subprocess.Popen[str]) -> None:
    proc.terminate()
    try:
        proc.wait(TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def test_systemd_hears_ready_status_and_watchdog(
    tmp_path: Path, resources: SandboxResources, env: dict[str, str], notify_socket: socket.socket
) -> None:
    """Under Type=notify with WatchdogSec: READY=1 once listening, then STATUS= lines with
    workers, leases, run rate and spend, and WATCHDOG=1 at half the watchdog interval."""
    env = {**env, "NOTIFY_SOCKET": notify_socket.getsockname(), "WATCHDOG_USEC": "1000000"}
    config = config_file(tmp_path, resources)
    proc = start(["serve", "--config", str(config), "--host", "127.0.0.1", "--port", "0"], env)
    try:
        messages: list[str] = []
        while not (any("WATCHDOG=1" in m for m in messages) and len(messages) >= 3):
            messages.append(notify_socket.recv(4096).decode())
    finally:
        stop(proc)
    assert messages[0] == "READY=1"
    statuses = [line for m in messages for line in m.split("\n") if line.startswith("STATUS=")]
    assert statuses
    assert statuses[0].startswith("STATUS=0 workers (0 ready, 0 launching), 0 leases, $0.00/h")


def test_socket_activation_serves_on_the_socket_systemd_passed(
    tmp_path: Path, resources: SandboxResources, env: dict[str, str]
) -> None:
    """With LISTEN_FDS=1 and LISTEN_PID set to the broker's pid, it serves on fd 3 (the
    socket compute-broker.socket holds across restarts), not on a port of its own."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    config = config_file(tmp_path, resources, listen_host="127.0.0.1", listen_port=free_port())
    # What systemd does: the socket as fd 3, LISTEN_PID the broker's own pid (exec keeps it).
    exec_as_systemd = (
        "import os, sys; os.dup2(int(sys.argv[1]), 3); "
        "os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS='1'); "
        "os.execv(sys.executable, [sys.executable, '-m', 'broker', *sys.argv[2:]])"
    )
    log = tmp_path / "stderr"
    with log.open("w") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-c", exec_as_systemd, str(listener.fileno()),
             "serve", "--config", str(config)],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=stderr, text=True,
            pass_fds=(listener.fileno(),),
        )  # fmt: skip
    listener.close()  # the broker holds it now
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line == f"listening on 127.0.0.1:{port}\n", log.read_text()[-2000:]
        assert ask(port, "HELP").startswith("OK commands:")
    finally:
        stop(proc)


def test_activated_sockets_are_only_those_meant_for_this_process() -> None:
    """LISTEN_PID of another process: no sockets, and the variables stay."""
    environ = {"LISTEN_PID": "1", "LISTEN_FDS": "1"}
    assert activated_sockets(environ, 2) == []
    assert environ == {"LISTEN_PID": "1", "LISTEN_FDS": "1"}


def test_metrics_and_healthz_from_the_running_broker(
    tmp_path: Path, resources: SandboxResources, env: dict[str, str]
) -> None:
    """http_listen: /metrics parses as Prometheus text with the request counted; /healthz is
    200, and 503 naming the registry once the DynamoDB table is gone."""
    table = f"service-{uuid.uuid4().hex[:8]}"
    ensure_table(make_client("dynamodb", region="us-east-1"), table)
    http = free_port()
    config = config_file(
        tmp_path,
        resources,
        registry="dynamodb",
        registry_table=table,
        reap_interval=0.5,
        http_listen=f"127.0.0.1:{http}",
    )
    proc = start(["serve", "--config", str(config), "--host", "127.0.0.1", "--port", "0"], env)
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline().rsplit(":", 1)[1])
        assert ask(port, "STATUS").startswith("{")
        base = f"http://127.0.0.1:{http}"
        with urllib.request.urlopen(f"{base}/metrics", timeout=TIMEOUT) as response:
            text = response.read().decode()
        families = {family.name: family for family in text_string_to_metric_families(text)}
        requests = families["compute_broker_requests"]
        counted = {
            (s.labels["command"], s.labels["outcome"]): s.value
            for s in requests.samples
            if s.name.endswith("_total")
        }
        assert counted[("STATUS", "ok")] == 1
        with urllib.request.urlopen(f"{base}/healthz", timeout=TIMEOUT) as response:
            assert (response.status, response.read()) == (200, b"ok\n")
        full_client("dynamodb").delete_table(TableName=table)  # not an operation the broker has

        def unhealthy() -> str | None:
            try:
                urllib.request.urlopen(f"{base}/healthz", timeout=TIMEOUT).close()
            except urllib.error.HTTPError as exc:
                return f"{exc.code} {exc.read().decode()}"
            return None

        reply = wait_for_blocking(unhealthy, TIMEOUT, what="/healthz to turn 503")
        assert reply.startswith("503 registry: last call failed")
    finally:
        stop(proc)


def test_status_line_and_health_reasons() -> None:
    """The STATUS= line's figures; health names the stalled reaper or the failed call."""
    document = {
        "totals": {"workers": 3, "by_state": {"ready": 2, "launching": 1}},
        "leases": [{}, {}],
        "budget": {"run_rate_per_hour": 1.5, "day": {"spent": 12.345}},
    }
    assert (
        status_line(document)
    ) == "3 workers (2 ready, 1 launching), 2 leases, $1.50/h, $12.35 spent today"
    health = Health(reap_interval=60.0, started_at=0.0)
    assert health.check(100.0) == (True, "ok")
    health.aws_call("ec2", "DescribeInstances", "RequestLimitExceeded")
    assert (health.check(100.0)) == (
        False,
        "ec2: last call failed: DescribeInstances: RequestLimitExceeded",
    )
    health.aws_call("ec2", "DescribeInstances", None)
    health.reaper_pass(100.0)
    assert health.check(341.0) == (False, "reaper: no pass for 241s")


@pytest.mark.slow  # runs systemd-analyze
def test_the_units_exposure_is_the_one_the_readme_states() -> None:
    """`systemd-analyze security --offline=true` rates the shipped unit as README says
    (skipped where systemd-analyze is missing)."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    result = subprocess.run(
        [analyze, "security", "--offline=true", str(ROOT / "systemd" / "compute-broker.service")],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    match = re.search(
        r"Overall exposure level for compute-broker.service: (\d+\.\d+)", result.stdout
    )
    assert match is not None, result.stdout + result.stderr
    readme = (ROOT / "README.md").read_text()
    assert f"rates it {match.group(1)} " in readme
