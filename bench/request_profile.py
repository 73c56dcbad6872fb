"""Where a warm request's time goes: profile the deployed broker under 50 persistent clients.

    .venv/bin/python bench/request_profile.py [--tool py-spy|cprofile] [--seconds 8]

- `py-spy` (default when `py-spy` is on PATH or in this venv; `pip install py-spy`): samples
  the running broker from outside (`py-spy record --nonblocking`, 250 Hz), so the broker runs
  at full speed. Each sample's stack is put in one category, the first of these it touches:
  logging (structlog, the JSON renderer, the write), metrics, engine and registry, protocol,
  socket I/O, the server's own code, Trio's scheduler. Also the functions with the most
  samples on top of the stack (self) and in the stack (inclusive).
- `cprofile`: runs the broker through bench/profiled_broker.py, profiling only while the load
  runs (start-up left out); deterministic, but each Python call costs more, so cheap,
  many-call code looks dearer than it is. Self time by the same categories (by file; C
  functions by name), and the top functions by self and cumulative time.

The broker: `compute-broker serve --config`, registry dynamodb on moto, logging at `info`
(shipped), placed as the other benchmarks place it (procs.Placement); the profiler runs on
the generator's CPU.
"""

from __future__ import annotations

import argparse
import collections
import os
import pstats
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from procs import BENCH, Broker, Moto, Placement, pin_self, request

# (category, file patterns): a sample belongs to the first category any of its frames matches.
CATEGORIES: list[tuple[str, tuple[str, ...]]] = [
    ("logging (structlog, JSON render, write)", ("structlog/", "broker/log.py", "logging/")),
    ("metrics", ("broker/metrics.py", "prometheus_client/")),
    (
        "engine + registry (hand-out, pool, cover)",
        (
            "broker/engine.py",
            "broker/handout.py",
            "broker/pool.py",
            "broker/spending.py",
            "broker/context.py",
            "broker/launcher.py",
            "broker/retire.py",
            "broker/model.py",
            "broker/memory_registry.py",
            "broker/dynamo.py",
            "broker/registry.py",
            "broker/clock.py",
            "broker/ledger.py",
            "broker/aws.py",
            "botocore/",
            "boto3/",
        ),
    ),
    ("protocol (parse, reply)", ("broker/protocol.py",)),
    (
        "socket I/O (broker/connection.py, trio's sockets: send/recv)",
        ("broker/connection.py", "trio/_highlevel_socket.py", "trio/_socket.py"),
    ),
    ("waiting in epoll (idle)", ("_io_epoll.py",)),
    ("server (broker/server.py itself)", ("broker/server.py",)),
    ("trio scheduler", ("trio/",)),
]
OTHER = "other"
_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*):\d+\)$")


def categorize(files: list[str]) -> str:
    for name, patterns in CATEGORIES:
        if any(pattern in file for file in files for pattern in patterns):
            return name
    return OTHER


def _frames(stack: str) -> list[tuple[str, str]]:
    out = []
    for frame in stack.split(";"):
        match = _FRAME.match(frame)
        if match:
            out.append((match["func"], match["file"]))
    return out


def _inclusive_worthy(file: str) -> bool:
    """Broker and structlog frames, but not the entry points every sample has."""
    if file.endswith(("broker/cli.py", "broker/__main__.py", "broker/service.py")):
        return False
    return "broker/" in file or "structlog/" in file


def py_spy_report(raw: str, top: int = 12, cpu_us: float | None = None) -> str:
    """The category shares and top functions of a `py-spy record --format raw` output;
    with `cpu_us` (the broker's CPU microseconds per request meanwhile), each category's
    share of it too."""
    by_category: collections.Counter[str] = collections.Counter()
    self_counts: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not count_text.isdigit():
            continue
        count = int(count_text)
        frames = _frames(stack)
        if not frames:
            continue
        total += count
        by_category[categorize([file for _, file in frames])] += count
        func, file = frames[-1]
        self_counts[f"{func} ({file})"] += count
        for name in {f"{f} ({p})" for f, p in frames if _inclusive_worthy(p)}:
            inclusive[name] += count
    if not total:
        return "no samples"
    busy = total - by_category["waiting in epoll (idle)"]
    lines = [f"py-spy: {total} samples, {busy} busy (not waiting in epoll)"]
    if cpu_us is not None:
        lines.append(f"broker CPU per request meanwhile: {cpu_us:.1f} us")
    lines += [
        "",
        "| category | % of busy samples | ~ CPU us per request |",
        "| --- | ---: | ---: |",
    ]
    for name, count in by_category.most_common():
        if name != "waiting in epoll (idle)":
            share = count / max(busy, 1)
            us = "" if cpu_us is None else f"{share * cpu_us:.1f}"
            lines.append(f"| {name} | {share * 100:.1f} | {us} |")
    lines += ["", "| top of stack (self) | % of all samples |", "| --- | ---: |"]
    for name, count in self_counts.most_common(top):
        lines.append(f"| {name} | {count / total * 100:.1f} |")
    lines += [
        "",
        "| in the stack (inclusive; broker and structlog) | % of busy |",
        "| --- | ---: |",
    ]
    for name, count in inclusive.most_common(top):
        lines.append(f"| {name} | {count / max(busy, 1) * 100:.1f} |")
    return "\n".join(lines)


def _builtin_category(name: str) -> str:
    """The category of a C function (cProfile names them, with no file)."""
    if "epoll" in name:
        return "waiting in epoll (idle)"
    if "_socket.socket" in name:
        return "socket I/O (trio streams, send/recv)"
    if "_json" in name or "TextIOWrapper" in name:  # the JSON log renderer, the log write
        return CATEGORIES[0][0]
    return OTHER


def cprofile_report(path: str, top: int = 15) -> str:
    stats = pstats.Stats(path)
    raw = stats.stats  # type: ignore[attr-defined]
    by_category: collections.Counter[str] = collections.Counter()
    total = 0.0
    rows = []
    for (file, line, func), (_, calls, tottime, cumtime, _) in raw.items():
        by_category[_builtin_category(func) if file == "~" else categorize([file])] += tottime
        total += tottime
        rows.append((tottime, cumtime, calls, f"{func} ({_short(file)}:{line})"))
    idle = by_category["waiting in epoll (idle)"]
    busy = total - idle
    lines = [f"cProfile: {total:.2f} s of self time, {busy:.2f} s not in epoll", ""]
    lines += ["| category (self time by file) | % of busy |", "| --- | ---: |"]
    for name, seconds in by_category.most_common():
        if name != "waiting in epoll (idle)":
            lines.append(f"| {name} | {seconds / max(busy, 1e-9) * 100:.1f} |")
    lines += ["", "| function | self s | cumulative s | calls |", "| --- | ---: | ---: | ---: |"]
    for tottime, cumtime, calls, name in sorted(rows, reverse=True)[:top]:
        lines.append(f"| {name} | {tottime:.3f} | {cumtime:.3f} | {calls:,} |")
    lines += [
        "",
        "| broker function (cumulative) | cumulative s | calls |",
        "| --- | ---: | ---: |",
    ]
    mine = [r for r in rows if "broker/" in r[3] or "structlog/" in r[3]]
    for _, cumtime, calls, name in sorted(mine, key=lambda r: -r[1])[:top]:
        lines.append(f"| {name} | {cumtime:.3f} | {calls:,} |")
    return "\n".join(lines)


def _short(file: str) -> str:
    for marker in ("site-packages/", "/lib/python3"):
        if marker in file:
            return file.split(marker, 1)[1]
    return file.replace(str(BENCH.parent) + "/", "")


def py_spy_path() -> str | None:
    local = Path(sys.executable).with_name("py-spy")
    return str(local) if local.exists() else shutil.which("py-spy")


def _loadgen(
    port: int, placement: Placement, requests: int, mode: str = "persistent"
) -> subprocess.Popen[str]:
    argv = [
        sys.executable,
        str(BENCH / "loadgen.py"),
        f"--port={port}",
        f"--mode={mode}",
        "--clients=50",
        f"--requests={requests}",
    ]
    if placement.generator is not None:
        argv.append(f"--cpu={placement.generator}")
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def profile(
    moto: Moto,
    placement: Placement,
    *,
    tool: str,
    seconds: float,
    keep_raw: str | None = None,
    mode: str = "persistent",
) -> str:
    """Profile the deployed broker under 50 persistent clients; the report."""
    if tool == "py-spy":
        spy = py_spy_path()
        if spy is None:
            raise RuntimeError("py-spy not found: pip install py-spy, or --tool cprofile")
        with Broker(moto, placement, registry="dynamodb") as broker:
            assert not request(broker.port, "GET_WORKER").startswith("ERROR")
            load = _loadgen(
                broker.port, placement, requests=100_000, mode=mode
            )  # stopped after sampling
            time.sleep(1)  # past the connects
            fd, out = tempfile.mkstemp(prefix="bench-pyspy-", suffix=".txt")
            os.close(fd)
            try:
                argv = [spy, "record", "--pid", str(broker.pid), "--rate", "250"]
                argv += ["--duration", str(int(seconds)), "--format", "raw", "--output", out]
                argv += ["--nonblocking"]
                cpu, served = broker.cpu_seconds(), broker.log_lines("request")
                done = subprocess.run(
                    argv, capture_output=True, text=True, timeout=seconds + 60, check=False
                )
                cpu, served = broker.cpu_seconds() - cpu, broker.log_lines("request") - served
                if done.returncode != 0:
                    raise RuntimeError(f"py-spy failed: {done.stderr[-1000:]}")
                cpu_us = cpu / served * 1e6 if served else None
                raw = Path(out).read_text()
                if keep_raw is not None:
                    Path(keep_raw).write_text(raw)
                return py_spy_report(raw, cpu_us=cpu_us)
            finally:
                load.kill()
                load.wait()
                os.unlink(out)
    fd, out = tempfile.mkstemp(prefix="bench-cprofile-", suffix=".prof")
    os.close(fd)
    try:
        command = [str(BENCH / "profiled_broker.py"), out]
        with Broker(moto, placement, registry="dynamodb", command=command) as broker:
            assert not request(broker.port, "GET_WORKER").startswith("ERROR")
            load = _loadgen(broker.port, placement, requests=100_000, mode=mode)
            try:
                time.sleep(1)  # past the connects
                os.kill(broker.pid, signal.SIGUSR1)
                time.sleep(seconds)
                os.kill(broker.pid, signal.SIGUSR2)
                deadline = time.monotonic() + 30
                while not os.path.getsize(out) and time.monotonic() < deadline:
                    time.sleep(0.1)
            finally:
                load.kill()
                load.wait()
        return cprofile_report(out)
    finally:
        os.unlink(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tool", choices=["py-spy", "cprofile"])
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--no-pin", action="store_true")
    parser.add_argument("--mode", choices=["persistent", "oneshot"], default="persistent")
    parser.add_argument("--keep-raw", metavar="FILE", help="py-spy: also write its raw samples")
    args = parser.parse_args()
    tool = args.tool or ("py-spy" if py_spy_path() else "cprofile")
    placement = Placement.default(not args.no_pin)
    pin_self(placement.generator)
    moto = Moto(boot_delay=0.5)
    try:
        print(
            profile(
                moto,
                placement,
                tool=tool,
                seconds=args.seconds,
                keep_raw=args.keep_raw,
                mode=args.mode,
            )
        )
    finally:
        moto.stop()


if __name__ == "__main__":
    main()
