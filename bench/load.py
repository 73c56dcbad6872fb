"""Load benchmark: start the sandbox broker, measure it on loopback, print a table.

    .venv/bin/python bench/load.py [--quick] [--log-level warning] [--registry dynamodb]

Measures (against a `compute-broker serve` process using a moto server in this process):
  - the launch count of a 50-client cold storm on an empty pool (target: 1);
  - warm GET_WORKER latency p50/p99 and requests/s, sequential, one connection per request;
  - the same with 50 concurrent one-shot clients;
  - with 50 concurrent persistent connections;
  - broker RSS before and after 100,000 requests (target: flat within 10 %);
  - broker RSS growth while holding 1,000 idle connections (target: under 50 MB).

The load generator uses asyncio in this process (it is cheaper per request than the broker,
so the broker stays the bottleneck); both share this machine's cores, so absolute figures
are a floor. Every loop is bounded in count and time and talks only to 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
CONFIG = """\
describe_interval: 0.5
max_connections: 4096
client_timeout: 60
log_format: json
"""


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class Broker:
    """The broker as deployed: its own process, against a cloud it does not embed.

    moto runs in this (the bench) process on loopback, so the broker's RSS is its own.
    """

    def __init__(self, log_level: str, registry: str) -> None:
        from broker import sandbox
        from broker.aws import make_client
        from broker.dynamo_table import ensure_table

        self.moto = sandbox.start_moto()
        for name in [name for name in os.environ if name.startswith("AWS_")]:
            del os.environ[name]
        os.environ.update(sandbox.sandbox_environment(self.moto.endpoint_url))
        os.environ["AWS_CONFIG_FILE"] = os.environ["AWS_SHARED_CREDENTIALS_FILE"] = os.devnull
        sandbox.install_unique_ips()
        sandbox.install_boot_delay(2)
        res = sandbox.prepare_resources()
        ensure_table(make_client("dynamodb", region="us-east-1"), "compute-broker")
        self.dynamodb_writes = count_dynamodb_writes()
        config = CONFIG + (
            f"registry: {registry}\nlog_level: {log_level}\nami_id: {res.ami_id}\n"
            f"security_group_ids: [{res.security_group_id}]\nsubnet_id: {res.subnet_id}\n"
            f"key_name: {res.key_name}\nregion: us-east-1\n"
        )
        fd, self.config_path = tempfile.mkstemp(suffix=".yaml")
        with os.fdopen(fd, "w") as config_file:
            config_file.write(config)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "broker", "serve", "--host", HOST, "--port", "0",
             "--config", self.config_path],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        )  # fmt: skip
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        match = re.match(r"listening on (\S+):(\d+)", line)
        if not match:
            raise RuntimeError(f"broker did not start: {line!r}")
        self.port = int(match.group(2))

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        os.unlink(self.config_path)
        self.moto.stop()


def count_dynamodb_writes() -> list[int]:
    """Count the DynamoDB write requests moto serves in this process: [writes]."""
    from moto.dynamodb.responses import DynamoHandler

    counter = [0]
    for name in ("put_item", "update_item", "delete_item", "transact_write_items"):
        original = getattr(DynamoHandler, name)

        def counted(handler: object, _original: object = original) -> object:
            counter[0] += 1
            return _original(handler)  # type: ignore[operator]

        setattr(DynamoHandler, name, counted)
    return counter


async def one_shot(port: int, line: bytes) -> tuple[bytes, float]:
    start = time.perf_counter()
    reader, writer = await asyncio.open_connection(HOST, port)
    writer.write(line)
    reply = await asyncio.wait_for(reader.readline(), 120)
    writer.close()
    await writer.wait_closed()
    return reply, time.perf_counter() - start


async def cold_storm(port: int, clients: int = 50) -> tuple[int, int]:
    replies = await asyncio.gather(*(one_shot(port, b"GET_WORKER\n") for _ in range(clients)))
    ips = {reply for reply, _ in replies}
    status, _ = await one_shot(port, b"STATUS\n")
    workers = len(json.loads(status)["workers"])
    return workers, len(ips)


async def sequential(port: int, count: int) -> list[float]:
    return [(await one_shot(port, b"GET_WORKER\n"))[1] for _ in range(count)]


async def concurrent_one_shot(
    port: int, clients: int, per_client: int
) -> tuple[list[float], float]:
    latencies: list[float] = []

    async def client() -> None:
        for _ in range(per_client):
            reply, latency = await one_shot(port, b"GET_WORKER\n")
            assert not reply.startswith(b"ERROR"), reply
            latencies.append(latency)

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    return latencies, time.perf_counter() - start


async def persistent(port: int, clients: int, per_client: int) -> tuple[list[float], float]:
    latencies: list[float] = []

    async def client() -> None:
        reader, writer = await asyncio.open_connection(HOST, port)
        for _ in range(per_client):
            start = time.perf_counter()
            writer.write(b"GET_WORKER\n")
            reply = await asyncio.wait_for(reader.readline(), 30)
            assert not reply.startswith(b"ERROR"), reply
            latencies.append(time.perf_counter() - start)
        writer.close()

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    return latencies, time.perf_counter() - start


async def hold_idle(port: int, count: int) -> list[asyncio.StreamWriter]:
    writers = []
    for _ in range(count):
        _, writer = await asyncio.open_connection(HOST, port)
        writers.append(writer)
    return writers


def row(name: str, latencies: list[float], seconds: float | None = None) -> str:
    rate = len(latencies) / (seconds if seconds is not None else sum(latencies))
    p50 = statistics.median(latencies) * 1000
    p99 = percentile(latencies, 0.99) * 1000
    return f"| {name} | {len(latencies)} | {rate:,.0f} | {p50:.2f} | {p99:.2f} |"


async def main(quick: bool, log_level: str, registry: str) -> None:
    scale = 10 if quick else 1
    broker = Broker(log_level, registry)
    try:
        port = broker.port
        launches, distinct = await cold_storm(port)
        print(
            f"cold storm: 50 concurrent GET_WORKER on an empty pool -> {launches} launch(es), "
            f"{distinct} distinct IP(s)"
        )
        await sequential(port, 200)  # warm-up
        print("\n| load (warm GET_WORKER) | requests | req/s | p50 ms | p99 ms |")
        print("| --- | ---: | ---: | ---: | ---: |")
        writes_before = broker.dynamodb_writes[0]
        lat = await sequential(port, 5000 // scale)
        print(row("sequential, one connection per request", lat))
        per_request = (broker.dynamodb_writes[0] - writes_before) / len(lat)
        writes_before = broker.dynamodb_writes[0]
        for n in range(200):  # first-time clients: each GET_WORKER creates a lease
            reply, _ = await one_shot(port, f"GET_WORKER client=bench{n}\n".encode())
            assert not reply.startswith(b"ERROR"), reply
        per_new_lease = (broker.dynamodb_writes[0] - writes_before) / 200
        lat, secs = await concurrent_one_shot(port, 50, 400 // scale)
        print(row("50 concurrent clients, one connection per request", lat, secs))
        lat, secs = await persistent(port, 50, 1000 // scale)
        print(row("50 concurrent persistent connections", lat, secs))

        before = rss_kib(broker.proc.pid)
        total = 100_000 // scale
        await persistent(port, 50, total // 50)
        after = rss_kib(broker.proc.pid)
        print(
            f"\nDynamoDB writes per warm GET_WORKER (registry {registry}): "
            f"{per_request:.2f} for a client that holds the worker, "
            f"{per_new_lease:.2f} for a new client\n"
            f"RSS across {total:,} requests: {before / 1024:.1f} MB -> {after / 1024:.1f} MB "
            f"({(after - before) / before * 100:+.1f} %)"
        )

        base = rss_kib(broker.proc.pid)
        idle = await hold_idle(port, 1000)
        await asyncio.sleep(1)
        held = rss_kib(broker.proc.pid)
        print(
            f"1,000 idle connections: RSS +{(held - base) / 1024:.1f} MB "
            f"(total {held / 1024:.1f} MB)"
        )
        for writer in idle:
            writer.close()
    finally:
        broker.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a tenth of the requests")
    parser.add_argument(
        "--log-level", default="info", help="the broker's log_level (default: info, as shipped)"
    )
    parser.add_argument(
        "--registry", default="memory", choices=["memory", "dynamodb"], help="default: memory"
    )
    args = parser.parse_args()
    print(f"broker log_level: {args.log_level}, registry: {args.registry}")
    asyncio.run(main(args.quick, args.log_level, args.registry))
