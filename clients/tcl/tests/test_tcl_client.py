"""The Tcl client against a live sandbox broker.

Starts `python -m broker serve --sandbox` on a free loopback port, then
- runs the tcltest suite (`tclsh clients/tcl/tests/all.tcl`) with COMPUTE_BROKER_HOST/PORT
  pointing at it, and fails with tcltest's output when any Tcl test fails;
- runs the seed guide's Tcl snippet (request a worker, release it) verbatim against it.
A second sandbox broker, with a tokens file, checks the client's AUTH against the real
access control.

Each test runs once per Tcl: `tclsh` (Tcl 8.6 on Debian 12) and a Tcl 9 shell (`tclsh9.0`,
Debian 13's package tcl9.0) when one is installed. Without tclsh the tests are skipped, except
in CI (the CI environment variable is set), where .ci/run installs tclsh and its absence is a
failure; without a Tcl 9 shell the Tcl 9 runs are skipped, in CI too (Debian 12 has none).
"""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

TESTS_DIR = Path(__file__).resolve().parent
TCL_DIR = TESTS_DIR.parent
REPO_ROOT = TCL_DIR.parent.parent
TCLSH = shutil.which("tclsh")
# A Tcl 9 shell, by the names its packages install (Debian 13: tcl9.0 -> /usr/bin/tclsh9.0).
TCLSH9_NAMES = ("tclsh9.0", "tclsh9.1", "tclsh9")
TCLSH9 = next((path for path in map(shutil.which, TCLSH9_NAMES) if path), None)
TCL9_PACKAGE = "tcl9.0"
IN_CI = bool(os.environ.get("CI"))

pytestmark = pytest.mark.slow  # every test runs tclsh (and most a broker process)

BROKER_CONFIG = """\
sandbox_boot_time: 0.5
launch_timeout: 30
describe_interval: 0.1
# The default type and compute_broker.test's freshType candidates: allowed, and priced (the
# broker refuses a type with no known price).
allowed_instance_types: [c7i.8xlarge, t3.small, t3.medium, t3.large, m5.large, m5.xlarge,
  c5.large, c5.xlarge, r5.large]
prices:
  t3.medium: {spot: 0.0125}
  m5.large: {spot: 0.035}
  m5.xlarge: {spot: 0.07}
  r5.large: {spot: 0.04}
"""
STARTUP_TIMEOUT = 60.0
SUITE_TIMEOUT = 120.0

# The seed guide's "Client Integration" snippets ("Request worker", "Release worker"), as
# written there: the test defines broker_host and replaces the port 9000 with the live one.
SEED_REQUEST = """\
set sock [socket $broker_host 9000]
puts $sock "GET_WORKER"
flush $sock
gets $sock worker_ip
close $sock

puts "Got worker at: $worker_ip"

# Now connect to worker for actual compute
set worker_sock [socket $worker_ip 2560]
# ... your dserv protocol ...
close $worker_sock
"""
SEED_RELEASE = """\
set sock [socket $broker_host 9000]
puts $sock "RELEASE $worker_ip"
flush $sock
gets $sock response  ;# Should get "OK"
close $sock
"""
SEED_WORKER_PORT = 2560

LIVE_TOKEN = "Tk-live-tcl-" + "7c" * 12
WRONG_TOKEN = "Tk-live-wrong-" + "w" * 20
# Against token_broker, COMPUTE_BROKER_TOKEN set to LIVE_TOKEN: one result per line.
TOKEN_SCRIPT = """\
package require compute_broker
proc ec {script} {
    catch {uplevel 1 $script} msg opts
    return [list [dict get $opts -errorcode] $msg]
}
puts [ec {compute_broker::status -token ""}]
puts [ec {compute_broker::status -token %(wrong)s}]
set ip [compute_broker::get_worker -client rig]
puts [list ip $ip]
puts [list ping [compute_broker::ping $ip -client rig]]
puts [list status [compute_broker::status]]
set ::done {}
compute_broker::release $ip -client rig -command {lappend ::done}
vwait ::done
puts [list release {*}$::done]
puts [ec {compute_broker::burst 1}]
"""

TOTALS = re.compile(
    r"^all\.tcl:\s+Total\s+(\d+)\s+Passed\s+(\d+)\s+Skipped\s+(\d+)\s+Failed\s+(\d+)", re.M
)


@dataclass
class LiveBroker:
    host: str
    port: int
    output: list[str]

    def log(self) -> str:
        return "".join(self.output[-200:])

    def request(self, line: str) -> str:
        """One request on its own connection; the reply line without its line ending."""
        with socket.create_connection((self.host, self.port), timeout=10) as conn:
            conn.sendall(line.encode() + b"\n")
            reply = b""
            while not reply.endswith(b"\n"):
                chunk = conn.recv(65536)
                if not chunk:
                    break
                reply += chunk
        return reply.decode().rstrip("\r\n")


@pytest.fixture(scope="module", params=["tcl", "tcl9"])
def tclsh(request: pytest.FixtureRequest) -> str:
    """The Tcl shell to run: the default tclsh, then a Tcl 9 one (each checked for its major
    version, so that the Tcl 9 run cannot silently be a Tcl 8 one)."""
    if request.param == "tcl":
        if TCLSH is None:
            if IN_CI:
                pytest.fail("tclsh is not installed, and CI is set: .ci/run should install it")
            pytest.skip("tclsh not found (install Tcl 8.6, e.g. apt-get install tcl)")
        return TCLSH
    if TCLSH9 is None:
        pytest.skip(
            f"no Tcl 9 shell ({', '.join(TCLSH9_NAMES)}) on this machine: "
            f"apt-get install {TCL9_PACKAGE} (Debian 13 and later; Debian 12 has no Tcl 9)"
        )
    version = _tcl_version(TCLSH9)
    assert version.startswith("9."), f"{TCLSH9} is Tcl {version}, not Tcl 9"
    return TCLSH9


def _tcl_version(tclsh: str) -> str:
    result = subprocess.run(
        [tclsh],
        input="puts [info patchlevel]\n",
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return result.stdout.strip()


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveBroker]:
    """A sandbox broker on a free loopback port, for this module's tests."""
    yield from _serve(tmp_path_factory.mktemp("tcl-client-broker"), BROKER_CONFIG)


@pytest.fixture(scope="module")
def token_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveBroker]:
    """A sandbox broker with access control: one `use` token, LIVE_TOKEN, named tcl."""
    workdir = tmp_path_factory.mktemp("tcl-client-token-broker")
    tokens = workdir / "tokens"
    tokens.write_text(f"tcl use {LIVE_TOKEN}\n")
    tokens.chmod(0o600)  # the broker refuses a tokens file that others may read
    yield from _serve(workdir, BROKER_CONFIG + f"tokens_file: {tokens}\n")


def _serve(workdir: Path, config_text: str) -> Iterator[LiveBroker]:
    """Run a sandbox broker with `config_text` until the generator is closed."""
    config = workdir / "broker.yaml"
    config.write_text(config_text)
    command = [sys.executable, "-m", "broker", "serve", "--sandbox"]
    command += ["--host", "127.0.0.1", "--port", "0", "--config", str(config)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("COMPUTE_BROKER_")}
    proc = subprocess.Popen(
        command,
        cwd=REPO_ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    output: list[str] = []
    lines: queue.Queue[str | None] = queue.Queue()

    def drain() -> None:  # keeps reading so the broker never blocks on a full pipe
        assert proc.stdout is not None
        for line in proc.stdout:
            output.append(line)
            lines.put(line)
        lines.put(None)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        host, port = _wait_until_listening(lines, output)
        yield LiveBroker(host, port, output)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
        reader.join(timeout=5)


def _wait_until_listening(lines: queue.Queue[str | None], output: list[str]) -> tuple[str, int]:
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            pytest.fail(f"the broker did not print 'listening on' in {STARTUP_TIMEOUT:.0f}s")
        try:
            line = lines.get(timeout=remaining)
        except queue.Empty:
            continue
        if line is None:
            pytest.fail("the broker exited before listening:\n" + "".join(output))
        match = re.match(r"listening on (\S+):(\d+)\s*$", line)
        if match:
            return match.group(1), int(match.group(2))


def _tcl_env(broker: LiveBroker) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("COMPUTE_BROKER_")}
    env["COMPUTE_BROKER_HOST"] = broker.host
    env["COMPUTE_BROKER_PORT"] = str(broker.port)
    return env


def test_tcltest_suite(tclsh: str, broker: LiveBroker) -> None:
    """clients/tcl/tests/all.tcl: every Tcl test passes, the live-broker ones included."""
    result = subprocess.run(
        [tclsh, str(TESTS_DIR / "all.tcl")],
        cwd=REPO_ROOT,
        env=_tcl_env(broker),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=SUITE_TIMEOUT,
    )
    report = f"tcltest output:\n{result.stdout}\n{result.stderr}\nbroker log:\n{broker.log()}"
    totals = TOTALS.search(result.stdout)
    assert totals, f"no tcltest totals line\n{report}"
    total, passed, skipped, failed = (int(n) for n in totals.groups())
    assert failed == 0, f"{failed} Tcl test(s) failed\n{report}"
    assert result.returncode == 0, f"all.tcl exited {result.returncode}\n{report}"
    assert "Test files exiting with errors" not in result.stdout, report
    assert total > 0 and passed + skipped == total, report
    assert "liveBroker" not in result.stdout, f"live-broker tests were skipped\n{report}"


def test_tokens_against_a_broker_with_access_control(tclsh: str, token_broker: LiveBroker) -> None:
    """With tokens on: none or a wrong one is an AUTH error; COMPUTE_BROKER_TOKEN serves all."""
    env = _tcl_env(token_broker)
    env["COMPUTE_BROKER_TOKEN"] = LIVE_TOKEN
    env["TCLLIBPATH"] = str(TCL_DIR)
    result = subprocess.run(
        [tclsh],
        input=TOKEN_SCRIPT % {"wrong": WRONG_TOKEN},
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=SUITE_TIMEOUT,
    )
    report = f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}\nlog:\n{token_broker.log()}"
    assert result.returncode == 0, report
    lines = result.stdout.splitlines()
    assert lines[0].startswith("{COMPUTE_BROKER AUTH {ERROR: auth required}} "), report
    assert lines[1].startswith(
        "{COMPUTE_BROKER AUTH {ERROR: auth required (token not accepted)}} "
    ), report
    ip = re.fullmatch(r"ip (127\.77\.\d+\.\d+)", lines[2])
    assert ip, report
    assert lines[3] == "ping OK", report
    assert '"view":"own"' in lines[4].replace(" ", "") and '"token:tcl/rig"' in lines[4], report
    assert lines[5] == "release ok OK", report
    assert lines[6].startswith(
        "{COMPUTE_BROKER BROKER_ERROR {ERROR: not allowed: BURST needs the admin role}} "
    ), report
    assert LIVE_TOKEN not in result.stdout + result.stderr, report


def test_seed_snippet_verbatim(tclsh: str, broker: LiveBroker) -> None:
    """The seed guide's Tcl snippet gets a worker and releases it."""
    script = "\n".join(
        [
            f"set broker_host {broker.host}",
            SEED_REQUEST.replace("9000", str(broker.port)),
            SEED_RELEASE.replace("9000", str(broker.port)),
            'puts "response: $response"',
        ]
    )
    # The snippet connects to the worker's dserv port. Sandbox workers have loopback IPs
    # (127.77.x.y) with nothing behind them, so a listener on that port of every local
    # address stands in for dserv (the kernel completes the connect; nothing is read).
    with _stand_in_worker(SEED_WORKER_PORT):
        result = subprocess.run(
            [tclsh],
            input=script,
            cwd=REPO_ROOT,
            env=_tcl_env(broker),
            capture_output=True,
            text=True,
            timeout=SUITE_TIMEOUT,
        )
    report = f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}\nbroker log:\n{broker.log()}"
    assert result.returncode == 0, report
    match = re.search(r"^Got worker at: (127\.77\.\d+\.\d+)$", result.stdout, re.M)
    assert match, report
    assert re.search(r"^response: OK$", result.stdout, re.M), report
    # The snippet sends no client=ID: its lease is the one of the bare peer address.
    status = json.loads(broker.request("STATUS"))
    bare = [lease for lease in status["leases"] if "/" not in lease["client"]]
    assert bare == [], f"the seed client's lease is still there: {bare}\n{report}"


@contextmanager
def _stand_in_worker(port: int) -> Iterator[None]:
    """Listen on 0.0.0.0:port for the duration of the block, if the port is free.

    If something already listens there (a developer's own dserv), that accepts the connect.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("0.0.0.0", port))
            sock.listen(16)
        except OSError:
            pass  # the port is taken: whatever holds it accepts the connect (or the test says)
        yield
    finally:
        sock.close()
