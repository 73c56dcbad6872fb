"""The `compute-broker` command: argument parsing and wiring, nothing else.

compute-broker serve [--config FILE] [--sandbox] [--host H] [--port P]
compute-broker check-config FILE
compute-broker check [--config FILE]
compute-broker setup [--config FILE]
compute-broker agent --name NAME --ip IP [--config FILE]
compute-broker stop-all [--config FILE] [--dry-run]
compute-broker config-reference | sample-config
"""

from __future__ import annotations

import argparse
import errno
import functools
import os
import signal
import sys
from collections.abc import Sequence

import attrs
import structlog
import trio

from broker import __version__
from broker.aws import make_client
from broker.checks import EXIT_CONFIG, EXIT_TEMPFAIL, exit_status, failures
from broker.clock import Clock
from broker.cloud import CloudError, LaunchSpec, Market
from broker.config_docs import reference_markdown, sample_yaml
from broker.config_load import load_config
from broker.config_validate import Config, ConfigError
from broker.ec2 import BILLABLE_STATES, Ec2Cloud, Ec2Settings
from broker.engine import Engine, EngineSettings, Refusal
from broker.ledger import Budget, OnCap
from broker.log import configure_logging
from broker.memory_registry import MemoryRegistry
from broker.model import Limits
from broker.prices import PriceTable
from broker.registry import Registry
from broker.sdnotify import notify
from broker.server import Server, ServerSettings
from broker.sqs import SqsEventQueue, SqsQueue, ensure_events_queue
from broker.userdata import WatchdogSettings, compose

# Exit statuses: EXIT_CONFIG (78, EX_CONFIG) for a config or setup that starting again will not
# fix (the unit's RestartPreventExitStatus= names it); EXIT_TEMPFAIL (75) for AWS that could not
# be asked at start; 1 for anything else (systemd restarts it).
__all__ = ["EXIT_CONFIG", "EXIT_TEMPFAIL", "build_engine", "build_registry", "main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2  # a usage error, as argparse's own
    command = _COMMANDS[args.command]
    return command(args)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="compute-broker", description="Hands lab clients EC2 spot workers over TCP."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command")
    serve = sub.add_parser("serve", help="run the broker")
    serve.add_argument("--config", help="YAML config file (default: built-in defaults)")
    serve.add_argument(
        "--sandbox",
        action="store_true",
        help="run against an embedded moto cloud on loopback (no AWS account needed)",
    )
    serve.add_argument("--host", help="listen address (overrides listen_host)")
    serve.add_argument("--port", type=int, help="listen port, 0 for a free one (listen_port)")
    check = sub.add_parser("check-config", help="validate a config file and exit")
    check.add_argument("file")
    check.add_argument(
        "--aws", action="store_true", help="also require what serving against AWS needs (ami_id)"
    )
    preflight = sub.add_parser(
        "check", help="check what serving needs from AWS, one ok/FAIL line each (docs/preflight.md)"
    )
    preflight.add_argument("--config", help="YAML config file (default: built-in defaults)")
    preflight.add_argument(
        "--sandbox", action="store_true", help="check against the embedded moto cloud"
    )
    setup = sub.add_parser("setup", help="create the DynamoDB registry table (idempotent)")
    setup.add_argument("--config", help="YAML config file (default: built-in defaults)")
    setup.add_argument(
        "--events-queue",
        metavar="NAME",
        help="also create the SQS queue for EC2 interruption events (prints its URL)",
    )
    agent = sub.add_parser("agent", help="register this lab machine as a local worker")
    agent.add_argument("--name", required=True, help="the worker's name (1-64 of A-Za-z0-9_.-)")
    agent.add_argument("--ip", required=True, help="the IP clients connect to")
    agent.add_argument("--config", help="YAML config file (registry, pool_name, heartbeat)")
    stop_all = sub.add_parser(
        "stop-all", help="emergency stop: terminate every instance tagged with this pool"
    )
    stop_all.add_argument("--config", help="YAML config file (pool_name, region, registry)")
    stop_all.add_argument("--dry-run", action="store_true", help="list them, terminate nothing")
    sub.add_parser("config-reference", help="print the config reference (Markdown)")
    sub.add_parser("sample-config", help="print a commented sample config")
    return parser


def _load(path: str | None) -> Config:
    return load_config(path, os.environ)


def _check_config(args: argparse.Namespace) -> int:
    try:
        config = _load(args.file)
        if args.aws:
            config.validate_for_aws()
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return EXIT_CONFIG
    print(f"{args.file}: ok ({len(attrs.asdict(config))} keys)")
    return 0


def _check(args: argparse.Namespace) -> int:
    """Run the start-up checks `serve` runs, print one line each; 0, 75 or 78."""
    from broker.preflight import run_checks

    try:
        config = _load(args.config)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return EXIT_CONFIG
    configure_logging(config.log_format, "warning")
    if args.sandbox:
        config = _start_sandbox(config)
    checks = trio.run(functools.partial(run_checks, config, config_path=args.config))
    for check in checks:
        print(check.line())
    return exit_status(checks)


def _setup(args: argparse.Namespace) -> int:
    """Create the registry table: PAY_PER_REQUEST, TTL on expires_at; a second run is a no-op."""
    from broker.dynamo import ensure_table

    try:
        config = _load(args.config)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return EXIT_CONFIG
    try:
        if config.registry == "dynamodb":
            client = make_client("dynamodb", region=config.region)
            done = ensure_table(client, config.registry_table)
            state = "created" if done.created else "exists"
            ttl = "enabled now" if done.ttl_enabled else "already enabled"
            print(f"table {config.registry_table}: {state}; TTL on expires_at: {ttl}")
        else:
            print("registry: memory needs no setup")
        if args.events_queue:
            url = ensure_events_queue(make_client("sqs", region=config.region), args.events_queue)
            print(f"events queue {args.events_queue}: {url}")
            print(f"  set events_queue_url: {url} and point an EventBridge rule at it")
            print("  (docs/interruptions.md)")
    except CloudError as exc:
        print(f"setup failed: {exc}", file=sys.stderr)
        return 1
    return 0


def _agent(args: argparse.Namespace) -> int:
    from broker.agent import AgentSettings, run_agent

    try:
        config = load_config(
            args.config,
            {
                **os.environ,
                "COMPUTE_BROKER_LOCAL_WORKERS": f"[{{name: {args.name}, ip: {args.ip}}}]",
            },
        )
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return EXIT_CONFIG
    if config.registry != "dynamodb":
        print(
            "agent: needs registry: dynamodb (the brokers read local workers from it)",
            file=sys.stderr,
        )
        return EXIT_CONFIG
    configure_logging(config.log_format, config.log_level)
    (worker,) = config.local_workers  # validated name and ip

    async def main() -> None:
        registry = build_registry(config, trio.CapacityLimiter(2))
        settings = AgentSettings(worker, config.agent_heartbeat)
        await run_agent(registry, settings, Clock())

    try:
        trio.run(main)
    except CloudError as exc:
        print(f"agent: {exc}", file=sys.stderr)
        return 1
    return 0


def _stop_all(args: argparse.Namespace) -> int:
    """Terminate every instance tagged with the pool (found in EC2, so it works with the broker
    down or the registry lost), then forget them in the registry."""
    try:
        config = _load(args.config)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return EXIT_CONFIG
    configure_logging(config.log_format, config.log_level)

    async def main() -> int:
        engine = build_engine(config, Clock())
        cloud = engine.cloud
        assert isinstance(cloud, Ec2Cloud)
        instances = await cloud.list_pool(BILLABLE_STATES)
        for instance in instances:
            print(f"{instance.instance_id} {instance.state} {instance.public_ip or '-'}")
        print(f"{len(instances)} instance(s) in pool {config.pool_name}")
        if args.dry_run or not instances:
            return 0
        # The broker's own retire path: leases end, records go, the pool-wide counter and
        # the ledger get back what the workers held.
        stopped = await engine.stop_all(instances)
        structlog.get_logger("broker").warning(
            "pool.stop_all", pool=config.pool_name, instance_ids=stopped
        )
        print("terminated")
        return 0

    try:
        return trio.run(main)
    except (CloudError, Refusal) as exc:
        print(f"stop-all failed: {exc}", file=sys.stderr)
        return 1


def _config_reference(args: argparse.Namespace) -> int:
    sys.stdout.write(reference_markdown())
    return 0


def _sample_config(args: argparse.Namespace) -> int:
    sys.stdout.write(sample_yaml())
    return 0


def _serve(args: argparse.Namespace) -> int:
    try:
        config = _load(args.config)
        if args.host is not None:
            config = attrs.evolve(config, listen_host=args.host)
        if args.port is not None:
            config = attrs.evolve(config, listen_port=args.port)
        if not args.sandbox:
            config.validate_for_aws()
        elif args.host is None and config.listen_host == "0.0.0.0":
            # The sandbox is for one machine: nobody else on the network may drive it.
            config = attrs.evolve(config, listen_host="127.0.0.1")
        # Refused now, not at the first launch (port 0: the real one is known once listening).
        worker_user_data(config, config.listen_port or 65535)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return EXIT_CONFIG
    configure_logging(config.log_format, config.log_level)
    if args.sandbox:
        config = _start_sandbox(config)
    return trio.run(_run, config, args.config)


def _start_sandbox(config: Config) -> Config:
    """Start the embedded moto cloud and point boto3 (this process only) at it."""
    from broker import sandbox  # moto is an optional extra

    handle = sandbox.start_moto()
    # Nothing of the user's AWS setup may leak in: no profile, no endpoint override, no
    # credentials file. The sandbox must never reach real AWS.
    for name in [name for name in os.environ if name.startswith("AWS_")]:
        del os.environ[name]
    os.environ.update(sandbox.sandbox_environment(handle.endpoint_url))
    os.environ["AWS_CONFIG_FILE"] = os.environ["AWS_SHARED_CREDENTIALS_FILE"] = os.devnull
    sandbox.install_unique_ips()
    sandbox.install_boot_delay(config.sandbox_boot_time)
    resources = sandbox.prepare_resources(config.region or "us-east-1")
    if config.registry == "dynamodb":
        from broker.dynamo import ensure_table

        ensure_table(make_client("dynamodb", region="us-east-1"), config.registry_table)
    structlog.get_logger("broker").info(
        "sandbox.started", endpoint=handle.endpoint_url, ami_id=resources.ami_id
    )
    return attrs.evolve(
        config,
        region=config.region or "us-east-1",
        ami_id=resources.ami_id,
        security_group_ids=(resources.security_group_id,),
        key_name=resources.key_name,
        subnet_id=resources.subnet_id,
    )


def build_registry(config: Config, limiter: trio.CapacityLimiter) -> Registry:
    """The registry the config asks for."""
    if config.registry == "memory":
        return MemoryRegistry(config.pool_name)
    from broker.dynamo import DynamoRegistry

    return DynamoRegistry(config.registry_table, config.pool_name, limiter, region=config.region)


def _ec2_settings(config: Config, port: int | None = None) -> Ec2Settings:
    return Ec2Settings(
        ami_id=config.ami_id or "",  # serve validates it; stop-all launches nothing
        security_group_ids=tuple(config.security_group_ids),
        key_name=config.key_name,
        subnet_id=config.subnet_id,
        pool_name=config.pool_name,
        region=config.region,
        user_data=None if port is None else worker_user_data(config, port),
    )


_ANY_ADDRESS = frozenset({"", "0.0.0.0", "::"})


def watchdog_brokers(config: Config, port: int) -> tuple[tuple[str, int], ...]:
    """Where the workers' watchdogs reach the brokers: `broker_addresses`, else this broker's
    own listen address on `port`. ConfigError when that is no address a worker can use."""
    if config.broker_addresses:
        found = []
        for address in config.broker_addresses:
            host, _, number = address.rpartition(":")
            found.append((host.strip("[]"), int(number)))
        return tuple(found)
    if config.listen_host in _ANY_ADDRESS:
        raise ConfigError(
            f"broker_addresses: worker_watchdog needs the address workers reach this broker at, "
            f"and listen_host {config.listen_host or '(any)'} does not say it: set "
            "broker_addresses: [HOST:PORT] (every replica's), or worker_watchdog: false"
        )
    return ((config.listen_host, port),)


def worker_user_data(config: Config, port: int) -> str | None:
    """The user data every worker is launched with: the operator's `user_data` plus, unless
    `worker_watchdog: false`, the watchdog (broker.userdata). ConfigError if too large."""
    watchdog = None
    try:
        if config.worker_watchdog:
            watchdog = WatchdogSettings(
                brokers=watchdog_brokers(config, port),
                orphan_timeout=config.orphan_timeout,
                max_lifetime=config.max_lifetime,
            )
        return compose(config.user_data, watchdog)
    except ValueError as exc:
        raise ConfigError(f"user_data: {exc}") from None


def _budget(config: Config) -> Budget:
    return Budget(
        config.max_daily_cost, config.max_monthly_cost, config.budget_timezone, OnCap(config.on_cap)
    )


def build_engine(config: Config, clock: Clock, port: int | None = None) -> Engine:
    """The engine for a config, talking to EC2 (and DynamoDB) through boto3; with the port
    the broker listens on, its workers are launched with the watchdog's user data."""
    limiter = trio.CapacityLimiter(config.aws_max_concurrency)
    cloud = Ec2Cloud(_ec2_settings(config, port), limiter)
    settings = EngineSettings(
        default_spec=LaunchSpec(
            config.instance_type,
            Market(config.market),
            config.instance_types,
            config.on_demand_fallback,
        ),
        limits=Limits(
            config.max_workers,
            config.max_hourly_cost,
            config.idle_timeout,
            config.clients_per_worker if config.sharing == "exclusive" else None,
        ),
        launch_timeout=config.launch_timeout,
        describe_interval=config.describe_interval,
        reap_interval=config.reap_interval,
        worker_port=config.worker_port,
        probe=config.probe,
        probe_timeout=config.probe_timeout,
        warm_pool=config.warm_pool,
        local_workers=config.local_workers,
        prefer_local=config.prefer_local,
        burst=config.burst_policy,
        budget=_budget(config),
        subnets=config.subnets or (config.subnet_id,),
    )
    prices = PriceTable.default().with_overrides(config.prices)
    queue = events = None
    if config.burst_policy.mode == "auto" and config.burst_policy.queue_url:
        queue = SqsQueue(config.burst_policy.queue_url, limiter, region=config.region)
    if config.events_queue_url:
        # Long polls hold a thread for up to 20 s: their own limiter, not the shared one.
        events = SqsEventQueue(
            config.events_queue_url, trio.CapacityLimiter(1), region=config.region
        )
    return Engine(
        cloud,
        settings,
        clock,
        prices,
        build_registry(config, limiter),
        queue,
        events=events,
        spot_prices=cloud if config.spot_price_history else None,
    )


async def _preflight(config: Config, config_path: str | None) -> int:
    """The start-up checks; on failure each failed one as one line on stderr. The exit status."""
    from broker.preflight import run_checks

    checks = await run_checks(config, config_path=config_path)
    for check in failures(checks):
        print(check.line(), file=sys.stderr)
    return exit_status(checks)


async def _listen(config: Config) -> list[trio.SocketListener] | int:
    """The listening sockets, or (one line on stderr) the exit status when they cannot be had:
    1 if the port is taken (it may free up: systemd retries), else EXIT_CONFIG."""
    host, port = config.listen_host, config.listen_port
    try:
        return await trio.open_tcp_listeners(port, host=host)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        print(f"cannot listen on {host}:{port}: {reason}", file=sys.stderr)
        return 1 if exc.errno == errno.EADDRINUSE else EXIT_CONFIG


async def _run(config: Config, config_path: str | None = None) -> int:
    log = structlog.get_logger("broker")
    status = await _preflight(config, config_path)
    if status:
        log.error("broker.not_started", reason="preflight", exit_status=status)
        return status
    listeners = await _listen(config)
    if isinstance(listeners, int):
        log.error("broker.not_started", reason="listen", exit_status=listeners)
        return listeners
    engine = build_engine(config, Clock(), listeners[0].socket.getsockname()[1])
    server = Server(
        engine,
        ServerSettings(
            host=config.listen_host,
            port=config.listen_port,
            client_timeout=config.client_timeout,
            max_connections=config.max_connections,
        ),
    )
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(engine.run)
            await nursery.start(functools.partial(server.run, listeners=listeners))
            host, port = listeners[0].socket.getsockname()[:2]
            print(f"listening on {host}:{port}", flush=True)
            notify("READY=1")
            log.info("broker.started", host=host, port=port, pool=config.pool_name)
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
    log.info("broker.stopped", workers_left_running=len(engine.pool.workers))
    return 0


_COMMANDS = {
    "serve": _serve,
    "check-config": _check_config,
    "check": _check,
    "setup": _setup,
    "agent": _agent,
    "stop-all": _stop_all,
    "config-reference": _config_reference,
    "sample-config": _sample_config,
}
