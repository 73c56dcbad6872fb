"""SQS bursting, as plain code: how many cloud workers to launch or terminate for a queue depth.

No I/O and no clock: the engine reads the queue depth (visible + in-flight messages) through the
SQS adapter, describes its workers as `WorkerView`s and asks `decide(policy, depth, workers,
now)` every `check_interval`. The rules are the hybrid guide's "Scaling Policies":

- Scale up when depth > `queue_depth_threshold`: `needed = depth // jobs_per_worker + 1`
  workers in all; launch `needed - (local + cloud + launching)`, at most
  `max_launch_per_check`, never past `max_cloud_instances` (cloud + launching) and never past
  `cost_budget` ($/hour: run rate + launches x price).
- Scale down when depth < `queue_depth_threshold / 2`: terminate up to `cloud - needed` cloud
  workers, at most `max_terminate_per_check`, never below `min_cloud_instances`, only workers
  no one holds and idle for `scale_down_delay` since their *last activity* (not their launch),
  the longest idle first. An empty queue needs no workers (the `+ 1` rounds up a partial
  batch), so the pool can scale to zero.
- In between: hold. Always (auto mode): launch up to `min_cloud_instances`.
- `mode: manual`: never anything.

Config shape (YAML), the `burst_policy` key::

    burst_policy:
      mode: auto                     # manual | auto; default manual
      queue_url: https://sqs.us-east-1.amazonaws.com/123456789012/lab-jobs  # required if auto
      queue_depth_threshold: 100     # default 100
      min_cloud_instances: 0         # default 0 (scale to zero)
      max_cloud_instances: 50        # default 50
      jobs_per_worker: 10            # default 10
      cost_budget: 10.0              # $/hour; default null (no budget)
      scale_down_delay: 5m           # default 5m
      check_interval: 1m             # default 1m
      max_launch_per_check: 10       # default 10
      max_terminate_per_check: 5     # default 5

Errors are `BurstPolicyError` (a `ValueError`) whose message names the key:
`scale_down_delay: must be a duration >= 0 like 5m or 300 (got '5 minutes')`; `.path` and
`.problem` give the parts.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Mapping, Sequence
from typing import Any, Final, Literal

import attrs

from broker.values import parse_duration
from broker.values import show as _show

Mode = Literal["manual", "auto"]
MODES: Final = ("manual", "auto")

BURST_POLICY_LABEL: Final = "burst policy (mode, queue_url, thresholds, caps, delays)"
BURST_POLICY_EXAMPLE: Final[Mapping[str, Any]] = {
    "mode": "auto",
    "queue_url": "https://sqs.us-east-1.amazonaws.com/123456789012/lab-jobs",
    "queue_depth_threshold": 100,
    "max_cloud_instances": 20,
    "cost_budget": 10.0,
    "scale_down_delay": "5m",
    "check_interval": "1m",
}

# Budget arithmetic in dollars: a launch that fits to within a millionth of a cent fits.
_BUDGET_SLACK: Final = 1e-8
# Keys of the guide's burst_policy that describe the launch, which the pool's top-level settings
# own here.
_LAUNCH_KEYS: Final = frozenset(
    {"instance_type", "ami", "spot", "key_name", "subnet_id", "security_groups"}
)


class BurstPolicyError(ValueError):
    """A burst policy that cannot be used; `str()` is `<path>: <problem>`."""

    def __init__(self, problem: str, path: tuple[str | int, ...] = ()) -> None:
        self.problem = problem
        self.path = path
        where = ".".join(str(step) for step in path)
        super().__init__(f"{where}: {problem}" if where else problem)


@attrs.frozen
class BurstPolicy:
    """When to burst to the cloud on SQS queue depth; durations are seconds, money $/hour."""

    mode: Mode = "manual"
    queue_url: str | None = None
    queue_depth_threshold: int = 100
    min_cloud_instances: int = 0
    max_cloud_instances: int = 50
    jobs_per_worker: int = 10
    cost_budget: float | None = None
    scale_down_delay: float = 300.0
    check_interval: float = 60.0
    max_launch_per_check: int = 10
    max_terminate_per_check: int = 5

    @classmethod
    def default(cls) -> BurstPolicy:
        """No bursting (manual mode)."""
        return cls()

    @classmethod
    def from_dict(cls, data: Any) -> BurstPolicy:
        """A validated policy from the parsed YAML mapping; raises BurstPolicyError."""
        if not isinstance(data, Mapping):
            raise _must("be a mapping with mode, queue_url, thresholds and caps", data)
        _reject_unknown(data)
        default = cls.default()
        mode = data.get("mode", default.mode)
        if mode not in MODES:
            raise _must("be manual or auto", mode, "mode")
        queue_url = data.get("queue_url")
        if queue_url is not None and (not isinstance(queue_url, str) or not queue_url):
            raise _must("be an SQS queue URL", queue_url, "queue_url")
        if mode == "auto" and queue_url is None:
            raise BurstPolicyError("required when mode is auto", ("queue_url",))
        policy = cls(
            mode=mode,
            queue_url=queue_url,
            queue_depth_threshold=_count(data, "queue_depth_threshold", 1, default),
            min_cloud_instances=_count(data, "min_cloud_instances", 0, default),
            max_cloud_instances=_count(data, "max_cloud_instances", 0, default),
            jobs_per_worker=_count(data, "jobs_per_worker", 1, default),
            cost_budget=_budget(data.get("cost_budget")),
            scale_down_delay=_duration(data, "scale_down_delay", 0.0, default),
            check_interval=_duration(data, "check_interval", None, default),
            max_launch_per_check=_count(data, "max_launch_per_check", 1, default),
            max_terminate_per_check=_count(data, "max_terminate_per_check", 1, default),
        )
        if policy.min_cloud_instances > policy.max_cloud_instances:
            raise BurstPolicyError(
                f"must be <= max_cloud_instances ({policy.max_cloud_instances}) "
                f"(got {policy.min_cloud_instances})",
                ("min_cloud_instances",),
            )
        return policy


# The guide's "Tuning Parameters". It gives only these keys per profile (plus an instance type:
# c5.9xlarge for High-Throughput, t3.large for Cost-Optimized, none for Low-Latency, which is
# a launch setting and not part of the policy here); every other field keeps the guide's
# reference-config default (threshold 100, max 50, min 0, 5m delay, 1m interval, 10 launches
# and 5 terminations per check). `cost_budget` stays unset: the guide's $10/h is an example
# value, and would cap High-Throughput at 21 c5.9xlarge. Set `queue_url` (attrs.evolve) to use
# one.
PROFILES: Final[Mapping[str, BurstPolicy]] = {
    "high-throughput": BurstPolicy(
        mode="auto", queue_depth_threshold=200, max_cloud_instances=100, scale_down_delay=120.0
    ),
    "cost-optimized": BurstPolicy(
        mode="auto",
        queue_depth_threshold=50,
        max_cloud_instances=10,
        scale_down_delay=600.0,
        min_cloud_instances=0,
    ),
    "low-latency": BurstPolicy(
        mode="auto", min_cloud_instances=5, queue_depth_threshold=10, scale_down_delay=1800.0
    ),
}


@attrs.frozen
class WorkerView:
    """What the burst decision knows of one worker.

    `last_activity` is the Unix time of its last hand-out, PING or RELEASE (its ready time if it
    never had one); `held` is True while any client holds a lease on it. `local` workers count
    as capacity but are never terminated or counted against the cloud caps.
    """

    instance_id: str
    local: bool
    held: bool
    last_activity: float
    price_per_hour: float | None


@attrs.frozen
class BurstDecision:
    """Launch `launch` cloud workers and terminate `terminate`; `reason` is for the log."""

    launch: int
    terminate: tuple[str, ...]
    reason: str


def workers_needed(depth: int, jobs_per_worker: int) -> int:
    """The guide's `depth / 10 + 1` workers for a queue depth; none for an empty queue."""
    return 0 if depth <= 0 else depth // jobs_per_worker + 1


def decide(
    policy: BurstPolicy,
    depth: int,
    workers: Sequence[WorkerView],
    now: float,
    *,
    launching: int = 0,
    run_rate: float = 0.0,
    price_per_hour: float | None = None,
) -> BurstDecision:
    """What to launch and terminate at Unix time `now` for a queue of `depth` messages.

    `depth` is visible + in-flight messages; `workers` are the running ones, local and cloud;
    `launching` counts cloud launches not yet running; `run_rate` is the $/hour of the cloud
    workers running and launching; `price_per_hour` is what one more worker costs (needed only
    when `cost_budget` is set).
    """
    if policy.mode == "manual":
        return BurstDecision(0, (), "manual mode: no automatic bursting")
    local = sum(1 for worker in workers if worker.local)
    cloud = len(workers) - local
    needed = workers_needed(depth, policy.jobs_per_worker)
    threshold = policy.queue_depth_threshold
    have = f"have {local} local + {cloud} cloud + {launching} launching"
    wanted, why = 0, ""
    if depth > threshold:
        wanted = needed - (local + cloud + launching)
        why = f"depth {depth} > {threshold} needs {needed}, {have}"
    floor = policy.min_cloud_instances - (cloud + launching)
    if floor > max(wanted, 0):
        wanted = floor
        why = f"min_cloud_instances {policy.min_cloud_instances}, {have}"
    if wanted > 0:
        return _scale_up(policy, wanted, why, cloud + launching, run_rate, price_per_hour)
    if depth < threshold / 2:
        return _scale_down(policy, depth, needed, workers, cloud, now)
    return BurstDecision(0, (), f"depth {depth}, {have}: holding")


def _scale_up(
    policy: BurstPolicy,
    wanted: int,
    why: str,
    cloud_and_launching: int,
    run_rate: float,
    price: float | None,
) -> BurstDecision:
    count, limit = wanted, ""
    caps = [
        (policy.max_launch_per_check, f"max_launch_per_check {policy.max_launch_per_check}"),
        (
            policy.max_cloud_instances - cloud_and_launching,
            f"max_cloud_instances {policy.max_cloud_instances}",
        ),
    ]
    budget = policy.cost_budget
    if budget is not None:
        if price is None:
            return BurstDecision(
                0, (), f"{why}: launching 0 of {wanted} (cost_budget set, price unknown)"
            )
        caps.append(
            (
                _affordable(budget, run_rate, price),
                f"cost_budget ${budget:g}/h at ${run_rate:.2f}/h + ${price:g}/h each",
            )
        )
    for cap, name in caps:
        if cap < count:
            count, limit = max(0, cap), name
    if count == wanted:
        return BurstDecision(count, (), f"{why}: launching {count}")
    return BurstDecision(count, (), f"{why}: launching {count} of {wanted} ({limit})")


def _affordable(budget: float, run_rate: float, price: float) -> int:
    """The most workers at `price` that keep `run_rate` within `budget` ($/hour)."""
    if price <= 0:
        return 2**31  # free: the budget does not limit
    return max(0, math.floor((budget - run_rate + _BUDGET_SLACK) / price))


def _scale_down(
    policy: BurstPolicy,
    depth: int,
    needed: int,
    workers: Sequence[WorkerView],
    cloud: int,
    now: float,
) -> BurstDecision:
    excess = cloud - needed
    room = min(excess, cloud - policy.min_cloud_instances, policy.max_terminate_per_check)
    below = f"depth {depth} < {policy.queue_depth_threshold / 2:g}"
    if room <= 0:
        return BurstDecision(0, (), f"{below}: {cloud} cloud, none in excess")
    delay = policy.scale_down_delay
    idle = sorted(
        (
            worker
            for worker in workers
            if not worker.local and not worker.held and now - worker.last_activity >= delay
        ),
        key=lambda worker: (worker.last_activity, worker.instance_id),
    )
    chosen = tuple(worker.instance_id for worker in idle[:room])
    return BurstDecision(
        0,
        chosen,
        f"{below}: {excess} excess cloud, terminating {len(chosen)} idle >= {delay:g}s",
    )


# --- validation -------------------------------------------------------------------------------


def _must(rule: str, value: Any, key: str | None = None) -> BurstPolicyError:
    return BurstPolicyError(f"must {rule} (got {_show(value)})", () if key is None else (key,))


def _reject_unknown(data: Mapping[Any, Any]) -> None:
    known = [field.name for field in attrs.fields(BurstPolicy)]
    for key in data:
        if key in known:
            continue
        if key in _LAUNCH_KEYS:
            raise BurstPolicyError(
                "not part of burst_policy: burst workers use the pool's launch settings "
                "(instance_type, ami_id, market, key_name, subnet_id, security_group_ids)",
                (str(key),),
            )
        close = difflib.get_close_matches(str(key), known, n=1)
        hint = f" (did you mean {close[0]}?)" if close else f" (known: {', '.join(known)})"
        raise BurstPolicyError(f"unknown key{hint}", (str(key),))


def _count(data: Mapping[Any, Any], key: str, minimum: int, default: BurstPolicy) -> int:
    value = data.get(key, getattr(default, key))
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise _must(f"be an integer >= {minimum}", value, key)
    return value


def _budget(value: Any) -> float | None:
    if value is None:
        return None
    rule = "be a cost in $/hour > 0, or null for no budget"
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _must(rule, value, "cost_budget")
    if not math.isfinite(value) or value <= 0:
        raise _must(rule, value, "cost_budget")
    return float(value)


def _duration(
    data: Mapping[Any, Any], key: str, minimum: float | None, default: BurstPolicy
) -> float:
    """A duration >= `minimum`, or > 0 when `minimum` is None."""
    value = data.get(key, getattr(default, key))
    seconds = parse_duration(value)
    bound = ">= 0" if minimum is not None else "> 0"
    if seconds is None or (seconds < minimum if minimum is not None else seconds <= 0):
        raise _must(f"be a duration {bound} like 5m or 300", value, key)
    return seconds
