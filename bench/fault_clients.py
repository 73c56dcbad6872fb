"""Fault scenarios: hostile clients against a broker process (silent sockets, 1 MiB lines,
binary, one byte per 10 s, a connect-and-close storm) while a good client keeps asking."""

from __future__ import annotations

import math
import os
import random
import select
import socket
import statistics
import threading
import time
from typing import Any

from bench import fault_checks as checks
from bench.fault_bench import Bench, Result
from bench.fault_harness import Outcome, ask, proc_figures
from bench.fault_inject import HOST

CLIENT_TIMEOUT = 12.0  # the broker's, in this scenario: longer than one byte's 10 s gap
SILENT = 200
HUGE = 10
BINARY_CONNECTIONS, BINARY_LINES = 20, 50
SLOW = 3
STORM_RATE = 2000  # connect-and-close attempts per second, at most


def hostile_clients(bench: Bench) -> list[Result]:
    """Silent sockets, 1 MiB lines, binary lines, one byte per 10 s and a connect-and-close
    storm, all at once against one broker, while a well-behaved client keeps asking."""
    storm_seconds = 10.0 if bench.full else 5.0
    pool = bench.pool("hostile")
    # Every hostile client, and the good one, connects from 127.0.0.1: the per-address cap
    # (max_connections_per_peer, 128 by default) would answer the silent sockets beyond it
    # `ERROR: limit: ...` and close them. Off here: this scenario is about max_connections
    # and client_timeout, which close a silent connection without a reply (protocol.md).
    config = bench.config(
        pool,
        client_timeout=CLIENT_TIMEOUT,
        max_connections=4096,
        max_connections_per_peer=None,
    )
    rows: list[Result] = []
    with bench.brokers() as start:
        broker = start(config)
        good_ip = broker.ask("GET_WORKER client=good").reply
        time.sleep(0.5)
        rss_before, fds_before = proc_figures(broker.pid)
        results: dict[str, Any] = {}
        stop = threading.Event()
        jobs = {
            "silent": lambda: _silent(broker.port),
            "huge": lambda: _huge(broker.port),
            "binary": lambda: _binary(broker.port),
            "slow": lambda: _slow(broker.port),
            "storm": lambda: _storm(broker.port, storm_seconds),
        }
        good: list[Outcome] = []
        threads = [
            threading.Thread(target=_into, args=(results, name, job), daemon=True)
            for name, job in jobs.items()
        ]
        keeper = threading.Thread(target=_good_client, args=(broker.port, good_ip, stop, good))
        began = time.monotonic()
        keeper.start()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(CLIENT_TIMEOUT * 3 + storm_seconds)
        stop.set()
        keeper.join(30)
        seconds = time.monotonic() - began
        closed = _wait_fds(broker.pid, fds_before + 5, 15)
        rss_after, fds_after = proc_figures(broker.pid)
        alive = broker.alive()
        instances = len(bench.cloud.instances(pool))
    for name, job_rows in _rows(results, seconds).items():
        rows.extend(job_rows if name in results else [_missing(name, seconds)])
    latencies = sorted(o.seconds for o in good)
    p99 = latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))] if latencies else math.inf
    found = [
        checks.holds("the broker stayed up", alive),
        checks.one_reply_each(good),
        checks.holds(
            "every request of the good client served",
            bool(good) and all(o.ok for o in good),
            f"{sum(o.ok for o in good)} of {len(good)}",
        ),
        checks.holds("good client's p99 under 1 s", p99 < 1.0, f"p99 {p99 * 1000:.0f} ms"),
        checks.holds(
            "connections given back (open files at the start again)",
            closed,
            f"{fds_before} -> {fds_after}",
        ),
        checks.holds(
            "nothing launched by hostile input", instances == 1, f"{instances} instance(s)"
        ),
    ]
    figures = {
        "good requests": len(good),
        "p50": f"{statistics.median(latencies) * 1000:.1f} ms" if latencies else "-",
        "p99": f"{p99 * 1000:.0f} ms",
        "RSS": f"{rss_before:.0f} -> {rss_after:.0f} MB",
        "open files": f"{fds_before} -> {fds_after}",
    }
    rows.append(
        Result(
            "hostile clients: a good client meanwhile",
            "all of the above at once",
            tuple(found),
            figures,
            seconds,
        )
    )
    return rows


def _into(results: dict[str, Any], name: str, job: Any) -> None:
    try:
        results[name] = job()
    except Exception as exc:  # a failed job is reported as such in its row
        results[name] = exc


def _missing(name: str, seconds: float) -> Result:
    return Result(f"hostile clients: {name}", "", (checks.holds("ran", False),), {}, seconds)


def _rows(results: dict[str, Any], seconds: float) -> dict[str, list[Result]]:
    rows: dict[str, list[Result]] = {}
    for name, (title, fault) in {
        "silent": ("silent sockets", f"{SILENT} connections that send nothing"),
        "huge": ("1 MiB lines", f"{HUGE} connections send 1 MiB without a line feed"),
        "binary": ("binary lines", f"{BINARY_CONNECTIONS} x {BINARY_LINES} random binary lines"),
        "slow": ("one byte per 10 s", f"{SLOW} connections, a byte every 10 s"),
        "storm": ("connect-and-close storm", f"up to {STORM_RATE}/s"),
    }.items():
        value = results.get(name)
        if isinstance(value, Exception) or value is None:
            found = (checks.holds("ran to the end", False, repr(value)),)
            rows[name] = [Result(f"hostile clients: {title}", fault, found, {}, seconds)]
            continue
        found, figures = value
        rows[name] = [Result(f"hostile clients: {title}", fault, tuple(found), figures, seconds)]
    return rows


def _good_client(port: int, ip: str | None, stop: threading.Event, out: list[Outcome]) -> None:
    lines = ["GET_WORKER client=good", f"PING {ip} client=good"]
    n = 0
    while not stop.is_set():
        out.append(ask(port, lines[n % 2], timeout=10))
        n += 1
        stop.wait(0.05)


def _wait_fds(pid: int, at_most: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if len(os.listdir(f"/proc/{pid}/fd")) <= at_most:
            return True
        time.sleep(0.5)
    return False


def _closed_after(sock: socket.socket, timeout: float) -> tuple[float | None, bytes]:
    """Seconds until the broker closed `sock` (None: still open after `timeout`) and the
    bytes it sent meanwhile."""
    began = time.monotonic()
    received = b""
    while (left := timeout - (time.monotonic() - began)) > 0:
        ready, _, _ = select.select([sock], [], [], left)
        if not ready:
            break
        try:
            chunk = sock.recv(65536)
        except OSError:
            return time.monotonic() - began, received  # reset
        if not chunk:
            return time.monotonic() - began, received
        received += chunk
    return None, received


def _silent(port: int) -> tuple[list[checks.Check], dict[str, Any]]:
    socks = [socket.create_connection((HOST, port), timeout=10) for _ in range(SILENT)]
    began = time.monotonic()
    closes: list[float | None] = []
    sent = 0
    try:
        for sock in socks:
            left = CLIENT_TIMEOUT + 10 - (time.monotonic() - began)
            after, data = _closed_after(sock, max(0.1, left))
            closes.append(None if after is None else time.monotonic() - began)
            sent += len(data)
    finally:
        for sock in socks:
            sock.close()
    shut = [c for c in closes if c is not None]
    in_time = all(CLIENT_TIMEOUT - 1 <= c <= CLIENT_TIMEOUT + 5 for c in shut)
    found = [
        checks.holds(
            "every silent connection closed at client_timeout",
            len(shut) == SILENT and in_time,
            f"{len(shut)} of {SILENT}, after {min(shut, default=0):.1f}-"
            f"{max(shut, default=0):.1f}s (client_timeout {CLIENT_TIMEOUT:g}s)",
        ),
        checks.holds("nothing sent to a silent client", sent == 0, f"{sent} bytes"),
    ]
    return found, {"closed": f"{len(shut)}/{SILENT}", "after": f"{max(shut, default=0):.1f}s"}


def _huge(port: int) -> tuple[list[checks.Check], dict[str, Any]]:
    outcomes: list[str] = []

    def one() -> None:
        with socket.create_connection((HOST, port), timeout=30) as sock:
            try:
                sock.sendall(b"A" * (1 << 20))
            except OSError:
                pass  # the broker stopped reading and closed: the reply may still be there
            after, data = _closed_after(sock, 30)
            if after is None:
                outcomes.append("still open")
            elif data == b"ERROR: line too long\n":
                outcomes.append("ERROR: line too long")
            elif data == b"":
                outcomes.append("reset")
            else:
                outcomes.append(f"other: {data[:40]!r}")

    threads = [threading.Thread(target=one) for _ in range(HUGE)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    good = outcomes.count("ERROR: line too long") + outcomes.count("reset")
    found = [
        checks.holds(
            "each answered ERROR: line too long (or reset) and closed",
            good == HUGE,
            ", ".join(f"{outcomes.count(k)} {k}" for k in sorted(set(outcomes))),
        )
    ]
    return found, {
        "line too long": outcomes.count("ERROR: line too long"),
        "reset": outcomes.count("reset"),
    }


def _binary(port: int) -> tuple[list[checks.Check], dict[str, Any]]:
    replies: list[list[str]] = []
    rng = random.Random(15)

    def line() -> bytes:
        body = bytes(
            rng.choice([b for b in range(256) if b != 0x0A]) for _ in range(rng.randint(0, 200))
        )
        return bytes([rng.randint(0x80, 0xFF)]) + body + b"\n"

    batches = [b"".join(line() for _ in range(BINARY_LINES)) for _ in range(BINARY_CONNECTIONS)]

    def one(batch: bytes) -> None:
        got: list[str] = []
        with socket.create_connection((HOST, port), timeout=30) as sock:
            sock.sendall(batch + b"QUIT\n")
            data = b""
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
            got = data.decode("ascii", "replace").split("\n")
        replies.append(got)

    threads = [threading.Thread(target=one, args=(batch,)) for batch in batches]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    exact = sum(1 for got in replies if got[-2:] == ["OK bye", ""] and len(got) == BINARY_LINES + 2)
    errors = [r for got in replies for r in got[:BINARY_LINES]]
    all_errors = all(r.startswith("ERROR") for r in errors)
    kinds = sorted({r.partition(":")[2].strip() for r in errors if r.startswith("ERROR")})
    found = [
        checks.holds(
            "one reply line per binary line, in order, then QUIT's",
            exact == BINARY_CONNECTIONS,
            f"{exact} of {BINARY_CONNECTIONS} exact",
        ),
        checks.holds("every binary line answered with an ERROR line", all_errors, "; ".join(kinds)),
    ]
    return found, {"lines": BINARY_CONNECTIONS * BINARY_LINES, "replies": len(errors)}


def _slow(port: int) -> tuple[list[checks.Check], dict[str, Any]]:
    closes: list[float | None] = []

    def one() -> None:
        with socket.create_connection((HOST, port), timeout=30) as sock:
            began = time.monotonic()
            for byte in b"PING 1.2.3.4":
                try:
                    sock.sendall(bytes([byte]))
                except OSError:
                    break
                after, _ = _closed_after(sock, 10.0)
                if after is not None:
                    closes.append(time.monotonic() - began)
                    return
            closes.append(None)

    threads = [threading.Thread(target=one) for _ in range(SLOW)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(CLIENT_TIMEOUT * 3)
    shut = [c for c in closes if c is not None]
    ok = len(shut) == SLOW and all(CLIENT_TIMEOUT - 1 <= c <= CLIENT_TIMEOUT + 5 for c in shut)
    found = [
        checks.holds(
            "a trickle does not extend client_timeout",
            ok,
            f"closed after {', '.join(f'{c:.1f}s' for c in shut)}",
        )
    ]
    return found, {"closed after": f"{max(shut, default=0):.1f}s"}


def _storm(port: int, seconds: float) -> tuple[list[checks.Check], dict[str, Any]]:
    counts = {"connected": 0, "failed": 0}
    lock = threading.Lock()
    began = time.monotonic()

    def one(share: float) -> None:
        n = 0
        while (elapsed := time.monotonic() - began) < seconds:
            if n > elapsed * share:  # pace: at most `share` per second from this thread
                time.sleep(0.001)
                continue
            n += 1
            try:
                socket.create_connection((HOST, port), timeout=5).close()
                key = "connected"
            except OSError:
                key = "failed"
            with lock:
                counts[key] += 1

    workers = 4
    threads = [threading.Thread(target=one, args=(STORM_RATE / workers,)) for _ in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(seconds + 30)
    elapsed = time.monotonic() - began
    rate = counts["connected"] / elapsed
    found = [
        checks.holds(
            "every connection accepted",
            counts["failed"] == 0,
            f"{counts['connected']} connected, {counts['failed']} failed",
        )
    ]
    return found, {"connects": counts["connected"], "rate": f"{rate:,.0f}/s"}
