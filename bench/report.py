"""Every benchmark of issue #12 in one command, one report.

    .venv/bin/python bench/report.py [--quick] [--no-pin] [--skip SECTION ...]
                                     [--profile py-spy|cprofile|none]

Sections, in the order they run (each also runs alone: see its module):

  throughput  bench/deployed.py   50 persistent and 50 one-shot clients: bare Trio, the
                                  seed-style server, the broker as deployed (registry memory
                                  and dynamodb on moto, logging at info); broker/floor
  sandbox     bench/deployed.py   50 one-shot clients, first run: serve --sandbox vs deployed
  memory      bench/deployed.py   RSS per idle connection (10,000 held) and per lease
  profile     bench/request_profile.py  where a warm request's time goes (py-spy or cProfile)
  cold        bench/cold.py       delay from `running` to the GET_WORKER answer, Describe calls
  engine      bench/engine_cost.py  GET_WORKER, PING, RELEASE, STATUS at 10 / 1,000 / 100,000
                                  leases and 1,000 workers, and 1,000 leases on 10 and 100
                                  workers (in its own process)
  requests    bench/request_cost.py  the same sizes through the server: round trips of warm
                                  GET_WORKER, PING and RELEASE (1,000 leases on 10 and 10,000
                                  workers beside them)

bench/README.md says how to read the tables.

`--quick` (about a tenth of the requests, 1 throughput round, 2,000 connections and leases,
10,000 leases at most in the engine section, 3 cold launches) checks the tools in a few
minutes; the full run takes about 10 minutes on a quiet 2-core machine. Placement: see
bench/procs.py (server on CPU 0; generator, moto and this process on CPU 1). Figures move
with whatever else the machine runs: the load average is printed before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import cold
import deployed
import engine_cost
import request_cost
import request_profile
from procs import BENCH, Moto, Placement, pin_self, pinned, raise_fd_limit

SECTIONS = ["throughput", "sandbox", "memory", "profile", "cold", "engine", "requests"]
THROUGHPUT_BOOT = 0.5  # seconds moto keeps a new instance pending outside the cold section


def machine() -> str:
    model = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    return (
        f"{os.cpu_count()} CPUs ({model}), Python {platform.python_version()}, "
        f"{platform.system()} {platform.release()}"
    )


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def engine_section(quick: bool, placement: Placement) -> str:
    """engine_cost in a process of its own (no moto heap beside it), on the server's CPU."""
    argv = [sys.executable, str(BENCH / "engine_cost.py"), "--json"]
    if quick:
        argv.append("--quick")
    done = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=1800,
        check=False,
        preexec_fn=pinned(placement.server),
    )
    if done.returncode != 0:
        raise RuntimeError(f"engine_cost failed: {done.stderr[-2000:]}")
    return engine_cost.table(json.loads(done.stdout.strip().splitlines()[-1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="check the tools in a few minutes")
    parser.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs")
    parser.add_argument("--skip", nargs="*", default=[], choices=SECTIONS, metavar="SECTION")
    parser.add_argument(
        "--profile",
        choices=["py-spy", "cprofile", "none"],
        help="profiler for the profile section (default: py-spy if installed, else cProfile)",
    )
    parser.add_argument(
        "--rounds", type=int, help="throughput rounds and sandbox pairs (default 3, quick 1)"
    )
    args = parser.parse_args()
    quick = args.quick
    skip = set(args.skip)
    if args.profile == "none":
        skip.add("profile")
    placement = Placement.default(not args.no_pin)
    pin_self(placement.generator)
    raise_fd_limit()
    started = time.monotonic()
    print(f"# compute-broker benchmarks{' (--quick)' if quick else ''}\n")
    print(f"machine: {machine()}")
    print(f"placement: {placement.describe()}")
    print(f"load average at start: {load_average()}\n", flush=True)

    def section(name: str, title: str, body: Callable[[], str]) -> None:
        if name in skip:
            return
        print(f"## {title}\n", flush=True)
        t = time.monotonic()
        try:
            text = body()
        except Exception as exc:  # one broken section must not hide the others
            text = f"FAILED: {type(exc).__name__}: {exc}"
        print(f"{text}\n\n({time.monotonic() - t:.0f} s)\n", flush=True)

    needs_moto = not set(SECTIONS[:5]) <= skip  # every section but `engine` needs moto
    moto = Moto(boot_delay=THROUGHPUT_BOOT) if needs_moto else None
    try:
        if moto is not None:
            rounds = args.rounds or (1 if quick else 3)
            section(
                "throughput",
                "Throughput against the floor (warm GET_WORKER)",
                lambda: deployed.throughput_table(
                    deployed.throughput(moto, placement, rounds=rounds, quick=quick)
                ),
            )
            section(
                "sandbox",
                "The sandbox's tail",
                lambda: deployed.sandbox_table(
                    deployed.sandbox_tail(moto, placement, quick=quick, rounds=rounds)
                ),
            )
            n = 2000 if quick else 10_000
            section(
                "memory",
                "Memory",
                lambda: deployed.memory_table(
                    deployed.memory(moto, placement, connections=n, leases=n)
                ),
            )
            tool = args.profile or ("py-spy" if request_profile.py_spy_path() else "cprofile")
            section(
                "profile",
                f"Where a warm request's time goes ({tool}, 50 persistent clients, "
                "registry dynamodb, logging at info)",
                lambda: request_profile.profile(
                    moto, placement, tool=tool, seconds=4 if quick else 10
                ),
            )
            launches, boot = (3, 2.0) if quick else (8, 5.0)

            def cold_section() -> str:
                rows = [
                    (
                        "broker (registry dynamodb)",
                        cold.broker_cold(moto, placement, launches, boot),
                    )
                ]
                rows.append(("seed pattern (poll every 2 s)", cold.seed_cold(moto, launches, boot)))
                moto.set_boot_delay(THROUGHPUT_BOOT)
                return cold.table(rows, boot)

            section("cold", "Cold hand-out delay", cold_section)
    finally:
        if moto is not None:
            moto.stop()
    section(
        "engine",
        "Per-request cost by pool size (engine only, no sockets)",
        lambda: engine_section(quick, placement),
    )
    sizes = [10, 1000, 10_000 if quick else 100_000]
    section(
        "requests",
        "Per-request cost by pool size, through the server (round trips on loopback)",
        lambda: request_cost.table(
            request_cost.measure(
                [(n, 1000) for n in sizes] + [(1000, 10), (1000, 10_000)],
                300 if quick else 2000,
                placement,
            )
        ),
    )
    print(f"load average at end: {load_average()}; took {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()
