"""The broker's domain values: what a worker, a lease and a launch are. No I/O, no decisions.

Ports (`broker.cloud`, `broker.registry`) and decision modules (`broker.pool`, `broker.ledger`,
...) import these values, never each other. `Worker` and `Lease` are mutable, but only
`broker.pool.Pool` changes them (tests/test_architecture.py holds every other module to that).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Final

import attrs

LAUNCH_TOKEN_TAG: Final = "compute-broker:launch-token"  # the tag each launch's instances carry


class Market(enum.StrEnum):
    """How an instance is bought."""

    SPOT = "spot"
    ON_DEMAND = "on-demand"


@attrs.frozen
class LaunchSpec:
    """What to launch: the parts of RunInstances that vary per request.

    A request's spec may also accept other types (`fallback_types`, tried in order after
    `instance_type` when EC2 has no capacity) and, for spot, on-demand after every spot
    offering failed (`on_demand_fallback`). The cloud port is always given a plain spec.
    """

    instance_type: str
    market: Market
    fallback_types: tuple[str, ...] = ()
    on_demand_fallback: bool = False

    @property
    def types(self) -> tuple[str, ...]:
        """Every acceptable type, in the order they are tried."""
        return (self.instance_type, *(t for t in self.fallback_types if t != self.instance_type))

    @property
    def markets(self) -> tuple[Market, ...]:
        """Every acceptable market, in the order they are tried."""
        if self.on_demand_fallback and self.market is Market.SPOT:
            return (Market.SPOT, Market.ON_DEMAND)
        return (self.market,)

    def accepts(self, instance_type: str, market: Market) -> bool:
        """True if a worker of this type and market satisfies the spec (on every hand-out:
        kept to comparisons)."""
        if market != self.market and not (
            self.on_demand_fallback and self.market is Market.SPOT and market is Market.ON_DEMAND
        ):
            return False
        return instance_type == self.instance_type or instance_type in self.fallback_types

    def plain(self, instance_type: str, market: Market) -> LaunchSpec:
        """One concrete offering's spec, without alternatives."""
        return LaunchSpec(instance_type, market)


@attrs.frozen
class Instance:
    """One EC2 instance as the cloud reports it.

    `state` is EC2's state name (pending, running, shutting-down, terminated, stopping,
    stopped). `launched_at` is Unix seconds.
    """

    instance_id: str
    instance_type: str
    market: Market
    state: str
    public_ip: str | None
    launched_at: float
    tags: Mapping[str, str] = attrs.field(factory=dict)

    @property
    def is_alive(self) -> bool:
        """True while the instance can still become (or is) a usable worker."""
        return self.state in ("pending", "running")

    @property
    def launch_token(self) -> str | None:
        """The ClientToken of the launch that made it (its intent's token), from its tag."""
        return self.tags.get(LAUNCH_TOKEN_TAG)


class WorkerState(enum.StrEnum):
    """Where a worker is in its life, as far as hand-out is concerned."""

    LAUNCHING = "launching"  # RunInstances accepted; waiting for running + IP (+ probe)
    READY = "ready"  # can be handed out
    TERMINATING = "terminating"  # chosen for termination; never handed out again


LOCAL_TYPE: Final = "local"  # the instance_type of local (lab) workers


@attrs.frozen
class LocalWorker:
    """A lab machine or instrument declared in the config (or registered by an agent)."""

    name: str
    ip: str

    @property
    def instance_id(self) -> str:
        """The worker's id in the pool and the registry."""
        return f"local:{self.name}"


@attrs.frozen
class Interruption:
    """The worker is being taken away: by EC2 (a spot interruption warning or a rebalance
    recommendation) or by the budget (its cover cannot be extended). It is handed out no
    more; its holders' PINGs are answered `ERROR: Worker interrupted <deadline>`."""

    reason: str  # "spot_interruption", "rebalance_recommendation" or "budget"
    deadline: float | None  # when it goes away, when known
    noticed_at: float


@attrs.define
class Worker:
    """One worker of the pool: an EC2 instance, or a local lab machine (`local`), which is
    leased like the others but never launched, counted against caps, reaped or terminated."""

    instance_id: str
    instance_type: str
    market: Market
    state: WorkerState
    ip: str | None
    launched_at: float
    last_activity: float
    price_per_hour: float | None
    ready_at: float | None = None
    launch_token: str | None = None
    local: bool = False
    paid_until: float | None = None  # the end of its cover in the dollar ledger
    interruption: Interruption | None = None
    answered_at: float | None = None  # when this broker's RunInstances answered for it

    @property
    def boot_started(self) -> float:
        """When its boot began as near as this broker knows: the RunInstances answer (EC2's
        LaunchTime is in whole seconds: up to 1 s early), else the LaunchTime (adopted)."""
        return self.launched_at if self.answered_at is None else self.answered_at

    def matches(self, spec: LaunchSpec) -> bool:
        """True if this worker is of a type and market the spec accepts."""
        return spec.accepts(self.instance_type, self.market)

    @property
    def available(self) -> bool:
        """True if it may be handed out: ready and not being taken away."""
        return self.state is WorkerState.READY and self.interruption is None


@attrs.define
class Lease:
    """A client holds a worker."""

    client: str
    instance_id: str
    ip: str
    started_at: float
    last_activity: float
    price_per_hour: float | None = None
    persisted_activity: float | None = None  # the last activity time written to the registry

    def cost(self, now: float) -> float | None:
        """Dollars this lease has cost so far: the worker's price times the lease's duration."""
        if self.price_per_hour is None:
            return None
        return self.price_per_hour * max(0.0, now - self.started_at) / 3600.0


@attrs.frozen
class InFlight:
    """A RunInstances call that has not answered yet (counted against every cap)."""

    token: str
    spec: LaunchSpec
    count: int
    started_at: float
    price_per_hour: float | None


@attrs.frozen
class Limits:
    """The caps and clocks the pool's decisions use.

    `clients_per_worker` is None when clients share workers without limit (sharing: shared),
    else how many leases one worker takes (sharing: exclusive; 1 = a worker per client).
    """

    max_workers: int
    max_hourly_cost: float | None
    idle_timeout: float
    clients_per_worker: int | None = None


@attrs.frozen
class WorkerRequest:
    """What a GET_WORKER asks for; None means the broker's default."""

    instance_type: str | None = None
    market: Market | None = None
    wait: float | None = None


# --- what the pool decides (broker.pool returns these) -----------------------------------


@attrs.frozen
class Admission:
    """How many of the requested launches may go ahead; `refusal` says why when none may."""

    count: int
    refusal: str | None = None


class ReleaseOutcome(enum.Enum):
    """What a RELEASE did."""

    NOT_FOUND = "not_found"  # an IP the pool never knew
    ALREADY_GONE = "already_gone"  # a worker terminated earlier: OK, idempotent
    KEPT = "kept"  # other clients still hold it
    KEPT_WARM = "kept_warm"  # nobody holds it, but the warm pool wants it: back to the pool
    KEPT_IDLE = "kept_idle"  # nobody holds it, but the idle policy keeps it for a while
    TERMINATE = "terminate"  # nobody holds it: it is marked terminating, to be terminated


@attrs.frozen
class Released:
    """The outcome of a RELEASE, with the lease it ended and the worker it concerns."""

    outcome: ReleaseOutcome
    worker: Worker | None = None
    lease: Lease | None = None
    holders: int = 0


@attrs.frozen
class ReapPlan:
    """What a reaper pass should do now."""

    expired_leases: tuple[Lease, ...]
    idle_workers: tuple[Worker, ...]


@attrs.frozen
class WarmPool:
    """What the warm pool keeps: `count` idle ready workers that a default GET_WORKER would
    be given (`spec`: the default type and market, or their configured fallbacks)."""

    spec: LaunchSpec
    count: int

    def wants(self, worker: Worker) -> bool:
        """True if the warm pool counts this worker: a cloud worker `spec` accepts."""
        return self.count > 0 and not worker.local and worker.matches(self.spec)


NO_WARM_POOL: Final = WarmPool(LaunchSpec("none", Market.SPOT), 0)


@attrs.frozen
class MergePlan:
    """What a merge with the registry changed, for the caller to log and act on."""

    joined: tuple[Worker, ...] = ()  # other replicas' workers (and local ones) that joined
    interrupted: tuple[Worker, ...] = ()  # interruptions learned from the registry
    gone: tuple[Worker, ...] = ()  # removed: terminated or dropped through another replica
    lost_local: tuple[Worker, ...] = ()  # local workers whose agent stopped heartbeating
