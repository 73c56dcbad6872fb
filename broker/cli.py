"""The `compute-broker` command: argument parsing and wiring, nothing else.

compute-broker serve [--config FILE] [--sandbox] [--host H] [--port P]
compute-broker check-config FILE
compute-broker check [--config FILE]
compute-broker setup [--config FILE]
compute-broker agent --name NAME --ip IP [--config FILE]
compute-broker stop-all [--config FILE] [--dry-run]
compute-broker iam-policy [--config FILE] [--account ID] [--setup] [--events-queue NAME]
compute-broker report --since DAY [--until DAY] [--by client|identity|type|day]
                      [--format table|csv] [--config FILE]
compute-broker config-reference | sample-config
"""

from __future__ import annotations

import argparse
import functools
import gc
import os
import sys
from collections.abc import Sequence

import attrs
import structlog
import trio

from broker import __version__, service
from broker.aws import make_client
from broker.checks import EXIT_CONFIG, EXIT_TEMPFAIL, exit_status
from broker.clock import Clock, wall_time
from broker.cloud import CloudError
from broker.config_docs import reference_markdown, sample_yaml
from broker.config_load import load_config
from broker.config_validate import Config, ConfigError
from broker.ec2 import BILLABLE_STATES, Ec2Cloud
from broker.engine import Refusal
from broker.log import configure_logging
from broker.model import LocalWorker
from broker.registry import LeaseHistoryRecord
from broker.sqs import ensure_events_queue
from broker.wiring import build_engine, build_registry, worker_user_data

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
    agent.add_argument(
        "--broker",
        metavar="HOST:PORT",
        help="a broker's address (default: $COMPUTE_BROKER_HOST:$COMPUTE_BROKER_PORT, else "
        "localhost:9000); the token, for the agent role, comes from $COMPUTE_BROKER_TOKEN",
    )
    stop_all = sub.add_parser(
        "stop-all", help="emergency stop: terminate every instance tagged with this pool"
    )
    stop_all.add_argument("--config", help="YAML config file (pool_name, region, registry)")
    stop_all.add_argument("--dry-run", action="store_true", help="list them, terminate nothing")
    iam_policy = sub.add_parser(
        "iam-policy", help="print the least-privilege IAM policy for a config (docs/iam.md)"
    )
    iam_policy.add_argument("--config", help="YAML config file (default: built-in defaults)")
    iam_policy.add_argument(
        "--account", default="*", help="the AWS account id in the ARNs (default: *, any)"
    )
    iam_policy.add_argument(
        "--setup", action="store_true", help="also allow what `compute-broker setup` does"
    )
    iam_policy.add_argument(
        "--events-queue", metavar="NAME", help="with --setup: the events queue setup creates"
    )
    simulate = sub.add_parser(
        "simulate",
        help="what a config costs: the broker's decisions on simulated time over a trace "
        "(docs/simulator.md)",
    )
    configs = simulate.add_mutually_exclusive_group()
    configs.add_argument("--config", help="YAML config file to simulate")
    configs.add_argument("--compare", nargs="+", metavar="FILE", help="YAML configs to compare")
    source = simulate.add_mutually_exclusive_group(required=True)
    source.add_argument("--trace", metavar="FILE", help="a trace of sessions (JSON lines)")
    source.add_argument(
        "--generate", choices=["lab-day", "lab-week", "quick-week"], help="a generated trace"
    )
    source.add_argument("--trace-from-log", metavar="FILE", help="the broker's JSON log lines")
    source.add_argument(
        "--trace-from-registry",
        metavar="CONFIG",
        help="the lease history in the registry of this broker config (its idle_timeout too)",
    )
    simulate.add_argument("--seed", type=int, default=0, help="for --generate and boot times")
    simulate.add_argument("--start", help="--generate: first day, YYYY-MM-DD (2026-11-02)")
    simulate.add_argument("--timezone", default="UTC", help="--generate: the lab's time zone")
    simulate.add_argument(
        "--log-idle-timeout",
        type=float,
        default=900.0,
        metavar="SECONDS",
        help="--trace-from-log: the logging broker's idle_timeout (900)",
    )
    simulate.add_argument(
        "--boot-time",
        action="append",
        default=[],
        metavar="[TYPE=]MEDIAN[:P95]",
        help="seconds to a usable worker (default 20:45); repeat per type",
    )
    simulate.add_argument("--plot", metavar="PNG", help="with --compare: cost against wait")
    report = sub.add_parser(
        "report",
        help="what the pool cost, and who: ended leases against the ledger (docs/cost-report.md)",
    )
    report.add_argument("--config", help="YAML config file (registry, pool_name, region)")
    report.add_argument("--since", required=True, metavar="DAY", help="first day, YYYY-MM-DD")
    report.add_argument(
        "--until", metavar="DAY", help="first day not included, YYYY-MM-DD (default: tomorrow)"
    )
    report.add_argument(
        "--by", choices=["client", "identity", "type", "day"], default="client", help="rows"
    )
    report.add_argument("--format", choices=["table", "csv"], default="table")
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
            worker_user_data(config, config.listen_port or 65535)  # what serve refuses too
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
    from broker.dynamo_table import ensure_table

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
    """Register this machine as a local worker through a broker's port (no AWS access)."""
    from broker.agent import AgentSettings, run_agent

    try:
        worker = _local_worker(args.name, args.ip)
        broker = _broker_address(args.broker)
    except ValueError as exc:
        print(f"agent: {exc}", file=sys.stderr)
        return 2
    configure_logging("auto", "info")
    token = os.environ.get("COMPUTE_BROKER_TOKEN") or None
    trio.run(functools.partial(run_agent, AgentSettings(worker, broker, token)))
    return 0


def _local_worker(name: str, ip: str) -> LocalWorker:
    from broker.config_kinds import Invalid, local_worker

    try:
        worker: LocalWorker = local_worker().check({"name": name, "ip": ip})
    except Invalid as exc:
        raise ValueError(str(exc)) from None
    return worker


def _broker_address(value: str | None) -> tuple[str, int]:
    """HOST:PORT from --broker, else the clients' environment, else localhost:9000."""
    if value is None:
        host = os.environ.get("COMPUTE_BROKER_HOST", "localhost")
        port_text = os.environ.get("COMPUTE_BROKER_PORT", "9000")
    else:
        host, _, port_text = value.rpartition(":")
    if not host or not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"--broker must be HOST:PORT (got {value!r})")
    return host.strip("[]"), int(port_text)


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


def _iam_policy(args: argparse.Namespace) -> int:
    """Print the IAM policy for the config as JSON; 78 for a config it cannot be made for."""
    from broker.iam import policy, render

    try:
        config = _load(args.config)
        document = policy(
            config, account=args.account, setup=args.setup, events_queue=args.events_queue
        )
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return EXIT_CONFIG
    except ValueError as exc:
        print(f"iam-policy: {exc}", file=sys.stderr)
        return 2  # a usage error, as argparse's own
    print(render(document))
    return 0


def _report(args: argparse.Namespace) -> int:
    """Read the lease history and the ledger for whole days in budget_timezone; print them."""
    import datetime as dt
    from zoneinfo import ZoneInfo

    from broker import report

    try:
        config = _load(args.config)
        zone = ZoneInfo(config.budget_timezone)
        since = dt.date.fromisoformat(args.since)
        today = dt.datetime.fromtimestamp(wall_time(), zone).date()
        until = dt.date.fromisoformat(args.until) if args.until else today + dt.timedelta(1)
        window = report.Window(since, until, config.budget_timezone)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return EXIT_CONFIG
    except ValueError as exc:
        print(f"report: {exc}", file=sys.stderr)
        return 2  # a usage error, as argparse's own
    configure_logging(config.log_format, "warning")
    if config.registry == "memory":
        print("report: registry is memory: the history lived in the broker", file=sys.stderr)
    registry = build_registry(config, trio.CapacityLimiter(config.aws_max_concurrency))

    async def read() -> tuple[list[LeaseHistoryRecord], dict[str, int]]:
        records = await registry.lease_history(window.start)
        return records, await registry.spend(window.day_keys())

    try:
        records, ledger = trio.run(read)
    except CloudError as exc:
        print(f"report: the registry could not be read: {exc}", file=sys.stderr)
        return 1
    built = report.build(records, ledger, window, report.By(args.by))
    if args.format == "csv":
        sys.stdout.write(report.csv_text(built))
    else:
        print(report.table(built))
    return 0


def _config_reference(args: argparse.Namespace) -> int:
    sys.stdout.write(reference_markdown())
    return 0


def _sample_config(args: argparse.Namespace) -> int:
    sys.stdout.write(sample_yaml())
    return 0


def _simulate(args: argparse.Namespace) -> int:
    """Without a config, print the trace; with one (or --compare), simulate and print a table."""
    import datetime as dt
    from pathlib import Path

    from broker import simulate, traces

    try:
        if args.generate:
            start = dt.date.fromisoformat(args.start) if args.start else traces.DEFAULT_START
            trace = traces.generate(args.generate, args.seed, start=start, timezone=args.timezone)
        elif args.trace_from_registry:
            recorded = _load(args.trace_from_registry)
            registry = build_registry(recorded, trio.CapacityLimiter(recorded.aws_max_concurrency))
            history = trio.run(registry.lease_history, 0.0)
            trace = traces.from_history(history, idle_timeout=recorded.idle_timeout)
        else:
            with open(args.trace or args.trace_from_log, encoding="utf-8") as file:
                if args.trace:
                    trace = traces.read(file)
                else:
                    trace = traces.from_log(file, idle_timeout=args.log_idle_timeout)
        paths = args.compare or ([args.config] if args.config else [])
        configs = [(Path(path).stem, load_config(path, {})) for path in paths]
        boot = simulate.BootModel.parse(args.boot_time)
    except (ConfigError, OSError, ValueError) as exc:  # TraceError is a ValueError
        print(f"simulate: {exc}", file=sys.stderr)
        return 2
    except CloudError as exc:
        print(f"simulate: the registry could not be read: {exc}", file=sys.stderr)
        return 1
    if not configs:
        sys.stdout.writelines(line + "\n" for line in trace.lines())
        return 0
    configure_logging("auto", "warning")
    results = [
        simulate.simulate(config, trace, boot=boot, seed=args.seed, name=name)
        for name, config in configs
    ]
    print(simulate.table(results))
    for result in results:
        print(simulate.summary(result), file=sys.stderr)
    if args.plot:
        try:
            source = args.generate or Path(args.trace or args.trace_from_log).name
            title = f"{len(trace.sessions)} sessions ({source}), cost against wait"
            simulate.plot(results, args.plot, title=title)
        except simulate.PlotUnavailable as exc:
            print(f"simulate: {exc}", file=sys.stderr)
            return 1
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
    return trio.run(functools.partial(service.serve, config, args.config, sandbox=args.sandbox))


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
    sandbox.install_worker_services(config.worker_port)  # workers echo on worker_port
    resources = sandbox.prepare_resources(config.region or "us-east-1")
    if config.registry == "dynamodb":
        from broker.dynamo_table import ensure_table

        ensure_table(make_client("dynamodb", region="us-east-1"), config.registry_table)
    structlog.get_logger("broker").info(
        "sandbox.started", endpoint=handle.endpoint_url, ami_id=resources.ami_id
    )
    # The embedded moto holds a large heap (its AMI and instance-type data): move it out of
    # the garbage collector's sight, or each full collection pauses requests for 100+ ms.
    gc.collect()
    gc.freeze()
    return attrs.evolve(
        config,
        region=config.region or "us-east-1",
        ami_id=resources.ami_id,
        security_group_ids=(resources.security_group_id,),
        key_name=resources.key_name,
        subnet_id=resources.subnet_id,
    )


_COMMANDS = {
    "serve": _serve,
    "check-config": _check_config,
    "check": _check,
    "setup": _setup,
    "agent": _agent,
    "stop-all": _stop_all,
    "iam-policy": _iam_policy,
    "simulate": _simulate,
    "report": _report,
    "config-reference": _config_reference,
    "sample-config": _sample_config,
}
