"""The fault bench's tools: moto with a fault injector and a TCP proxy in front, broker
processes, clients that prove one reply line per request, and views of EC2 and the registry.

Everything runs on loopback. moto runs in this process (so faults are injected where the
requests land, at exact points); each broker is a `python -m broker serve` process whose
`AWS_ENDPOINT_URL` is the proxy, which can be stopped and started again ("the endpoint is
down"). The bench's own reads go straight to moto and are never faulted.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import functools
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl

import attrs
import boto3
import botocore.config
import yaml

if TYPE_CHECKING:
    from broker.sandbox import MotoHandle

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
REGION = "us-east-1"
TABLE = "compute-broker"
START_TIMEOUT = 60.0
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


# --- the sandbox cloud --------------------------------------------------------------------


class Cloud:
    """moto in this process, the injector around it, a proxy in front; resources ready.

    Without `moto`, starts one and points this process's boto3 at it (a bench run). With
    `moto` (a test session's), uses it as it is: the environment must point at it already.
    """

    def __init__(self, moto: MotoHandle | None = None) -> None:
        from broker import sandbox
        from broker.aws import make_client
        from broker.dynamo import ensure_table

        self.injector = Injector()
        self.injector.install()
        self._own_moto = moto is None
        self.moto = sandbox.start_moto() if moto is None else moto
        if self._own_moto:
            for name in [name for name in os.environ if name.startswith("AWS_")]:
                del os.environ[name]
            os.environ.update(sandbox.sandbox_environment(self.moto.endpoint_url))
            os.environ["AWS_CONFIG_FILE"] = os.devnull
            os.environ["AWS_SHARED_CREDENTIALS_FILE"] = os.devnull
        sandbox.install_unique_ips()
        sandbox.install_boot_delay(0)
        make_client("ec2", region=REGION).describe_vpcs()  # moto loads its EC2 data once
        self.resources = sandbox.prepare_resources()
        ensure_table(make_client("dynamodb", region=REGION), TABLE)
        host, _, port = self.moto.endpoint_url.rpartition(":")
        self.proxy = TcpProxy((host.removeprefix("http://"), int(port)))
        self.proxy.start()
        config = botocore.config.Config(
            user_agent_extra=BENCH_AGENT, retries={"mode": "standard", "max_attempts": 3}
        )
        endpoint = self.moto.endpoint_url
        self.ec2 = boto3.client("ec2", region_name=REGION, config=config, endpoint_url=endpoint)
        self.dynamodb = boto3.client(
            "dynamodb", region_name=REGION, config=config, endpoint_url=endpoint
        )

    def boot_delay(self, seconds: float) -> None:
        from broker import sandbox

        sandbox.install_boot_delay(seconds)

    def broker_env(self) -> dict[str, str]:
        """A broker's environment: the sandbox's, with the proxy as the endpoint."""
        from broker import sandbox

        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "COMPUTE_"))}
        env.update(sandbox.sandbox_environment(self.proxy.url))
        env["AWS_CONFIG_FILE"] = env["AWS_SHARED_CREDENTIALS_FILE"] = os.devnull
        return env

    def base_config(self, pool: str) -> dict[str, Any]:
        res = self.resources
        return {
            "pool_name": pool,
            "ami_id": res.ami_id,
            "security_group_ids": [res.security_group_id],
            "key_name": res.key_name,
            "subnet_id": res.subnet_id,
            "region": REGION,
            "describe_interval": 0.2,
            "log_format": "json",
        }

    def instances(self, pool: str) -> dict[str, dict[str, Any]]:
        """Every instance EC2 has for `pool` (terminated ones included), by id."""
        pages = self.ec2.get_paginator("describe_instances").paginate(
            Filters=[{"Name": "tag:compute-broker:pool", "Values": [pool]}]
        )
        return {
            i["InstanceId"]: i for p in pages for r in p["Reservations"] for i in r["Instances"]
        }

    def live(self, pool: str) -> set[str]:
        """Ids of the pool's pending and running instances."""
        return {
            iid
            for iid, i in self.instances(pool).items()
            if i["State"]["Name"] in ("pending", "running")
        }

    def registry(self, pool: str) -> RegistryView:
        """The pool's registry items as they are now."""
        items: list[dict[str, Any]] = []
        kwargs: dict[str, Any] = {
            "TableName": TABLE,
            "KeyConditionExpression": "pk = :pk",
            "ExpressionAttributeValues": {":pk": {"S": f"pool#{pool}"}},
            "ConsistentRead": True,
        }
        while True:
            page = self.dynamodb.query(**kwargs)
            items.extend(page["Items"])
            if "LastEvaluatedKey" not in page:
                break
            kwargs["ExclusiveStartKey"] = page["LastEvaluatedKey"]
        from broker.dynamo import decode_item

        return RegistryView.of([decode_item(item) for item in items], time.time())

    def close(self) -> None:
        self.proxy.stop()
        self.injector.uninstall()
        self.boot_delay(0)
        if self._own_moto:
            self.moto.stop()


@attrs.frozen
class RegistryView:
    """The registry items of one pool, by kind (TTL-expired ones left out, as the broker
    reads them)."""

    workers: dict[str, dict[str, Any]]
    leases: list[dict[str, Any]]
    intents: list[dict[str, Any]]
    reserved: int
    spend: dict[str, int]  # ledger key (day:..., month:..., rate) -> micro-dollars

    @classmethod
    def of(cls, items: list[dict[str, Any]], now: float) -> RegistryView:
        def live(item: dict[str, Any]) -> bool:
            expires = item.get("expires_at")
            return expires is None or float(expires) >= now

        by_sk = {item["sk"]: item for item in items if live(item)}
        counter = by_sk.get("counter#instances", {})
        return cls(
            workers={
                sk.removeprefix("worker#"): item
                for sk, item in by_sk.items()
                if sk.startswith("worker#")
            },
            leases=[item for sk, item in by_sk.items() if sk.startswith("lease#")],
            intents=[item for sk, item in by_sk.items() if sk.startswith("intent#")],
            reserved=int(counter.get("reserved", 0)),
            spend={
                sk.removeprefix("spend#"): int(item.get("committed", 0))
                for sk, item in by_sk.items()
                if sk.startswith("spend#")
            },
        )

    def cloud_workers(self) -> dict[str, dict[str, Any]]:
        return {k: w for k, w in self.workers.items() if w.get("provider", "ec2") == "ec2"}


# --- broker processes ---------------------------------------------------------------------


class Broker:
    """A `compute-broker serve` process on a free loopback port; its JSON log in a file."""

    def __init__(self, config: Mapping[str, Any], env: Mapping[str, str], workdir: Path) -> None:
        name = uuid.uuid4().hex[:8]
        self.config = dict(config)
        self.config_path = workdir / f"config-{name}.yaml"
        self.config_path.write_text(yaml.safe_dump(self.config))
        self.log_path = workdir / f"broker-{name}.log"
        self._log = self.log_path.open("w")
        started = time.monotonic()
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "broker",
                "serve",
                "--config",
                str(self.config_path),
                "--host",
                HOST,
                "--port",
                "0",
            ],
            cwd=ROOT,
            env=dict(env),
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
        )
        self.port = self._wait_listening()
        self.start_seconds = time.monotonic() - started

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _wait_listening(self) -> int:
        found: list[int] = []

        def read() -> None:
            assert self.proc.stdout is not None
            for line in self.proc.stdout:
                match = re.fullmatch(r"listening on 127\.0\.0\.1:(\d+)\n", line)
                if match:
                    found.append(int(match.group(1)))
                    return

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        reader.join(START_TIMEOUT)
        if not found:
            self.proc.kill()
            raise RuntimeError(f"broker did not start:\n{self.log_path.read_text()[-3000:]}")
        return found[0]

    def ask(self, line: str, timeout: float = 60.0) -> Outcome:
        return ask(self.port, line, timeout)

    def status(self) -> dict[str, Any]:
        outcome = self.ask("STATUS", timeout=30)
        status: dict[str, Any] = json.loads(outcome.reply or "{}")
        return status

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        self._log.flush()
        events = []
        for line in self.log_path.read_text().splitlines():
            if line.startswith("{"):
                with contextlib.suppress(ValueError):
                    events.append(json.loads(line))
        return [e for e in events if name is None or e.get("event") == name]

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL, as a crash."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return None
        finally:
            self._log.close()


# --- clients ------------------------------------------------------------------------------


@attrs.frozen
class Outcome:
    """What one request got: `reply` (one line, without its LF) or None, and how the
    exchange ended: "one" (exactly one reply line, proven by the QUIT that followed),
    "cut" (the connection closed before any reply), "extra" (more than one line),
    "partial" (bytes without an LF), "timeout", "refused"."""

    line: str
    reply: str | None
    ending: str
    seconds: float

    @property
    def ok(self) -> bool:
        return self.ending == "one" and self.reply is not None and not self.error

    @property
    def error(self) -> bool:
        return self.reply is not None and self.reply.startswith("ERROR")


def ask(port: int, line: str, timeout: float = 60.0) -> Outcome:
    """Send `line` on a new connection, read its reply, then QUIT: the next line must be
    `OK bye` and then EOF, which proves the request got exactly one reply line."""
    started = time.monotonic()

    def done(reply: str | None, ending: str) -> Outcome:
        return Outcome(line, reply, ending, time.monotonic() - started)

    try:
        sock = socket.create_connection((HOST, port), timeout=timeout)
    except OSError:
        return done(None, "refused")
    with sock:
        reader = _LineReader(sock)
        try:
            sock.sendall(line.encode() + b"\n")
            first = reader.line()
            if first is None:
                return done(None, "partial" if reader.buffer else "cut")
            try:
                sock.sendall(b"QUIT\n")
            except OSError:
                return done(first, "one")  # the broker closed after its reply (line too long)
            second = reader.line()
            if second is None or second == "OK bye":
                return done(first, "one")
            return done(first, "extra")
        except TimeoutError:
            return done(None, "timeout")
        except OSError:
            return done(None, "cut")


class _LineReader:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""

    def line(self) -> str | None:
        """The next LF-terminated line, or None at EOF."""
        while b"\n" not in self.buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                return None
            self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\n")
        return line.decode("ascii", "replace")


def storm(port_of: Callable[[int], int], lines: list[str], timeout: float = 90.0) -> list[Outcome]:
    """Send every line at once, each on its own connection from its own thread; request n
    goes to `port_of(n)`. Outcomes in request order."""
    outcomes: list[Outcome | None] = [None] * len(lines)
    gate = threading.Barrier(len(lines))

    def one(n: int) -> None:
        with contextlib.suppress(threading.BrokenBarrierError):
            gate.wait(10)
        outcomes[n] = ask(port_of(n), lines[n], timeout)

    threads = [threading.Thread(target=one, args=(n,), daemon=True) for n in range(len(lines))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout + 15)
    return [
        o if o is not None else Outcome(lines[n], None, "timeout", timeout)
        for n, o in enumerate(outcomes)
    ]


def wait_until(condition: Callable[[], bool], timeout: float, poll: float = 0.1) -> bool:
    """Poll `condition` until it holds (True) or `timeout` seconds pass (False)."""
    deadline = time.monotonic() + timeout
    while True:
        if condition():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(poll)


def proc_figures(pid: int) -> tuple[float, int]:
    """(RSS in MB, open file descriptors) of a process, from /proc."""
    rss = 0.0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1]) / 1024
    return rss, len(os.listdir(f"/proc/{pid}/fd"))


@contextlib.contextmanager
def brokers_of(cloud: Cloud, workdir: Path) -> Iterator[Callable[..., Broker]]:
    """Start brokers with `start(config)`; every one still running is killed on exit."""
    started: list[Broker] = []

    def start(config: Mapping[str, Any]) -> Broker:
        broker = Broker(config, cloud.broker_env(), workdir)
        started.append(broker)
        return broker

    try:
        yield start
    finally:
        for broker in started:
            if broker.alive():
                broker.kill()
            broker.stop()
