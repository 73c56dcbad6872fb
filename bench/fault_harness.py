"""The fault bench's tools: the sandbox cloud (moto with the injector and the proxy of
`bench.fault_inject`), broker processes, clients that prove one reply line per request, and
views of EC2 and the registry.

Everything runs on loopback. moto runs in this process (so faults are injected where the
requests land, at exact points); each broker is a `python -m broker serve` process whose
`AWS_ENDPOINT_URL` is the proxy, which can be stopped and started again ("the endpoint is
down"). The bench's own reads go straight to moto and are never faulted.
"""

from __future__ import annotations

import contextlib
import json
import os
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

import attrs
import boto3
import botocore.config
import yaml

from bench.fault_inject import BENCH_AGENT, HOST, Injector, TcpProxy
from tests.harness import listening_port

if TYPE_CHECKING:
    from broker.sandbox import MotoHandle

ROOT = Path(__file__).resolve().parent.parent
REGION = "us-east-1"
TABLE = "compute-broker"
START_TIMEOUT = 60.0


# --- the sandbox cloud --------------------------------------------------------------------


class Cloud:
    """moto in this process, the injector around it, a proxy in front; resources ready.

    Without `moto`, starts one and points this process's boto3 at it (a bench run). With
    `moto` (a test session's), uses it as it is: the environment must point at it already.
    """

    def __init__(self, moto: MotoHandle | None = None) -> None:
        from broker import sandbox
        from broker.aws import make_client
        from broker.dynamo_table import ensure_table

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
        from broker.dynamo_table import decode_item

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
        port = listening_port(self.proc, START_TIMEOUT)
        if port is None:
            self.proc.kill()
            raise RuntimeError(f"broker did not start:\n{self.log_path.read_text()[-3000:]}")
        return port

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
