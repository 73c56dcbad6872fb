"""Fixtures for the Python client's tests: stub servers, odd sockets and a live sandbox broker."""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest
from pyclient_support import (
    LIVE_TOKENS,
    REPO_ROOT,
    AuthBroker,
    LiveBroker,
    StubBroker,
    closed_port,
    silent_listener,
)

from compute_broker_client import BrokerClient

BROKER_START_TIMEOUT = 90.0
BROKER_CONFIG = """\
sandbox_boot_time: 0.5
idle_timeout: 900
launch_timeout: 30
max_workers: 10
describe_interval: 0.2
# The live tests' type=: allowed, and priced (the broker refuses a type with no known price).
allowed_instance_types: [c7i.8xlarge, c7i.large]
prices: {c7i.large: {spot: 0.03}}
"""


@pytest.fixture(autouse=True)
def _no_token_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """A developer's own COMPUTE_BROKER_TOKEN must not change what the tests send."""
    monkeypatch.delenv("COMPUTE_BROKER_TOKEN", raising=False)


@pytest.fixture
def auth_stub() -> Iterator[AuthBroker]:
    """A stand-in broker that serves a connection only after `AUTH pyclient_support.TOKEN`."""
    server = AuthBroker()
    yield server
    server.close()


@pytest.fixture
def stub() -> Iterator[StubBroker]:
    """A stub broker answering like a healthy one (tests may replace `stub.respond`)."""
    server = StubBroker()
    yield server
    server.close()


@pytest.fixture
def stub_client(stub: StubBroker) -> BrokerClient:
    """A client of the stub with short timeouts and the id `tester`."""
    return BrokerClient(stub.host, stub.port, timeout=2.0, retry_backoff=0.01, client_id="tester")


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port that accepts connections and never answers."""
    sock = silent_listener()
    yield sock.getsockname()[1]
    sock.close()


@pytest.fixture
def refused_port() -> int:
    """A port where connections are refused."""
    return closed_port()


@pytest.fixture(scope="session")
def live_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveBroker]:
    """The real broker in sandbox mode on a free loopback port, for the whole session."""
    yield from _serve(tmp_path_factory.mktemp("live-broker"), BROKER_CONFIG)


@pytest.fixture(scope="session")
def live_token_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveBroker]:
    """A sandbox broker with access control: the tokens in LIVE_TOKENS (name role token)."""
    workdir = tmp_path_factory.mktemp("live-token-broker")
    tokens = workdir / "tokens"
    tokens.write_text("".join(f"{name} {role} {token}\n" for name, role, token in LIVE_TOKENS))
    tokens.chmod(0o600)  # the broker refuses a tokens file that others may read
    yield from _serve(workdir, BROKER_CONFIG + f"tokens_file: {tokens}\n")


def _serve(workdir: Path, config_text: str) -> Iterator[LiveBroker]:
    """Run `python -m broker serve --sandbox` with `config_text` until the generator closes."""
    if not (REPO_ROOT / "broker" / "__init__.py").is_file():
        pytest.skip("the broker's source is not beside this client")
    config = workdir / "broker.yaml"
    config.write_text(config_text)
    log_path = workdir / "broker.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("COMPUTE_BROKER_")}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "broker",
                "serve",
                "--sandbox",
                "--host",
                "127.0.0.1",
                "--port",
                "0",
                "--config",
                str(config),
            ],
            cwd=str(REPO_ROOT),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            env=env,
        )
    try:
        host, port = _await_listening(proc, log_path)
        yield LiveBroker(host, port, log_path)
    finally:
        _stop(proc)


def _await_listening(proc: subprocess.Popen[str], log_path: Path) -> tuple[str, int]:
    """Read the broker's stdout (on a thread, so the wait is bounded) until `listening on`."""
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, name="live-broker-stdout", daemon=True).start()
    deadline = time.monotonic() + BROKER_START_TIMEOUT
    seen: list[str] = []
    while True:
        try:
            line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            line = None
        if line is None:
            tail = log_path.read_text(errors="replace")[-3000:]
            pytest.fail(
                f"broker did not print 'listening on' (exit code {proc.poll()}); "
                f"stdout: {''.join(seen)!r}\nstderr tail:\n{tail}"
            )
        seen.append(line)
        match = re.search(r"listening on (\S+):(\d+)", line)
        if match:
            return match.group(1), int(match.group(2))


def _stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(15)
    if proc.stdout is not None:
        proc.stdout.close()
