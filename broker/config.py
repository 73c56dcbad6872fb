"""The config: one schema, and from it validation, the reference docs and a sample config.

`FIELDS` is the schema: one `Field` per key with its type (a `Kind`: a docs label and a check
that validates and converts), its default, a description and an example. `Config` takes its
defaults from that table, `Config.from_dict` validates against it, and `reference_markdown()`
and `sample_yaml()` render it, so code, docs and sample cannot drift apart.
"""

from __future__ import annotations

import copy
import difflib
import ipaddress
import math
import os
import re
import textwrap
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import attrs
import yaml

from broker.burst import BURST_POLICY_EXAMPLE, BURST_POLICY_LABEL, BurstPolicy, BurstPolicyError
from broker.model import LocalWorker
from broker.schedule import (
    WARM_POOL_EXAMPLE,
    WARM_POOL_LABEL,
    ScheduleError,
    WarmPoolSchedule,
    warm_pool_kind_check,
)
from broker.values import parse_duration
from broker.values import show as _show

ENV_PREFIX = "COMPUTE_BROKER_"
# The client libraries' variables share the prefix; the broker ignores them rather than refuse
# to start on a machine that also runs a client.
CLIENT_VARIABLES = frozenset(
    {"COMPUTE_BROKER_HOST", "COMPUTE_BROKER_PORT", "COMPUTE_BROKER_CLIENT_ID"}
)
MAX_REAP_INTERVAL = 60.0

_INSTANCE_TYPE = re.compile(r"[a-z][a-z0-9-]*\.[a-z0-9-]+")  # as in broker/protocol.py
_MARKETS = ("spot", "on-demand")


class ConfigError(Exception):
    """A config that cannot be used. `str()` is one line: `config: <where>: <what is wrong>`."""

    def __init__(self, message: str) -> None:
        super().__init__(f"config: {message}")


class _Invalid(Exception):
    """A value failed its check; `path` locates the bad part below the value checked."""

    def __init__(self, problem: str, path: tuple[str | int, ...] = ()) -> None:
        super().__init__(problem)
        self.problem = problem
        self.path = path

    def below(self, step: str | int) -> _Invalid:
        """The same problem, one level further from the root."""
        return _Invalid(self.problem, (step, *self.path))


# --- kinds: a docs label and a check ----------------------------------------------------------


@attrs.frozen
class Kind:
    """A key's type: its label in the docs and the check that validates and converts a value.

    `text` marks kinds whose values are text, so an environment value is taken as written when
    YAML would read it as something else (`COMPUTE_BROKER_POOL_NAME=2024`).
    """

    label: str
    check: Callable[[Any], Any]
    text: bool = False


def _must(rule: str, value: Any) -> _Invalid:
    return _Invalid(f"must {rule} (got {_show(value)})")


def _text(pattern: str | None = None, rule: str = "") -> Kind:
    compiled = re.compile(pattern) if pattern else None

    def check(value: Any) -> str:
        if not isinstance(value, str) or not value:
            raise _must(rule or "be a non-empty string", value)
        if compiled is not None and not compiled.fullmatch(value):
            raise _must(rule, value)
        return value

    return Kind("string", check, text=True)


def _choice(*options: str) -> Kind:
    def check(value: Any) -> str:
        if value not in options or not isinstance(value, str):
            raise _must(f"be one of {', '.join(options)}", value)
        return value

    return Kind(" | ".join(options), check, text=True)


def _integer(low: int, high: int | None = None) -> Kind:
    rule = f"be an integer {low}..{high}" if high is not None else f"be an integer >= {low}"

    def check(value: Any) -> int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise _must(rule, value)
        if value < low or (high is not None and value > high):
            raise _must(rule, value)
        return value

    return Kind("integer", check)


def _number(low: float, *, inclusive: bool) -> Kind:
    rule = f"be a number {'>=' if inclusive else '>'} {low:g}"

    def check(value: Any) -> float:
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise _must(rule, value)
        number = float(value)
        if not math.isfinite(number) or number < low or (number == low and not inclusive):
            raise _must(rule, value)
        return number

    return Kind("number", check)


def _boolean() -> Kind:
    def check(value: Any) -> bool:
        if not isinstance(value, bool):
            raise _must("be true or false", value)
        return value

    return Kind("boolean", check)


def _duration(*, allow_zero: bool = False, maximum: float | None = None) -> Kind:
    rule = f"be a duration {'>=' if allow_zero else '>'} 0"
    if maximum is not None:
        rule += f" and <= {maximum:g}s"

    def check(value: Any) -> float:
        seconds = parse_duration(value)
        if seconds is None or not math.isfinite(seconds):
            raise _must(rule, value)
        if seconds < 0 or (seconds == 0 and not allow_zero):
            raise _must(rule, value)
        if maximum is not None and seconds > maximum:
            raise _must(rule, value)
        return seconds

    return Kind("duration", check)


def _optional(kind: Kind) -> Kind:
    def check(value: Any) -> Any:
        return None if value is None else kind.check(value)

    return Kind(f"{kind.label} or null", check, text=kind.text)


def _list_of(kind: Kind) -> Kind:
    def check(value: Any) -> tuple[Any, ...]:
        if not isinstance(value, list | tuple):
            raise _must(f"be a list of {kind.label}s", value)
        items = []
        for index, item in enumerate(value):
            try:
                items.append(kind.check(item))
            except _Invalid as exc:
                raise exc.below(index) from None
        return tuple(items)

    return Kind(f"list of {kind.label}s", check)


def _local_worker() -> Kind:
    name_kind = _text(r"[A-Za-z0-9_.-]{1,64}", "1-64 of A-Z a-z 0-9 _ . -")

    def check(value: Any) -> LocalWorker:
        if not isinstance(value, Mapping):
            raise _must("be a mapping with name and ip", value)
        unknown = sorted(str(key) for key in value if key not in ("name", "ip"))
        if unknown:
            raise _Invalid("unknown key (a local worker has name and ip)", (unknown[0],))
        for key in ("name", "ip"):
            if key not in value:
                raise _Invalid("is required", (key,))
        try:
            name = name_kind.check(value["name"])
        except _Invalid as exc:
            raise exc.below("name") from None
        try:
            ip = str(ipaddress.ip_address(str(value["ip"])))
        except ValueError:
            raise _Invalid(f"must be an IP address (got {_show(value['ip'])})", ("ip",)) from None
        return LocalWorker(name, ip)

    return Kind("local worker (name, ip)", check)


def _price_table() -> Kind:
    price = _number(0, inclusive=True)

    def check(value: Any) -> dict[str, dict[str, float]]:
        if not isinstance(value, Mapping):
            raise _must("be a mapping of instance type to {spot: $, on-demand: $}", value)
        table: dict[str, dict[str, float]] = {}
        for instance_type, by_market in value.items():
            if not isinstance(instance_type, str) or not _INSTANCE_TYPE.fullmatch(instance_type):
                raise _Invalid("not an EC2 instance type (like c7i.8xlarge)", (str(instance_type),))
            if not isinstance(by_market, Mapping):
                raise _must("be a mapping like {spot: 0.5, on-demand: 1.4}", by_market).below(
                    instance_type
                )
            table[instance_type] = {}
            for market, amount in by_market.items():
                if market not in _MARKETS:
                    problem = f"unknown market{_suggestion(str(market), _MARKETS)}"
                    raise _Invalid(problem, (instance_type, str(market)))
                try:
                    table[instance_type][market] = price.check(amount)
                except _Invalid as exc:
                    raise exc.below(market).below(instance_type) from None
        return table

    return Kind("mapping of instance type to {spot, on-demand}", check)


def _burst_policy() -> Kind:
    def check(value: Any) -> BurstPolicy:
        try:
            return BurstPolicy.from_dict(value)
        except BurstPolicyError as exc:
            raise _Invalid(exc.problem, exc.path) from None

    return Kind(BURST_POLICY_LABEL, check)


def _warm_pool() -> Kind:
    def check(value: Any) -> WarmPoolSchedule:
        try:
            return warm_pool_kind_check(value)
        except ScheduleError as exc:
            raise _Invalid(exc.problem, exc.path) from None

    return Kind(WARM_POOL_LABEL, check)


def _timezone() -> Kind:
    def check(value: Any) -> str:
        if not isinstance(value, str):
            raise _must("be an IANA time zone name (Europe/Berlin)", value)
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError, OSError):
            raise _must("be an IANA time zone name (Europe/Berlin)", value) from None
        return value

    return Kind("time zone", check, text=True)


def _suggestion(name: str, known: Iterable[str], fallback: str = "") -> str:
    close = difflib.get_close_matches(name, list(known), n=1)
    if close:
        return f" (did you mean {close[0]}?)"
    return f" ({fallback})" if fallback else ""


# --- the schema -------------------------------------------------------------------------------


@attrs.frozen
class Field:
    """One config key: what validation, the reference docs and the sample config need.

    `default` and `example` are written as they would be in YAML (durations as seconds or
    strings with a unit); `Config` holds the checked, converted default.
    """

    name: str
    kind: Kind
    default: Any
    description: str
    example: Any


_DURATION_KIND = _duration()

FIELDS: tuple[Field, ...] = (
    Field(
        "listen_host",
        _text(),
        "0.0.0.0",
        "Address to listen on (0.0.0.0: every IPv4 interface).",
        "127.0.0.1",
    ),
    Field(
        "listen_port",
        _integer(0, 65535),
        9000,
        "TCP port for clients; 0 picks a free port (the broker logs the one it got).",
        9001,
    ),
    Field(
        "pool_name",
        _text(r"[A-Za-z0-9_.-]{1,64}", "be 1-64 characters of A-Z a-z 0-9 _ . -"),
        "default",
        "Value of the compute-broker:pool tag on the instances this broker launches; at start "
        "it adopts running instances that carry the same tag.",
        "lab-a",
    ),
    Field(
        "region",
        _optional(_text(r"[a-z]{2}(-[a-z]+)+-\d+", "look like an AWS region (us-east-1)")),
        None,
        "AWS region. null: the standard chain (AWS_REGION, AWS_DEFAULT_REGION, ~/.aws/config).",
        "eu-west-1",
    ),
    Field(
        "ami_id",
        _optional(_text(r"ami-[0-9a-f]{8,17}", "look like ami-0123456789abcdef0")),
        None,
        "AMI of the workers. Required to serve against AWS; --sandbox creates one.",
        "ami-0123456789abcdef0",
    ),
    Field(
        "instance_type",
        _text(_INSTANCE_TYPE.pattern, "look like an EC2 instance type (c7i.8xlarge)"),
        "c7i.8xlarge",
        "Instance type of a GET_WORKER that names none, and of BURST.",
        "c6i.8xlarge",
    ),
    Field(
        "market",
        _choice(*_MARKETS),
        "spot",
        "How workers are bought when a GET_WORKER names no market, and for BURST.",
        "on-demand",
    ),
    Field(
        "instance_types",
        _list_of(_text(_INSTANCE_TYPE.pattern, "look like an EC2 instance type (c7i.8xlarge)")),
        [],
        "More acceptable types for a GET_WORKER that names none, tried in order after "
        "instance_type when EC2 has no capacity for it (InsufficientInstanceCapacity, "
        "SpotMaxPriceTooLow, MaxSpotInstanceCountExceeded, Unsupported).",
        ["c6i.8xlarge", "m7i.8xlarge"],
    ),
    Field(
        "on_demand_fallback",
        _boolean(),
        False,
        "With market spot: when no spot offering (type x subnet) has capacity, launch on-demand "
        "(charged at the on-demand price). A GET_WORKER with market=spot never falls back.",
        True,
    ),
    Field(
        "security_group_ids",
        _list_of(_text(r"sg-[0-9a-f]{8,17}", "look like sg-0123456789abcdef0")),
        [],
        "Security groups of the workers. []: the VPC's default group.",
        ["sg-0123456789abcdef0"],
    ),
    Field(
        "key_name",
        _optional(_text()),
        None,
        "EC2 key pair installed on the workers, for SSH. null: none.",
        "lab-key",
    ),
    Field(
        "subnet_id",
        _optional(_text(r"subnet-[0-9a-f]{8,17}", "look like subnet-0123456789abcdef0")),
        None,
        "Subnet of the workers. null: EC2 picks one in the default VPC.",
        "subnet-0123456789abcdef0",
    ),
    Field(
        "subnets",
        _list_of(_text(r"subnet-[0-9a-f]{8,17}", "look like subnet-0123456789abcdef0")),
        [],
        "Subnets (one per availability zone) tried in order for each type when EC2 has no "
        "capacity; replaces subnet_id when set. []: subnet_id.",
        ["subnet-0123456789abcdef0", "subnet-0fedcba9876543210"],
    ),
    Field(
        "worker_port",
        _integer(1, 65535),
        2560,
        "Port clients use on a worker, and the one the readiness probe connects to.",
        8080,
    ),
    Field(
        "probe",
        _boolean(),
        False,
        "Hand a worker out only once a TCP connect to worker_port succeeds.",
        True,
    ),
    Field(
        "probe_timeout",
        _DURATION_KIND,
        2,
        "How long one readiness probe connect may take.",
        "5s",
    ),
    Field(
        "idle_timeout",
        _DURATION_KIND,
        900,
        "A worker with no activity (hand-out, PING) this long is terminated; a lease this idle "
        "expires.",
        "30m",
    ),
    Field(
        "reap_interval",
        _duration(maximum=MAX_REAP_INTERVAL),
        60,
        "How often idle workers and expired leases are looked for (at most 60 s).",
        "30s",
    ),
    Field(
        "launch_timeout",
        _DURATION_KIND,
        300,
        "The longest a launch may take to become ready (it is then terminated), and the "
        "longest a GET_WORKER waits for one.",
        "10m",
    ),
    Field(
        "describe_interval",
        _DURATION_KIND,
        2,
        "How often pending launches are polled (one batched DescribeInstances call).",
        "5s",
    ),
    Field(
        "max_workers",
        _integer(1),
        10,
        "Hard cap on the instances the pool runs, launching ones included.",
        20,
    ),
    Field(
        "registry",
        _choice("dynamodb", "memory"),
        "dynamodb",
        "Where the pool's state (workers, leases, launch intents) lives. dynamodb: survives "
        "restarts and is shared by replicas (create the table with `compute-broker setup`); "
        "memory: one broker, forgotten on restart (EC2 instances are still adopted by tag).",
        "memory",
    ),
    Field(
        "registry_table",
        _text(r"[A-Za-z0-9_.-]{3,255}", "3-255 of A-Z a-z 0-9 _ . -"),
        "compute-broker",
        "The DynamoDB table of the registry (one table can hold several pools).",
        "lab-compute-broker",
    ),
    Field(
        "local_workers",
        _list_of(_local_worker()),
        [],
        "Lab machines and instruments leased like cloud workers but never launched or "
        "terminated; more can register at run time with `compute-broker agent`.",
        [{"name": "lab-ws-1", "ip": "10.0.0.5"}],
    ),
    Field(
        "prefer_local",
        _boolean(),
        True,
        "GET_WORKER without type= or market= hands out an idle local worker before a cloud one.",
        False,
    ),
    Field(
        "agent_heartbeat",
        _duration(),
        30,
        "How often `compute-broker agent` heartbeats; its entry expires after 3 missed beats.",
        "30s",
    ),
    Field(
        "sharing",
        _choice("shared", "exclusive"),
        "shared",
        "shared: any number of clients share a worker (the seed's behaviour). exclusive: a "
        "worker takes at most clients_per_worker leases; more clients mean more workers.",
        "exclusive",
    ),
    Field(
        "clients_per_worker",
        _integer(1),
        1,
        "With sharing: exclusive, how many clients may hold one worker (1: one each).",
        4,
    ),
    Field(
        "warm_pool",
        _warm_pool(),
        {},
        "Ready workers of the default type kept idle so GET_WORKER answers at once: min_idle, "
        "and windows (days, from, to, min_idle) in a time zone that change it. Refilled in the "
        "background; RELEASE and the reaper keep that many idle workers.",
        dict(WARM_POOL_EXAMPLE),
    ),
    Field(
        "burst_policy",
        _burst_policy(),
        {},
        "Bursting on an SQS job queue's depth (the hybrid guide's burst_policy): mode "
        "manual|auto, queue_url, queue_depth_threshold, jobs_per_worker, min/max_cloud_instances, "
        "cost_budget, scale_down_delay, check_interval. Manual (off) by default.",
        dict(BURST_POLICY_EXAMPLE),
    ),
    Field(
        "max_hourly_cost",
        _optional(_number(0, inclusive=False)),
        None,
        "Cap on the pool's run rate in $/hour; a launch that would exceed it is refused. "
        "null: no cap. With a cap, a type with no known price cannot be launched.",
        12.5,
    ),
    Field(
        "max_daily_cost",
        _optional(_number(0, inclusive=False)),
        None,
        "Cap on the pool's spend per calendar day (budget_timezone), in $: a launch is admitted "
        "only if the day's spend plus what running and new workers cost until they can be "
        "reaped stays under it. Shared by replicas through the registry. null: no cap.",
        50,
    ),
    Field(
        "max_monthly_cost",
        _optional(_number(0, inclusive=False)),
        None,
        "Cap on the pool's spend per calendar month (budget_timezone), in $, like "
        "max_daily_cost. null: no cap.",
        800,
    ),
    Field(
        "budget_timezone",
        _timezone(),
        "UTC",
        "IANA time zone whose midnights start the days and months of max_daily_cost and "
        "max_monthly_cost.",
        "Europe/Berlin",
    ),
    Field(
        "on_cap",
        _choice("refuse", "terminate_idle"),
        "refuse",
        "When a cap is reached: refuse launches (idle workers live out what is paid for), or "
        "also terminate every idle worker at once. Either way the warm pool stops refilling "
        "until the period whose cap was reached ends.",
        "terminate_idle",
    ),
    Field(
        "spot_price_history",
        _boolean(),
        True,
        "Price spot workers from EC2's spot price history (refreshed hourly, highest price "
        "across availability zones) where the account allows it; else from prices.",
        False,
    ),
    Field(
        "events_queue_url",
        _optional(_text(r"https?://\S+", "be an SQS queue URL")),
        None,
        "SQS queue an EventBridge rule feeds with EC2 spot interruption warnings, rebalance "
        "recommendations and state changes (docs/interruptions.md); null: none.",
        "https://sqs.eu-west-1.amazonaws.com/123456789012/compute-broker-events",
    ),
    Field(
        "prices",
        _price_table(),
        {},
        "$/hour by instance type and market, added to or replacing the built-in table "
        "(broker/prices.py, approximate us-east-1). Either market may be given alone.",
        {"c7i.8xlarge": {"spot": 0.45}},
    ),
    Field(
        "client_timeout",
        _DURATION_KIND,
        30,
        "A connection that sends no complete line this long is closed (the clock restarts "
        "after every reply).",
        "2m",
    ),
    Field(
        "max_connections",
        _integer(1),
        1024,
        "Open client connections at most; one more is answered ERROR: too many connections.",
        256,
    ),
    Field(
        "shutdown_grace",
        _duration(allow_zero=True),
        10,
        "On SIGTERM, how long requests in progress may finish. Workers keep running.",
        "30s",
    ),
    Field(
        "aws_max_concurrency",
        _integer(1),
        8,
        "AWS API calls in flight at once (each runs in a thread).",
        16,
    ),
    Field(
        "log_format",
        _choice("auto", "json", "console"),
        "auto",
        "auto: console lines on a terminal, JSON lines otherwise (journald).",
        "json",
    ),
    Field(
        "log_level",
        _choice("debug", "info", "warning", "error"),
        "info",
        "Least severe log level written.",
        "debug",
    ),
    Field(
        "sandbox_boot_time",
        _duration(allow_zero=True),
        3,
        "--sandbox only: how long new instances stay pending, like an EC2 boot.",
        0,
    ),
)

FIELDS_BY_NAME: Mapping[str, Field] = {field.name: field for field in FIELDS}
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
    on_demand_fallback: bool = _default("on_demand_fallback")
    security_group_ids: tuple[str, ...] = attrs.field(
        default=_default("security_group_ids"), converter=_string_tuple
    )
    key_name: str | None = _default("key_name")
    subnet_id: str | None = _default("subnet_id")
    subnets: tuple[str, ...] = attrs.field(default=_default("subnets"), converter=_string_tuple)
    worker_port: int = _default("worker_port")
    probe: bool = _default("probe")
    probe_timeout: float = _default("probe_timeout")
    idle_timeout: float = _default("idle_timeout")
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
    client_timeout: float = _default("client_timeout")
    max_connections: int = _default("max_connections")
    shutdown_grace: float = _default("shutdown_grace")
    aws_max_concurrency: int = _default("aws_max_concurrency")
    log_format: Literal["auto", "json", "console"] = _default("log_format")
    log_level: Literal["debug", "info", "warning", "error"] = _default("log_level")
    sandbox_boot_time: float = _default("sandbox_boot_time")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Config:
        """A validated config from a parsed YAML mapping; missing keys take their defaults."""
        _reject_unknown_keys(data)
        return _build({name: (value, name) for name, value in data.items()})

    def validate_for_aws(self) -> None:
        """Raise ConfigError unless the config has what serving against real AWS needs."""
        if self.ami_id is None:
            raise ConfigError(
                f"ami_id: required to serve against AWS (set it in the config file or "
                f"{env_variable('ami_id')}; --sandbox needs none)"
            )


def _reject_unknown_keys(data: Mapping[Any, Any]) -> None:
    for key in data:
        if key not in FIELDS_BY_NAME:
            hint = _suggestion(
                str(key), FIELDS_BY_NAME, "compute-broker config-reference lists them"
            )
            raise ConfigError(f"{key}: unknown key{hint}")


def _build(given: Mapping[str, tuple[Any, str]]) -> Config:
    """Check each given value (name: (value, where it came from)); the rest keep defaults."""
    values: dict[str, Any] = {}
    for name, (value, where) in given.items():
        try:
            values[name] = FIELDS_BY_NAME[name].kind.check(value)
        except _Invalid as exc:
            raise ConfigError(f"{_key_path(where, exc.path)}: {exc.problem}") from None
    return Config(**values)


def _key_path(root: str, path: tuple[str | int, ...]) -> str:
    return root + "".join(f"[{step}]" if isinstance(step, int) else f".{step}" for step in path)


# --- loading: file, YAML, environment ---------------------------------------------------------


def env_variable(name: str) -> str:
    """The environment variable that overrides a key: `COMPUTE_BROKER_<KEY>`."""
    return ENV_PREFIX + name.upper()


def load_config(path: str | os.PathLike[str] | None, environ: Mapping[str, str]) -> Config:
    """Read a YAML config file (None: defaults only), apply environment overrides, validate."""
    data = {} if path is None else _read_file(path)
    _reject_unknown_keys(data)
    given: dict[str, tuple[Any, str]] = {name: (value, name) for name, value in data.items()}
    given.update(_environment_overrides(environ))
    return _build(given)


def _read_file(path: str | os.PathLike[str]) -> dict[Any, Any]:
    shown = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as file:
            text = file.read()
    except FileNotFoundError:
        raise ConfigError(f"file not found: {shown}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"not valid UTF-8: {shown}") from None
    except OSError as exc:
        raise ConfigError(f"cannot read {shown}: {exc.strerror or exc}") from None
    try:
        data = _parse_yaml(text)
    except _Invalid as exc:
        raise ConfigError(exc.problem) from None
    if data is None:  # an empty file (or one with only comments): all defaults
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"top level must be a mapping (got {type(data).__name__})")
    return data


def _environment_overrides(environ: Mapping[str, str]) -> dict[str, tuple[Any, str]]:
    overrides: dict[str, tuple[Any, str]] = {}
    for variable in sorted(environ):
        if not variable.startswith(ENV_PREFIX) or variable in CLIENT_VARIABLES:
            continue
        name = variable.removeprefix(ENV_PREFIX).lower()
        if name not in FIELDS_BY_NAME or variable != env_variable(name):
            close = difflib.get_close_matches(name, list(FIELDS_BY_NAME), n=1)
            hint = f" (did you mean {env_variable(close[0])}?)" if close else ""
            raise ConfigError(f"{variable}: no such config key{hint}")
        overrides[name] = (_environment_value(variable, environ[variable]), variable)
    return overrides


def _environment_value(variable: str, raw: str) -> Any:
    """An environment value read as YAML; a text key takes it as written unless it is text."""
    text = FIELDS_BY_NAME[variable.removeprefix(ENV_PREFIX).lower()].kind.text
    try:
        value = _parse_yaml(raw)
    except _Invalid as exc:
        if text:
            return raw.strip()
        raise ConfigError(f"{variable}: {exc.problem}") from None
    if text and not (value is None or isinstance(value, str)):
        return raw.strip()
    return value


class _StrictLoader(yaml.SafeLoader):
    """YAML's safe loader, except that a key given twice in one mapping is an error."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        try:
            duplicate = key in seen
        except TypeError:  # an unhashable key: construct_mapping reports it
            continue
        if duplicate:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node, deep=True)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _parse_yaml(text: str) -> Any:
    try:
        return yaml.load(text, Loader=_StrictLoader)  # a SafeLoader subclass
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = exc.problem or str(exc).splitlines()[0]
        raise _Invalid(f"not valid YAML: {problem}{where}") from None
    except yaml.YAMLError as exc:
        first_line = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise _Invalid(f"not valid YAML: {first_line}") from None


# --- generated documents ----------------------------------------------------------------------

_RULES = """\
- Unknown keys are errors (`config: listen_prot: unknown key (did you mean listen_port?)`), and
  so is a key given twice. An empty file means every key at its default.
- Types are strict: `listen_port: "9000"` is a string and is rejected, `probe: 1` is not a
  boolean. `null` is accepted only where the type says so.
- Errors are one line naming the key path and what is wrong, e.g.
  `config: prices.c7i.8xlarge.spot: must be a number >= 0 (got -1)`.
- `compute-broker check-config FILE` validates a file (add `--aws` to also require `ami_id`)
  without starting anything.

## Durations

A duration is a number of seconds (`90`, `0.5`) or a string with a unit: `90s`, `15m`, `1h`,
`1.5h`, `2d` (s, m, h, d).

## Environment overrides

Every key can be set by an environment variable `COMPUTE_BROKER_<KEY>` (the key in upper
case), which wins over the file: `COMPUTE_BROKER_LISTEN_PORT=9001`, `COMPUTE_BROKER_PROBE=true`,
`COMPUTE_BROKER_SECURITY_GROUP_IDS='[sg-1, sg-2]'`,
`COMPUTE_BROKER_PRICES='{c7i.8xlarge: {spot: 0.45}}'`. Values are read as YAML (scalars and
flow collections); an empty value is `null`. For a key whose type is text, a value that YAML
would read as something else is taken as written (`COMPUTE_BROKER_POOL_NAME=2024` is the
string `2024`). An override replaces the whole value (a `prices` override replaces the file's
`prices`, not merges into it). A variable with the prefix that names no key is an error, and
errors in an override name the variable:
`config: COMPUTE_BROKER_LISTEN_PORT: must be an integer 0..65535 (got 'ninety')`. The client
libraries' variables `COMPUTE_BROKER_HOST`, `COMPUTE_BROKER_PORT` and `COMPUTE_BROKER_CLIENT_ID`
are ignored by the broker (it listens on `COMPUTE_BROKER_LISTEN_HOST` and
`COMPUTE_BROKER_LISTEN_PORT`).
"""


def _inline(value: Any) -> str:
    """A value as one line of YAML (flow style)."""
    text = yaml.safe_dump(value, default_flow_style=True, width=math.inf, sort_keys=False)
    return text.removesuffix("...\n").strip()


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def reference_markdown() -> str:
    """The configuration reference (Markdown), generated from the schema."""
    lines = [
        "# Configuration reference",
        "",
        "_Generated by `compute-broker config-reference` from the schema in `broker/config.py`;"
        " edit the schema, not this file._",
        "",
        "The broker reads one YAML file (`compute-broker serve --config FILE`); without one, every"
        " key takes its default. [sample-config.yaml](sample-config.yaml)"
        " (`compute-broker sample-config`) lists every key at its default.",
        "",
        _RULES,
        "## Keys",
        "",
        "| key | type | default | description | example |",
        "| --- | --- | --- | --- | --- |",
    ]
    for field in FIELDS:
        cells = (
            f"`{field.name}`",
            field.kind.label,
            f"`{_inline(field.default)}`",
            field.description,
            f"`{_inline(field.example)}`",
        )
        lines.append("| " + " | ".join(_cell(cell) for cell in cells) + " |")
    return "\n".join(lines) + "\n"


def sample_yaml() -> str:
    """A commented sample config with every key at its default; it loads to `Config()`."""
    lines = [
        "# compute-broker configuration: every key at its default. Keep only what you change.",
        "# Generated by `compute-broker sample-config`; the reference is docs/config.md.",
        "# Check a file with `compute-broker check-config FILE`.",
        "# Durations: seconds (90) or a number with a unit (90s, 15m, 1.5h, 2d).",
        "# Environment overrides: COMPUTE_BROKER_<KEY>, e.g. COMPUTE_BROKER_LISTEN_PORT=9001.",
    ]
    for field in FIELDS:
        lines.append("")
        lines.extend(
            textwrap.wrap(field.description, width=98, initial_indent="# ", subsequent_indent="# ")
        )
        lines.append(f"# Type: {field.kind.label}. Example: {_inline(field.example)}")
        lines.append(f"{field.name}: {_inline(field.default)}")
    return "\n".join(lines) + "\n"
