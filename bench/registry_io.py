"""Registry I/O benchmark: boto3 in worker threads against aiobotocore under trio-asyncio.

    python bench/registry_io.py [--quick] [--rounds 2] [--moto process|thread] [--json FILE]

Needs trio, boto3, moto[server], trio-asyncio and aiobotocore in the interpreter that runs it.
aiobotocore pins botocore tightly, so use a separate venv, not the project's (docs/registry-io.md):

    python3 -m venv /tmp/aiovenv
    /tmp/aiovenv/bin/pip install trio trio-asyncio aiobotocore boto3 'moto[server]'
    /tmp/aiovenv/bin/python bench/registry_io.py

Both clients come from the same botocore there, so they differ only in how they do I/O:
  threads  a boto3 client, each call in `trio.to_thread.run_sync` under CapacityLimiter(8),
           as `broker.aws.call` does;
  aio      an aiobotocore client, each call awaited via `trio_asyncio.aio_as_trio` inside
           `trio_asyncio.open_loop()`;
  asyncio  control: the same aiobotocore client under plain `asyncio.run`, no Trio, no
           bridge, to tell the bridge's cost from aiobotocore's own.
Same config for all (standard retries, max_attempts 5, botocore's 10 pooled connections).

Workloads, each on a fresh table shaped like the registry's (pk S hash, sk S range,
PAY_PER_REQUEST): sequential PutItem (latency), PutItem from 50 concurrent tasks (throughput),
and the registry's claim shape from 50 concurrent tasks: UpdateItem `ADD #holders :one` under a
ConditionExpression (exists, ready, not expired, holders < capacity) on 10 worker items whose
capacity admits half of the attempts, so both the success and the ConditionalCheckFailed path
are timed. Rounds rotate the order of the clients; the table shows medians over rounds.

moto runs as a separate process (`python -m moto.server`) by default, so its CPU does not share
the GIL with the clients; `--moto thread` runs moto.server.ThreadedMotoServer in this process
instead (then the CPU column includes moto's). The CPU column is this process's CPU time per
call: the client-side cost.

moto's werkzeug server closes the connection after every response, so against moto every call
also pays a TCP connect, which DynamoDB (keep-alive) does not. The put workloads therefore run a
second time against a keep-alive stub (its own process, an empty 200 to every request): that
table is the client cost alone, as against a real endpoint minus TLS and network. Every loop is
bounded in count and time; everything talks to 127.0.0.1 only, with fake credentials.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from importlib.metadata import version
from typing import Any

HOST = "127.0.0.1"
REGION = "us-east-1"
THREADS = 8  # CapacityLimiter tokens, as in the broker
CONCURRENCY = 50
WORKER_ITEMS = 10  # items the claim workload contends on
MOTO_START_TIMEOUT = 60.0
REQUIRED = ("trio", "boto3", "botocore", "moto", "trio_asyncio", "aiobotocore")
CONFIG_KWARGS: dict[str, Any] = {
    "retries": {"mode": "standard", "max_attempts": 5},
    "connect_timeout": 5,
    "read_timeout": 20,
}
CLAIM_CONDITION = (
    "attribute_exists(#sk) AND #state = :ready AND (attribute_not_exists(#expires_at)"
    " OR #expires_at >= :now) AND #holders < :capacity"
)

# A keep-alive stand-in for DynamoDB, run as `python -c STUB PORT`: it answers every request
# with an empty 200 (what PutItem returns) and keeps the connection open, as AWS does and
# moto's werkzeug server does not (it sends `Connection: close` after every response).
STUB = """
import asyncio, sys
REPLY = (b"HTTP/1.1 200 OK\\r\\nContent-Type: application/x-amz-json-1.0\\r\\n"
         b"x-amzn-requestid: stub\\r\\nContent-Length: 2\\r\\n\\r\\n{}")
async def handle(reader, writer):
    try:
        while True:
            head = await reader.readuntil(b"\\r\\n\\r\\n")
            size = 0
            for line in head.split(b"\\r\\n"):
                if line.lower().startswith(b"content-length:"):
                    size = int(line.split(b":")[1])
            await reader.readexactly(size)
            writer.write(REPLY)
    except (asyncio.IncompleteReadError, ConnectionError):
        writer.close()
async def main():
    await asyncio.start_server(handle, "127.0.0.1", int(sys.argv[1]))
    await asyncio.sleep(600)
asyncio.run(main())
"""

# --- servers --------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, proc: subprocess.Popen[bytes] | None) -> None:
    deadline = time.monotonic() + MOTO_START_TIMEOUT
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with code {proc.returncode}")
        try:
            with socket.create_connection((HOST, port), timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"server not listening on {HOST}:{port} after {MOTO_START_TIMEOUT}s")


class Server:
    """On loopback: a moto server in its own process ("process") or in a thread of this one
    ("thread"), or the keep-alive stub in its own process ("stub")."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.port = free_port()
        self.url = f"http://{HOST}:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.server: Any = None

    def __enter__(self) -> Server:
        if self.mode in ("process", "stub"):
            command = (
                ["-m", "moto.server", "-H", HOST, "-p", str(self.port)]
                if self.mode == "process"
                else ["-c", STUB, str(self.port)]
            )
            self.proc = subprocess.Popen(
                [sys.executable, *command], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
        else:
            from moto.server import ThreadedMotoServer

            self.server = ThreadedMotoServer(ip_address=HOST, port=self.port, verbose=False)
            self.server.start()
        wait_for_port(self.port, self.proc)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        if self.server is not None:
            self.server.stop()


# --- clients --------------------------------------------------------------------------------


def client_kwargs(endpoint: str) -> dict[str, Any]:
    return {
        "region_name": REGION,
        "endpoint_url": endpoint,
        "aws_access_key_id": "testing",
        "aws_secret_access_key": "testing",
    }


def boto3_client(endpoint: str) -> Any:
    import boto3
    import botocore.config

    session = boto3.session.Session()
    return session.client(
        "dynamodb", config=botocore.config.Config(**CONFIG_KWARGS), **client_kwargs(endpoint)
    )


def create_table(endpoint: str, name: str) -> None:
    client = boto3_client(endpoint)
    client.create_table(
        TableName=name,
        AttributeDefinitions=[
            {"AttributeName": "pk", "AttributeType": "S"},
            {"AttributeName": "sk", "AttributeType": "S"},
        ],
        KeySchema=[
            {"AttributeName": "pk", "KeyType": "HASH"},
            {"AttributeName": "sk", "KeyType": "RANGE"},
        ],
        BillingMode="PAY_PER_REQUEST",
    )
    client.get_waiter("table_exists").wait(
        TableName=name, WaiterConfig={"Delay": 1, "MaxAttempts": 30}
    )


def refused(exc: Exception) -> bool:
    """A failed condition is an answer, as in the registry, not an error."""
    import botocore.exceptions

    return (
        isinstance(exc, botocore.exceptions.ClientError)
        and exc.response.get("Error", {}).get("Code") == "ConditionalCheckFailedException"
    )


async def trio_gather(tasks: list[Callable[[], Awaitable[None]]]) -> None:
    import trio

    async with trio.open_nursery() as nursery:
        for task in tasks:
            nursery.start_soon(task)


async def asyncio_gather(tasks: list[Callable[[], Awaitable[None]]]) -> None:
    import asyncio

    await asyncio.gather(*(task() for task in tasks))


def _blocking_call(fn: Callable[..., Any], params: dict[str, Any]) -> bool:
    try:
        fn(**params)
    except Exception as exc:
        if refused(exc):
            return False
        raise
    return True


class ThreadsBackend:
    """boto3, each call in a worker thread under the limiter (broker.aws.call)."""

    name = "threads"

    def __init__(self, endpoint: str) -> None:
        import trio

        self.client = boto3_client(endpoint)
        self.limiter = trio.CapacityLimiter(THREADS)

    gather = staticmethod(trio_gather)

    async def call(self, op: str, params: dict[str, Any]) -> bool:
        import trio

        return await trio.to_thread.run_sync(
            functools.partial(_blocking_call, getattr(self.client, op), params),
            limiter=self.limiter,
            abandon_on_cancel=True,
        )


class AioBackend:
    """aiobotocore, each call awaited through trio-asyncio's bridge (needs open_loop)."""

    name = "aio"
    gather = staticmethod(trio_gather)

    def __init__(self, endpoint: str) -> None:
        from aiobotocore.config import AioConfig
        from aiobotocore.session import get_session

        self.context = get_session().create_client(
            "dynamodb", config=AioConfig(**CONFIG_KWARGS), **client_kwargs(endpoint)
        )
        self.client: Any = None

    async def __aenter__(self) -> AioBackend:
        from trio_asyncio import aio_as_trio

        self.client = await aio_as_trio(self.context).__aenter__()
        return self

    async def __aexit__(self, *exc: object) -> None:
        from trio_asyncio import aio_as_trio

        await aio_as_trio(self.context).__aexit__(None, None, None)

    async def call(self, op: str, params: dict[str, Any]) -> bool:
        from trio_asyncio import aio_as_trio

        try:
            await aio_as_trio(getattr(self.client, op))(**params)
        except Exception as exc:
            if refused(exc):
                return False
            raise
        return True


class AsyncioBackend(AioBackend):
    """Control: the same aiobotocore client on plain asyncio, no Trio and no bridge."""

    name = "asyncio"
    gather = staticmethod(asyncio_gather)

    async def __aenter__(self) -> AioBackend:
        self.client = await self.context.__aenter__()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.context.__aexit__(None, None, None)

    async def call(self, op: str, params: dict[str, Any]) -> bool:
        try:
            await getattr(self.client, op)(**params)
        except Exception as exc:
            if refused(exc):
                return False
            raise
        return True


# --- workloads ------------------------------------------------------------------------------

Backend = ThreadsBackend | AioBackend | AsyncioBackend


def worker_item(table: str, index: int, now: float) -> dict[str, Any]:
    """A PutItem request shaped like a registry worker record."""
    return {
        "TableName": table,
        "Item": {
            "pk": {"S": "pool#bench"},
            "sk": {"S": f"worker#i-{index:017x}"},
            "state": {"S": "ready"},
            "ip": {"S": f"10.0.{index // 250 % 250}.{index % 250}"},
            "instance_type": {"S": "c7g.large"},
            "launched_at": {"N": repr(now)},
            "last_activity": {"N": repr(now)},
            "expires_at": {"N": repr(now + 3600)},
            "holders": {"N": "0"},
        },
    }


def claim_request(table: str, index: int, now: float, capacity: int) -> dict[str, Any]:
    """The registry's claim: count one more holder on a ready, unexpired worker with room."""
    return {
        "TableName": table,
        "Key": {"pk": {"S": "pool#bench"}, "sk": {"S": f"worker#i-{index:017x}"}},
        "UpdateExpression": "SET #last_activity = :now ADD #holders :one",
        "ConditionExpression": CLAIM_CONDITION,
        "ExpressionAttributeNames": {
            "#sk": "sk",
            "#state": "state",
            "#expires_at": "expires_at",
            "#last_activity": "last_activity",
            "#holders": "holders",
        },
        "ExpressionAttributeValues": {
            ":ready": {"S": "ready"},
            ":now": {"N": repr(now)},
            ":one": {"N": "1"},
            ":capacity": {"N": str(capacity)},
        },
    }


async def timed(backend: Backend, op: str, params: dict[str, Any], samples: list[float]) -> bool:
    start = time.perf_counter()
    ok = await backend.call(op, params)
    samples.append(time.perf_counter() - start)
    return ok


async def run_concurrent(
    requests: list[tuple[str, dict[str, Any]]], backend: Backend, samples: list[float]
) -> int:
    """Run `requests` from CONCURRENCY tasks (task i takes every CONCURRENCY-th); count oks."""
    oks = 0

    async def task(first: int) -> None:
        nonlocal oks
        for op, params in requests[first::CONCURRENCY]:
            ok = await timed(backend, op, params, samples)  # await first: no lost update
            oks += ok

    await backend.gather([functools.partial(task, first) for first in range(CONCURRENCY)])
    return oks


def summary(samples: list[float], wall: float, cpu: float, oks: int) -> dict[str, float]:
    ordered = sorted(samples)
    count = len(ordered)
    return {
        "calls": count,
        "ok": oks,
        "p50_ms": 1000 * ordered[count // 2],
        "p99_ms": 1000 * ordered[min(count - 1, int(0.99 * count))],
        "calls_per_s": count / wall,
        "cpu_ms_per_call": 1000 * cpu / count,
    }


async def measure(
    backend: Backend, requests: list[tuple[str, dict[str, Any]]], *, sequential: bool
) -> dict[str, float]:
    samples: list[float] = []
    wall0, cpu0 = time.perf_counter(), time.process_time()
    if sequential:
        oks = 0
        for op, params in requests:
            oks += await timed(backend, op, params, samples)
    else:
        oks = await run_concurrent(requests, backend, samples)
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    return summary(samples, wall, cpu, oks)


async def run_workloads(backend: Backend, tables: dict[str, str], n: int) -> dict[str, Any]:
    """Each workload on its own table; without a "claim" table (the stub) no claim workload."""
    now = time.time()
    # Warm-up: open the pooled connections and fill botocore's caches outside the timing.
    warm = [("put_item", worker_item(tables["warm"], i, now)) for i in range(2 * CONCURRENCY)]
    await run_concurrent(warm, backend, [])
    results: dict[str, Any] = {}
    sequential = [("put_item", worker_item(tables["seq"], i, now)) for i in range(n)]
    results["put_sequential"] = await measure(backend, sequential, sequential=True)
    concurrent = [("put_item", worker_item(tables["conc"], i, now)) for i in range(2 * n)]
    results["put_concurrent"] = await measure(backend, concurrent, sequential=False)
    if "claim" not in tables:
        return results
    for i in range(WORKER_ITEMS):
        await backend.call("put_item", worker_item(tables["claim"], i, now))
    capacity = n // WORKER_ITEMS  # 2n attempts on WORKER_ITEMS items: half are refused
    claims = [
        ("update_item", claim_request(tables["claim"], i % WORKER_ITEMS, now, capacity))
        for i in range(2 * n)
    ]
    results["claim_concurrent"] = await measure(backend, claims, sequential=False)
    results["claim_concurrent"]["expected_ok"] = capacity * WORKER_ITEMS
    return results


async def run_threads(endpoint: str, tables: dict[str, str], n: int) -> dict[str, Any]:
    return await run_workloads(ThreadsBackend(endpoint), tables, n)


async def run_aio(endpoint: str, tables: dict[str, str], n: int) -> dict[str, Any]:
    import trio_asyncio

    async with trio_asyncio.open_loop(), AioBackend(endpoint) as backend:
        return await run_workloads(backend, tables, n)


async def run_asyncio(endpoint: str, tables: dict[str, str], n: int) -> dict[str, Any]:
    async with AsyncioBackend(endpoint) as backend:
        return await run_workloads(backend, tables, n)


def run_backend(name: str, endpoint: str, tables: dict[str, str], n: int) -> dict[str, Any]:
    if name == "asyncio":
        import asyncio

        return asyncio.run(run_asyncio(endpoint, tables, n))
    import trio

    return trio.run(run_threads if name == "threads" else run_aio, endpoint, tables, n)


RUNNERS = ("threads", "aio", "asyncio")

# --- report ---------------------------------------------------------------------------------


def combine(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Per workload and metric, the median over rounds."""
    out: dict[str, Any] = {}
    for workload in rounds[0]:
        out[workload] = {
            metric: statistics.median(r[workload][metric] for r in rounds)
            for metric in rounds[0][workload]
        }
    return out


def print_table(results: dict[str, dict[str, Any]]) -> None:
    header = (
        f"{'workload':<18} {'client':<8} {'calls':>6} {'ok':>6} {'p50 ms':>8} {'p99 ms':>8} "
        f"{'calls/s':>8} {'CPU ms/call':>11}"
    )
    print(header)
    print("-" * len(header))
    for workload in results["threads"]:
        for name in RUNNERS:
            r = results[name][workload]
            print(
                f"{workload:<18} {name:<8} {r['calls']:>6.0f} {r['ok']:>6.0f} "
                f"{r['p50_ms']:>8.2f} {r['p99_ms']:>8.2f} {r['calls_per_s']:>8.0f} "
                f"{r['cpu_ms_per_call']:>11.2f}"
            )


def versions() -> dict[str, str]:
    found = {"python": platform.python_version(), "cpus": str(os.cpu_count())}
    for dist in ("trio", "trio-asyncio", "boto3", "botocore", "aiobotocore", "aiohttp", "moto"):
        found[dist] = version(dist)
    return found


def run_suite(mode: str, n: int, rounds: int, started: float) -> dict[str, Any]:
    """Every client on every workload against one server, `rounds` times; medians."""
    per_round: dict[str, list[dict[str, Any]]] = {name: [] for name in RUNNERS}
    workloads = ("warm", "seq", "conc") if mode == "stub" else ("warm", "seq", "conc", "claim")
    with Server(mode) as server:
        for index in range(rounds):
            shift = index % len(RUNNERS)  # rotate the order from round to round
            for name in RUNNERS[shift:] + RUNNERS[:shift]:
                tables = {w: f"bench-{name}-{index}-{w}" for w in workloads}
                if mode != "stub":
                    for table in tables.values():
                        create_table(server.url, table)
                per_round[name].append(run_backend(name, server.url, tables, n))
                print(f"{mode} round {index + 1} {name}: done at {time.monotonic() - started:.1f}s")
    return {name: combine(rs) for name, rs in per_round.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run: N=40, one round")
    parser.add_argument("-n", type=int, default=300, help="sequential PutItems per round")
    parser.add_argument("--rounds", type=int, default=2, help="rounds, rotating the order")
    parser.add_argument(
        "--moto", choices=("process", "thread"), default="process", help="where moto runs"
    )
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    missing = [name for name in REQUIRED if importlib.util.find_spec(name) is None]
    if missing:
        print(
            f"registry_io: missing {', '.join(missing)}; run it from a venv with "
            "trio trio-asyncio aiobotocore boto3 'moto[server]' (see the docstring)",
            file=sys.stderr,
        )
        return 2
    n, rounds = (40, 1) if args.quick else (max(args.n, 2 * WORKER_ITEMS), max(args.rounds, 1))
    # Fake credentials only, whatever the environment holds; nothing leaves loopback.
    os.environ.update(
        {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_SESSION_TOKEN": "testing",
            "AWS_DEFAULT_REGION": REGION,
            "AWS_CONFIG_FILE": os.devnull,
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        }
    )
    os.environ.pop("AWS_PROFILE", None)
    os.environ.pop("AWS_ENDPOINT_URL", None)
    info = versions()
    print("versions: " + ", ".join(f"{k} {v}" for k, v in info.items()))
    print(f"N={n}; rounds={rounds}; concurrency={CONCURRENCY}; threads={THREADS}")
    started = time.monotonic()
    results = {mode: run_suite(mode, n, rounds, started) for mode in (args.moto, "stub")}
    for mode, result in results.items():
        title = f"moto ({mode})" if mode != "stub" else "keep-alive stub (client cost only)"
        print(f"\n{title}")
        print_table(result)
    claim = results[args.moto]["threads"]["claim_concurrent"]
    print(f"\nclaim: {claim['expected_ok']:.0f} of {claim['calls']:.0f} can succeed (capacity)")
    print(f"total {time.monotonic() - started:.0f}s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"versions": info, "n": n, "rounds": rounds, "results": results}, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
