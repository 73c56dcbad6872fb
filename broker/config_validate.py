"""Validation: `Config`, the broker's settings, checked against the schema.

`Config` has one attribute per key of `FIELDS` (`broker/config.py`) with the schema's default,
checked and converted. `Config.from_dict` and `build` check given values with each key's kind and
turn a problem into one `ConfigError` line naming the key path; `broker/config_load.py` feeds
them a file and the environment.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from typing import Any, Literal

import attrs

from broker.burst import BurstPolicy
from broker.config import FIELDS, FIELDS_BY_NAME, env_variable
from broker.config_kinds import Invalid, suggestion
from broker.model import LocalWorker
from broker.schedule import WarmPoolSchedule


class ConfigError(Exception):
    """A config that cannot be used. `str()` is one line: `config: <where>: <what is wrong>`."""

    def __init__(self, message: str) -> None:
        super().__init__(f"config: {message}")


_DEFAULTS: dict[str, Any] = {field.name: field.kind.check(field.default) for field in FIELDS}


def _default(name: str) -> Any:
    """The attrs default of a key, from the schema (a factory for mutable values)."""
    value = _DEFAULTS[name]
    if isinstance(value, dict):
        return attrs.Factory(lambda: copy.deepcopy(value))
    return value


def _string_tuple(value: Iterable[str]) -> tuple[str, ...]:
    return tuple(value)


@attrs.frozen
class Config:
    """The broker's settings, one attribute per key of `FIELDS` (durations in seconds)."""

    listen_host: str = _default("listen_host")
    listen_port: int = _default("listen_port")
    pool_name: str = _default("pool_name")
    region: str | None = _default("region")
    ami_id: str | None = _default("ami_id")
    instance_type: str = _default("instance_type")
    market: Literal["spot", "on-demand"] = _default("market")
    instance_types: tuple[str, ...] = attrs.field(
        default=_default("instance_types"), converter=_string_tuple
    )
    allowed_instance_types: tuple[str, ...] = attrs.field(
        default=_default("allowed_instance_types"), converter=_string_tuple
    )
    allow_on_demand: bool | None = _default("allow_on_demand")
    on_demand_fallback: bool = _default("on_demand_fallback")
    security_group_ids: tuple[str, ...] = attrs.field(
        default=_default("security_group_ids"), converter=_string_tuple
    )
    key_name: str | None = _default("key_name")
    subnet_id: str | None = _default("subnet_id")
    subnets: tuple[str, ...] = attrs.field(default=_default("subnets"), converter=_string_tuple)
    http_listen: str | None = _default("http_listen")
    http_allow_cidrs: tuple[str, ...] = attrs.field(
        default=_default("http_allow_cidrs"), converter=_string_tuple
    )
    user_data: str | None = _default("user_data")
    worker_watchdog: bool = _default("worker_watchdog")
    orphan_timeout: float = _default("orphan_timeout")
    max_lifetime: float = _default("max_lifetime")
    broker_addresses: tuple[str, ...] = attrs.field(
        default=_default("broker_addresses"), converter=_string_tuple
    )
    worker_port: int = _default("worker_port")
    probe: bool = _default("probe")
    probe_timeout: float = _default("probe_timeout")
    idle_timeout: float = _default("idle_timeout")
    idle_policy: Literal["fixed", "linger", "adaptive"] = _default("idle_policy")
    wait_cost_per_hour: float = _default("wait_cost_per_hour")
    reap_interval: float = _default("reap_interval")
    launch_timeout: float = _default("launch_timeout")
    describe_interval: float = _default("describe_interval")
    max_workers: int = _default("max_workers")
    registry: Literal["dynamodb", "memory"] = _default("registry")
    registry_table: str = _default("registry_table")
    local_workers: tuple[LocalWorker, ...] = _default("local_workers")
    prefer_local: bool = _default("prefer_local")
    agent_heartbeat: float = _default("agent_heartbeat")
    sharing: Literal["shared", "exclusive"] = _default("sharing")
    clients_per_worker: int = _default("clients_per_worker")
    warm_pool: WarmPoolSchedule = _default("warm_pool")  # noqa: RUF009 (frozen: immutable)
    burst_policy: BurstPolicy = _default("burst_policy")  # noqa: RUF009 (frozen: immutable)
    max_hourly_cost: float | None = _default("max_hourly_cost")
    max_daily_cost: float | None = _default("max_daily_cost")
    max_monthly_cost: float | None = _default("max_monthly_cost")
    budget_timezone: str = _default("budget_timezone")
    on_cap: Literal["refuse", "terminate_idle"] = _default("on_cap")
    spot_price_history: bool = _default("spot_price_history")
    events_queue_url: str | None = _default("events_queue_url")
    prices: Mapping[str, Mapping[str, float]] = _default("prices")
    instance_tags: Mapping[str, str] = _default("instance_tags")
    lease_history_days: int = _default("lease_history_days")
    client_timeout: float = _default("client_timeout")
    allow_cidrs: tuple[str, ...] = attrs.field(
        default=_default("allow_cidrs"), converter=_string_tuple
    )
    address_roles: Mapping[str, str] = _default("address_roles")
    tokens_file: str | None = _default("tokens_file")
    insecure: bool = _default("insecure")
    max_connections_per_peer: int | None = _default("max_connections_per_peer")
    max_requests_per_second: float | None = _default("max_requests_per_second")
    request_burst: int = _default("request_burst")
    max_leases_per_identity: int | None = _default("max_leases_per_identity")
    max_launches_per_minute: int | None = _default("max_launches_per_minute")
    max_connections: int = _default("max_connections")
    shutdown_grace: float = _default("shutdown_grace")
    aws_max_concurrency: int = _default("aws_max_concurrency")
    log_format: Literal["auto", "json", "console"] = _default("log_format")
    log_level: Literal["debug", "info", "warning", "error"] = _default("log_level")
    sandbox_boot_time: float = _default("sandbox_boot_time")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Config:
        """A validated config from a parsed YAML mapping; missing keys take their defaults."""
        reject_unknown_keys(data)
        return build({name: (value, name) for name, value in data.items()})

    def validate_for_aws(self) -> None:
        """Raise ConfigError unless the config has what serving against real AWS needs."""
        if self.ami_id is None:
            raise ConfigError(
                f"ami_id: required to serve against AWS (set it in the config file or "
                f"{env_variable('ami_id')}; --sandbox needs none)"
            )


def reject_unknown_keys(data: Mapping[Any, Any]) -> None:
    """Raise ConfigError for the first key the schema does not have, with a did-you-mean."""
    for key in data:
        if key not in FIELDS_BY_NAME:
            hint = suggestion(
                str(key), FIELDS_BY_NAME, "compute-broker config-reference lists them"
            )
            raise ConfigError(f"{key}: unknown key{hint}")


def build(given: Mapping[str, tuple[Any, str]]) -> Config:
    """Check each given value (name: (value, where it came from)); the rest keep defaults."""
    values: dict[str, Any] = {}
    for name, (value, where) in given.items():
        try:
            values[name] = FIELDS_BY_NAME[name].kind.check(value)
        except Invalid as exc:
            raise ConfigError(f"{_key_path(where, exc.path)}: {exc.problem}") from None
    return Config(**values)


def _key_path(root: str, path: tuple[str | int, ...]) -> str:
    return root + "".join(f"[{step}]" if isinstance(step, int) else f".{step}" for step in path)
