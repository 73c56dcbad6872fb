"""The sandbox's first hand-out: GET_WORKER on an empty pool, from request to reply.

    .venv/bin/python bench/sandbox_first_handout.py [--runs 5] [--probe] [--echo-load]

Each run starts `compute-broker serve --sandbox --host 127.0.0.1 --port 0` afresh (the
default config: sandbox_boot_time 3 s, describe_interval 2 s, unless --config names a file),
sends one GET_WORKER once it listens, and times the reply; then it checks that the worker's
port echoes a line, and stops the broker. It prints each run with the time from the launch
call to the worker being ready (the broker's `worker.launch` and `worker.ready` log lines),
then the median and the maximum.

--echo-load also measures, in the last run, what the workers' echo service (its own Trio loop
in a thread of the broker process) costs the broker's event loop: 2,000 sequential HELPs (no
registry call: the loop and the GIL alone), one connection each, while the service is idle
and while a client keeps 256-byte lines going through it. Everything runs on loopback and
stops by itself.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT = 60.0
REQUEST_TIMEOUT = 60.0
REQUESTS = 2000
ECHO_LINE = b"x" * 255 + b"\n"
ECHO_SECONDS_MAX = 60.0


def start_broker(config: Path, log: Path) -> tuple[subprocess.Popen[str], int]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "COMPUTE_"))}
    proc = subprocess.Popen(
        [sys.executable, "-m", "broker", "serve", "--sandbox", "--host", "127.0.0.1",
         "--port", "0", "--config", str(config)],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=log.open("w"), text=True,
    )  # fmt: skip
    assert proc.stdout is not None
    deadline = time.monotonic() + START_TIMEOUT
    for line in proc.stdout:
        match = re.fullmatch(r"listening on 127\.0\.0\.1:(\d+)\n", line)
        if match:
            return proc, int(match.group(1))
        if time.monotonic() > deadline:
            break
    proc.kill()
    raise SystemExit(f"the broker did not start: {log.read_text()[-2000:]}")


def ask(port: int, line: str) -> str:
    with socket.create_connection(("127.0.0.1", port), timeout=REQUEST_TIMEOUT) as sock:
        sock.sendall(line.encode() + b"\n")
        return sock.makefile().readline().rstrip("\n")


def echo_once(ip: str, worker_port: int) -> bool:
    with socket.create_connection((ip, worker_port), timeout=10) as sock:
        sock.sendall(b"hello\n")
        return sock.makefile("rb").readline() == b"hello\n"


def launch_to_ready(log: Path) -> float:
    """Seconds from the `worker.launch` log line to `worker.ready`."""
    stamps = {}
    for line in log.read_text().splitlines():
        if line.startswith("{"):
            event = json.loads(line)
            if event.get("event") in ("worker.launch", "worker.ready"):
                stamps.setdefault(event["event"], datetime.fromisoformat(event["timestamp"]))
    return (stamps["worker.ready"] - stamps["worker.launch"]).total_seconds()


def help_latencies(port: int) -> list[float]:
    """Milliseconds of HELPs, one connection each."""
    times = []
    for _ in range(REQUESTS):
        start = time.perf_counter()
        reply = ask(port, "HELP")
        times.append((time.perf_counter() - start) * 1000)
        assert reply.startswith("OK commands:"), reply
    return times


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def echo_flood(ip: str, worker_port: int, stop: threading.Event, counts: list[int]) -> None:
    """Lines through the worker's echo, one at a time, until `stop` (or a minute passes)."""
    deadline = time.monotonic() + ECHO_SECONDS_MAX
    with socket.create_connection((ip, worker_port), timeout=10) as sock:
        reader = sock.makefile("rb")
        while not stop.is_set() and time.monotonic() < deadline:
            sock.sendall(ECHO_LINE)
            assert reader.readline() == ECHO_LINE
            counts[0] += 1


def measure_echo_load(port: int, ip: str, worker_port: int) -> None:
    idle = help_latencies(port)
    stop = threading.Event()
    counts = [0]
    flood = threading.Thread(target=echo_flood, args=(ip, worker_port, stop, counts))
    started = time.perf_counter()
    flood.start()
    try:
        loaded = help_latencies(port)
    finally:
        stop.set()
        flood.join()
    elapsed = time.perf_counter() - started
    for label, times in (("echo idle", idle), ("echo busy", loaded)):
        print(
            f"HELP ({label}): p50 {percentile(times, 0.5):.2f} ms, "
            f"p99 {percentile(times, 0.99):.2f} ms, max {max(times):.1f} ms"
        )
    print(f"echo meanwhile: {counts[0] / elapsed:,.0f} lines/s of {len(ECHO_LINE)} bytes")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--probe", action="store_true", help="probe: true in the config")
    parser.add_argument("--config", type=Path, help="a config file instead of the defaults")
    parser.add_argument("--echo-load", action="store_true", help="also measure echo load")
    args = parser.parse_args()
    print(
        f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"{platform.system()} {platform.release()}"
    )
    seconds = []
    with tempfile.TemporaryDirectory() as workdir:
        config = args.config or Path(workdir) / "sandbox.yaml"
        if args.config is None:
            config.write_text(f"log_format: json\nprobe: {str(args.probe).lower()}\n")
        for run in range(1, args.runs + 1):
            log = Path(workdir) / f"broker-{run}.log"
            proc, port = start_broker(config, log)
            try:
                start = time.perf_counter()
                ip = ask(port, "GET_WORKER")
                elapsed = time.perf_counter() - start
                assert re.fullmatch(r"127\.77\.\d+\.\d+", ip), ip
                echoes = echo_once(ip, 2560)
                seconds.append(elapsed)
                boot = launch_to_ready(log)
                print(f"run {run}: {elapsed:.2f} s (launch to ready {boot:.2f} s), echo: {echoes}")
                if args.echo_load and run == args.runs:
                    measure_echo_load(port, ip, 2560)
            finally:
                proc.send_signal(signal.SIGTERM)
                proc.wait(30)
    print(f"first hand-out: median {statistics.median(seconds):.2f} s, max {max(seconds):.2f} s")


if __name__ == "__main__":
    main()
