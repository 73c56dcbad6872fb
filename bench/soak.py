"""Load soak: persistent clients mixing GET_WORKER, PING and RELEASE for minutes against a
broker process on the DynamoDB registry (moto), with figures per minute.

    .venv/bin/python -m bench.soak [--clients 1000] [--minutes 10] [--think 10] [--out FILE]
                                   [--trace FILE.csv]

Each client holds one connection for the whole run and loops: GET_WORKER (with its own
`client=`), then PINGs (80 %), GET_WORKER again (10 %) or RELEASE (10 %, then GET_WORKER),
pausing about `--think` seconds between requests (0.5x to 1.5x, at random; 1,000 clients
at 10 s: about 100 requests/s; a holder's lease is written at most every 30 s). Clients
connect over 5 s.
Workers are shared (the default), so RELEASE terminates a worker only when its last holder
lets go.

Printed per minute: requests, requests/s, p50 and p99 latency, errors, and the broker's RSS
and open files (from /proc/<pid>/status and /proc/<pid>/fd); at the end the totals and the
broker's error log events. Expected: zero errors, RSS and open files flat from the first
minute to the last. Exit status 1 if any request failed.

moto runs in this process (DynamoDB serialised, as in the sandbox); the load generator runs
in a child process (asyncio), so neither slows the other through the GIL; the broker is its
own process. moto's TransactWriteItems is made to cost what it touches rather than the whole
table (`install_fast_transactions`): otherwise, with 1,000 leases in the table, the soak
measures moto's table copies. Loopback only; the file limit is raised for all three.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import random
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.fault_harness import Broker, proc_figures
from bench.fault_inject import HOST, install_fast_transactions

REQUEST_TIMEOUT = 60.0  # seconds one reply may take before it counts as an error
RAMP_SECONDS = 5.0  # clients connect over this long, not all in one instant


# --- the load generator (child process) ------------------------------------------------------


def generate(
    port: int, clients: int, seconds: float, think: float, out: Any, trace: str | None = None
) -> None:
    """Run the clients for `seconds`; put one dict per minute (and a last partial one) on
    `out`, then None. With `trace`, write every request there as CSV (seconds since the
    start, latency in ms, command, reply)."""
    traced: list[str] | None = [] if trace else None
    asyncio.run(_generate(port, clients, seconds, think, out, traced))
    if trace and traced is not None:
        Path(trace).write_text("seconds,ms,command,reply\n" + "".join(traced))
    out.put(None)


class _Window:
    def __init__(self) -> None:
        self.latencies: list[float] = []
        self.errors: dict[str, int] = {}
        self.commands: dict[str, int] = {}

    def summary(self, minute: int, seconds: float) -> dict[str, Any]:
        ordered = sorted(self.latencies)
        count = len(ordered)
        return {
            "minute": minute if seconds >= 59.5 else f"{minute} (last {seconds:.0f} s)",
            "requests": count,
            "rate": count / seconds if seconds else 0.0,
            "p50": statistics.median(ordered) * 1000 if ordered else 0.0,
            "p99": ordered[min(count - 1, int(0.99 * count))] * 1000 if ordered else 0.0,
            "errors": dict(self.errors),
            "commands": dict(self.commands),
        }


async def _generate(
    port: int, clients: int, seconds: float, think: float, out: Any, traced: list[str] | None
) -> None:
    loop = asyncio.get_running_loop()
    start = loop.time()
    windows: dict[int, _Window] = {}

    def window(at: float) -> _Window:
        return windows.setdefault(int((at - start) // 60), _Window())

    def fail(kind: str) -> None:
        errors = window(loop.time()).errors
        errors[kind] = errors.get(kind, 0) + 1

    async def client(n: int) -> None:
        rng = random.Random(n)
        await asyncio.sleep(RAMP_SECONDS * n / clients)
        try:
            reader, writer = await asyncio.open_connection(HOST, port)
        except OSError as exc:
            fail(f"connect: {exc.strerror or exc}")
            return
        ip: str | None = None
        try:
            while loop.time() - start < seconds:
                draw = rng.random()
                if ip is None or draw < 0.1:
                    command, line = "GET_WORKER", f"GET_WORKER client=c{n}"
                elif draw < 0.2:
                    command, line = "RELEASE", f"RELEASE {ip} client=c{n}"
                else:
                    command, line = "PING", f"PING {ip} client=c{n}"
                sent = loop.time()
                writer.write(line.encode() + b"\n")
                reply = (await asyncio.wait_for(reader.readline(), REQUEST_TIMEOUT)).decode()
                done = loop.time()
                current = window(done)
                current.latencies.append(done - sent)
                current.commands[command] = current.commands.get(command, 0) + 1
                if traced is not None:
                    word = reply.strip().partition(" ")[0][:20]
                    traced.append(
                        f"{done - start:.3f},{(done - sent) * 1000:.1f},{command},{word}\n"
                    )
                if not reply.endswith("\n"):
                    fail("connection closed")
                    return
                reply = reply.rstrip("\n")
                if reply.startswith("ERROR"):
                    fail(reply[:80])
                elif command == "GET_WORKER":
                    ip = reply
                elif command == "RELEASE":
                    ip = None
                await asyncio.sleep(think * rng.uniform(0.5, 1.5))
            writer.write(b"QUIT\n")
            await asyncio.wait_for(reader.readline(), REQUEST_TIMEOUT)
        except TimeoutError:
            fail("timeout")
        except OSError as exc:
            fail(f"socket: {exc.strerror or exc}")
        finally:
            writer.close()

    async def reporter() -> None:
        minute = 0
        while True:
            boundary = start + 60 * (minute + 1)
            await asyncio.sleep(max(0.0, boundary - loop.time()) + 0.5)
            out.put(windows.pop(minute, _Window()).summary(minute + 1, 60.0))
            minute += 1

    reporting = asyncio.create_task(reporter())
    await asyncio.gather(*(client(n) for n in range(clients)))
    reporting.cancel()
    finished = loop.time()
    for minute in sorted(windows):
        length = min(60.0, finished - start - 60 * minute)
        out.put(windows[minute].summary(minute + 1, length))


# --- the bench (parent process) ---------------------------------------------------------------


def raise_file_limit(needed: int) -> int:
    """Raise this process's soft limit on open files (children inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = needed if hard == resource.RLIM_INFINITY else min(hard, max(soft, needed))
    if wanted > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def start_cloud() -> dict[str, str]:
    """moto in this process, boto3 pointed at it; the broker's environment."""
    from broker import sandbox
    from broker.aws import make_client
    from broker.dynamo_table import ensure_table

    moto = sandbox.start_moto()
    for name in [name for name in os.environ if name.startswith("AWS_")]:
        del os.environ[name]
    os.environ.update(sandbox.sandbox_environment(moto.endpoint_url))
    os.environ["AWS_CONFIG_FILE"] = os.environ["AWS_SHARED_CREDENTIALS_FILE"] = os.devnull
    sandbox.install_unique_ips()
    sandbox.install_boot_delay(0.5)
    install_fast_transactions()
    ensure_table(make_client("dynamodb", region="us-east-1"), "compute-broker")
    return dict(os.environ)


def config_for(clients: int, log_level: str) -> dict[str, Any]:
    from broker.sandbox import prepare_resources

    res = prepare_resources()
    return {
        "pool_name": f"soak-{os.getpid()}",
        "ami_id": res.ami_id,
        "security_group_ids": [res.security_group_id],
        "key_name": res.key_name,
        "subnet_id": res.subnet_id,
        "region": "us-east-1",
        "registry": "dynamodb",
        "describe_interval": 0.5,
        "max_connections": clients + 256,
        # Every client connects from 127.0.0.1, one identity: the per-address and
        # per-identity caps (128 connections, 256 leases, 100 launches a minute) are off.
        "max_connections_per_peer": None,
        "max_leases_per_identity": None,
        "max_launches_per_minute": None,
        "log_format": "json",
        "log_level": log_level,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=1000, help="persistent clients (1000)")
    parser.add_argument("--minutes", type=float, default=10.0, help="how long (10)")
    parser.add_argument("--think", type=float, default=10.0, help="mean pause between requests")
    parser.add_argument("--log-level", default="info", help="the broker's log_level (info)")
    parser.add_argument("--out", type=Path, help="write the Markdown table here")
    parser.add_argument("--trace", type=Path, help="write every request here (CSV)")
    args = parser.parse_args(argv)
    limit = raise_file_limit(args.clients + 1024)
    print(f"{args.clients} clients, {args.minutes:g} min, think {args.think:g}s, "
          f"file limit {limit}")  # fmt: skip
    env = start_cloud()
    config = config_for(args.clients, args.log_level)
    with tempfile.TemporaryDirectory(prefix="soak-") as workdir:
        broker = Broker(config, env, Path(workdir))
        try:
            return _soak(broker, args)
        finally:
            broker.stop()


def _soak(broker: Broker, args: argparse.Namespace) -> int:
    first = broker.ask("GET_WORKER client=warmup", timeout=60)
    if not first.ok:
        print(f"warm-up failed: {first.reply!r}")
        return 1
    rss0, fds0 = proc_figures(broker.pid)
    seconds = args.minutes * 60
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    load = context.Process(
        target=generate,
        args=(
            broker.port,
            args.clients,
            seconds,
            args.think,
            queue,
            args.trace and str(args.trace),
        ),
    )
    started = time.monotonic()
    load.start()
    rows = [
        "| minute | requests | req/s | p50 ms | p99 ms | errors | broker RSS MB | open files |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    print(f"broker before the clients: RSS {rss0:.1f} MB, {fds0} open files\n")
    print(rows[0] + "\n" + rows[1])
    totals: dict[str, Any] = {"requests": 0, "errors": {}}
    figures: list[tuple[float, int]] = []
    while True:
        summary = queue.get(timeout=seconds + 300)
        if summary is None:
            break
        rss, fds = proc_figures(broker.pid)
        figures.append((rss, fds))
        errors = sum(summary["errors"].values())
        totals["requests"] += summary["requests"]
        for kind, count in summary["errors"].items():
            totals["errors"][kind] = totals["errors"].get(kind, 0) + count
        row = (
            f"| {summary['minute']} | {summary['requests']:,} | {summary['rate']:,.0f} | "
            f"{summary['p50']:.1f} | {summary['p99']:.1f} | {errors} | {rss:.1f} | {fds} |"
        )
        rows.append(row)
        print(row, flush=True)
    load.join(60)
    elapsed = time.monotonic() - started
    time.sleep(2)  # the clients' connections close
    rss_end, fds_end = proc_figures(broker.pid)
    crashed = len(broker.events("connection.crashed"))
    error_events = [e for e in broker.events() if e.get("level") in ("error", "critical")]
    failures = sum(totals["errors"].values())
    lines = [
        "",
        f"{totals['requests']:,} requests in {elapsed:.0f} s from {args.clients} persistent "
        f"clients; {failures} failed"
        + (f" ({', '.join(f'{n}x {k}' for k, n in totals['errors'].items())})" if failures else "")
        + f"; broker log: {len(error_events)} error events, {crashed} connection.crashed.",
        f"Broker RSS {rss0:.1f} MB before the clients, {figures[0][0]:.1f} MB after the first "
        f"minute, {figures[-1][0]:.1f} MB after the last, {rss_end:.1f} MB once they left; "
        f"open files {fds0}, {figures[0][1]}, {figures[-1][1]}, {fds_end}.",
    ] if figures else ["", "no minute completed"]  # fmt: skip
    print("\n".join(lines))
    if args.out is not None:
        args.out.write_text("\n".join(rows + lines) + "\n")
    return 0 if failures == 0 and crashed == 0 and figures else 1


if __name__ == "__main__":
    sys.exit(main())
