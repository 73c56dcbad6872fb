"""The fault bench's injectors: a WSGI layer around moto that answers chosen AWS requests
with errors, late, or after killing a broker; a TCP proxy in front of moto that can be
stopped (the endpoint is down) and started again; and a patch that makes moto's DynamoDB
transactions cost what they touch."""

from __future__ import annotations

import collections
import contextlib
import copy
import functools
import io
import json
import socket
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import parse_qsl

import attrs

HOST = "127.0.0.1"
# Requests from the bench itself carry this in their User-Agent; the injector lets them pass.
BENCH_AGENT = "compute-broker-fault-bench"


# --- the fault injector ---------------------------------------------------------------------


@attrs.frozen
class Request:
    """An AWS request as moto receives it: service, operation and raw body."""

    service: str  # "ec2", "dynamodb", ...
    operation: str  # "RunInstances", "PutItem", ...
    body: bytes

    def has(self, text: str) -> bool:
        """True if the body contains `text` (form-encoded for EC2, JSON for DynamoDB)."""
        return text.encode() in self.body


@attrs.frozen
class Reply:
    """What the injector answers instead of moto."""

    status: int
    body: bytes
    content_type: str


def ec2_error(code: str, message: str, status: int = 400) -> Reply:
    """An EC2 error reply as AWS words it."""
    xml = (
        '<?xml version="1.0" encoding="UTF-8"?>\n<Response><Errors><Error>'
        f"<Code>{code}</Code><Message>{message}</Message></Error></Errors>"
        "<RequestID>injected</RequestID></Response>"
    )
    return Reply(status, xml.encode(), "text/xml")


def dynamodb_error(code: str, message: str, status: int = 400, **extra: Any) -> Reply:
    """A DynamoDB (JSON 1.0) error reply as AWS words it."""
    document = {"__type": f"com.amazonaws.dynamodb.v20120810#{code}", "message": message, **extra}
    return Reply(status, json.dumps(document).encode(), "application/x-amz-json-1.0")


def transaction_conflict() -> Reply:
    """A TransactWriteItems cancelled by a concurrent transaction on one of its items."""
    return dynamodb_error(
        "TransactionCanceledException",
        "Transaction cancelled, please refer cancellation reasons for specific reasons "
        "[TransactionConflict]",
        CancellationReasons=[{"Code": "TransactionConflict", "Message": "conflict"}],
    )


@attrs.define
class Rule:
    """A fault for matching requests: wait `delay` seconds, then call `before` (which may
    kill a broker), then answer `reply` instead of moto (None: let moto answer), then call
    `after` with moto's answer sent to nobody yet. Applies `times` times (None: always),
    to one matching request in `every`."""

    service: str
    operation: str
    match: Callable[[Request], bool] | None = None
    delay: float = 0.0
    before: Callable[[Request], None] | None = None
    reply: Reply | None = None
    after: Callable[[Request], None] | None = None
    times: int | None = None
    every: int = 1
    seen: int = 0  # matching requests
    applied: int = 0

    def take(self, request: Request) -> bool:
        """Count `request` if it matches; True if the fault applies to it."""
        if request.service != self.service or request.operation != self.operation:
            return False
        if self.match is not None and not self.match(request):
            return False
        if self.times is not None and self.applied >= self.times:
            return False
        self.seen += 1
        if (self.seen - 1) % self.every:
            return False
        self.applied += 1
        return True


class Injector:
    """Faults for requests reaching moto, installed as a WSGI middleware around its app."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._rules: list[Rule] = []
        self.counts: dict[tuple[str, str], int] = {}  # brokers' requests per operation

    def add(self, rule: Rule) -> Rule:
        with self._lock:
            self._rules.append(rule)
        return rule

    def clear(self) -> None:
        with self._lock:
            self._rules.clear()
            self.counts.clear()

    def remove(self, rule: Rule) -> None:
        with self._lock:
            if rule in self._rules:
                self._rules.remove(rule)

    def install(self) -> None:
        from moto.moto_server.werkzeug_app import DomainDispatcherApplication

        original = DomainDispatcherApplication.__call__
        if getattr(original, "_fault_injector", None) is not None:
            return
        injector = self

        @functools.wraps(original)
        def call(app: Any, environ: dict[str, Any], start_response: Any) -> Any:
            return injector._serve(original, app, environ, start_response)

        call._fault_injector = self  # type: ignore[attr-defined]
        DomainDispatcherApplication.__call__ = call  # type: ignore[method-assign]

    def uninstall(self) -> None:
        from moto.moto_server.werkzeug_app import DomainDispatcherApplication

        installed = DomainDispatcherApplication.__call__
        if getattr(installed, "_fault_injector", None) is self:
            DomainDispatcherApplication.__call__ = installed.__wrapped__  # type: ignore[attr-defined,method-assign]

    def _serve(self, original: Any, app: Any, environ: dict[str, Any], start: Any) -> Any:
        if BENCH_AGENT in environ.get("HTTP_USER_AGENT", ""):
            return original(app, environ, start)
        length = int(environ.get("CONTENT_LENGTH") or 0)
        body = environ["wsgi.input"].read(length) if length else b""
        environ["wsgi.input"] = io.BytesIO(body)
        request = _identify(environ, body)
        with self._lock:
            key = (request.service, request.operation)
            self.counts[key] = self.counts.get(key, 0) + 1
            rule = next((r for r in self._rules if r.take(request)), None)
        if rule is None:
            return original(app, environ, start)
        if rule.delay:
            time.sleep(rule.delay)
        if rule.before is not None:
            rule.before(request)
        if rule.reply is not None:
            reply = rule.reply
            start(
                f"{reply.status} Injected",
                [("Content-Type", reply.content_type), ("Content-Length", str(len(reply.body)))],
            )
            return [reply.body]
        answer = list(original(app, environ, start))
        if rule.after is not None:
            rule.after(request)
        return answer


def _identify(environ: Mapping[str, Any], body: bytes) -> Request:
    target = environ.get("HTTP_X_AMZ_TARGET", "")
    if target.startswith("DynamoDB_"):
        return Request("dynamodb", target.partition(".")[2], body)
    form = dict(parse_qsl(body.decode("utf-8", "replace")))
    if "Action" in form:
        service = "ec2" if form.get("Version", "").startswith("2016") else "query"
        return Request(service, form["Action"], body)
    return Request("other", environ.get("PATH_INFO", ""), body)


def dry_run(request: Request) -> bool:
    return request.has("DryRun=true")


def not_dry_run(request: Request) -> bool:
    return not dry_run(request)


# --- moto's transactions, at the cost of what they touch ------------------------------------

_touched = threading.local()


def install_fast_transactions() -> None:
    """Make moto's TransactWriteItems cost what it touches, not the table's size.

    moto backs up every table a transaction names (a deep copy) so it can roll back a
    cancelled one: with 1,000 leases in the table that is some 60 ms per transaction, and
    DynamoDB is serialised in the sandbox, so a soak would measure moto. The backup taken here
    copies the table's item index and deep-copies only the items the transaction writes;
    with requests serialised (`broker.sandbox.install_atomic_dynamodb`) the rollback is the
    same. For benchmarks that fill the table; idempotent."""
    from moto.dynamodb.models import DynamoDBBackend
    from moto.dynamodb.models.dynamo_type import DynamoType
    from moto.dynamodb.models.table import Table

    if getattr(DynamoDBBackend.transact_write_items, "_fast", False):
        return
    original = DynamoDBBackend.transact_write_items

    @functools.wraps(original)
    def transact_write_items(backend: Any, transact_items: list[dict[str, Any]]) -> None:
        keys = []
        for item in transact_items:
            _, op = next(iter(item.items()))
            table = backend.tables.get(op.get("TableName"))
            if table is None:
                continue
            attrs = op.get("Key") or op.get("Item") or {}
            hash_key = attrs.get(table.hash_key_attr)
            range_key = attrs.get(table.range_key_attr) if table.range_key_attr else None
            if hash_key is not None:
                keys.append(
                    (DynamoType(hash_key), None if range_key is None else DynamoType(range_key))
                )
        _touched.keys = keys
        try:
            original(backend, transact_items)
        finally:
            _touched.keys = None

    def backup(table: Any, memo: dict[int, Any]) -> Any:
        keys = getattr(_touched, "keys", None)
        if keys is None:  # not a transaction's backup: a real deep copy
            clone = object.__new__(Table)
            clone.__dict__.update(copy.deepcopy(table.__dict__, memo))
            return clone
        clone = copy.copy(table)
        clone.items = collections.defaultdict(dict)
        for hash_key, rows in table.items.items():
            clone.items[hash_key] = dict(rows) if isinstance(rows, dict) else rows
        for hash_key, range_key in keys:
            rows = table.items.get(hash_key)
            if range_key is None and rows is not None and not isinstance(rows, dict):
                clone.items[hash_key] = copy.deepcopy(rows)
            elif isinstance(rows, dict) and range_key in rows:
                clone.items[hash_key][range_key] = copy.deepcopy(rows[range_key])
        return clone

    transact_write_items._fast = True  # type: ignore[attr-defined]
    DynamoDBBackend.transact_write_items = transact_write_items  # type: ignore[method-assign]
    Table.__deepcopy__ = backup  # type: ignore[attr-defined]


# --- a TCP proxy that can go down ---------------------------------------------------------


class TcpProxy:
    """Forwards a loopback port to moto; `stop()` closes the port and every connection
    through it (the endpoint is down: connections are refused), `start()` opens the same
    port again."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.port = 0
        self._listener: socket.socket | None = None
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()

    def start(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((HOST, self.port))
        listener.listen(256)
        self.port = listener.getsockname()[1]
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def stop(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        with self._lock:
            for sock in list(self._open):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()
            self._open.clear()

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # stopped
            try:
                upstream = socket.create_connection(self.upstream, timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                self._open.update((client, upstream))
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            with self._lock:
                self._open.discard(source)
                self._open.discard(sink)
            for sock in (source, sink):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()
