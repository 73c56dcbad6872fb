"""Test helpers for the Python client: stub line servers, odd sockets, a CLI runner."""

from __future__ import annotations

import json
import os
import socket
import socketserver
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, TypeVar

CLIENT_DIR = Path(__file__).resolve().parents[1]
REPO_ROOT = CLIENT_DIR.parents[1]

HANG = "\x00hang"
"""A stub reply meaning: read the request, then never answer (until the stub closes)."""

Responder = Callable[[str], "str | bytes | None"]

STUB_IP = "127.77.0.9"
STUB_STATUS = {
    "workers": [{"instance_id": "i-0stub", "ip": STUB_IP, "state": "ready", "clients": 1}],
    "leases": [],
    "totals": {"workers": 1},
}
STUB_HELP = "OK commands: GET_WORKER | PING <ip> | RELEASE <ip> | STATUS | BURST <n> | HELP | QUIT"

TOKEN = "Tk-stand-in-" + "s3cr3t" * 4
"""The token AuthBroker accepts: distinctive, so a leak of it is easy to find in any text."""
LIVE_TOKENS = (
    ("alice", "use", "Tk-live-alice-" + "a1" * 10),
    ("ops", "admin", "Tk-live-ops-" + "0p" * 10),
)
"""The tokens file of conftest.live_token_broker: (name, role, token)."""
AUTH_REQUIRED = "ERROR: auth required"
TOKEN_NOT_ACCEPTED = "ERROR: auth required (token not accepted)"

T = TypeVar("T")


@dataclass(frozen=True)
class LiveBroker:
    """Where the live sandbox broker listens, and its log file."""

    host: str
    port: int
    log: Path


def default_respond(line: str) -> str | bytes | None:
    """Answer like a healthy broker with one worker at STUB_IP."""
    words = line.split()
    command = words[0].upper() if words else "GET_WORKER"
    if command == "GET_WORKER":
        return STUB_IP
    if command in ("PING", "RELEASE"):
        return "OK" if len(words) > 1 and words[1] == STUB_IP else "ERROR: Worker not found"
    if command == "STATUS":
        return json.dumps(STUB_STATUS)
    if command == "BURST":
        return "OK 2 i-0a1 i-0b2"
    if command == "HELP":
        return STUB_HELP
    return "ERROR: Unknown command"


class StubBroker:
    """A threaded loopback line server that records request lines and answers via `respond`.

    `respond(line)` returns a str (sent as one reply line), bytes (sent as they are, then the
    connection is closed), None (close without a reply) or HANG (never answer).
    """

    def __init__(self, respond: Responder = default_respond) -> None:
        self.respond = respond
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self._closing = threading.Event()
        stub = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                respond = stub.connection()
                for raw in self.rfile:
                    line = raw.decode("utf-8", "replace").rstrip("\r\n")
                    stub._record(line)
                    reply = respond(line)
                    if reply is None:
                        return
                    if reply == HANG:
                        stub._closing.wait(30)
                        return
                    if isinstance(reply, bytes):
                        self.wfile.write(reply)
                        return
                    self.wfile.write(reply.encode("utf-8") + b"\n")

        socketserver.ThreadingTCPServer.allow_reuse_address = True
        self._server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._server.block_on_close = False  # a HANG handler must not delay close()
        self.host = "127.0.0.1"
        self.port: int = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True
        )
        self._thread.start()

    def connection(self) -> Responder:
        """The responder for a new connection (by default `respond`, however it is set then)."""
        return lambda line: self.respond(line)

    def _record(self, line: str) -> None:
        with self._changed:
            self.lines.append(line)
            self._changed.notify_all()

    def wait_for(self, predicate: Callable[[list[str]], bool], timeout: float = 5.0) -> list[str]:
        """Block until `predicate(lines)` holds; a copy of the lines. AssertionError on timeout."""
        with self._changed:
            if not self._changed.wait_for(lambda: predicate(self.lines), timeout):
                raise AssertionError(f"stub never saw the expected requests: {self.lines}")
            return list(self.lines)

    def close(self) -> None:
        self._closing.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)


class AuthBroker(StubBroker):
    """A stand-in for a broker with access control: a connection is served after `AUTH TOKEN`.

    Per connection, as protocol.md has it: `AUTH <token>` answers OK (the right token) or
    `ERROR: auth required (token not accepted)` and leaves the connection as it was; any other
    request before a good AUTH is answered `ERROR: auth required`; after it, `respond(line)`.
    `auth_reply`, when set, answers every AUTH instead (to play odd brokers).
    """

    def __init__(self, respond: Responder = default_respond, token: str = TOKEN) -> None:
        self.token = token
        self.auth_reply: str | None = None
        super().__init__(respond)

    def connection(self) -> Responder:
        authenticated = False

        def respond(line: str) -> str | bytes | None:
            nonlocal authenticated
            words = line.split(" ")
            if words[0] == "AUTH":
                if self.auth_reply is not None:
                    return self.auth_reply
                if len(words) == 2 and words[1] == self.token:
                    authenticated = True
                    return "OK"
                return TOKEN_NOT_ACCEPTED
            if not authenticated:
                return AUTH_REQUIRED
            return self.respond(line)

        return respond


def silent_listener() -> socket.socket:
    """A listening socket that never accepts: connects succeed, replies never come."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    return sock


def closed_port() -> int:
    """A loopback port nobody listens on (bound, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def wait_until(probe: Callable[[], T], timeout: float = 15.0, what: str = "the condition") -> T:
    """Poll `probe` until it returns something truthy; that value. AssertionError on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


def cli_env(**extra: str) -> dict[str, str]:
    """The environment for a CLI subprocess: the package importable, no broker settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("COMPUTE_BROKER_")}
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(CLIENT_DIR), env.get("PYTHONPATH", "")) if p
    )
    env.update(extra)
    return env


def run_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 30.0
) -> subprocess.CompletedProcess[str]:
    """Run `python -m compute_broker_client ARGS` and capture its output."""
    return subprocess.run(
        [sys.executable, "-m", "compute_broker_client", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env if env is not None else cli_env(),
        cwd=str(CLIENT_DIR),
        check=False,
    )


def iter_status_leases(status: dict[str, object], ip: str) -> Iterator[dict[str, object]]:
    """The STATUS leases on the worker at `ip`."""
    leases = status.get("leases")
    assert isinstance(leases, list)
    for lease in leases:
        if isinstance(lease, dict) and lease.get("ip") == ip:
            yield lease
