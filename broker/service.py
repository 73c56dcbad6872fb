"""`compute-broker serve`: the broker as a service. It checks what it needs before it listens
(one line and an exit status on failure), then runs the engine, the line-protocol server and,
when configured, the monitor (broker.monitor), and keeps systemd told: READY, STATUS= every
few seconds, WATCHDOG=1 while the reaper's passes come on time, STOPPING."""

from __future__ import annotations

import errno
import functools
import gc
import os
import signal
import socket
import sys
from collections.abc import Mapping, MutableMapping
from typing import TYPE_CHECKING, Any, Final

import structlog
import trio

from broker.aws import observe_calls
from broker.checks import EXIT_CONFIG, exit_status, failures
from broker.clock import Clock
from broker.config_validate import Config, ConfigError
from broker.engine import Engine
from broker.health import Health
from broker.log import FLUSH_SECONDS, active_sink
from broker.sdnotify import notify
from broker.server import Server, ServerSettings
from broker.wiring import build_engine, build_gate

if TYPE_CHECKING:
    from broker.monitor import Monitor


async def _preflight(config: Config, config_path: str | None) -> int:
    """The start-up checks; on failure each failed one as one line on stderr. The exit status."""
    from broker.preflight import run_checks

    checks = await run_checks(config, config_path=config_path)
    for check in failures(checks):
        print(check.line(), file=sys.stderr)
    return exit_status(checks)


SD_LISTEN_FDS_START: Final = 3  # the first socket systemd passes (sd_listen_fds(3))
STATUS_EVERY: Final = 10.0  # seconds between STATUS= lines to systemd


def activated_sockets(environ: MutableMapping[str, str], pid: int) -> list[socket.socket]:
    """The listening sockets systemd passed (socket activation: compute-broker.socket), and
    the variables that passed them removed; [] when none were passed to this process."""
    if environ.get("LISTEN_PID") != str(pid):
        return []
    count = int(environ.get("LISTEN_FDS", "0") or "0")
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        environ.pop(name, None)
    return [
        socket.socket(fileno=fd) for fd in range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + count)
    ]


async def _listen(config: Config) -> list[trio.SocketListener] | int:
    """The listening sockets (systemd's, with socket activation), or (one line on stderr) the
    exit status when they cannot be had: 1 if the port is taken (it may free up: systemd
    retries), else EXIT_CONFIG."""
    passed = activated_sockets(os.environ, os.getpid())
    if passed:
        return [trio.SocketListener(trio.socket.from_stdlib_socket(sock)) for sock in passed]
    host, port = config.listen_host, config.listen_port
    try:
        return await trio.open_tcp_listeners(port, host=host)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        print(f"cannot listen on {host}:{port}: {reason}", file=sys.stderr)
        return 1 if exc.errno == errno.EADDRINUSE else EXIT_CONFIG


def _monitor(config: Config, engine: Engine, health: Health) -> Monitor | int:
    """The HTTP monitor the config asks for, or (one line on stderr) EXIT_CONFIG."""
    from broker.metrics import missing_monitoring_packages
    from broker.monitor import Monitor, MonitorSettings, parse_listen, parse_networks
    from broker.statuspage import History

    missing = missing_monitoring_packages()
    if missing:
        print(
            f"http_listen needs the monitoring extra: pip install 'compute-broker[monitoring]' "
            f"(missing: {', '.join(missing)})",
            file=sys.stderr,
        )
        return EXIT_CONFIG
    assert config.http_listen is not None
    host, port = parse_listen(config.http_listen)
    settings = MonitorSettings(host=host, port=port, allow=parse_networks(config.http_allow_cidrs))

    async def status() -> dict[str, Any]:
        return engine.status()

    clock = engine.clock
    return Monitor(
        settings,
        status=status,
        health=lambda: health.check(clock.now()),
        metrics=engine.metrics,
        history=History(),
        now=clock.now,
    )


def status_line(document: Mapping[str, Any]) -> str:
    """The STATUS= line `systemctl status` shows: workers, leases, run rate, spend today."""
    totals = document.get("totals", {})
    by_state = totals.get("by_state", {})
    budget = document.get("budget", {})
    day = budget.get("day", {})
    return (
        f"{totals.get('workers', 0)} workers ({by_state.get('ready', 0)} ready, "
        f"{by_state.get('launching', 0)} launching), {len(document.get('leases', []))} leases, "
        f"${budget.get('run_rate_per_hour', 0):.2f}/h, ${day.get('spent', 0):.2f} spent today"
    )


async def tell_systemd(engine: Engine, environ: Mapping[str, str]) -> None:
    """Keep systemd told: STATUS= every few seconds; WATCHDOG=1 at half of WatchdogSec while
    the reaper's passes come on time (a wedged loop is then restarted by systemd)."""
    watchdog_usec = environ.get("WATCHDOG_USEC")
    every = STATUS_EVERY
    if watchdog_usec and environ.get("WATCHDOG_PID", str(os.getpid())) == str(os.getpid()):
        every = min(every, int(watchdog_usec) / 1e6 / 2)
    else:
        watchdog_usec = None
    while True:
        states = [f"STATUS={status_line(engine.status())}"]
        if watchdog_usec and engine.health.loops_alive(engine.clock.now()):
            states.append("WATCHDOG=1")
        notify("\n".join(states))
        await trio.sleep(every)


async def serve(config: Config, config_path: str | None = None, *, sandbox: bool = False) -> int:
    """Serve until SIGTERM or SIGINT; the exit status. In the sandbox, launches are planned
    to boot in sandbox_boot_time from the first one on."""
    log = structlog.get_logger("broker")
    try:
        gate = build_gate(config, os.environ)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return EXIT_CONFIG
    refusal = (
        None if "LISTEN_FDS" in os.environ else gate.policy.refuse_to_start(config.listen_host)
    )
    if refusal is not None:  # before anything listens (with socket activation: see below)
        print(refusal, file=sys.stderr)
        return EXIT_CONFIG
    status = await _preflight(config, config_path)
    if status:
        log.error("broker.not_started", reason="preflight", exit_status=status)
        return status
    listeners = await _listen(config)
    if isinstance(listeners, int):
        log.error("broker.not_started", reason="listen", exit_status=listeners)
        return listeners
    for listener in listeners:  # the real socket: with socket activation, not listen_host
        refusal = gate.policy.refuse_to_start(str(listener.socket.getsockname()[0]))
        if refusal is not None:
            print(refusal, file=sys.stderr)
            log.error("broker.not_started", reason="insecure", exit_status=EXIT_CONFIG)
            return EXIT_CONFIG
    hint = config.sandbox_boot_time if sandbox else None
    engine = build_engine(
        config, Clock(), listeners[0].socket.getsockname()[1], boot_time_hint=hint
    )
    monitor = None if config.http_listen is None else _monitor(config, engine, engine.health)
    if isinstance(monitor, int):
        return monitor
    server = Server(
        engine,
        ServerSettings(
            host=config.listen_host,
            port=config.listen_port,
            client_timeout=config.client_timeout,
            max_connections=config.max_connections,
        ),
        gate,
    )
    stop_observing = [
        observe_calls(
            lambda service, op, seconds, error: engine.metrics.aws_call(service, op, seconds, error)
        ),
        observe_calls(lambda service, op, _, error: engine.health.aws_call(service, op, error)),
    ]
    try:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async with trio.open_nursery() as nursery:
                if monitor is not None:
                    try:
                        await nursery.start(monitor.run)
                    except OSError as exc:
                        print(
                            f"cannot listen on {config.http_listen}: {exc.strerror or exc}",
                            file=sys.stderr,
                        )
                        nursery.cancel_scope.cancel()
                        return EXIT_CONFIG
                await nursery.start(engine.run)
                await nursery.start(functools.partial(server.run, listeners=listeners))
                # What start-up made (boto3's models, the restored pool) lives as long as the
                # process: out of the collector's sight, a full collection scans only what
                # requests made since, so it pauses them less (issue #12: the p99).
                gc.collect()
                gc.freeze()
                host, port = listeners[0].socket.getsockname()[:2]
                print(f"listening on {host}:{port}", flush=True)
                notify("READY=1")
                nursery.start_soon(tell_systemd, engine, os.environ)
                nursery.start_soon(_flush_logs_often)
                log.info("broker.started", host=host, port=port, pool=config.pool_name)
                uncapped = config.max_hourly_cost is None and not (
                    config.max_daily_cost or config.max_monthly_cost
                )
                if uncapped and not sandbox:
                    log.warning(
                        "budget.uncapped",
                        advice="set max_daily_cost (and max_hourly_cost): nothing bounds "
                        "what this pool may spend",
                    )
                async for signum in signals:
                    log.info("broker.stopping", signal=signal.Signals(signum).name)
                    break
                notify("STOPPING=1")
                await server.shutdown()
                with trio.move_on_after(config.shutdown_grace):
                    await server.wait_closed()
                engine.stop_handing_out()  # requests still waiting answer "shutting down"
                with trio.move_on_after(2):
                    await server.wait_closed()
                nursery.cancel_scope.cancel()
    finally:
        for stop in stop_observing:
            stop()
    log.info("broker.stopped", workers_left_running=len(engine.pool.workers))
    return 0


async def _flush_logs_often() -> None:
    """While serving, info lines are held and written every `FLUSH_SECONDS` (one write for
    many request lines); at the end, what is held is written and lines go out at once again."""
    sink = active_sink()
    if sink is None:
        return
    sink.hold()
    try:
        while True:
            await trio.sleep(FLUSH_SECONDS)
            try:
                sink.flush()
            except (OSError, ValueError):  # stderr gone: nothing more can be logged anyway
                return
    finally:
        sink.release()
