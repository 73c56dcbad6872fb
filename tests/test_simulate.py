"""The policy simulator: the real engine on simulated time prices a trace of sessions, with
answers worked out by hand; traces are generated per seed and read from the broker's log."""

from __future__ import annotations

import datetime as dt
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest
import trio

from broker import simulate, traces
from broker.cli import main
from broker.clock import Clock
from broker.config_load import load_config
from broker.config_validate import Config
from broker.memory_registry import MemoryRegistry
from broker.registry import LeaseHistoryRecord
from broker.schedule import WarmPoolSchedule
from broker.simcloud import BootModel, BootTime
from broker.simulate import Result
from broker.traces import QueueDepth, Session, Trace
from broker.wiring import build_engine

DOCS = Path(__file__).resolve().parent.parent / "docs" / "simulator"
PRICE = 0.36  # $/hour: $0.0001 a second, so dollars read as seconds
PER_SECOND = PRICE / 3600
BOOT = BootModel(BootTime(60.0, 60.0))  # every worker is usable 60 s after RunInstances
T = dt.datetime(2026, 11, 2, 1, 0, tzinfo=dt.UTC).timestamp()  # an hour after the sim starts


def lab_config(**changes: object) -> Config:
    """A config of the kind the simulator is for: exclusive workers at $0.36/h."""
    config = Config.from_dict(
        {
            "registry": "memory",
            "sharing": "exclusive",
            "idle_timeout": 900,
            "reap_interval": 60,
            "describe_interval": 2,
            "prices": {"c7i.8xlarge": {"spot": PRICE}},
        }
    )
    return attrs.evolve(config, **changes)


def one(session: Session, config: Config | None = None) -> Result:
    return simulate.simulate(config or lab_config(), traces.trace([session]), boot=BOOT)


def test_one_released_session_on_an_empty_pool_costs_the_boot_and_the_use() -> None:
    """10 minutes on an empty pool with a 60 s boot: the client waits 60 s (and the wait
    for the next describe), one launch, and the RELEASE ends the worker: that wait + 600 s
    paid, idle only while it ran before a describe saw it."""
    result = one(Session(T, 600, "lab/a", ping=60, release=True))
    assert (result.launches, result.refused, result.lost) == (1, 0, 0)
    (wait,) = result.waits  # a type never seen is described every 0.9 s: 60.0 to 60.9 s
    assert 60.0 - 0.01 <= wait <= 60.9
    assert result.median_wait == pytest.approx(wait, abs=0.01)
    assert result.spent == pytest.approx(PER_SECOND * (wait + 600), abs=1e-6)
    assert result.idle == pytest.approx(PER_SECOND * (wait - 60), abs=1e-6)  # up, not seen


def test_an_abandoned_session_pays_idle_timeout_until_the_reaper_takes_the_worker() -> None:
    """Without RELEASE the worker runs idle_timeout (900 s) past the last PING (540 s into
    the use), until the next reaper pass (within reap_interval): that tail is idle."""
    result = one(Session(T, 600, "lab/a", ping=60, release=False))
    assert (result.launches, result.lost) == (1, 0)
    used = PER_SECOND * (60 + 600)  # boot, then the session
    earliest = PER_SECOND * (60 + 540 + 900)  # the last PING, then idle_timeout
    assert earliest <= result.spent + 1e-6
    assert result.spent <= earliest + PER_SECOND * 60 + 1e-6  # one reap_interval at most
    assert result.spent - result.idle == pytest.approx(used, abs=1e-6)


def test_a_client_pinging_less_often_than_idle_timeout_loses_its_worker_and_asks_again() -> None:
    """A PING every 400 s against a 300 s idle_timeout: the reaper takes the worker under
    the client, whose next PING hears `Worker not found`; it asks again (a second launch)."""
    result = one(Session(T, 700, "lab/a", ping=400), lab_config(idle_timeout=300))
    assert (result.launches, result.lost) == (2, 1)
    first, second = result.waits  # the second boot is watched on a learned schedule
    assert 60.0 - 0.01 <= first <= 60.9  # nothing learned: described every 0.9 s
    assert 60.0 - 0.01 <= second <= 60.0 + 2  # within a describe_interval of the boot


def test_a_warm_pool_answers_at_once_and_its_waiting_is_idle() -> None:
    """min_idle 1 all day: the worker boots before the session comes (no wait), and its hour
    of waiting for it is idle dollars."""
    config = lab_config(warm_pool=WarmPoolSchedule.from_dict({"min_idle": 1}))
    result = one(Session(T, 600, "lab/a", ping=60), config)
    assert result.waits == (0.0,)
    assert result.idle >= PER_SECOND * 3500  # up from 00:01, the session came at 01:00


def test_bursting_launches_on_the_traces_queue_depth_and_scales_down() -> None:
    """burst_policy auto: the depth the trace sets (50 jobs, 10 a worker) makes the burst
    loop launch six workers; once the queue is empty they go after scale_down_delay."""
    policy = {
        "mode": "auto",
        "queue_url": "https://sqs.us-east-1.amazonaws.com/123456789012/jobs",
        "queue_depth_threshold": 10,
        "jobs_per_worker": 10,
        "scale_down_delay": 300,
    }
    config = load_config(None, {"COMPUTE_BROKER_BURST_POLICY": json.dumps(policy)})
    config = attrs.evolve(config, registry="memory", prices=lab_config().prices)
    depths = [QueueDepth(T, 50), QueueDepth(T + 1800, 0)]
    result = simulate.simulate(config, Trace((), tuple(depths)), boot=BOOT)
    assert result.launches >= 6
    assert result.running_at_end == 0
    assert result.spent < PER_SECOND * result.launches * (1800 + 300 + 3 * 60 + 60)


def test_adaptive_keeps_released_workers_for_a_steady_stream_and_fixed_does_not() -> None:
    """A 5-minute session every 10 minutes for two hours, 60 s boots, $50/h of waiting
    against $0.36/h (break-even: 8333 s idle): once a few have come, each session finds the
    last one's worker (no wait); under the default policy every session boots one."""
    stream = traces.trace(
        Session(T + 600 * n, 300, f"lab/u{n}", ping=60, release=True) for n in range(12)
    )
    fixed = simulate.simulate(lab_config(), stream, boot=BOOT)
    adaptive = simulate.simulate(lab_config(idle_policy="adaptive"), stream, boot=BOOT)
    assert fixed.launches == 12
    assert adaptive.launches < 6
    assert adaptive.waits.count(0.0) >= 7
    assert fixed.idle < adaptive.idle < fixed.idle + PER_SECOND * 900 * 12


def test_adaptive_learns_that_the_mornings_end_at_noon() -> None:
    """An 8-minute session every 10 minutes from 09:00 to 12:00, Monday and Tuesday, waits
    valued at $15/h (break-even: 2500 s idle). Both mornings each session finds the last one's
    worker; on Monday the last released one is kept for most of the idle timeout (the decayed
    rate still reads six an hour), on Tuesday the day profile knows nobody comes after noon
    and the reaper takes it within minutes."""

    def mornings(days: int) -> Trace:
        return traces.trace(
            Session(T + 8 * 3600 + day * 86400 + 600 * n, 480, f"lab/d{day}-{n}", ping=60)
            for day in range(days)
            for n in range(18)
        )

    config = lab_config(idle_policy="adaptive", wait_cost_per_hour=15.0)
    monday = simulate.simulate(config, mornings(1), boot=BOOT)
    both = simulate.simulate(config, mornings(2), boot=BOOT)
    assert both.waits.count(0.0) >= 2 * monday.waits.count(0.0)  # Tuesday keeps them too
    assert both.idle < 2 * monday.idle - PER_SECOND * 400  # but not after noon


def test_a_generated_week_simulates_within_a_minute() -> None:
    """The generated lab week under the documented idle-15m config: every session served
    (one worker each), in well under a minute of wall time (about 5 s on a 2-core machine)."""
    week = traces.generate("lab-week", 1)
    config = load_config(DOCS / "idle-15m.yaml", {})
    result = simulate.simulate(config, week, seed=1, name="idle-15m")
    assert result.wall_seconds < 60
    assert result.simulated_seconds >= 6.5 * 86400  # Monday 00:00 to Sunday night
    assert result.refused == 0
    assert result.launches >= len(week.sessions) == len(result.waits)
    assert 0 < result.idle < result.spent


def test_the_engine_settings_are_the_ones_serve_uses(monkeypatch: pytest.MonkeyPatch) -> None:
    """simulate.engine_settings mirrors broker.wiring.build_engine, key for key."""
    for name in [name for name in os.environ if name.startswith("AWS_")]:
        monkeypatch.delenv(name)  # no AWS call is made, and nobody's profile is read
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    config = attrs.evolve(
        load_config(DOCS / "warm-2.yaml", {}),
        region="us-east-1",
        max_hourly_cost=5.0,
        max_daily_cost=20.0,
        instance_types=("c6i.8xlarge",),
        on_demand_fallback=True,
        probe=True,
    )

    async def both() -> None:
        assert simulate.engine_settings(config) == build_engine(config, Clock()).settings

    trio.run(both)


# --- traces ----------------------------------------------------------------------------------


def test_the_generator_is_the_same_for_a_seed_and_differs_between_seeds() -> None:
    """Same seed, same lines; another seed, another week; the lines read back as written."""
    week = traces.generate("lab-week", 7)
    assert list(week.lines()) == list(traces.generate("lab-week", 7).lines())
    assert list(week.lines()) != list(traces.generate("lab-week", 8).lines())
    assert traces.read(week.lines()) == week


def test_a_generated_week_has_bursts_a_lunch_gap_a_batch_and_a_quiet_weekend() -> None:
    """Each weekday: a burst at 9:00 and at 14:00, at most one session over lunch, overnight
    jobs of hours from the evening; Saturday and Sunday have fewer sessions than any weekday."""
    week = traces.generate("lab-week", 3)
    by_day: dict[int, list[tuple[float, Session]]] = {}
    for session in week.sessions:
        moment = dt.datetime.fromtimestamp(session.at, dt.UTC)
        by_day.setdefault(moment.weekday(), []).append((moment.hour + moment.minute / 60, session))
    for day in range(5):
        hours = [hour for hour, _ in by_day[day]]
        assert sum(8.5 <= h < 9.6 for h in hours) >= 8
        assert sum(13.5 <= h < 14.6 for h in hours) >= 6
        assert sum(12 <= h < 13 for h in hours) <= 1
        assert any(h >= 19 and s.duration >= 2 * 3600 for h, s in by_day[day])
    busiest_weekend = max(len(by_day.get(5, [])), len(by_day.get(6, [])))
    assert busiest_weekend < min(len(by_day[day]) for day in range(5))


def test_a_quick_week_has_many_short_sessions_in_working_hours() -> None:
    """quick-week: on weekdays 57 to 91 sessions of minutes between 09:00 and 18:00, besides
    the overnight batch; the same for a seed."""
    week = traces.generate("quick-week", 1)
    assert list(week.lines()) == list(traces.generate("quick-week", 1).lines())
    monday = [
        s
        for s in week.sessions
        if dt.datetime.fromtimestamp(s.at, dt.UTC).weekday() == 0 and "batch" not in s.client
    ]
    assert 57 <= len(monday) <= 91
    assert all(9 <= dt.datetime.fromtimestamp(s.at, dt.UTC).hour < 18 for s in monday)
    assert sorted(s.duration for s in monday)[len(monday) // 2] < 15 * 60


def test_a_bad_trace_line_is_named_by_its_number() -> None:
    """A line the simulator cannot read is refused with its line number and the problem."""
    good = Session(T, 60, "lab/a").to_json()
    with pytest.raises(traces.TraceError, match=r"line 3: duration must be at least 0"):
        traces.read([good, "# a comment", good.replace('"duration": 60', '"duration": -1')])


def test_the_brokers_log_replays_as_a_trace() -> None:
    """lease.ended lines (as journalctl -o cat or -o json prints them, with or without a
    priority prefix) become sessions: they arrived waited_seconds before the lease started;
    a released lease was released, an expired one was abandoned idle_timeout before; an
    event without its figures is refused with its line number."""
    started = {
        "event": "lease.started",
        "client": "10.0.0.5/job-1",
        "instance_id": "i-1",
        "waited_seconds": 12.5,
        "timestamp": "2026-11-02T09:00:12.500000Z",
    }
    released = {
        "event": "lease.ended",
        "client": "10.0.0.5/job-1",
        "instance_id": "i-1",
        "reason": "released",
        "duration_seconds": 600.0,
        "cost_usd": 0.083,
        "level": "info",
        "timestamp": "2026-11-02T09:10:12.500000Z",
    }
    expired = {
        **released,
        "client": "10.0.0.6",
        "instance_id": "i-2",
        "reason": "expired",
        "duration_seconds": 1000.0,
        "timestamp": "2026-11-02T12:00:00Z",
    }
    lines = [
        "-- Journal begins at Mon 2026-11-02 --",
        json.dumps(started),
        "<6>" + json.dumps(released),
        json.dumps({"MESSAGE": json.dumps(expired), "PRIORITY": "6"}),
        json.dumps({"event": "worker.ready", "instance_id": "i-1"}),
    ]
    trace = traces.from_log(lines, idle_timeout=900)
    nine = dt.datetime(2026, 11, 2, 9, 0, tzinfo=dt.UTC).timestamp()
    noon = dt.datetime(2026, 11, 2, 12, 0, tzinfo=dt.UTC).timestamp()
    assert (
        Session(nine, 600.0, "10.0.0.5/job-1", ping=60.0, release=True),
        Session(noon - 1000, 100.0, "10.0.0.6", ping=60.0, release=False),
    ) == trace.sessions
    broken = {key: value for key, value in released.items() if key != "duration_seconds"}
    with pytest.raises(traces.TraceError, match=r"line 2: lease.ended: missing 'duration_se"):
        traces.from_log(["", json.dumps(broken)])


def history(client: str, start: float, seconds: float, reason: str) -> LeaseHistoryRecord:
    return LeaseHistoryRecord(
        client, "i-1", "c7i.8xlarge", "spot", start, start + seconds, 0.5, reason, None
    )


def test_a_trace_from_the_lease_history_has_a_session_per_used_lease() -> None:
    """Each lease is a session arriving at its start: released (or cut short by its worker's
    end) for its whole duration, expired ones abandoned idle_timeout before their end;
    undeliverable replies are left out."""
    records = [
        history("10.0.0.6", T + 60, 1000.0, "expired"),
        history("token:a/job-1", T, 600.0, "released"),
        history("token:a/job-2", T + 30, 120.0, "worker_lost"),
        history("token:b", T + 90, 0.0, "reply_undeliverable"),
    ]
    trace = traces.from_history(records, idle_timeout=900)
    assert trace.sessions == (
        Session(T, 600.0, "token:a/job-1", ping=60.0, release=True),
        Session(T + 30, 120.0, "token:a/job-2", ping=60.0, release=True),
        Session(T + 60, 100.0, "10.0.0.6", ping=60.0, release=False),
    )


# --- the command -----------------------------------------------------------------------------


@pytest.fixture
def quiet_cli(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[str, str]]]:
    """The CLI's logging setup, recorded instead of done (it would bind every logger of the
    test session to a captured stream)."""
    calls: list[tuple[str, str]] = []
    monkeypatch.setattr(
        "broker.cli.configure_logging", lambda fmt, level: calls.append((fmt, level))
    )
    yield calls


def write_trace(path: Path, *sessions: Session) -> Path:
    path.write_text("".join(line + "\n" for line in traces.trace(sessions).lines()))
    return path


def test_compare_prints_a_row_per_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], quiet_cli: list[tuple[str, str]]
) -> None:
    """`simulate --compare A B --trace T` prints the table's header and one row per config,
    named after its file, and asks for warnings only in the log."""
    trace = write_trace(tmp_path / "t.jsonl", Session(T, 600, "lab/a", release=False))
    a, b = tmp_path / "idle-15m.yaml", tmp_path / "idle-5m.yaml"
    a.write_text("registry: memory\nidle_timeout: 15m\n")
    b.write_text("registry: memory\nidle_timeout: 5m\n")
    argv = ["simulate", "--compare", str(a), str(b), "--trace", str(trace), "--boot-time", "60"]
    assert main(argv) == 0
    rows = capsys.readouterr().out.splitlines()
    assert rows[0].startswith("| config | spent $ | idle $ | launches | median wait s |")
    assert [row.split("|")[1].strip() for row in rows[2:]] == ["idle-15m", "idle-5m"]
    assert all(60.0 <= float(row.split("|")[5]) <= 60.9 for row in rows[2:])
    assert quiet_cli == [("auto", "warning")]


def test_generate_prints_the_trace_and_a_bad_config_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], quiet_cli: list[tuple[str, str]]
) -> None:
    """`--generate lab-day --seed N` without a config prints the trace's JSON lines; a config
    that does not validate is refused with one line and exit status 2."""
    assert main(["simulate", "--generate", "lab-day", "--seed", "4"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed == list(traces.generate("lab-day", 4).lines())
    bad = tmp_path / "bad.yaml"
    bad.write_text("idle_timeout: soon\n")
    assert main(["simulate", "--config", str(bad), "--generate", "lab-day"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("simulate: config: idle_timeout") and error.count("\n") == 1


def test_trace_from_registry_reads_the_history_of_that_config_s_registry(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    quiet_cli: list[tuple[str, str]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`--trace-from-registry CONFIG` without a config to simulate prints the trace made from
    the registry that CONFIG names, with CONFIG's idle_timeout."""
    recorded = MemoryRegistry("lab-a")
    records = [history("a", T, 600.0, "released"), history("b", T, 1000.0, "expired")]
    for record in records:
        trio.run(recorded.put_lease_history, record)
    asked: list[str] = []

    def registry_of(config: Config, limiter: trio.CapacityLimiter) -> MemoryRegistry:
        asked.append(config.pool_name)
        return recorded

    monkeypatch.setattr("broker.cli.build_registry", registry_of)
    config = tmp_path / "broker.yaml"
    config.write_text("pool_name: lab-a\nidle_timeout: 10m\n")
    assert main(["simulate", "--trace-from-registry", str(config)]) == 0
    expected = traces.from_history(records, idle_timeout=600.0)
    assert capsys.readouterr().out.splitlines() == list(expected.lines())
    assert asked == ["lab-a"]


def test_plot_draws_a_png(tmp_path: Path) -> None:
    """With matplotlib (the plot extra), `plot` writes a PNG."""
    pytest.importorskip("matplotlib")
    result = one(Session(T, 600, "lab/a"))
    simulate.plot(
        [result, attrs.evolve(result, name="other", spent=2 * result.spent)],
        str(tmp_path / "p.png"),
    )
    assert (tmp_path / "p.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def test_plot_without_matplotlib_says_which_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without matplotlib, --plot fails with the pip command that installs it."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(simulate.PlotUnavailable, match=r"compute-broker\[plot\]"):
        simulate.plot([], "unused.png")
