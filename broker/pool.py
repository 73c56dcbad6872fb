"""The pool's state and decisions, as plain code: which worker, whether to launch, what to reap.

No I/O and no clock: every method that depends on time takes `now` (Unix seconds). The engine
(`broker.engine`) owns one `Pool`, asks it what to do, does it, and reports back.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Collection, Iterable
from typing import Any, Final

import attrs

from broker.cloud import Instance, LaunchSpec, Market

GONE_MEMORY_SECONDS: Final = 24 * 3600  # how long RELEASE of a terminated IP stays `OK`


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
    TERMINATE = "terminate"  # nobody holds it: the engine terminates it


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


@attrs.define
class Pool:
    """Workers, leases and in-flight launches; the decisions over them."""

    limits: Limits
    workers: dict[str, Worker] = attrs.field(factory=dict)
    leases: dict[tuple[str, str], Lease] = attrs.field(factory=dict)
    in_flight: dict[str, InFlight] = attrs.field(factory=dict)
    gone_ips: dict[str, float] = attrs.field(factory=dict)

    # --- queries -----------------------------------------------------------------------------

    def by_ip(self, ip: str) -> Worker | None:
        """The live worker with this IP (launching workers have no IP yet)."""
        for worker in self.workers.values():
            if worker.ip == ip and worker.state is not WorkerState.TERMINATING:
                return worker
        return None

    def holders(self, instance_id: str) -> list[Lease]:
        """The open leases on a worker."""
        return [lease for lease in self.leases.values() if lease.instance_id == instance_id]

    def choose_ready(
        self,
        spec: LaunchSpec,
        client: str | None = None,
        *,
        local_ok: bool = False,
        prefer_local: bool = True,
        exclude: Collection[str] = (),
    ) -> Worker | None:
        """The ready worker to hand out: one `client` already holds, else one with room
        (local ones first when `prefer_local`, then fewest holders, then most recently used).
        Local workers qualify only with `local_ok` (a request that named no type or market)."""
        ready = [
            worker
            for worker in self.workers.values()
            if worker.available
            and (worker.matches(spec) or (local_ok and worker.local))
            and worker.instance_id not in exclude
        ]
        if not ready:
            return None
        if client is not None:
            for worker in ready:
                if (client, worker.instance_id) in self.leases:
                    return worker
        counts = self._holder_counts()
        capacity = self.limits.clients_per_worker
        if capacity is not None:
            ready = [w for w in ready if counts.get(w.instance_id, 0) < capacity]
            if not ready:
                return None

        def rank(w: Worker) -> tuple[bool, int, float]:
            cloud_first = w.local != prefer_local  # False sorts first
            return (cloud_first, counts.get(w.instance_id, 0), -w.last_activity)

        return min(ready, key=rank)

    def idle_ready(self, spec: LaunchSpec) -> list[Worker]:
        """Ready workers of `spec` nobody holds."""
        held = {lease.instance_id for lease in self.leases.values()}
        return [
            w
            for w in self.workers.values()
            if w.available and w.matches(spec) and w.instance_id not in held
        ]

    def coming_instances(self, spec: LaunchSpec) -> int:
        """Instances of `spec` launching or requested and not answered yet."""
        coming = sum(f.count for f in self.in_flight.values() if f.spec == spec)
        return coming + sum(
            1 for w in self.workers.values() if w.state is WorkerState.LAUNCHING and w.matches(spec)
        )

    def coming_capacity(self, spec: LaunchSpec) -> float:
        """How many more clients the launches under way for `spec` will serve (inf: shared)."""
        coming = self.coming_instances(spec)
        capacity = self.limits.clients_per_worker
        if capacity is None:
            return math.inf if coming else 0.0
        return float(coming * capacity)

    def is_launching(self, spec: LaunchSpec) -> bool:
        """True if a launch that could satisfy `spec` is under way."""
        return self.coming_capacity(spec) > 0

    def launching(self) -> list[Worker]:
        """Workers waiting for running + IP (+ probe)."""
        return [w for w in self.workers.values() if w.state is WorkerState.LAUNCHING]

    def instance_count(self) -> int:
        """Instances running or on their way, in-flight launches included (not local ones)."""
        cloud = sum(1 for w in self.workers.values() if not w.local)
        return cloud + sum(flight.count for flight in self.in_flight.values())

    def run_rate(self) -> float:
        """$/hour of every worker and in-flight launch (unknown prices count as 0)."""
        rate = sum(w.price_per_hour or 0.0 for w in self.workers.values())
        rate += sum((f.price_per_hour or 0.0) * f.count for f in self.in_flight.values())
        return rate

    def admit(self, spec: LaunchSpec, count: int, price_per_hour: float | None) -> Admission:
        """How many of `count` new instances of `spec` the caps allow (all or some or none)."""
        room = self.limits.max_workers - self.instance_count()
        if room <= 0:
            return Admission(0, f"max_workers reached ({self.limits.max_workers})")
        allowed = min(count, room)
        cap = self.limits.max_hourly_cost
        if cap is None:
            return Admission(allowed)
        if price_per_hour is None:
            return Admission(
                0,
                f"budget: no price known for {spec.instance_type} {spec.market}; "
                "add it under prices in the config",
            )
        rate = self.run_rate()
        by_budget = math.floor((cap - rate) / price_per_hour + 1e-9) if price_per_hour else count
        if by_budget <= 0:
            return Admission(
                0,
                f"budget: launching one {spec.instance_type} {spec.market} "
                f"(${price_per_hour:.4g}/h) would raise the run rate from ${rate:.4g}/h to "
                f"${rate + price_per_hour:.4g}/h, above max_hourly_cost ${cap:.4g}/h",
            )
        return Admission(min(allowed, by_budget))

    def rate_refusal(
        self, token: str, spec: LaunchSpec, price_per_hour: float | None
    ) -> str | None:
        """Why the in-flight launch `token` may not go ahead as `spec` at `price_per_hour`
        (a fallback offering) under max_hourly_cost; None if it may. The launch is re-priced
        when it may, so later decisions count it at that price."""
        flight = self.in_flight.get(token)
        cap = self.limits.max_hourly_cost
        if flight is None or cap is None:
            return None
        if price_per_hour is None:
            return "no price known"
        others = self.run_rate() - (flight.price_per_hour or 0.0) * flight.count
        if others + price_per_hour * flight.count > cap + 1e-9:
            return f"run rate would pass max_hourly_cost ${cap:.4g}/h"
        self.in_flight[token] = attrs.evolve(flight, price_per_hour=price_per_hour)
        return None

    # --- transitions -------------------------------------------------------------------------

    def launch_started(
        self, token: str, spec: LaunchSpec, count: int, price: float | None, now: float
    ) -> None:
        """Record a RunInstances call before it is made, so caps see it at once."""
        self.in_flight[token] = InFlight(token, spec, count, now, price)

    def launch_failed(self, token: str) -> None:
        """The RunInstances call failed: nothing was launched."""
        self.in_flight.pop(token, None)

    def launch_answered(
        self,
        token: str,
        instances: Iterable[Instance],
        now: float,
        *,
        price: float | None = None,
    ) -> list[Worker]:
        """RunInstances answered: its instances become launching workers (at `price`, else
        the price the launch was admitted at)."""
        flight = self.in_flight.pop(token, None)
        if price is None and flight is not None:
            price = flight.price_per_hour
        added = [self.add(instance, now, price=price, token=token) for instance in instances]
        return added

    def add(
        self,
        instance: Instance,
        now: float,
        *,
        price: float | None,
        token: str | None = None,
        ready: bool = False,
    ) -> Worker:
        """Add an instance (launched or adopted) as a worker; its idle clock starts now."""
        worker = Worker(
            instance_id=instance.instance_id,
            instance_type=instance.instance_type,
            market=instance.market,
            state=WorkerState.READY if ready else WorkerState.LAUNCHING,
            ip=instance.public_ip,
            launched_at=instance.launched_at,
            last_activity=now,
            price_per_hour=price,
            ready_at=now if ready else None,
            launch_token=token,
        )
        self.workers[worker.instance_id] = worker
        return worker

    def mark_ready(self, instance_id: str, ip: str, now: float) -> Worker | None:
        """A launching worker is running, has an IP and passed the probe."""
        worker = self.workers.get(instance_id)
        if worker is None or worker.state is not WorkerState.LAUNCHING:
            return None
        worker.state = WorkerState.READY
        worker.ip = ip
        worker.ready_at = now
        worker.last_activity = now
        return worker

    def hand_out(self, worker: Worker, client: str, now: float) -> tuple[Lease, bool]:
        """Give `worker` to `client`: create or refresh its lease. True if the lease is new."""
        worker.last_activity = now
        key = (client, worker.instance_id)
        lease = self.leases.get(key)
        if lease is not None:
            lease.last_activity = now
            return lease, False
        assert worker.ip is not None, "only ready workers are handed out"
        lease = Lease(client, worker.instance_id, worker.ip, now, now, worker.price_per_hour)
        self.leases[key] = lease
        return lease, True

    def end_lease(self, lease: Lease) -> None:
        """Forget a lease (released, expired, or its worker is gone)."""
        self.leases.pop((lease.client, lease.instance_id), None)

    def ping(self, ip: str, client: str, now: float) -> Worker | None:
        """Restart a worker's idle clock and the caller's lease on it; None if unknown."""
        worker = self.by_ip(ip)
        if worker is None:
            return None
        worker.last_activity = now
        lease = self.leases.get((client, worker.instance_id))
        if lease is not None:
            lease.last_activity = now
        return worker

    def release(self, ip: str, client: str, now: float, *, keep_idle: int = 0) -> Released:
        """End the caller's lease; decide whether the worker is to be terminated.

        A worker nobody holds any more goes back to the pool instead when fewer than
        `keep_idle` idle ready workers of its type and market would be left (the warm pool).
        """
        worker = self.by_ip(ip)
        if worker is None:
            if any(w.ip == ip for w in self.workers.values()):
                return Released(ReleaseOutcome.ALREADY_GONE)  # being terminated right now
            gone = self.gone_ips.get(ip)
            if gone is not None and now - gone < GONE_MEMORY_SECONDS:
                return Released(ReleaseOutcome.ALREADY_GONE)
            return Released(ReleaseOutcome.NOT_FOUND)
        lease = self.leases.get((client, worker.instance_id))
        if lease is not None:
            self.end_lease(lease)
        others = self.holders(worker.instance_id)
        if others:
            return Released(ReleaseOutcome.KEPT, worker, lease, len(others))
        if worker.local:
            return Released(ReleaseOutcome.KEPT_WARM, worker, lease)  # never terminated
        if worker.available and keep_idle > 0:
            spec = LaunchSpec(worker.instance_type, worker.market)
            idle_others = [w for w in self.idle_ready(spec) if w is not worker]
            if len(idle_others) < keep_idle:
                return Released(ReleaseOutcome.KEPT_WARM, worker, lease)
        worker.state = WorkerState.TERMINATING
        return Released(ReleaseOutcome.TERMINATE, worker, lease)

    def remove(self, instance_id: str, now: float) -> tuple[Worker | None, list[Lease]]:
        """The worker is gone: drop it and its leases; remember its IP for RELEASE."""
        worker = self.workers.pop(instance_id, None)
        ended = self.holders(instance_id)
        for lease in ended:
            self.end_lease(lease)
        if worker is not None and worker.ip is not None:
            self.gone_ips[worker.ip] = now
        self._forget_old_ips(now)
        return worker, ended

    def reap_plan(
        self, now: float, *, keep_idle: int = 0, keep_spec: LaunchSpec | None = None
    ) -> ReapPlan:
        """Leases and ready workers idle for `idle_timeout` or longer (workers: no holders).

        The `keep_idle` most recently used idle workers of `keep_spec` are kept (warm pool).
        """
        timeout = self.limits.idle_timeout
        expired = tuple(
            lease for lease in self.leases.values() if now - lease.last_activity >= timeout
        )
        expired_keys = {(lease.client, lease.instance_id) for lease in expired}
        still_held = {
            lease.instance_id for key, lease in self.leases.items() if key not in expired_keys
        }
        unheld = [
            worker
            for worker in self.workers.values()
            if worker.state is WorkerState.READY
            and worker.instance_id not in still_held
            and not worker.local
        ]
        kept: set[str] = set()
        if keep_idle > 0 and keep_spec is not None:
            warm = sorted(
                (w for w in unheld if w.available and w.matches(keep_spec)),
                key=lambda w: -w.last_activity,
            )
            kept = {w.instance_id for w in warm[:keep_idle]}
        # An interrupted worker nobody holds goes at once: it is handed out no more.
        idle = tuple(
            worker
            for worker in unheld
            if worker.instance_id not in kept
            and (now - worker.last_activity >= timeout or worker.interruption is not None)
        )
        return ReapPlan(expired, idle)

    # --- reporting ---------------------------------------------------------------------------

    def status(self, now: float) -> dict[str, Any]:
        """The STATUS document (see protocol.md)."""
        counts = self._holder_counts()
        workers = [
            {
                "instance_id": w.instance_id,
                "ip": w.ip,
                "type": w.instance_type,
                "market": str(w.market),
                "state": str(w.state),
                "clients": counts.get(w.instance_id, 0),
                "idle_seconds": round(max(0.0, now - w.last_activity), 3),
                "price_per_hour": w.price_per_hour,
                "launched_at": w.launched_at,
                "provider": "local" if w.local else "ec2",
                "paid_until": w.paid_until,
                "interrupted": None
                if w.interruption is None
                else {"reason": w.interruption.reason, "deadline": w.interruption.deadline},
            }
            for w in sorted(self.workers.values(), key=lambda w: w.launched_at)
        ]
        leases = [
            {
                "client": lease.client,
                "instance_id": lease.instance_id,
                "ip": lease.ip,
                "started_at": lease.started_at,
                "idle_seconds": round(max(0.0, now - lease.last_activity), 3),
                "cost_usd": _round(lease.cost(now)),
            }
            for lease in sorted(self.leases.values(), key=lambda lease: lease.started_at)
        ]
        by_state = {str(state): 0 for state in WorkerState}
        for w in self.workers.values():
            by_state[str(w.state)] += 1
        totals = {
            "workers": len(self.workers),
            "by_state": by_state,
            "launches_in_flight": sum(f.count for f in self.in_flight.values()),
            "run_rate_per_hour": round(self.run_rate(), 6),
            "max_hourly_cost": self.limits.max_hourly_cost,
            "max_workers": self.limits.max_workers,
            "clients_per_worker": self.limits.clients_per_worker,
        }
        return {"workers": workers, "leases": leases, "totals": totals}

    def _holder_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for lease in self.leases.values():
            counts[lease.instance_id] = counts.get(lease.instance_id, 0) + 1
        return counts

    def _forget_old_ips(self, now: float) -> None:
        stale = [ip for ip, t in self.gone_ips.items() if now - t >= GONE_MEMORY_SECONDS]
        for ip in stale:
            del self.gone_ips[ip]


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 6)
