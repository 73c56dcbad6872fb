"""Client for the compute-broker line protocol, standard library only.

    from compute_broker_client import BrokerClient

    client = BrokerClient("broker.lab", 9000)
    with client.worker() as ip:  # kept alive with PINGs, RELEASEd at the end
        ...  # talk to the worker at ip:2560

    w = client.worker(keepalive=15)  # the handle: w.ip, w.interrupted, w.replace()
    with w:
        for chunk in chunks:
            if w.interrupted:  # e.g. a spot interruption: switch to another worker
                w.replace()
            ...  # talk to the worker at w.ip

Every call opens one TCP connection, sends one request line, reads one reply line and closes
the connection: nothing to keep alive between calls, nothing stale after a broker restart, and
the broker's 30 s idle-connection limit never applies. Every wait is bounded.

With a token (`BrokerClient(token=...)` or `COMPUTE_BROKER_TOKEN`), each connection first sends
`AUTH <token>` and waits for `OK`. The token never appears in an exception, a repr or a log line.
"""

from __future__ import annotations

import datetime
import ipaddress
import itertools
import json
import logging
import math
import os
import random
import re
import secrets
import socket
import threading
import time
from types import TracebackType
from typing import Any, Callable

__all__ = [
    "DEFAULT_HOST",
    "DEFAULT_KEEPALIVE",
    "DEFAULT_LAUNCH_TIMEOUT",
    "DEFAULT_PORT",
    "MAX_BURST",
    "AuthError",
    "BrokerClient",
    "BrokerError",
    "BrokerProtocolError",
    "BrokerTimeout",
    "BrokerUnavailable",
    "ClientError",
    "LimitError",
    "Worker",
    "WorkerInterrupted",
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
MAX_BURST = 100
"""The largest `n` of BURST (protocol.md: `BURST <n>`, n from 1 to 100)."""

_MAX_BACKOFF = 30.0
_MAX_DOUBLINGS = 32  # 2**32 * any sane retry_backoff is far past _MAX_BACKOFF
_CLIENT_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}\Z")
_WORD = re.compile(r"[\x21-\x7e]+\Z")  # printable ASCII, no blanks: one protocol word
_TOKEN = re.compile(r"[\x21-\x7e]{16,256}\Z")  # protocol.md: 16-256 printable ASCII, no blanks
TOKEN_RULE = "16-256 printable ASCII characters without blanks"
"""What a token must be (the broker refuses anything else); error messages quote this rule."""

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


class WorkerInterrupted(BrokerError):
    """PING found the worker at `ip` interrupted: it is being taken away.

    The broker answered `ERROR: Worker interrupted <deadline>` (e.g. an EC2 spot interruption
    notice: `deadline` is when the worker goes, a timezone-aware UTC datetime) or
    `ERROR: Worker interrupted` (e.g. a rebalance recommendation: `deadline` is None, as it is
    for a deadline this client cannot read). The broker no longer hands the worker out and
    launches a replacement: finish or checkpoint what runs there, then get another worker
    (`Worker.replace()` in a `worker()` block). `message` and `line` are the broker's, as for
    every `BrokerError`; `str(exc)` says which worker and when.
    """

    def __init__(
        self,
        ip: str,
        deadline: datetime.datetime | None = None,
        message: str | None = None,
        line: str | None = None,
    ) -> None:
        if message is None:
            message = _INTERRUPTED_REASON + (f" {_iso(deadline)}" if deadline else "")
        super().__init__(message, line)
        self.ip = ip
        self.deadline = deadline

    def __str__(self) -> str:
        if self.deadline is not None:
            return f"worker {self.ip} interrupted: it goes away at {_iso(self.deadline)}"
        rest = self.message[len(_INTERRUPTED_REASON) :].strip()
        if rest:
            return f"worker {self.ip} interrupted (unreadable deadline {rest!r})"
        return f"worker {self.ip} interrupted (no deadline given)"

    def __reduce__(self) -> tuple[Any, ...]:
        # Picklable with all its fields, e.g. raised in a multiprocessing worker.
        return (type(self), (self.ip, self.deadline, self.message, self.line))


class AuthError(BrokerError):
    """The broker wants a token, or did not accept the one sent (`ERROR: auth required...`).

    Raised for any ERROR reply to the `AUTH` line a client with a token sends first on each
    connection, and for `ERROR: auth required` replies to any request. `message` and `line`
    are the broker's (a token the reply may echo is replaced by `<token>`); `str(exc)` adds
    what to do. `token_sent` says whether this client sent a token.
    """

    def __init__(self, message: str, line: str | None = None, token_sent: bool = False) -> None:
        super().__init__(message, line)
        self.token_sent = token_sent

    def __str__(self) -> str:
        if not self.token_sent:
            hint = "the broker wants a token: pass token= or set COMPUTE_BROKER_TOKEN"
        elif self.message.lower().startswith("unknown command"):
            hint = "this broker does not know AUTH (it predates tokens): send no token"
        else:
            hint = "the broker did not accept the token"
        return f"{self.message} ({hint})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.message, self.line, self.token_sent))


class LimitError(BrokerError):
    """The broker refused the request under a per-identity limit (`ERROR: limit: <key> ...`).

    `message` names the config key and its value, e.g. `limit: max_requests_per_second (20)
    exceeded; slow down`. Nothing was done; the same request may succeed a little later.
    """


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
    `connect_retries` times. Retry n (from 0) waits a random time between 0 and
    `retry_backoff * 2**n` seconds (at most 30): "full jitter", so that the instruments a broker
    restart turned away do not all come back at the same instant. The draws come from `rng`
    (default: a `random.Random` of the client's own, seeded by the OS, so the retries never
    draw from, nor disturb, the global `random` generator an experiment may have seeded).

    `client_id` is sent as `client=ID` on GET_WORKER, PING and RELEASE so that programs on one
    host hold separate leases. It defaults to `COMPUTE_BROKER_CLIENT_ID`, else a random id per
    process; `""` sends none, so the broker identifies the caller by its IP address alone (as
    it does for netcat and the seed clients).

    `token` is the access token the broker's operator gave you (16-256 printable ASCII
    characters, no blanks). It defaults to `COMPUTE_BROKER_TOKEN`; `""` (or an empty variable)
    sends none. With a token, every connection sends `AUTH <token>` first and goes on only
    after `OK`; an ERROR reply raises `AuthError`. The token is kept out of every exception,
    repr and log line this client makes.
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
        rng: random.Random | None = None,
        token: str | None = None,
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
        self._rng = rng if rng is not None else random.Random()
        if client_id is None:
            client_id = os.environ.get("COMPUTE_BROKER_CLIENT_ID") or default_client_id()
        if client_id and not _CLIENT_ID.match(client_id):
            raise ValueError(
                f"client_id must be 1-64 characters of A-Z a-z 0-9 . _ : - (or empty), "
                f"not {client_id!r}"
            )
        self.client_id = client_id
        self._token = _Secret.checked(token)
        self._leases = itertools.count(1)
        self._leases_lock = threading.Lock()

    def __repr__(self) -> str:
        token = ", token=<hidden>" if self._token is not None else ""
        return (
            f"BrokerClient(host={self.host!r}, port={self.port}, "
            f"client_id={self.client_id!r}{token})"
        )

    @property
    def has_token(self) -> bool:
        """Whether this client sends `AUTH <token>` on each connection (the token stays hidden)."""
        return self._token is not None

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
        """Keep the worker at `ip` and your lease on it alive; `BrokerError` if it is unknown.

        `WorkerInterrupted` (a `BrokerError`) if the worker is being taken away (e.g. an EC2
        spot interruption): get another one.
        """
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
        """Launch up to `n` (1-100) workers now without waiting for them; the new instance ids."""
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_BURST:
            raise ValueError(f"n must be an int from 1 to {MAX_BURST}, not {n!r}")
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

    def worker(
        self,
        type: str | None = None,
        market: str | None = None,
        wait: float | None = None,
        keepalive: float | None = None,
        *,
        on_interrupt: Callable[[WorkerInterrupted], object] | None = None,
    ) -> Worker:
        """Hold a worker for a `with` block: GET_WORKER on entry, PINGs, RELEASE on the way out.

        `with client.worker() as ip:` gives the worker's IP. A daemon thread PINGs it every
        `keepalive` seconds (default `DEFAULT_KEEPALIVE`, 60 s; 0 turns it off) so the broker
        does not reap it while the block runs. The worker is released however the block ends;
        a failed release is logged, never raised, so it cannot hide the block's own exception.

        When a PING finds the worker interrupted (being taken away), the returned `Worker`
        handle's `interrupted` is set to the `WorkerInterrupted` and `on_interrupt(exc)`, if
        given, is called once for that worker from the keep-alive thread; if it returns True
        the thread fetches a replacement at once (`Worker.replace()`). Keep the handle to see
        the current IP (`Worker.ip`) after a replacement.

        Each block holds its own lease, under `<client_id>.<n>`: blocks running at the same
        time in one process may share a worker without releasing it from under each other.
        """
        return Worker(self, type, market, wait, keepalive, on_interrupt)

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
        try:
            line = self._request(" ".join(words), retries=retries)
        except BrokerError as exc:
            interrupted = _interruption(ip, exc)
            if interrupted is None:
                raise
            raise interrupted from None
        _expect_ok("PING", line)

    def _release(self, ip: str, client_id: str) -> None:
        words = ["RELEASE", _word("ip", ip), *_client_words(client_id)]
        _expect_ok("RELEASE", self._request(" ".join(words)))

    def _retry_delay(self, attempt: int) -> float:
        """Seconds to wait before retry `attempt` (0 for the first) of a refused connection.

        Full jitter: a uniform draw from [0, min(retry_backoff * 2**attempt, 30 s)]. Among the
        usual schemes it spreads simultaneous clients the most, and each delay has a fixed
        bound, so the longest a call can spend retrying is still the plain backoff's sum.
        """
        ceiling = min(self.retry_backoff * 2.0 ** min(attempt, _MAX_DOUBLINGS), _MAX_BACKOFF)
        return self._rng.uniform(0.0, ceiling)

    def _lease_id(self) -> str:
        if not self.client_id:
            return ""
        with self._leases_lock:
            suffix = f".{next(self._leases)}"
        return self.client_id[: 64 - len(suffix)] + suffix

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
            if self._token is not None:
                self._authenticate(sock, where)
            sock.sendall(line.encode("utf-8") + b"\n")
            reply = self._hide_token(_read_line(sock, read_timeout, where))
        except socket.timeout as exc:
            raise BrokerTimeout(
                f"broker at {where} did not answer within {read_timeout:g}s"
            ) from exc
        except OSError as exc:
            raise BrokerUnavailable(f"connection to broker at {where} failed: {exc}") from exc
        finally:
            sock.close()
        if reply.startswith("ERROR"):
            raise self._error(reply)
        return reply

    def _authenticate(self, sock: socket.socket, where: str) -> None:
        """Send `AUTH <token>` and return once the broker answers `OK`; `AuthError` otherwise.

        The request goes out only after the OK: sent at once, it would run without the
        token (or under the address's role) when the broker refuses the AUTH.
        """
        assert self._token is not None
        sock.sendall(b"AUTH " + self._token.reveal().encode("ascii") + b"\n")
        try:
            reply = self._hide_token(_read_line(sock, self.timeout, where))
        except socket.timeout as exc:
            raise BrokerTimeout(
                f"broker at {where} did not answer AUTH within {self.timeout:g}s"
            ) from exc
        if reply == "OK" or reply.startswith("OK "):
            return
        if reply.startswith("ERROR"):
            raise AuthError(_reason(reply), reply, token_sent=True)
        raise BrokerProtocolError(f"unexpected AUTH reply: {_clip(reply)}")

    def _hide_token(self, text: str) -> str:
        """`text` with this client's token, should a broker ever echo it, as `<token>`."""
        return text if self._token is None else self._token.hide_in(text)

    def _error(self, reply: str) -> BrokerError:
        """The exception an `ERROR...` reply line stands for."""
        reason = _reason(reply)
        if reason.lower().startswith("auth required"):
            return AuthError(reason, reply, token_sent=self._token is not None)
        if reason.lower().startswith("limit:"):
            return LimitError(reason, reply)
        return BrokerError(reason, reply)

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
                time.sleep(self._retry_delay(attempt))
                attempt += 1
            except OSError as exc:
                raise BrokerUnavailable(f"cannot connect to broker at {where}: {exc}") from exc


class Worker:
    """A worker held for a `with` block; `BrokerClient.worker()` makes one.

    `with` gets the worker (GET_WORKER) and gives its IP; leaving the block releases it.
    Inside the block:

    - `ip` is the IP of the worker currently held; it changes only through `replace()`.
    - `interrupted` is None, or the `WorkerInterrupted` a keep-alive PING received: this
      worker is being taken away (`interrupted.deadline` says when, if known).
    - `replace()` gets another worker (same type, market and wait) under a new lease, then
      releases the current one, and returns the new IP.

    A Worker serves one `with` block. It is safe to use from several threads.
    """

    def __init__(
        self,
        client: BrokerClient,
        type: str | None,
        market: str | None,
        wait: float | None,
        keepalive: float | None,
        on_interrupt: Callable[[WorkerInterrupted], object] | None,
    ) -> None:
        interval = DEFAULT_KEEPALIVE if keepalive is None else keepalive
        if isinstance(interval, bool) or not isinstance(interval, (int, float)):
            raise ValueError(f"keepalive must be a number of seconds, not {keepalive!r}")
        if not 0 <= interval < math.inf:
            raise ValueError(f"keepalive must be >= 0 seconds, not {keepalive!r}")
        if on_interrupt is not None and not callable(on_interrupt):
            raise TypeError(f"on_interrupt must be callable, not {on_interrupt!r}")
        self._client = client
        self._get = (type, market, wait)
        self._interval = float(interval)
        self._on_interrupt = on_interrupt
        self._lock = threading.Lock()  # guards the fields below
        self._replacing = threading.Lock()  # one replace() at a time
        self._stop = threading.Event()
        self._pinger: threading.Thread | None = None
        self._state = "new"  # then "held" inside the block, "done" after it
        self._ip: str | None = None
        self._lease_id = ""
        self._interrupted: WorkerInterrupted | None = None
        self._auto_replace = False  # on_interrupt asked for a replacement of this worker

    @property
    def ip(self) -> str:
        """The IP of the worker held (the last one held, after the block)."""
        ip = self._ip
        if ip is None:
            raise RuntimeError("no worker yet: use the Worker in a with statement")
        return ip

    @property
    def interrupted(self) -> WorkerInterrupted | None:
        """The interruption a keep-alive PING found for the current worker, else None."""
        return self._interrupted

    def __repr__(self) -> str:
        return f"<Worker ip={self._ip!r} interrupted={self._interrupted is not None}>"

    def __enter__(self) -> str:
        with self._lock:
            if self._state != "new":
                raise RuntimeError("a Worker serves one with block; call client.worker() again")
            self._state = "entering"
        lease_id = self._client._lease_id()
        try:
            ip = self._client._get_worker(*self._get, lease_id)
        except BaseException:
            self._state = "done"
            raise
        with self._lock:
            self._ip, self._lease_id, self._state = ip, lease_id, "held"
        if self._interval > 0:
            self._pinger = threading.Thread(
                target=self._keepalive, name=f"compute-broker-keepalive {ip}", daemon=True
            )
            self._pinger.start()
        return ip

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        if self._pinger is not None:
            # Only a request already on the wire delays this, and that is bounded.
            self._pinger.join(2 * self._client.timeout)
        with self._lock:
            self._state = "done"
            ip, lease_id = self._ip, self._lease_id
        if ip is not None:
            self._release(ip, lease_id)

    def replace(self) -> str:
        """Switch to another worker: the new worker's IP, now also `ip`.

        Gets a worker as the block did (same type, market and wait) under a new lease, then
        releases the current one. For an interrupted worker the broker hands out another (it
        launches replacements); a healthy worker may come back unchanged. If GET_WORKER fails
        its error is raised and the block keeps the worker it had.
        """
        return self._replace(None)

    # -- internals ----------------------------------------------------------------------------

    def _replace(self, only_lease: str | None) -> str:
        with self._replacing:
            with self._lock:
                if self._state != "held":
                    raise RuntimeError("replace() works only inside the Worker's with block")
                old_ip, old_lease = self._ip, self._lease_id
            assert old_ip is not None
            if only_lease is not None and old_lease != only_lease:
                return old_ip  # replaced meanwhile, e.g. by the block itself
            lease_id = self._client._lease_id()
            ip = self._client._get_worker(*self._get, lease_id)
            with self._lock:
                held = self._state == "held"
                if held:
                    self._ip, self._lease_id = ip, lease_id
                    self._interrupted, self._auto_replace = None, False
            if not held:  # the block ended while GET_WORKER waited: nobody wants this one
                self._release(ip, lease_id)
                raise RuntimeError("the with block ended while a replacement was fetched")
            _log.info("replaced worker %s with %s", old_ip, ip)
            self._release(old_ip, old_lease)
            if self._pinger is not None:
                self._pinger.name = f"compute-broker-keepalive {ip}"
            return ip

    def _keepalive(self) -> None:
        while not self._stop.wait(self._interval):
            with self._lock:
                ip, lease_id = self._ip, self._lease_id
            assert ip is not None
            try:
                # No connect retries: their backoff would delay the block's exit, and the
                # next PING comes soon enough.
                self._client._ping(ip, lease_id, retries=0)
            except WorkerInterrupted as exc:
                if not self._stop.is_set():
                    self._interruption(exc, lease_id)
            except LimitError as exc:
                if not self._stop.is_set():
                    _log.warning("keepalive: PING %s refused (%s); trying again later", ip, exc)
            except BrokerError as exc:
                if not self._stop.is_set():
                    _log.error("keepalive: broker refused PING %s (%s); stopping pings", ip, exc)
                return
            except Exception as exc:
                if not self._stop.is_set():
                    _log.warning("keepalive: PING %s failed (%s); trying again later", ip, exc)

    def _interruption(self, exc: WorkerInterrupted, lease_id: str) -> None:
        """A PING under `lease_id` found the worker interrupted: record, notify, replace."""
        with self._lock:
            if self._state != "held" or lease_id != self._lease_id:
                return  # that worker has been replaced meanwhile
            first = self._interrupted is None
            self._interrupted = exc
        if first:
            _log.warning("keepalive: %s", exc)
            if self._on_interrupt is not None:
                try:
                    wanted = bool(self._on_interrupt(exc))
                except Exception:
                    _log.exception("keepalive: on_interrupt(%r) raised", exc)
                    wanted = False
                with self._lock:
                    if lease_id == self._lease_id:
                        self._auto_replace = wanted
        with self._lock:
            wanted = self._auto_replace and lease_id == self._lease_id
        if wanted and not self._stop.is_set():
            try:
                self._replace(lease_id)
            except Exception as error:
                if not self._stop.is_set():
                    _log.error(
                        "keepalive: no replacement for interrupted worker %s (%s); trying "
                        "again after the next PING",
                        exc.ip,
                        error,
                    )

    def _release(self, ip: str, lease_id: str) -> None:
        try:
            self._client._release(ip, lease_id)
        except Exception as exc:
            _log.warning(
                "releasing worker %s failed (%s); the broker drops the lease after its "
                "idle timeout",
                ip,
                exc,
            )


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


class _Secret:
    """A token: `repr` and `str` hide it, `reveal()` gives it for the AUTH line alone."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def __repr__(self) -> str:
        return "<token hidden>"

    __str__ = __repr__

    def __reduce__(self) -> Any:
        raise TypeError("a token is not pickled")

    def reveal(self) -> str:
        return self._value

    def hide_in(self, text: str) -> str:
        return text.replace(self._value, "<token>")

    @classmethod
    def checked(cls, token: str | None) -> _Secret | None:
        """The token to send: `token`, else `COMPUTE_BROKER_TOKEN`; None when empty.

        Blanks around it (a newline read from a file) are dropped. A bad token raises
        ValueError saying what is wrong with it, never what it is.
        """
        source = "token"
        if token is None:
            source = "COMPUTE_BROKER_TOKEN"
            token = os.environ.get(source, "")
        if not isinstance(token, str):
            raise TypeError(f"{source} must be a str, not {type(token).__name__}")
        token = token.strip()
        if not token:
            return None
        if not _TOKEN.match(token):
            if _WORD.match(token):
                what = f"it has {len(token)} characters"
            else:
                what = "it has a blank, a control or a non-ASCII character"
            raise ValueError(f"{source} must be {TOKEN_RULE}; {what}")
        return cls(token)


def _reason(reply: str) -> str:
    """The reason of an `ERROR: reason` reply line (the whole line if it gives none)."""
    return reply[len("ERROR") :].lstrip(":").strip() or reply


def _decode(raw: bytes) -> str:
    return raw.decode("utf-8", "replace").strip()


def _expect_ok(command: str, line: str) -> None:
    if line != "OK" and not line.startswith("OK "):
        raise BrokerProtocolError(f"unexpected {command} reply: {_clip(line)}")


_INTERRUPTED_REASON = "Worker interrupted"
_ISO_DEADLINE = re.compile(
    r"([0-9]{4})-([0-9]{2})-([0-9]{2})[Tt ]([0-9]{2}):([0-9]{2}):([0-9]{2})"
    r"(?:[.,]([0-9]+))?([Zz]|[+-][0-9]{2}:?[0-9]{2})\Z"
)


def _interruption(ip: str, error: BrokerError) -> WorkerInterrupted | None:
    """The WorkerInterrupted a PING's `ERROR: Worker interrupted [deadline]` stands for."""
    reason = error.message
    head = reason[: len(_INTERRUPTED_REASON)]
    rest = reason[len(_INTERRUPTED_REASON) :]
    if head.lower() != _INTERRUPTED_REASON.lower() or rest[:1] not in ("", " ", "\t"):
        return None
    words = rest.split()
    deadline = _parse_deadline(words[0]) if words else None
    return WorkerInterrupted(ip, deadline, reason, error.line)


def _parse_deadline(text: str) -> datetime.datetime | None:
    """An ISO 8601 time with Z (or an offset) as an aware UTC datetime; None if unreadable."""
    match = _ISO_DEADLINE.match(text)
    if match is None:
        return None
    year, month, day, hour, minute, second, fraction, zone = match.groups()
    try:
        if zone in ("Z", "z"):
            tz = datetime.timezone.utc
        else:
            sign = -1 if zone[0] == "-" else 1
            hours, minutes = int(zone[1:3]), int(zone[-2:])
            if minutes > 59:
                return None
            offset = datetime.timedelta(hours=hours, minutes=minutes)
            tz = datetime.timezone(sign * offset)
        micros = int((fraction or "0")[:6].ljust(6, "0"))
        value = datetime.datetime(
            int(year), int(month), int(day), int(hour), int(minute), int(second), micros, tz
        )
        return value.astimezone(datetime.timezone.utc)
    except (ValueError, OverflowError):
        return None


def _iso(value: datetime.datetime) -> str:
    """`2026-11-23T12:34:56Z`: UTC, whole seconds (a naive datetime is taken as UTC)."""
    if value.tzinfo is not None:
        value = value.astimezone(datetime.timezone.utc)
    return value.strftime("%Y-%m-%dT%H:%M:%SZ")


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
