"""The monitoring listener: a small HTTP/1.1 server (Trio + h11) beside the line protocol.

Routes, GET (and HEAD) only:
- `/metrics`: the Prometheus text format from `Metrics`, its gauges set from a fresh STATUS;
- `/healthz`: `200 ok` while the `health()` callable says healthy, else `503` and its reason;
  it calls nothing else, so a checker may poll it as often as it likes;
- `/`: the status page (`broker.statuspage`).
Anything else is 404; another method on those paths 405.

It takes everything from what it is given (`status`, `health`, `metrics`, `history`, `now`),
so it never imports the engine. Each connection: only from the allowed networks (others are
closed at once, before a byte is read), a request (line, headers and body) of at most
`max_request_bytes`, at most `timeout` seconds to send a request and get its reply (the clock
restarts for each request on a kept-alive connection), at most `MAX_CONNECTIONS` at once. A
connection's failure is logged and answered 500 if it still can be; it never reaches the
listener. While it runs, a STATUS is sampled into `history` every `sample_interval` seconds
for the page's chart.

Needs the `monitoring` extra (h11, prometheus-client); `broker.metrics` does not.
"""

from __future__ import annotations

import email.utils
import ipaddress
import itertools
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Final

import attrs
import h11
import structlog
import trio

from broker import statuspage
from broker.metrics import CONTENT_TYPE, Metrics
from broker.statuspage import History

_log = structlog.get_logger("broker.monitor")

StatusSource = Callable[[], Awaitable[Mapping[str, Any]]]
HealthCheck = Callable[[], tuple[bool, str]]
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

DEFAULT_PORT: Final = 9100
LOOPBACK: Final[tuple[Network, ...]] = (
    ipaddress.ip_network("127.0.0.0/8"),
    ipaddress.ip_network("::1/128"),
)
MAX_CONNECTIONS: Final = 32
RECEIVE_SIZE: Final = 4096
ROUTES: Final = ("/", "/healthz", "/metrics")
ALLOWED_METHODS: Final = "GET, HEAD"
HTML_TYPE: Final = "text/html; charset=utf-8"
TEXT_TYPE: Final = "text/plain; charset=utf-8"
# No scripts, no frames, no forms, nothing fetched: the page is inline HTML, CSS and SVG.
SECURITY_HEADERS: Final = (
    (
        "Content-Security-Policy",
        "default-src 'none'; style-src 'unsafe-inline'; "
        "frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
    ),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
    ("Cache-Control", "no-store"),
)


@attrs.frozen
class MonitorSettings:
    """The listener's knobs (the config's `http` section)."""

    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    allow: tuple[Network, ...] = LOOPBACK
    timeout: float = 10.0
    max_request_bytes: int = 8192
    sample_interval: float = statuspage.SAMPLE_SECONDS


@attrs.frozen
class Response:
    """A reply to send: status, body, its type and any further headers."""

    status: int
    body: bytes
    content_type: str = TEXT_TYPE
    headers: tuple[tuple[str, str], ...] = ()
    close: bool = False

    @classmethod
    def text(cls, status: int, text: str, **kwargs: Any) -> Response:
        """A plain-text reply of one line."""
        return cls(status, (text + "\n").encode(), **kwargs)


class RequestTooLarge(Exception):
    """The peer sent more than `max_request_bytes` for one request."""

    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


def parse_listen(text: str) -> tuple[str, int]:
    """`host:port` (`127.0.0.1:9100`, `[::1]:9100`, `0.0.0.0:9100`) as (host, port)."""
    host, sep, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"expected host:port such as 127.0.0.1:9100, got {text!r}")
    return host, int(port)


def parse_networks(items: Sequence[str]) -> tuple[Network, ...]:
    """CIDRs (`10.0.0.0/8`, `::1/128`, a bare address) as networks; ValueError names a bad one."""
    networks = []
    for item in items:
        try:
            networks.append(ipaddress.ip_network(item, strict=False))
        except ValueError as exc:
            raise ValueError(f"not an address or CIDR: {item!r}") from exc
    return tuple(networks)


def allowed(peer: str, networks: Sequence[Network]) -> bool:
    """Whether a peer address is in one of the networks (IPv4-mapped IPv6 counts as IPv4)."""
    try:
        address = ipaddress.ip_address(peer.partition("%")[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(address in network for network in networks)


class Monitor:
    """Serves /metrics, /healthz and / on its own listener until cancelled."""

    def __init__(
        self,
        settings: MonitorSettings,
        *,
        status: StatusSource,
        health: HealthCheck,
        metrics: Metrics,
        history: History,
        now: Callable[[], float],
    ) -> None:
        self.settings = settings
        self.status = status
        self.health = health
        self.metrics = metrics
        self.history = history
        self.now = now
        self.open_connections = 0
        self._ids = itertools.count(1)

    async def run(
        self, *, task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Listen, sample the history, serve until cancelled. An OSError from listening (the
        port in use, a permission) propagates as it is, outside any exception group."""
        listeners = await trio.open_tcp_listeners(self.settings.port, host=self.settings.host)
        async with trio.open_nursery() as nursery:
            await nursery.start(trio.serve_listeners, self._handle, listeners)
            if self.settings.sample_interval > 0:
                nursery.start_soon(self.sample_history)
            task_status.started(listeners)

    async def sample_history(self) -> None:
        """Record a STATUS in the history now and every `sample_interval` seconds."""
        while True:
            try:
                document = await self.status()
            except Exception as exc:  # a registry outage: no sample this minute (a gap)
                _log.warning("monitor.sample_failed", error=repr(exc))
            else:
                self.history.record(self.now(), document)
            await trio.sleep(self.settings.sample_interval)

    async def respond(self, method: str, target: str) -> Response:
        """The reply to one request (HEAD gets GET's headers; the caller drops the body)."""
        path = target.partition("?")[0]
        if path not in ROUTES:
            return Response.text(404, "not found")
        if method not in ("GET", "HEAD"):
            return Response.text(405, "method not allowed", headers=(("Allow", ALLOWED_METHODS),))
        if path == "/healthz":
            healthy, reason = self._check_health()
            return Response.text(200, "ok") if healthy else Response.text(503, reason)
        if path == "/metrics":
            try:
                self.metrics.update_from_status(await self.status())
            except Exception as exc:  # serve the counters; the gauges stay as last seen
                _log.warning("monitor.status_failed", error=repr(exc))
            self.metrics.set_healthy(self._check_health()[0])
            return Response(200, self.metrics.exposition(), CONTENT_TYPE)
        page = statuspage.render(await self.status(), self.history, self.now())
        return Response(200, page.encode(), HTML_TYPE)

    def _check_health(self) -> tuple[bool, str]:
        try:
            return self.health()
        except Exception as exc:
            _log.exception("monitor.health_failed")
            return False, f"health check failed: {type(exc).__name__}"

    # --- connections --------------------------------------------------------------------------

    async def _handle(self, stream: trio.SocketStream) -> None:
        peer = _peer_host(stream)
        log = _log.bind(conn=next(self._ids), peer=peer)
        self.open_connections += 1
        try:
            if not allowed(peer, self.settings.allow):
                log.warning("monitor.refused", reason="address not allowed")
                return
            if self.open_connections > MAX_CONNECTIONS:
                log.warning("monitor.refused", reason="too many connections")
                return
            await self._serve(stream, log)
        except Exception:
            log.exception("monitor.crashed")
        finally:
            self.open_connections -= 1
            await stream.aclose()

    async def _serve(
        self, stream: trio.SocketStream, log: structlog.typing.FilteringBoundLogger
    ) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=self.settings.max_request_bytes)
        with trio.CancelScope() as scope:
            while True:
                scope.deadline = trio.current_time() + self.settings.timeout
                try:
                    request = await self._read_request(stream, conn)
                except h11.RemoteProtocolError as exc:
                    log.info("monitor.bad_request", error=str(exc))
                    reply = Response.text(exc.error_status_hint, "bad request", close=True)
                    await _send(stream, conn, reply, head=False, now=self.now())
                    return
                except RequestTooLarge as exc:
                    log.info("monitor.bad_request", error="request too large")
                    reply = Response.text(exc.status, "request too large", close=True)
                    await _send(stream, conn, reply, head=False, now=self.now())
                    return
                if request is None:
                    return
                method = request.method.decode("ascii", "replace")
                target = request.target.decode("ascii", "replace")
                try:
                    reply = await self.respond(method, target)
                except Exception:
                    log.exception("monitor.request_failed", method=method, target=target)
                    reply = Response.text(500, "internal error (logged by the broker)", close=True)
                log.debug("monitor.request", method=method, target=target, status=reply.status)
                await _send(stream, conn, reply, head=method == "HEAD", now=self.now())
                if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                    return
                conn.start_next_cycle()
        if scope.cancelled_caught:
            log.debug("monitor.timeout", after_seconds=self.settings.timeout)

    async def _read_request(
        self, stream: trio.SocketStream, conn: h11.Connection
    ) -> h11.Request | None:
        """The next whole request (its body read and dropped); None when the peer closed."""
        request: h11.Request | None = None
        received = 0
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                try:
                    data = await stream.receive_some(RECEIVE_SIZE)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    data = b""
                received += len(data)
                if received > self.settings.max_request_bytes:
                    raise RequestTooLarge(431 if request is None else 413)
                conn.receive_data(data)
            elif isinstance(event, h11.Request):
                request = event
            elif isinstance(event, h11.EndOfMessage):
                return request
            elif isinstance(event, h11.ConnectionClosed):
                return None
            # h11.Data: a body, read and dropped (bounded by `received`)


async def _send(
    stream: trio.SocketStream,
    conn: h11.Connection,
    reply: Response,
    *,
    head: bool,
    now: float,
) -> None:
    """Send a reply if the connection can still take one; a peer gone away is no error."""
    if conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
        return
    headers = [
        ("Content-Type", reply.content_type),
        ("Content-Length", str(len(reply.body))),
        *SECURITY_HEADERS,
        *reply.headers,
        ("Date", email.utils.formatdate(now, usegmt=True)),
    ]
    if reply.close:
        headers.append(("Connection", "close"))
    try:
        data = conn.send(h11.Response(status_code=reply.status, headers=headers)) or b""
        if not head and reply.body:
            data += conn.send(h11.Data(data=reply.body)) or b""
        data += conn.send(h11.EndOfMessage()) or b""
        await stream.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass


def _peer_host(stream: trio.SocketStream) -> str:
    try:
        return str(stream.socket.getpeername()[0])
    except OSError:
        return "unknown"
