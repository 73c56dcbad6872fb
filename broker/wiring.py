"""From a config to the objects that serve it: the engine, its registry, the EC2 settings and
the workers' user data. Used by `compute-broker serve` (broker.service) and the CLI's other
commands; no argument parsing here."""

from __future__ import annotations

from collections.abc import Mapping

import trio

from broker.access import (
    TOKEN_ENV,
    AccessConfigError,
    AccessPolicy,
    parse_token_env,
    read_token_file,
)
from broker.adaptive import IdlePolicy
from broker.clock import Clock
from broker.cloud import LaunchSpec, Market
from broker.config_validate import Config, ConfigError
from broker.ec2 import Ec2Cloud, Ec2Settings
from broker.engine import Engine, EngineSettings
from broker.gate import Gate
from broker.ledger import Budget, OnCap
from broker.limits import Limiter
from broker.limits import Limits as IdentityLimits
from broker.memory_registry import MemoryRegistry
from broker.model import Limits
from broker.prices import PriceTable
from broker.registry import Registry
from broker.sqs import SqsEventQueue, SqsQueue
from broker.userdata import WatchdogSettings, compose


def build_registry(config: Config, limiter: trio.CapacityLimiter) -> Registry:
    """The registry the config asks for."""
    if config.registry == "memory":
        return MemoryRegistry(config.pool_name)
    from broker.dynamo import DynamoRegistry

    return DynamoRegistry(config.registry_table, config.pool_name, limiter, region=config.region)


def ec2_settings(config: Config, port: int | None = None) -> Ec2Settings:
    return Ec2Settings(
        ami_id=config.ami_id or "",  # serve validates it; stop-all launches nothing
        security_group_ids=tuple(config.security_group_ids),
        key_name=config.key_name,
        subnet_id=config.subnet_id,
        pool_name=config.pool_name,
        region=config.region,
        user_data=None if port is None else worker_user_data(config, port),
        tags=tuple(config.instance_tags.items()),
    )


ANY_ADDRESS = frozenset({"", "0.0.0.0", "::"})


def watchdog_brokers(config: Config, port: int) -> tuple[tuple[str, int], ...]:
    """Where the workers' watchdogs reach the brokers: `broker_addresses`, else this broker's
    own listen address on `port`. ConfigError when that is no address a worker can use."""
    if config.broker_addresses:
        found = []
        for address in config.broker_addresses:
            host, _, number = address.rpartition(":")
            found.append((host.strip("[]"), int(number)))
        return tuple(found)
    if config.listen_host in ANY_ADDRESS:
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


def budget(config: Config) -> Budget:
    return Budget(
        config.max_daily_cost, config.max_monthly_cost, config.budget_timezone, OnCap(config.on_cap)
    )


def engine_settings(config: Config, *, boot_time_hint: float | None = None) -> EngineSettings:
    """The engine's knobs for a config (serve and the simulator use the same)."""
    return EngineSettings(
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
        budget=budget(config),
        subnets=config.subnets or (config.subnet_id,),
        boot_time_hint=boot_time_hint,
        agent_heartbeat=config.agent_heartbeat,
        idle_policy=IdlePolicy(config.idle_policy),
        wait_cost_per_hour=config.wait_cost_per_hour,
        lease_history_days=config.lease_history_days,
        allowed_types=frozenset(
            config.allowed_instance_types or (config.instance_type, *config.instance_types)
        ),
        allow_on_demand=(
            config.allow_on_demand
            if config.allow_on_demand is not None
            else config.market == "on-demand" or config.on_demand_fallback
        ),
    )


def build_engine(
    config: Config, clock: Clock, port: int | None = None, *, boot_time_hint: float | None = None
) -> Engine:
    """The engine for a config, talking to EC2 (and DynamoDB) through boto3; with the port
    the broker listens on, its workers are launched with the watchdog's user data."""
    limiter = trio.CapacityLimiter(config.aws_max_concurrency)
    cloud = Ec2Cloud(ec2_settings(config, port), limiter)
    settings = engine_settings(config, boot_time_hint=boot_time_hint)
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


def build_gate(config: Config, environ: Mapping[str, str]) -> Gate:
    """The access policy (allowlist, address roles, tokens from tokens_file and the
    environment) and the per-identity limits. ConfigError names what is wrong."""
    try:
        tokens = read_token_file(config.tokens_file) if config.tokens_file else ()
        if TOKEN_ENV in environ:
            tokens = (*tokens, parse_token_env(environ[TOKEN_ENV]))
        policy = AccessPolicy.build(
            allow_cidrs=config.allow_cidrs,
            address_roles=config.address_roles,
            tokens=tokens,
            insecure=config.insecure,
        )
    except AccessConfigError as exc:
        raise ConfigError(str(exc)) from None
    limits = IdentityLimits(
        max_connections_per_peer=config.max_connections_per_peer,
        max_requests_per_second=config.max_requests_per_second,
        request_burst=config.request_burst,
        max_leases_per_identity=config.max_leases_per_identity,
        max_launches_per_minute=config.max_launches_per_minute,
    )
    return Gate(policy, Limiter(limits))
