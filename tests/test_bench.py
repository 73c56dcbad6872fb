"""The benchmark tools under bench/ still work: tiny runs, no timing asserted.

Timing targets live in the benchmarks (bench/report.py), not here; these tests keep the
instruments from rotting while the engine changes under them.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import ModuleType

import trio

BENCH = Path(__file__).resolve().parent.parent / "bench"


def bench_module(name: str) -> ModuleType:
    """A module of bench/ (its scripts import each other by plain name)."""
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    return importlib.import_module(name)


def test_floor_servers_answer_every_request_of_the_load_generator() -> None:
    """The bare Trio server answers persistent and one-shot clients, the seed-style one
    one-shot clients; the generator counts every reply and no error."""
    procs = bench_module("procs")
    unpinned = procs.Placement(None, None)
    with procs.floor_server("trio", unpinned) as server:
        for mode in ("persistent", "oneshot"):
            result = procs.measured_load(
                server, server.port, mode, placement=unpinned, clients=3, requests=5, timeout=60
            )
            assert (result["requests"], result["errors"]) == (15, 0)
            assert result["rate"] > 0 and result["p99_ms"] >= result["p50_ms"] > 0
    with procs.floor_server("trio-direct", unpinned) as server:
        for mode in ("persistent", "oneshot"):
            result = procs.loadgen(
                server.port, mode, placement=unpinned, clients=3, requests=5, timeout=60
            )
            assert (result["requests"], result["errors"]) == (15, 0)
    with procs.floor_server("seed", unpinned) as server:
        result = procs.loadgen(
            server.port, "oneshot", placement=unpinned, clients=3, requests=5, timeout=60
        )
        assert (result["requests"], result["errors"]) == (15, 0)


async def test_engine_cost_times_each_request_without_terminating_workers() -> None:
    """The pool-size benchmark fills the leases, times GET_WORKER, PING, RELEASE and STATUS
    through the engine, and leaves every worker and lease as it found them."""
    engine_cost = bench_module("engine_cost")
    with trio.fail_after(60):
        raw = await engine_cost.measure_size(leases=30, workers=10, calls=20)
    row = engine_cost.summarize(raw)
    assert (row["leases"], row["workers"]) == (30, 10)
    for name in ("get_worker", "ping", "release"):
        assert len(raw[name]) == 20
        assert row[f"{name}_p50_us"] > 0
    assert row["status_bytes"] > 100
    assert "| 30 | 10 |" in engine_cost.table([row])


def test_request_cost_times_round_trips_through_a_server_per_size() -> None:
    """The pool-size benchmark through the server: a server process per size, every timed
    request answered (warm GET_WORKERs with the holder's own worker), a row per size."""
    procs, request_cost = bench_module("procs"), bench_module("request_cost")
    rows = request_cost.measure([(10, 5), (30, 5)], 20, procs.Placement(None, None))
    assert [(r["leases"], r["workers"]) for r in rows] == [(10, 5), (30, 5)]
    for row in rows:
        for name in ("get_worker", "ping", "release"):
            assert row[f"{name}_p99_us"] >= row[f"{name}_p50_us"] > 0
    assert "| 30 | 5 |" in request_cost.table(rows)


def test_profile_report_puts_each_sample_in_its_first_matching_category() -> None:
    """A py-spy stack that logs counts as logging, even under the server and the engine;
    epoll waits are idle, left out of the busy share."""
    request_profile = bench_module("request_profile")
    raw = "\n".join(
        [
            "run (trio/_core/_run.py:1);_answer (broker/server.py:2);"
            "meth (structlog/_native.py:3);iterencode (json/encoder.py:4) 3",
            "run (trio/_core/_run.py:1);_answer (broker/server.py:2);"
            "get_worker (broker/handout.py:5) 1",
            "run (trio/_core/_run.py:1);get_events (trio/_core/_io_epoll.py:6) 4",
        ]
    )
    report = request_profile.py_spy_report(raw)
    assert "8 samples, 4 busy" in report
    assert "| logging (structlog, JSON render, write) | 75.0 |" in report
    assert "| engine + registry (hand-out, pool, cover) | 25.0 |" in report
