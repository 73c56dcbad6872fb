"""One peer at its connection limit must not slow anyone else down (issue #13's target: a
STATUS or GET_WORKER from an allowed client stays under 100 ms while another peer holds its
maximum of connections).

Starts `compute-broker serve --sandbox` on loopback, opens `max_connections_per_peer` silent
connections from 127.0.0.3 (one more is refused by the limit), then times STATUS and a warm
GET_WORKER from 127.0.0.1 and prints p50, p99 and the maximum.

    .venv/bin/python bench/peer_limit.py [--requests 200]
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LIMIT = 128
TARGET_MS = 100.0


def ask(sock: socket.socket, line: str) -> str:
    sock.sendall(line.encode() + b"\n")
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(1 << 20)
        if not chunk:
            break
        data += chunk
    return data.decode().rstrip("\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "broker.yaml"
        config.write_text(
            f"max_connections_per_peer: {LIMIT}\nsandbox_boot_time: 0.2\n"
            "describe_interval: 0.1\nlog_level: warning\nlog_format: json\n"
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "COMPUTE_"))}
        proc = subprocess.Popen(
            [sys.executable, "-m", "broker", "serve", "--sandbox", "--host", "127.0.0.1",
             "--port", "0", "--config", str(config)],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        )  # fmt: skip
        try:
            assert proc.stdout is not None
            match = re.fullmatch(r"listening on 127\.0\.0\.1:(\d+)\n", proc.stdout.readline())
            assert match, "the broker did not start"
            port = int(match.group(1))
            hogs = []
            for _ in range(LIMIT):
                hog = socket.create_connection(("127.0.0.1", port), source_address=("127.0.0.3", 0))
                hogs.append(hog)
            refused = socket.create_connection(("127.0.0.1", port), source_address=("127.0.0.3", 0))
            refused_line = refused.recv(4096).decode().strip()
            me = socket.create_connection(("127.0.0.1", port), timeout=30)
            ip = ask(me, "GET_WORKER client=bench")  # cold: boots the worker
            timings: dict[str, list[float]] = {"STATUS": [], "GET_WORKER": []}
            for _ in range(args.requests):
                for name, line in (("STATUS", "STATUS"), ("GET_WORKER", "GET_WORKER client=bench")):
                    started = time.perf_counter()
                    reply = ask(me, line)
                    timings[name].append((time.perf_counter() - started) * 1000)
                    assert not reply.startswith("ERROR"), reply
            me.close()
            for sock in [*hogs, refused]:
                sock.close()
        finally:
            proc.terminate()
            proc.wait(30)
    print(f"127.0.0.3 holds {LIMIT} connections; one more: {refused_line!r}")
    print(f"worker {ip}; {args.requests} requests each from 127.0.0.1")
    print("| request | p50 ms | p99 ms | max ms | target |")
    print("| --- | ---: | ---: | ---: | --- |")
    ok = True
    for name, values in timings.items():
        ordered = sorted(values)
        p99 = ordered[max(0, int(0.99 * len(ordered)) - 1)]
        worst = ordered[-1]
        ok = ok and worst < TARGET_MS
        print(
            f"| {name} | {statistics.median(values):.2f} | {p99:.2f} | {worst:.2f} "
            f"| < {TARGET_MS:g} ms: {'met' if worst < TARGET_MS else 'MISSED'} |"
        )
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
