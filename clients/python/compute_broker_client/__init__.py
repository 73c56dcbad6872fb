"""Client for the compute-broker line protocol, standard library only.

    from compute_broker_client import BrokerClient

    client = BrokerClient("broker.lab", 9000)
    with client.worker() as ip:  # kept alive with PINGs, RELEASEd at the end
        ...  # talk to the worker at ip:2560

Every call opens one TCP connection, sends one request line, reads one reply line and closes
the connection: nothing to keep alive between calls, nothing stale after a broker restart, and
the broker's 30 s idle-connection limit never applies. Every wait is bounded.
"""

from __future__ import annotations

import contextlib
import ipaddress
import itertools
import json
import logging
import math
import os
import re
import secrets
import socket
import threading
import time
from typing import Any, Iterator

__all__ = [
    "DEFAULT_HOST",
    "DEFAULT_KEEPALIVE",
    "DEFAULT_LAUNCH_TIMEOUT",
    "DEFAULT_PORT",
    "BrokerClient",
    "BrokerError",
    "BrokerProtocolError",
    "BrokerTimeout",
    "BrokerUnavailable",
    "ClientError",
    "default_client_id",
]

__version__ = "0.1.0"

DEFAULT_HOST = "localhost"
"""Broker host when neither `host` nor `COMPUTE_BROKER_HOST` is given."""
DEFAULT_PORT = 9000
"""Broker port when neither `port` nor `COMPUTE_BROKER_PORT` is given."""
DEFAULT_LAUNCH_TIMEOUT = 300.0
"""The broker's default `launch_timeout`: how long a GET_WORKER without `wait=` may take."""
DEFAULT_KEEPALIVE = 60.0
"""Seconds between keepalive PINGs in `BrokerClient.worker` (the broker's idle timeout: 900 s)."""
MAX_REPLY_BYTES = 16 * 1024 * 1024
"""A reply line longer than this is a protocol error (a STATUS of a big pool is well below)."""

_MAX_BACKOFF = 30.0
_CLIENT_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}\Z")
_WORD = re.compile(r"[\x21-\x7e]+\Z")  # printable ASCII, no blanks: one protocol word

_log = logging.getLogger(__name__)


class ClientError(Exception):
    """Base class of every error this client raises about talking to the broker."""


class BrokerError(ClientError):
    """The broker answered `ERROR...`; `message` is its reason, `line` the whole reply."""

    def __init__(self, message: str, line: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.line = line if line is not None else f"ERROR: {message}"

    def __str__(self) -> str:
        return self.message


class BrokerTimeout(ClientError):
    """Connecting to the broker, or waiting for its reply, took longer than allowed."""


class BrokerUnavailable(ClientError):
    """The broker could not be reached, or closed the connection without replying."""


class BrokerProtocolError(ClientError):
    """The broker replied with something the protocol does not allow for that request."""


_process_id: tuple[int, str] | None = None
_process_id_lock = threading.Lock()


def default_client_id() -> str:
    """This process's random client id (`py-<pid>-<random>`), new after a fork."""
    global _process_id
    pid = os.getpid()
    with _process_id_lock:
        if _process_id is None or _process_id[0] != pid:
            _process_id = (pid, f"py-{pid}-{secrets.token_hex(4)}")
        return _process_id[1]


class BrokerClient:
    """A client of one broker; safe to share between threads.

    `host`/`port` default to `COMPUTE_BROKER_HOST`/`COMPUTE_BROKER_PORT`, else localhost:9000.
    `timeout` bounds connecting and every reply except GET_WORKER's, which waits for a worker
    to boot: its reply may take `wait` seconds (or `launch_timeout`, the broker's default of
    300 s, when no `wait` is given) plus `timeout` as a margin. A refused connection is retried
    `connect_retries` times, after `retry_backoff` seconds doubling each time.

    `client_id` is sent as `client=ID` on GET_WORKER, PING and RELEASE so that programs on one
    host hold separate leases. It defaults to `COMPUTE_BROKER_CLIENT_ID`, else a random id per
    process; `""` sends none, so the broker identifies the caller by its IP address alone (as
    it does for netcat and the seed clients).
    """

    def __init__(
        self,
        host: str | None = None,
        port: int | None = None,
        timeout: float = 10.0,
        connect_retries: int = 3,
        retry_backoff: float = 0.5,
        client_id: str | None = None,
        *,
        launch_timeout: float = DEFAULT_LAUNCH_TIMEOUT,
    ) -> None:
        self.host = host or os.environ.get("COMPUTE_BROKER_HOST") or DEFAULT_HOST
        self.port = _port(port)
        self.timeout = _positive("timeout", timeout)
        self.launch_timeout = _positive("launch_timeout", launch_timeout)
        if isinstance(connect_retries, bool) or not isinstance(connect_retries, int):
            raise ValueError(f"connect_retries must be an int, not {connect_retries!r}")
        if connect_retries < 0:
            raise ValueError(f"connect_retries must be >= 0, not {connect_retries}")
        self.connect_retries = connect_retries
        if not (isinstance(retry_backoff, (int, float)) and 0 <= retry_backoff < math.inf):
            raise ValueError(f"retry_backoff must be a number >= 0, not {retry_backoff!r}")
        self.retry_backoff = float(retry_backoff)
        if client_id is None:
            client_id = os.environ.get("COMPUTE_BROKER_CLIENT_ID") or default_client_id()
        if client_id and not _CLIENT_ID.match(client_id):
            raise ValueError(
                f"client_id must be 1-64 characters of A-Z a-z 0-9 . _ : - (or empty), "
                f"not {client_id!r}"
            )
        self.client_id = client_id
        self._leases = itertools.count(1)
        self._leases_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"BrokerClient(host={self.host!r}, port={self.port}, client_id={self.client_id!r})"

    # -- the commands -------------------------------------------------------------------------

    def get_worker(
        self, type: str | None = None, market: str | None = None, wait: float | None = None
    ) -> str:
        """A worker's IP address: a ready one, or one launched for you (this may take minutes).

        `type` is an EC2 instance type, `market` `spot` or `on-demand`; the broker's defaults
        otherwise. `wait` bounds (in seconds) how long the broker waits for a launch. The reply
        is awaited for `wait` (or `launch_timeout`) plus `timeout` seconds.
        """
        return self._get_worker(type, market, wait, self.client_id)

    def ping(self, ip: str) -> None:
        """Keep the worker at `ip` and your lease on it alive; `BrokerError` if it is unknown."""
        self._ping(ip, self.client_id, self.connect_retries)

    def release(self, ip: str) -> None:
        """End your lease on the worker at `ip`; it is terminated if nobody else holds it."""
        self._release(ip, self.client_id)

    def status(self) -> dict[str, Any]:
        """The broker's STATUS: workers, leases and totals, as parsed JSON."""
        line = self._request("STATUS")
        try:
            value = json.loads(line)
        except ValueError as exc:
            raise BrokerProtocolError(f"STATUS reply is not JSON: {_clip(line)}") from exc
        if not isinstance(value, dict):
            raise BrokerProtocolError(f"STATUS reply is not a JSON object: {_clip(line)}")
        return value

    def burst(self, n: int) -> list[str]:
        """Launch up to `n` workers now without waiting for them; the new instance ids."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive int, not {n!r}")
        line = self._request(f"BURST {n}")
        words = line.split()
        if len(words) < 2 or words[0] != "OK" or not words[1].isdigit():
            raise BrokerProtocolError(f"unexpected BURST reply: {_clip(line)}")
        ids = words[2:]
        if len(ids) != int(words[1]):
            raise BrokerProtocolError(f"BURST reply counts {words[1]} ids but lists {len(ids)}")
        return ids

    def help(self) -> str:
        """The broker's one-line HELP reply (`OK commands: ...`)."""
        return self._request("HELP")

    @contextlib.contextmanager
    def worker(
        self,
        type: str | None = None,
        market: str | None = None,
        wait: float | None = None,
        keepalive: float | None = None,
    ) -> Iterator[str]:
        """Hold a worker for the block: yields its IP, PINGs it, RELEASEs it on the way out.

        A daemon thread PINGs every `keepalive` seconds (default `DEFAULT_KEEPALIVE`, 60 s;
        0 turns it off) so the broker does not reap the worker while the block runs. The
        worker is released however the block ends; a failed release is logged, never raised,
        so it cannot hide the block's own exception.

        Each block holds its own lease, under `<client_id>.<n>`: blocks running at the same
        time in one process may share a worker without releasing it from under each other.
        """
        interval = DEFAULT_KEEPALIVE if keepalive is None else float(keepalive)
        if not 0 <= interval < math.inf:
            raise ValueError(f"keepalive must be >= 0 seconds, not {keepalive!r}")
        lease_id = self._lease_id()
        ip = self._get_worker(type, market, wait, lease_id)
        stop = threading.Event()
        pinger: threading.Thread | None = None
        try:
            if interval > 0:
                pinger = threading.Thread(
                    target=self._keepalive,
                    args=(ip, lease_id, interval, stop),
                    name=f"compute-broker-keepalive {ip}",
                    daemon=True,
                )
                pinger.start()
            yield ip
        finally:
            stop.set()
            if pinger is not None:
                # Only a PING already on the wire delays this, and that is bounded.
                pinger.join(2 * self.timeout)
            try:
                self._release(ip, lease_id)
            except Exception as exc:
                _log.warning(
                    "releasing worker %s failed (%s); the broker drops the lease after its "
                    "idle timeout",
                    ip,
                    exc,
                )

    # -- internals ----------------------------------------------------------------------------

    def _get_worker(
        self, type: str | None, market: str | None, wait: float | None, client_id: str
    ) -> str:
        words = ["GET_WORKER"]
        if type is not None:
            words.append("type=" + _word("type", type))
        if market is not None:
            words.append("market=" + _word("market", market))
        if wait is not None:
            words.append("wait=" + _number(_positive("wait", wait)))
        words += _client_words(client_id)
        budget = (wait if wait is not None else self.launch_timeout) + self.timeout
        line = self._request(" ".join(words), read_timeout=budget)
        try:
            ipaddress.ip_address(line)
        except ValueError:
            raise BrokerProtocolError(
                f"GET_WORKER reply is not an IP address: {_clip(line)}"
            ) from None
        return line

    def _ping(self, ip: str, client_id: str, retries: int) -> None:
        words = ["PING", _word("ip", ip), *_client_words(client_id)]
        _expect_ok("PING", self._request(" ".join(words), retries=retries))

    def _release(self, ip: str, client_id: str) -> None:
        words = ["RELEASE", _word("ip", ip), *_client_words(client_id)]
        _expect_ok("RELEASE", self._request(" ".join(words)))

    def _lease_id(self) -> str:
        if not self.client_id:
            return ""
        with self._leases_lock:
            suffix = f".{next(self._leases)}"
        return self.client_id[: 64 - len(suffix)] + suffix

    def _keepalive(self, ip: str, lease_id: str, interval: float, stop: threading.Event) -> None:
        while not stop.wait(interval):
            try:
                # No connect retries: their backoff would delay the block's exit, and the
                # next PING comes soon enough.
                self._ping(ip, lease_id, retries=0)
            except BrokerError as exc:
                if not stop.is_set():
                    _log.error("keepalive: broker refused PING %s (%s); stopping pings", ip, exc)
                return
            except Exception as exc:
                if not stop.is_set():
                    _log.warning("keepalive: PING %s failed (%s); trying again later", ip, exc)

    def _request(
        self, line: str, read_timeout: float | None = None, retries: int | None = None
    ) -> str:
        """Send one request line and return the reply line; `BrokerError` on `ERROR...`."""
        if read_timeout is None:
            read_timeout = self.timeout
        sock = self._connect(self.connect_retries if retries is None else retries)
        where = f"{self.host}:{self.port}"
        try:
            sock.settimeout(self.timeout)
            sock.sendall(line.encode("utf-8") + b"\n")
            reply = _read_line(sock, read_timeout, where)
        except socket.timeout as exc:
            raise BrokerTimeout(
                f"broker at {where} did not answer within {read_timeout:g}s"
            ) from exc
        except OSError as exc:
            raise BrokerUnavailable(f"connection to broker at {where} failed: {exc}") from exc
        finally:
            sock.close()
        if reply.startswith("ERROR"):
            raise BrokerError(reply[len("ERROR") :].lstrip(":").strip() or reply, reply)
        return reply

    def _connect(self, retries: int) -> socket.socket:
        where = f"{self.host}:{self.port}"
        attempt = 0
        while True:
            try:
                return socket.create_connection((self.host, self.port), timeout=self.timeout)
            except socket.timeout as exc:
                raise BrokerTimeout(
                    f"connecting to broker at {where} timed out after {self.timeout:g}s"
                ) from exc
            except ConnectionRefusedError as exc:
                if attempt >= retries:
                    raise BrokerUnavailable(
                        f"broker at {where} refused the connection ({attempt + 1} attempts)"
                    ) from exc
                time.sleep(min(self.retry_backoff * 2**attempt, _MAX_BACKOFF))
                attempt += 1
            except OSError as exc:
                raise BrokerUnavailable(f"cannot connect to broker at {where}: {exc}") from exc


def _read_line(sock: socket.socket, timeout: float, where: str) -> str:
    """One reply line, waiting at most `timeout` seconds in all (socket.timeout after that)."""
    deadline = time.monotonic() + timeout
    chunks: list[bytes] = []
    size = 0
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise socket.timeout("timed out")
        sock.settimeout(remaining)
        chunk = sock.recv(65536)
        if not chunk:
            data = b"".join(chunks)
            if data.strip():
                return _decode(data)  # a last line without its LF: take it as the reply
            raise BrokerUnavailable(f"broker at {where} closed the connection without a reply")
        end = chunk.find(b"\n")
        if end >= 0:
            chunks.append(chunk[:end])
            return _decode(b"".join(chunks))
        chunks.append(chunk)
        size += len(chunk)
        if size > MAX_REPLY_BYTES:
            raise BrokerProtocolError(f"reply from {where} is longer than {MAX_REPLY_BYTES} bytes")


def _decode(raw: bytes) -> str:
    return raw.decode("utf-8", "replace").strip()


def _expect_ok(command: str, line: str) -> None:
    if line != "OK" and not line.startswith("OK "):
        raise BrokerProtocolError(f"unexpected {command} reply: {_clip(line)}")


def _client_words(client_id: str) -> list[str]:
    return [f"client={client_id}"] if client_id else []


def _word(name: str, value: str) -> str:
    """`value` if it is one protocol word; a newline or blank would smuggle in another request."""
    if not isinstance(value, str) or not _WORD.match(value):
        raise ValueError(f"{name} must be one word of printable ASCII, not {value!r}")
    return value


def _positive(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number of seconds, not {value!r}")
    if not 0 < value < math.inf:
        raise ValueError(f"{name} must be a positive finite number of seconds, not {value!r}")
    return float(value)


def _number(value: float) -> str:
    return str(int(value)) if value.is_integer() else repr(value)


def _port(port: int | None) -> int:
    if port is None:
        text = os.environ.get("COMPUTE_BROKER_PORT")
        if not text:
            return DEFAULT_PORT
        try:
            port = int(text)
        except ValueError:
            raise ValueError(f"COMPUTE_BROKER_PORT is not a port number: {text!r}") from None
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise ValueError(f"port must be 1-65535, not {port!r}")
    return port


def _clip(line: str, limit: int = 200) -> str:
    return repr(line if len(line) <= limit else line[:limit] + "...")
