"""The config schema: every key with its type, default, description and example.

`FIELDS` is the schema: one `Field` per key, in the order the docs list them, with its kind (a
docs label and a check, `broker/config_kinds.py`), its default, a description and an example.
Everything else is derived from this table, so code, docs and sample cannot drift apart:
`Config` and validation (`broker/config_validate.py`), loading a file and the environment
(`broker/config_load.py`), and the reference docs and sample config (`broker/config_docs.py`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs

from broker import config_kinds as kinds
from broker.burst import BURST_POLICY_EXAMPLE
from broker.schedule import WARM_POOL_EXAMPLE

ENV_PREFIX = "COMPUTE_BROKER_"
MAX_REAP_INTERVAL = 60.0


def env_variable(name: str) -> str:
    """The environment variable that overrides a key: `COMPUTE_BROKER_<KEY>`."""
    return ENV_PREFIX + name.upper()


@attrs.frozen
class Field:
    """One config key: what validation, the reference docs and the sample config need.

    `default` and `example` are written as they would be in YAML (durations as seconds or
    strings with a unit); `Config` holds the checked, converted default.
    """

    name: str
    kind: kinds.Kind
    default: Any
    description: str
    example: Any


_DURATION_KIND = kinds.duration()

FIELDS: tuple[Field, ...] = (
    Field(
        "listen_host",
        kinds.text(),
        "0.0.0.0",
        "Address to listen on (0.0.0.0: every IPv4 interface).",
        "127.0.0.1",
    ),
    Field(
        "listen_port",
        kinds.integer(0, 65535),
        9000,
        "TCP port for clients; 0 picks a free port (the broker logs the one it got).",
        9001,
    ),
    Field(
        "pool_name",
        kinds.text(r"[A-Za-z0-9_.-]{1,64}", "be 1-64 characters of A-Z a-z 0-9 _ . -"),
        "default",
        "Value of the compute-broker:pool tag on the instances this broker launches; at start "
        "it adopts running instances that carry the same tag.",
        "lab-a",
    ),
    Field(
        "region",
        kinds.optional(
            kinds.text(r"[a-z]{2}(-[a-z]+)+-\d+", "look like an AWS region (us-east-1)")
        ),
        None,
        "AWS region. null: the standard chain (AWS_REGION, AWS_DEFAULT_REGION, ~/.aws/config).",
        "eu-west-1",
    ),
    Field(
        "ami_id",
        kinds.optional(kinds.text(r"ami-[0-9a-f]{8,17}", "look like ami-0123456789abcdef0")),
        None,
        "AMI of the workers. Required to serve against AWS; --sandbox creates one.",
        "ami-0123456789abcdef0",
    ),
    Field(
        "instance_type",
        kinds.text(kinds.INSTANCE_TYPE.pattern, "look like an EC2 instance type (c7i.8xlarge)"),
        "c7i.8xlarge",
        "Instance type of a GET_WORKER that names none, and of BURST.",
        "c6i.8xlarge",
    ),
    Field(
        "market",
        kinds.choice(*kinds.MARKETS),
        "spot",
        "How workers are bought when a GET_WORKER names no market, and for BURST.",
        "on-demand",
    ),
    Field(
        "instance_types",
        kinds.list_of(
            kinds.text(kinds.INSTANCE_TYPE.pattern, "look like an EC2 instance type (c7i.8xlarge)")
        ),
        [],
        "More acceptable types for a GET_WORKER that names none, tried in order after "
        "instance_type when EC2 has no capacity for it (InsufficientInstanceCapacity, "
        "SpotMaxPriceTooLow, MaxSpotInstanceCountExceeded, Unsupported).",
        ["c6i.8xlarge", "m7i.8xlarge"],
    ),
    Field(
        "allowed_instance_types",
        kinds.list_of(
            kinds.text(kinds.INSTANCE_TYPE.pattern, "look like an EC2 instance type (c7i.8xlarge)")
        ),
        [],
        "The only types a GET_WORKER type= may ask for. []: instance_type and instance_types.",
        ["c7i.8xlarge", "c7i.16xlarge"],
    ),
    Field(
        "allow_on_demand",
        kinds.optional(kinds.boolean()),
        None,
        "Whether a GET_WORKER may ask for market=on-demand. null: only when market is "
        "on-demand or on_demand_fallback is on.",
        True,
    ),
    Field(
        "on_demand_fallback",
        kinds.boolean(),
        False,
        "With market spot: when no spot offering (type x subnet) has capacity, launch on-demand "
        "(charged at the on-demand price). A GET_WORKER with market=spot never falls back.",
        True,
    ),
    Field(
        "security_group_ids",
        kinds.list_of(kinds.text(r"sg-[0-9a-f]{8,17}", "look like sg-0123456789abcdef0")),
        [],
        "Security groups of the workers. []: the VPC's default group.",
        ["sg-0123456789abcdef0"],
    ),
    Field(
        "key_name",
        kinds.optional(kinds.text()),
        None,
        "EC2 key pair installed on the workers, for SSH. null: none.",
        "lab-key",
    ),
    Field(
        "subnet_id",
        kinds.optional(kinds.text(r"subnet-[0-9a-f]{8,17}", "look like subnet-0123456789abcdef0")),
        None,
        "Subnet of the workers. null: EC2 picks one in the default VPC.",
        "subnet-0123456789abcdef0",
    ),
    Field(
        "subnets",
        kinds.list_of(kinds.text(r"subnet-[0-9a-f]{8,17}", "look like subnet-0123456789abcdef0")),
        [],
        "Subnets (one per availability zone) tried in order for each type when EC2 has no "
        "capacity; replaces subnet_id when set. []: subnet_id.",
        ["subnet-0123456789abcdef0", "subnet-0fedcba9876543210"],
    ),
    Field(
        "http_listen",
        kinds.optional(
            kinds.text(
                r"[A-Za-z0-9][A-Za-z0-9.-]*:[0-9]{1,5}|\[[0-9A-Fa-f:.]+\]:[0-9]{1,5}",
                "be host:port",
            )
        ),
        None,
        "Where to serve /metrics (Prometheus), /healthz and a status page for people "
        "(docs/monitoring.md; needs the monitoring extra). null: off.",
        "127.0.0.1:9100",
    ),
    Field(
        "http_allow_cidrs",
        kinds.list_of(kinds.text(r"[0-9A-Fa-f:.]+(/[0-9]{1,3})?", "be an address or CIDR")),
        ["127.0.0.0/8", "::1/128"],
        "Who may connect to http_listen; anyone else is closed before a byte is read.",
        ["127.0.0.0/8", "10.1.2.0/24"],
    ),
    Field(
        "user_data",
        kinds.optional(kinds.text()),
        None,
        "Your own user data for every worker (a shell script, #cloud-config, or MIME; in YAML "
        "a block: `user_data: |`). The watchdog is added to it, never replacing it "
        "(docs/worker-watchdog.md). null: none.",
        "#cloud-config",
    ),
    Field(
        "worker_watchdog",
        kinds.boolean(),
        True,
        "Put a dead-man's switch on every worker: it powers itself off (and so terminates) "
        "when no broker has wanted it for orphan_timeout. false: guard orphans otherwise.",
        False,
    ),
    Field(
        "orphan_timeout",
        kinds.duration(minimum=120.0),
        1800,
        "A worker that no broker has answered ALIVE with OK for this long powers itself off. "
        "At least 2 minutes, so a broker restart never costs the workers.",
        "1h",
    ),
    Field(
        "max_lifetime",
        kinds.duration(allow_zero=True),
        0,
        "A worker powers itself off this long after it booted, wanted or not. 0: no limit.",
        "24h",
    ),
    Field(
        "broker_addresses",
        kinds.list_of(
            kinds.text(
                r"[A-Za-z0-9][A-Za-z0-9.-]*:[0-9]{1,5}|\[[0-9A-Fa-f:.]+\]:[0-9]{1,5}",
                "be host:port",
            )
        ),
        [],
        "Where workers reach the brokers (every replica's), for their watchdog's ALIVE. []: "
        "this broker's listen address, which must then be a specific one (not 0.0.0.0).",
        ["broker.lab.example:9000", "203.0.113.7:9000"],
    ),
    Field(
        "worker_port",
        kinds.integer(1, 65535),
        2560,
        "Port clients use on a worker, and the one the readiness probe connects to.",
        8080,
    ),
    Field(
        "probe",
        kinds.boolean(),
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
        "idle_policy",
        kinds.choice("fixed", "linger", "adaptive"),
        "fixed",
        "How long a worker nobody holds is kept. fixed: RELEASE terminates it (the warm pool "
        "aside), any other goes after idle_timeout. linger: a released one stays idle_timeout "
        "too. adaptive: kept while the recent GET_WORKERs make it likely to save a boot wait "
        "worth more than its idling (docs/adaptive-idle.md), never past idle_timeout.",
        "adaptive",
    ),
    Field(
        "wait_cost_per_hour",
        kinds.number(0, inclusive=False),
        50,
        "idle_policy: adaptive: what an hour of someone waiting for a worker costs, in $ (a "
        "researcher's hour, salary and overheads). Higher keeps idle workers longer.",
        20,
    ),
    Field(
        "reap_interval",
        kinds.duration(maximum=MAX_REAP_INTERVAL),
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
        "The longest gap between polls of pending launches (one batched DescribeInstances "
        "call) from the start of each type's learned boot time window on; polls come denser "
        "in the window, every 10 s before it, and every 0.45 of this for a type never seen.",
        "5s",
    ),
    Field(
        "max_workers",
        kinds.integer(1),
        10,
        "Hard cap on the instances the pool runs, launching ones included.",
        20,
    ),
    Field(
        "registry",
        kinds.choice("dynamodb", "memory"),
        "dynamodb",
        "Where the pool's state (workers, leases, launch intents) lives. dynamodb: survives "
        "restarts and is shared by replicas (create the table with `compute-broker setup`); "
        "memory: one broker, forgotten on restart (EC2 instances are still adopted by tag).",
        "memory",
    ),
    Field(
        "registry_table",
        kinds.text(r"[A-Za-z0-9_.-]{3,255}", "3-255 of A-Z a-z 0-9 _ . -"),
        "compute-broker",
        "The DynamoDB table of the registry (one table can hold several pools).",
        "lab-compute-broker",
    ),
    Field(
        "local_workers",
        kinds.list_of(kinds.local_worker()),
        [],
        "Lab machines and instruments leased like cloud workers but never launched or "
        "terminated; more can register at run time with `compute-broker agent`.",
        [{"name": "lab-ws-1", "ip": "10.0.0.5"}],
    ),
    Field(
        "prefer_local",
        kinds.boolean(),
        True,
        "GET_WORKER without type= or market= hands out an idle local worker before a cloud one.",
        False,
    ),
    Field(
        "agent_heartbeat",
        kinds.duration(),
        30,
        "How often `compute-broker agent` heartbeats; its entry expires after 3 missed beats.",
        "30s",
    ),
    Field(
        "sharing",
        kinds.choice("shared", "exclusive"),
        "shared",
        "shared: any number of clients share a worker (the seed's behaviour). exclusive: a "
        "worker takes at most clients_per_worker leases; more clients mean more workers.",
        "exclusive",
    ),
    Field(
        "clients_per_worker",
        kinds.integer(1),
        1,
        "With sharing: exclusive, how many clients may hold one worker (1: one each).",
        4,
    ),
    Field(
        "warm_pool",
        kinds.warm_pool(),
        {},
        "Ready workers of the default type kept idle so GET_WORKER answers at once: min_idle, "
        "and windows (days, from, to, min_idle) in a time zone that change it. Refilled in the "
        "background; RELEASE and the reaper keep that many idle workers.",
        dict(WARM_POOL_EXAMPLE),
    ),
    Field(
        "burst_policy",
        kinds.burst_policy(),
        {},
        "Bursting on an SQS job queue's depth (the hybrid guide's burst_policy): mode "
        "manual|auto, queue_url, queue_depth_threshold, jobs_per_worker, min/max_cloud_instances, "
        "cost_budget, scale_down_delay, check_interval. Manual (off) by default.",
        dict(BURST_POLICY_EXAMPLE),
    ),
    Field(
        "max_hourly_cost",
        kinds.optional(kinds.number(0, inclusive=False)),
        None,
        "Cap on the run rate in $/hour of every replica's workers; a launch that would exceed "
        "it is refused. null: no cap.",
        12.5,
    ),
    Field(
        "max_daily_cost",
        kinds.optional(kinds.number(0, inclusive=False)),
        None,
        "Cap on the pool's spend per calendar day (budget_timezone), in $: a launch is admitted "
        "only if the day's spend plus what running and new workers cost until they can be "
        "reaped stays under it. Shared by replicas through the registry. null: no cap.",
        50,
    ),
    Field(
        "max_monthly_cost",
        kinds.optional(kinds.number(0, inclusive=False)),
        None,
        "Cap on the pool's spend per calendar month (budget_timezone), in $, like "
        "max_daily_cost. null: no cap.",
        800,
    ),
    Field(
        "budget_timezone",
        kinds.timezone(),
        "UTC",
        "IANA time zone whose midnights start the days and months of max_daily_cost and "
        "max_monthly_cost.",
        "Europe/Berlin",
    ),
    Field(
        "on_cap",
        kinds.choice("refuse", "terminate_idle"),
        "refuse",
        "When a cap is reached: refuse launches (idle workers live out what is paid for), or "
        "also terminate every idle worker at once. Either way the warm pool stops refilling "
        "until the period whose cap was reached ends.",
        "terminate_idle",
    ),
    Field(
        "spot_price_history",
        kinds.boolean(),
        True,
        "Price spot workers from EC2's spot price history (refreshed hourly, highest price "
        "across availability zones) where the account allows it; else from prices.",
        False,
    ),
    Field(
        "events_queue_url",
        kinds.optional(kinds.text(r"https?://\S+", "be an SQS queue URL")),
        None,
        "SQS queue an EventBridge rule feeds with EC2 spot interruption warnings, rebalance "
        "recommendations and state changes (docs/interruptions.md); null: none.",
        "https://sqs.eu-west-1.amazonaws.com/123456789012/compute-broker-events",
    ),
    Field(
        "prices",
        kinds.price_table(),
        {},
        "$/hour by instance type and market, added to or replacing the built-in table "
        "(broker/prices.py, approximate us-east-1). Either market may be given alone.",
        {"c7i.8xlarge": {"spot": 0.45}},
    ),
    Field(
        "instance_tags",
        kinds.instance_tags(),
        {},
        "Tags put on every instance the broker launches, for AWS cost allocation (activate "
        "them in the Billing console). The broker adds its own: compute-broker:pool, "
        "compute-broker:client (who caused the launch: the lease owner, warm-pool, burst or "
        "replacement) and others; keys starting aws: or compute-broker: are refused.",
        {"project": "lab-a", "cost-center": "4711"},
    ),
    Field(
        "lease_history_days",
        kinds.integer(0),
        90,
        "Days the registry keeps a record of each ended lease (who, which instance, how long, "
        "what it cost) for `compute-broker report`; 0: keep none.",
        365,
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
        "allow_cidrs",
        kinds.list_of(kinds.text(r"[0-9A-Fa-f:.]+(/[0-9]{1,3})?", "be an address or CIDR")),
        [],
        "Only connections from these addresses or networks are served; others are closed "
        "before a line is read (a worker's watchdog excepted, for ALIVE). []: any address.",
        ["10.1.2.0/24", "192.0.2.10"],
    ),
    Field(
        "address_roles",
        kinds.mapping_of(
            kinds.text(r"[0-9A-Fa-f:.]+(/[0-9]{1,3})?", "be an address or CIDR"),
            kinds.choice("use", "admin", "agent"),
        ),
        {},
        "A role for requests without a token from these networks, for instruments that "
        "cannot send one (docs/security.md). {}: none.",
        {"10.1.2.0/24": "use"},
    ),
    Field(
        "tokens_file",
        kinds.optional(kinds.text()),
        None,
        "File of access tokens, one `name role token` per line (roles: use, admin, agent); "
        "refused if group- or world-readable. null: none.",
        "/etc/compute-broker/tokens",
    ),
    Field(
        "insecure",
        kinds.boolean(),
        False,
        "Listen on a network address even though anyone who reaches the port could use the "
        "broker without a token (no tokens_file, address_roles or allow_cidrs).",
        True,
    ),
    Field(
        "max_connections_per_peer",
        kinds.optional(kinds.integer(1)),
        128,
        "Open connections from one address at most (null: no limit).",
        32,
    ),
    Field(
        "max_requests_per_second",
        kinds.optional(kinds.number(0, inclusive=False)),
        None,
        "Request lines per second per identity after request_burst (null: no limit).",
        20,
    ),
    Field(
        "request_burst",
        kinds.integer(1),
        200,
        "Request lines an identity may send at once before max_requests_per_second applies.",
        50,
    ),
    Field(
        "max_leases_per_identity",
        kinds.optional(kinds.integer(1)),
        256,
        "Leases one identity (a token, else an address) may hold at once (null: no limit).",
        16,
    ),
    Field(
        "max_launches_per_minute",
        kinds.optional(kinds.integer(1)),
        100,
        "Workers launched per minute per identity, a BURST n counting n (null: no limit).",
        20,
    ),
    Field(
        "max_connections",
        kinds.integer(1),
        1024,
        "Open client connections at most; one more is answered ERROR: too many connections.",
        256,
    ),
    Field(
        "shutdown_grace",
        kinds.duration(allow_zero=True),
        10,
        "On SIGTERM, how long requests in progress may finish. Workers keep running.",
        "30s",
    ),
    Field(
        "aws_max_concurrency",
        kinds.integer(1),
        8,
        "AWS API calls in flight at once (each runs in a thread).",
        16,
    ),
    Field(
        "log_format",
        kinds.choice("auto", "json", "console"),
        "auto",
        "auto: console lines on a terminal, JSON lines otherwise (journald).",
        "json",
    ),
    Field(
        "log_level",
        kinds.choice("debug", "info", "warning", "error"),
        "info",
        "Least severe log level written.",
        "debug",
    ),
    Field(
        "sandbox_boot_time",
        kinds.duration(allow_zero=True),
        3,
        "--sandbox only: how long new instances stay pending, like an EC2 boot.",
        0,
    ),
)

FIELDS_BY_NAME: Mapping[str, Field] = {field.name: field for field in FIELDS}
