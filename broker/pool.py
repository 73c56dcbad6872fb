"""The pool's state and decisions, as plain code: which worker, whether to launch, what to reap.

No I/O and no clock: every method that depends on time takes `now` (Unix seconds). The rooms
of the engine (`broker.handout`, `broker.launcher`, ...) ask the pool what to do, do it, and
report back through its transitions. The pool is the only code that changes a `Worker`, a
`Lease` or its own tables; the legal moves of a worker are the transitions below, on one
screen:

    (new)       -> LAUNCHING    launch_answered, adopt(ready=False)
    (new)       -> READY        adopt(ready=True), add_local, restore, merge
    LAUNCHING   -> READY        mark_ready
    READY       -> TERMINATING  mark_terminating, release (nobody holds it)
    LAUNCHING   -> TERMINATING  mark_terminating (boot timeout, interrupted while booting)
    TERMINATING -> READY        revert_ready (the registry kept it: held through a replica)
    any         -> (gone)       remove, merge (gone through another replica)

Besides the state, a worker's cover (`set_cover`, `extend_cover`) and its interruption
(`interrupt`, `lift`) change only here, and so do leases (`hand_out`, `ping`, `end_lease`,
`note_persisted`). Each keeps the indexes in step (workers by IP and in hand-out order,
`broker.pool_index`; leases by worker, holder, identity): requests never scan the pool.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from typing import Final

import attrs

from broker.model import (
    LOCAL_TYPE,
    NO_WARM_POOL,
    InFlight,
    Instance,
    Interruption,
    LaunchSpec,
    Lease,
    Limits,
    LocalWorker,
    Market,
    MergePlan,
    Released,
    ReleaseOutcome,
    WarmPool,
    Worker,
    WorkerState,
)
from broker.pool_index import Kind, ReadyIndex

GONE_MEMORY_SECONDS: Final = 24 * 3600  # how long RELEASE of a terminated IP stays `OK`
# How long a worker this broker terminated is not taken back from a view of EC2 or the
# registry read before the termination (a reconciliation that was already under way).
RETIRED_MEMORY_SECONDS: Final = 600


@attrs.define
class Pool:
    """Workers, leases and in-flight launches; the decisions over them."""

    limits: Limits
    workers: dict[str, Worker] = attrs.field(factory=dict)
    leases: dict[tuple[str, str], Lease] = attrs.field(factory=dict)
    in_flight: dict[str, InFlight] = attrs.field(factory=dict)
    gone_ips: dict[str, float] = attrs.field(factory=dict)
    retired: dict[str, float] = attrs.field(factory=dict)  # instance id -> when terminated
    # instance id -> client -> lease: the same leases as `leases`, indexed by worker.
    _held: dict[str, dict[str, Lease]] = attrs.field(factory=dict, alias="_held")
    # client -> ids it holds (a tuple: lighter than a dict), identity (up to its `/`) -> leases
    _by_client: dict[str, tuple[str, ...]] = attrs.field(factory=dict, alias="_by_client")
    _by_identity: dict[str, dict[tuple[str, str], Lease]] = attrs.field(
        factory=dict, alias="_by_identity"
    )
    # Workers by IP and the available ones in hand-out order, kept by the transitions below.
    _index: ReadyIndex = attrs.field(factory=ReadyIndex, alias="_index")

    # --- queries -----------------------------------------------------------------------------

    def by_ip(self, ip: str) -> Worker | None:
        """The live worker with this IP (launching workers have no IP yet)."""
        for worker in self._index.with_ip(ip):
            if worker.state is not WorkerState.TERMINATING:
                return worker
        return None

    def holders(self, instance_id: str) -> list[Lease]:
        """The open leases on a worker."""
        return list(self._held.get(instance_id, {}).values())

    def held_by_kind(self) -> dict[tuple[str, Market], int]:
        """Available cloud workers someone holds, by type and market (indexed: the adaptive
        idle rule counts them as coming back at every RELEASE)."""
        return {
            (instance_type, market): n
            for (instance_type, market, local), n in self._index.held_counts().items()
            if not local
        }

    def lease_of(self, client: str, instance_id: str) -> Lease | None:
        """`client`'s open lease on the worker, if any."""
        return self.leases.get((client, instance_id))

    def holder_count(self, instance_id: str) -> int:
        """How many clients hold the worker."""
        return len(self._held.get(instance_id, ()))

    def holds_any(self, client: str) -> bool:
        """True if `client` (a lease owner, `<identity>[/<client id>]`) holds a lease."""
        return client in self._by_client

    def leases_held(self, identity: str) -> int:
        """How many leases the owners of `identity` (their part before `/`) hold in all."""
        return len(self._by_identity.get(identity, ()))

    def leases_of(self, identity: str) -> list[Lease]:
        """The leases the owners of `identity` hold (STATUS shows a caller its own)."""
        return list(self._by_identity.get(identity, {}).values())

    def is_held(self, instance_id: str) -> bool:
        """True if any client holds the worker."""
        return bool(self._held.get(instance_id))

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
        Local workers qualify only with `local_ok` (a request that named no type or market).
        Ties go to the worker that joined the pool first. The work is the client's own leases
        and a heap top per kind of worker (`broker.pool_index`), not a scan of the pool."""

        def fits(kind: Kind) -> bool:
            instance_type, market, local = kind
            return spec.accepts(instance_type, market) or (local_ok and local)

        index = self._index
        if client is not None:
            mine = [
                worker
                for instance_id in self._by_client.get(client, ())
                if (worker := self.workers.get(instance_id)) is not None
                and worker.available
                and fits((worker.instance_type, worker.market, worker.local))
                and instance_id not in exclude
            ]
            if mine:
                return min(mine, key=lambda w: index.order(w.instance_id))
        return index.first(fits, self.limits.clients_per_worker, exclude, prefer_local)

    def idle_ready(self, spec: LaunchSpec) -> list[Worker]:
        """Ready workers of `spec` nobody holds."""
        return [
            w
            for w in self.workers.values()
            if w.available and w.matches(spec) and not self.is_held(w.instance_id)
        ]

    def warm_idle(self, warm: WarmPool) -> list[Worker]:
        """Ready cloud workers nobody holds that the warm pool counts (its type and market)."""
        return [
            w
            for w in self.workers.values()
            if w.available and not w.local and warm.wants(w) and not self.is_held(w.instance_id)
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

    def launching(self) -> list[Worker]:
        """Workers waiting for running + IP (+ probe)."""
        return [w for w in self.workers.values() if w.state is WorkerState.LAUNCHING]

    def unheld_ready(self) -> list[Worker]:
        """Ready cloud workers nobody holds (interrupted ones included)."""
        return [
            w
            for w in self.workers.values()
            if w.state is WorkerState.READY and not w.local and not self.is_held(w.instance_id)
        ]

    def instance_count(self) -> int:
        """Instances running or on their way, in-flight launches included (not local ones)."""
        cloud = sum(1 for w in self.workers.values() if not w.local)
        return cloud + sum(flight.count for flight in self.in_flight.values())

    def run_rate(self) -> float:
        """$/hour of every worker and in-flight launch (unknown prices count as 0)."""
        rate = sum(w.price_per_hour or 0.0 for w in self.workers.values())
        rate += sum((f.price_per_hour or 0.0) * f.count for f in self.in_flight.values())
        return rate

    # --- transitions: launches ---------------------------------------------------------------

    def launch_started(
        self, token: str, spec: LaunchSpec, count: int, price: float | None, now: float
    ) -> None:
        """Record a RunInstances call before it is made, so caps see it at once."""
        self.in_flight[token] = InFlight(token, spec, count, now, price)

    def reprice(self, token: str, price_per_hour: float) -> None:
        """The in-flight launch `token` goes ahead at another offering's price."""
        flight = self.in_flight.get(token)
        if flight is not None:
            self.in_flight[token] = attrs.evolve(flight, price_per_hour=price_per_hour)

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
        paid_until: float | None = None,
    ) -> list[Worker]:
        """RunInstances answered: its instances become launching workers (at `price`, else
        the price the launch was admitted at), covered until `paid_until`."""
        flight = self.in_flight.pop(token, None)
        if price is None and flight is not None:
            price = flight.price_per_hour
        workers = [
            self.adopt(instance, now, price=price, token=token, paid_until=paid_until)
            for instance in instances
        ]
        for worker in workers:
            worker.answered_at = now
        return workers

    def adopt(
        self,
        instance: Instance,
        now: float,
        *,
        price: float | None,
        token: str | None = None,
        ready: bool = False,
        paid_until: float | None = None,
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
            paid_until=paid_until,
        )
        self._add_worker(worker)
        return worker

    def add_local(self, local: LocalWorker, market: Market, now: float) -> Worker | None:
        """A local worker declared in the config joins, ready at once (None if known)."""
        if local.instance_id in self.workers:
            return None
        worker = Worker(
            instance_id=local.instance_id,
            instance_type=LOCAL_TYPE,
            market=market,
            state=WorkerState.READY,
            ip=local.ip,
            launched_at=now,
            last_activity=now,
            price_per_hour=None,
            ready_at=now,
            local=True,
        )
        self._add_worker(worker)
        return worker

    def mark_ready(self, instance_id: str, ip: str, now: float) -> Worker | None:
        """A launching worker is running, has an IP and passed the probe."""
        worker = self.workers.get(instance_id)
        if worker is None or worker.state is not WorkerState.LAUNCHING:
            return None
        old_ip, worker.ip = worker.ip, ip
        worker.state = WorkerState.READY
        worker.ready_at = now
        worker.last_activity = now
        self._index.ip_set(worker, old_ip)
        self._touch(worker)
        return worker

    def mark_terminating(self, worker: Worker) -> None:
        """The worker is chosen for termination: it is never handed out again."""
        worker.state = WorkerState.TERMINATING
        self._touch(worker)

    def revert_ready(self, worker: Worker) -> None:
        """A termination was not claimed (held through another replica): ready again."""
        if worker.state is WorkerState.TERMINATING and worker.instance_id in self.workers:
            worker.state = WorkerState.READY
            self._touch(worker)

    def retire(self, instance_id: str, now: float) -> tuple[Worker | None, list[Lease]]:
        """The worker was terminated here: `remove` it (which takes it back from no stale
        view for RETIRED_MEMORY_SECONDS)."""
        return self.remove(instance_id, now)

    def recently_retired(self, instance_id: str) -> bool:
        """True if this broker terminated the instance a short while ago."""
        return instance_id in self.retired

    def remove(self, instance_id: str, now: float) -> tuple[Worker | None, list[Lease]]:
        """The worker is gone: drop it and its leases; remember its IP for RELEASE, and its id
        for RETIRED_MEMORY_SECONDS, so that no view of EC2 or the registry read before now
        (a reconciliation under way) brings it back."""
        self.retired[instance_id] = now
        for old in [i for i, t in self.retired.items() if now - t >= RETIRED_MEMORY_SECONDS]:
            del self.retired[old]
        worker = self.workers.pop(instance_id, None)
        if worker is not None:
            self._index.leave(worker)
        ended = self.holders(instance_id)
        for lease in ended:
            self.end_lease(lease)
        if worker is not None and worker.ip is not None:
            self.gone_ips[worker.ip] = now
        self._forget_old_ips(now)
        return worker, ended

    # --- transitions: money and interruptions ------------------------------------------------

    def set_cover(self, worker: Worker, paid_until: float | None) -> None:
        """The worker's cost is committed until `paid_until` (as the ledger now says)."""
        worker.paid_until = paid_until

    def extend_cover(self, worker: Worker, paid_until: float) -> None:
        """Another replica committed the worker's cost further: keep the later end."""
        worker.paid_until = max(worker.paid_until or 0.0, paid_until)

    def interrupt(self, worker: Worker, interruption: Interruption) -> None:
        """The worker is being taken away: handed out no more, PINGs told the deadline."""
        worker.interruption = interruption
        self._touch(worker)

    def lift(self, worker: Worker) -> None:
        """The interruption is over (a budget stop in a new period): hand it out again."""
        worker.interruption = None
        self._touch(worker)

    # --- transitions: leases -----------------------------------------------------------------

    def hand_out(self, worker: Worker, client: str, now: float) -> tuple[Lease, bool]:
        """Give `worker` to `client`: create or refresh its lease. True if the lease is new."""
        worker.last_activity = now
        key = (client, worker.instance_id)
        lease = self.leases.get(key)
        if lease is not None:
            lease.last_activity = now
            self._touch(worker)
            return lease, False
        assert worker.ip is not None, "only ready workers are handed out"
        lease = Lease(client, worker.instance_id, worker.ip, now, now, worker.price_per_hour)
        self._add_lease(lease)
        return lease, True

    def note_persisted(self, lease: Lease, now: float) -> None:
        """The lease's activity up to `now` is in the registry (or being written)."""
        lease.persisted_activity = now

    def end_lease(self, lease: Lease) -> None:
        """Forget a lease (released, expired, or its worker is gone)."""
        if self.leases.pop((lease.client, lease.instance_id), None) is None:
            return
        mine = tuple(i for i in self._by_client.pop(lease.client, ()) if i != lease.instance_id)
        if mine:
            self._by_client[lease.client] = mine
        identity = lease.client.partition("/")[0]
        owned = self._by_identity.get(identity)
        if owned is not None:
            owned.pop((lease.client, lease.instance_id), None)
            if not owned:
                del self._by_identity[identity]
        held = self._held.get(lease.instance_id)
        if held is not None:
            held.pop(lease.client, None)
            if not held:
                del self._held[lease.instance_id]
        worker = self.workers.get(lease.instance_id)
        if worker is not None:
            self._touch(worker)

    def ping(self, ip: str, client: str, now: float) -> Worker | None:
        """Restart a worker's idle clock and the caller's lease on it; None if unknown."""
        worker = self.by_ip(ip)
        if worker is None:
            return None
        worker.last_activity = now
        self._touch(worker)
        lease = self.leases.get((client, worker.instance_id))
        if lease is not None:
            lease.last_activity = now
        return worker

    def release(
        self,
        ip: str,
        client: str,
        now: float,
        *,
        warm: WarmPool = NO_WARM_POOL,
        keep: Callable[[Worker, int], bool] | None = None,
    ) -> Released:
        """End the caller's lease; decide whether the worker is to be terminated.

        A worker nobody holds any more goes back to the pool instead when it is of the warm
        pool's type and market and fewer than `warm.count` such idle workers would be left,
        or when `keep(worker, rank)` says so (the idle policy; rank: 1 + the idle workers of
        its type and market); every other unheld cloud worker is marked terminating."""
        worker = self.by_ip(ip)
        if worker is None:
            if any(True for _ in self._index.with_ip(ip)):
                return Released(ReleaseOutcome.ALREADY_GONE)  # being terminated right now
            gone = self.gone_ips.get(ip)
            if gone is not None and now - gone < GONE_MEMORY_SECONDS:
                return Released(ReleaseOutcome.ALREADY_GONE)
            return Released(ReleaseOutcome.NOT_FOUND)
        lease = self.leases.get((client, worker.instance_id))
        if lease is not None:
            self.end_lease(lease)
        others = self.holder_count(worker.instance_id)
        if others:
            return Released(ReleaseOutcome.KEPT, worker, lease, others)
        if worker.local:
            return Released(ReleaseOutcome.KEPT_WARM, worker, lease)  # never terminated
        if worker.available and warm.wants(worker):
            # len(warm_idle(warm)) without `worker` (idle now, so counted there), indexed
            wanted = warm.spec.accepts
            idle_others = self._index.idle_count(lambda k: not k[2] and wanted(k[0], k[1])) - 1
            if idle_others < warm.count:
                return Released(ReleaseOutcome.KEPT_WARM, worker, lease)
        if keep is not None and worker.available:
            # 1 + the other idle workers alike (same type and market, available), indexed
            kind = (worker.instance_type, worker.market, False)
            rank = self._index.idle_count(lambda k: k == kind)
            if keep(worker, rank):
                return Released(ReleaseOutcome.KEPT_IDLE, worker, lease)
        self.mark_terminating(worker)
        return Released(ReleaseOutcome.TERMINATE, worker, lease)

    # --- transitions: the registry's view ----------------------------------------------------

    def restore(self, workers: Iterable[Worker], leases: Iterable[Lease]) -> list[Worker]:
        """After a restart: the workers and leases the registry has (unknown ones only); each
        worker's idle clock is its latest lease activity. The workers added."""
        added = []
        for worker in workers:
            if worker.instance_id not in self.workers:
                self._add_worker(worker)
                added.append(worker)
        for lease in leases:
            held = self.workers.get(lease.instance_id)
            if held is None:
                continue
            self._add_lease(attrs.evolve(lease, price_per_hour=held.price_per_hour))
            held.last_activity = max(held.last_activity, lease.last_activity)
            self._touch(held)
        return added

    def merge(
        self,
        registry: Mapping[str, Worker],
        leases: Sequence[Lease],
        *,
        alive: Collection[str],
        declared_local: Collection[str],
        now: float,
        known: Collection[str] | None = None,
        known_leases: Collection[tuple[str, str]] | None = None,
    ) -> MergePlan:
        """Learn what other replicas did, from the registry's workers (as `Worker` values,
        by id) and leases, and the instance ids EC2 runs (`alive`):

        - a worker the registry has and EC2 runs (or a local one) joins, unless terminating;
        - covers only grow (another replica extended one); interruptions are learned; a cloud
          worker's activity only moves forward (it was handed out or PINGed elsewhere; a
          local worker's record moves with its agent's heartbeats, which are no use);
        - a ready worker the registry no longer has, or has as terminating, is removed
          (only with no launch of ours in flight: its record may not be written yet; and
          only if it is in `known`, the ids the pool had before the registry was read, when
          given: a worker launched since is missing from that read, not gone);
        - a local worker neither the registry nor the config has is lost (agent gone);
        - leases join, and activity seen through another replica refreshes ours; a lease in
          `known_leases` (the pool's before the registry was read, when given) that the
          pool no longer has ended here since the read: it does not come back.
        """
        joined: list[Worker] = []
        for instance_id, record in registry.items():
            if instance_id in self.workers or record.state is WorkerState.TERMINATING:
                continue
            if instance_id in self.retired and not record.local:
                continue  # gone here since the registry was read (an agent may come back)
            if instance_id in alive or record.local:
                joined.append(self._add_worker(attrs.evolve(record)))
        interrupted: list[Worker] = []
        for instance_id, record in registry.items():
            worker = self.workers.get(instance_id)
            if worker is None:
                continue
            if record.paid_until is not None:
                self.extend_cover(worker, record.paid_until)
            if record.last_activity > worker.last_activity and not worker.local:
                worker.last_activity = record.last_activity
                self._touch(worker)
            if worker.interruption is None and record.interruption is not None:
                self.interrupt(worker, record.interruption)
                interrupted.append(worker)
        gone: list[Worker] = []
        lost_local: list[Worker] = []
        for worker in list(self.workers.values()):
            theirs = registry.get(worker.instance_id)
            if worker.local:
                if theirs is None and worker.instance_id not in declared_local:
                    lost_local.append(worker)
                continue
            elsewhere = theirs is None or (
                theirs.state is WorkerState.TERMINATING
                and worker.state is not WorkerState.TERMINATING
            )
            stale = known is not None and worker.instance_id not in known
            if elsewhere and worker.state is WorkerState.READY and not self.in_flight and not stale:
                self.remove(worker.instance_id, now)
                gone.append(worker)
        for lease in leases:
            key = (lease.client, lease.instance_id)
            mine = self.leases.get(key)
            held = self.workers.get(lease.instance_id)
            if mine is not None:
                mine.last_activity = max(mine.last_activity, lease.last_activity)
            elif held is not None and (known_leases is None or key not in known_leases):
                self._add_lease(attrs.evolve(lease, price_per_hour=held.price_per_hour))
        return MergePlan(tuple(joined), tuple(interrupted), tuple(gone), tuple(lost_local))

    # --- internals ---------------------------------------------------------------------------

    def _add_worker(self, worker: Worker) -> Worker:
        self.workers[worker.instance_id] = worker
        self._index.join(worker, self.holder_count(worker.instance_id))
        return worker

    def _touch(self, worker: Worker) -> None:
        """After a change of the worker's availability, activity or holders: re-index it
        (unless it has left the pool: a later worker may have its id)."""
        if self.workers.get(worker.instance_id) is worker:
            self._index.update(worker, self.holder_count(worker.instance_id))

    def _add_lease(self, lease: Lease) -> None:
        key = (lease.client, lease.instance_id)
        mine = self._by_client.get(lease.client, ())
        if lease.instance_id not in mine:
            self._by_client[lease.client] = (*mine, lease.instance_id)
        self._by_identity.setdefault(lease.client.partition("/")[0], {})[key] = lease
        self.leases[key] = lease
        self._held.setdefault(lease.instance_id, {})[lease.client] = lease
        worker = self.workers.get(lease.instance_id)
        if worker is not None:
            self._touch(worker)

    def _forget_old_ips(self, now: float) -> None:
        stale = [ip for ip, t in self.gone_ips.items() if now - t >= GONE_MEMORY_SECONDS]
        for ip in stale:
            del self.gone_ips[ip]
