"""The `compute-broker-client` command, run as a subprocess against stub servers."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from pyclient_support import HANG, STUB_HELP, STUB_IP, STUB_STATUS, StubBroker, cli_env, run_cli

pytestmark = pytest.mark.slow  # every test runs the CLI as a process


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
    ("args", "complaint"),
    [
        ([], "a command is required"),
        (["frob"], "argument COMMAND: invalid choice: 'frob'"),
        (["burst"], "the following arguments are required: N"),
        (["ping"], "the following arguments are required: ip"),
        # burst N: the broker's range, 1-100, whatever side it is missed on
        (["burst", "0"], "argument N: must be a whole number from 1 to 100, not '0'"),
        (["burst", "101"], "argument N: must be a whole number from 1 to 100, not '101'"),
        (["burst", "1000"], "argument N: must be a whole number from 1 to 100, not '1000'"),
        (["burst", "-1"], "argument N: must be a whole number from 1 to 100, not '-1'"),
        (["burst", "1.5"], "argument N: must be a whole number from 1 to 100, not '1.5'"),
        (["burst", "many"], "argument N: must be a whole number from 1 to 100, not 'many'"),
        # seconds: --wait as the broker reads wait=, --timeout likewise
        (["get", "--wait", "0"], "argument --wait: must be a number of seconds > 0, not '0'"),
        (["get", "--wait", "-5"], "argument --wait: must be a number of seconds > 0, not '-5'"),
        (["get", "--wait", "nan"], "argument --wait: must be a number of seconds > 0"),
        (["get", "--wait", "inf"], "argument --wait: must be a number of seconds > 0"),
        (["get", "--wait", "soon"], "argument --wait: must be a number of seconds > 0"),
        (["--timeout", "0", "status"], "argument --timeout: must be a number of seconds > 0"),
        (["--timeout", "inf", "status"], "argument --timeout: must be a number of seconds > 0"),
        # ports and counts
        (["--port", "0", "status"], "argument --port: must be a port number from 1 to 65535"),
        (["--port", "70000", "status"], "argument --port: must be a port number from 1 to"),
        (["--port", "http", "status"], "argument --port: must be a port number from 1 to"),
        (["--retries", "-1", "status"], "argument --retries: must be a whole number >= 0"),
        # words the broker would refuse with ERROR: usage
        (["get", "--type", "c7i large"], "argument --type: must be an EC2 instance type"),
        (["get", "--type", "C7I.LARGE"], "argument --type: must be an EC2 instance type"),
        (["get", "--market", "moon"], "argument --market: must be spot or on-demand"),
        (["ping", "1.2.3"], "argument ip: must be an IP address, not '1.2.3'"),
        (["ping", "worker-7.lab"], "argument ip: must be an IP address"),
        (["release", "10.0.0.1 client=x"], "argument ip: must be an IP address"),
        (["--client-id", "bad id", "status"], "argument --client-id: must be 1-64 characters"),
        (["--client-id", "x" * 65, "status"], "argument --client-id: must be 1-64 characters"),
    ],
)
def test_usage_errors_exit_2(stub: StubBroker, args: list[str], complaint: str) -> None:
    """Bad usage exits 2 with argparse's usage and `error: <complaint>`, and sends nothing."""
    port_args = [] if "--port" in args else ["--port", str(stub.port)]
    result = run_cli("--host", stub.host, *port_args, *args)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.startswith("usage: compute-broker-client ")
    last = result.stderr.rstrip("\n").splitlines()[-1]
    # argparse names the subcommand too: `compute-broker-client burst: error: ...`
    assert re.match(r"compute-broker-client( [a-z]+)?: error: ", last), result.stderr
    assert last.split(": error: ", 1)[1].startswith(complaint), result.stderr
    assert stub.lines == []


def test_burst_0_and_1000_are_refused_alike(stub: StubBroker) -> None:
    """`burst 0` and `burst 1000` give the same exit code and the same message, bar the value:
    neither reaches the broker (whose own answer to 1000 would be an ERROR, exit 1)."""
    low, high = (run_cli(*_at(stub), "burst", n) for n in ("0", "1000"))
    assert (low.returncode, high.returncode) == (2, 2)
    assert low.stderr.replace("'0'", "'N'") == high.stderr.replace("'1000'", "'N'")
    assert stub.lines == []


@pytest.mark.parametrize(
    ("args", "request_line"),
    [
        (["burst", "1"], "BURST 1"),
        (["burst", "100"], "BURST 100"),
        (["burst", "007"], "BURST 7"),
        (["get", "--market", "SPOT"], "GET_WORKER market=spot"),
        (["get", "--wait", "0.5"], "GET_WORKER wait=0.5"),
        (["get", "--wait", "1e3"], "GET_WORKER wait=1000"),
        (["ping", "::1"], "PING ::1"),
        (["--client-id", "", "release", "127.77.0.9"], "RELEASE 127.77.0.9"),
    ],
)
def test_values_at_the_limits_are_sent(
    stub: StubBroker, args: list[str], request_line: str
) -> None:
    """Values the broker accepts pass the checks, in the form the broker reads them."""
    result = run_cli(*_at(stub), *args)
    assert result.returncode in (0, 1), result.stderr  # 1: the stub's `Worker not found`
    assert stub.lines == [request_line]


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("COMPUTE_BROKER_PORT", "nine"),
        ("COMPUTE_BROKER_PORT", "0"),
        ("COMPUTE_BROKER_CLIENT_ID", "rig 7"),
    ],
)
def test_bad_environment_values_exit_2(variable: str, value: str) -> None:
    """A bad $COMPUTE_BROKER_PORT or $COMPUTE_BROKER_CLIENT_ID is a usage error naming it."""
    result = run_cli("--host", "127.0.0.1", "help", env=cli_env(**{variable: value}))
    assert result.returncode == 2
    last = result.stderr.rstrip("\n").splitlines()[-1]
    assert last.startswith(f"compute-broker-client: error: ${variable} must be "), result.stderr


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
