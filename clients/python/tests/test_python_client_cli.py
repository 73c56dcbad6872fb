"""The `compute-broker-client` command, run as a subprocess against stub servers."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from pyclient_support import HANG, STUB_HELP, STUB_IP, STUB_STATUS, StubBroker, cli_env, run_cli


def _at(stub: StubBroker) -> list[str]:
    return ["--host", stub.host, "--port", str(stub.port)]


@pytest.mark.parametrize(
    ("args", "request_line", "stdout"),
    [
        (["get"], "GET_WORKER", STUB_IP),
        (
            ["get", "--type", "c7i.large", "--market", "spot", "--wait", "60"],
            "GET_WORKER type=c7i.large market=spot wait=60",
            STUB_IP,
        ),
        (["ping", STUB_IP], f"PING {STUB_IP}", "OK"),
        (["release", STUB_IP], f"RELEASE {STUB_IP}", "OK"),
        (["burst", "2"], "BURST 2", "i-0a1\ni-0b2"),
        (["help"], "HELP", STUB_HELP),
    ],
)
def test_commands_print_reply_and_exit_0(
    stub: StubBroker, args: list[str], request_line: str, stdout: str
) -> None:
    """Each command sends its request (no client= by default) and prints the reply, exit 0."""
    result = run_cli(*_at(stub), *args)
    assert (result.returncode, result.stdout, result.stderr) == (0, stdout + "\n", "")
    assert stub.lines == [request_line]


def test_status_prints_indented_json(stub: StubBroker) -> None:
    """`status` prints the STATUS JSON indented, exit 0."""
    result = run_cli(*_at(stub), "status")
    assert result.returncode == 0
    assert json.loads(result.stdout) == STUB_STATUS
    assert result.stdout.startswith("{\n  ")


def test_client_id_option_and_variable(stub: StubBroker) -> None:
    """--client-id, else $COMPUTE_BROKER_CLIENT_ID, is sent as client=ID."""
    assert run_cli(*_at(stub), "--client-id", "rig-7", "get").returncode == 0
    assert run_cli(*_at(stub), "get", env=cli_env(COMPUTE_BROKER_CLIENT_ID="rig-8")).returncode == 0
    assert stub.lines == ["GET_WORKER client=rig-7", "GET_WORKER client=rig-8"]


def test_host_and_port_from_environment(stub: StubBroker) -> None:
    """Without --host/--port the command uses $COMPUTE_BROKER_HOST and $COMPUTE_BROKER_PORT."""
    env = cli_env(COMPUTE_BROKER_HOST=stub.host, COMPUTE_BROKER_PORT=str(stub.port))
    result = run_cli("help", env=env)
    assert (result.returncode, result.stdout) == (0, STUB_HELP + "\n")


def test_broker_error_exits_1_with_message_on_stderr(stub: StubBroker) -> None:
    """A broker ERROR reply exits 1, the line on stderr and nothing on stdout."""
    result = run_cli(*_at(stub), "ping", "10.9.9.9")
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr.strip() == "ERROR: Worker not found"


def test_nonsense_reply_exits_1(stub: StubBroker) -> None:
    """A reply that does not fit the request exits 1."""
    stub.respond = lambda line: "hello"
    result = run_cli(*_at(stub), "get")
    assert result.returncode == 1
    assert "not an IP address" in result.stderr


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["frob"],
        ["burst"],
        ["burst", "many"],
        ["ping"],
        ["get", "--wait", "soon"],
        ["get", "--type", "c7i large"],
        ["get", "--wait", "0"],
        ["--port", "70000", "status"],
        ["--timeout", "0", "status"],
        ["--client-id", "bad id", "status"],
    ],
)
def test_usage_errors_exit_2(stub: StubBroker, args: list[str]) -> None:
    """Bad usage exits 2 with a message on stderr and sends nothing."""
    port_args = [] if "--port" in args else ["--port", str(stub.port)]
    result = run_cli("--host", stub.host, *port_args, *args)
    assert result.returncode == 2
    assert result.stderr
    assert stub.lines == []


def test_refused_connection_exits_3(refused_port: int) -> None:
    """A closed port exits 3 after the retries."""
    result = run_cli("--port", str(refused_port), "--host", "127.0.0.1", "--retries", "1", "status")
    assert result.returncode == 3
    assert "refused" in result.stderr


def test_timeout_exits_3(silent_port: int) -> None:
    """A broker that never answers exits 3 after --timeout."""
    result = run_cli("--host", "127.0.0.1", "--port", str(silent_port), "--timeout", "0.3", "help")
    assert result.returncode == 3
    assert "did not answer" in result.stderr


def test_close_without_reply_exits_3(stub: StubBroker) -> None:
    """A broker that hangs up without replying exits 3."""
    stub.respond = lambda line: None
    assert run_cli(*_at(stub), "status").returncode == 3


def test_get_waits_beyond_timeout_for_wait(stub: StubBroker) -> None:
    """`get --wait` waits longer than --timeout for the reply; without a reply it exits 3."""
    stub.respond = lambda line: HANG
    result = run_cli(*_at(stub), "--timeout", "0.2", "get", "--wait", "0.4")
    assert result.returncode == 3
    assert "within 0.6s" in result.stderr


def test_console_script_is_installed() -> None:
    """The `compute-broker-client` console script runs (when the package is installed)."""
    script = shutil.which("compute-broker-client", path=str(Path(sys.executable).parent))
    if script is None:
        pytest.skip("compute_broker_client is not installed in this environment")
    result = subprocess.run(
        [script, "--version"], capture_output=True, text=True, timeout=30, check=False
    )
    assert result.returncode == 0
    assert result.stdout.startswith("compute-broker-client ")
