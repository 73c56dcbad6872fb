"""The pool's indexes agree with its tables after any sequence of its transitions, and the
indexed choice of a worker is the one a scan of every worker makes."""

from __future__ import annotations

from collections.abc import Collection

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broker.cloud import Instance, LaunchSpec, Market
from broker.model import Interruption, Lease, Limits, LocalWorker, WarmPool, Worker
from broker.pool import Pool
from broker.pool_index import expected

T0 = 1_700_000_000.0
C7I = LaunchSpec("c7i.8xlarge", Market.SPOT)
C6I = LaunchSpec("c6i.8xlarge", Market.SPOT)
ON_DEMAND = LaunchSpec("c7i.8xlarge", Market.ON_DEMAND)
KINDS = (C7I, C6I, ON_DEMAND)
SPECS = (
    C7I,
    C6I,
    ON_DEMAND,
    LaunchSpec("c7i.8xlarge", Market.SPOT, ("c6i.8xlarge",), on_demand_fallback=True),
)
CLIENTS = ("a", "b", "c", "lab/1", "lab/2")
N = 4  # worker numbers: few, so that transitions meet the same workers often


def scan_choice(
    pool: Pool,
    spec: LaunchSpec,
    client: str | None,
    *,
    local_ok: bool,
    prefer_local: bool,
    exclude: Collection[str],
) -> Worker | None:
    """`Pool.choose_ready` as it was before the index: a scan of every worker."""
    ready = [
        worker
        for worker in pool.workers.values()
        if worker.available
        and (worker.matches(spec) or (local_ok and worker.local))
        and worker.instance_id not in exclude
    ]
    if not ready:
        return None
    if client is not None:
        for worker in ready:
            if (client, worker.instance_id) in pool.leases:
                return worker
    capacity = pool.limits.clients_per_worker
    if capacity is not None:
        ready = [w for w in ready if pool.holder_count(w.instance_id) < capacity]
        if not ready:
            return None

    def rank(w: Worker) -> tuple[bool, int, float]:
        return (w.local != prefer_local, pool.holder_count(w.instance_id), -w.last_activity)

    return min(ready, key=rank)


def scan_by_ip(pool: Pool, ip: str) -> Worker | None:
    for worker in pool.workers.values():
        if worker.ip == ip and worker.state.value != "terminating":
            return worker
    return None


def check(pool: Pool) -> None:
    """Every index recomputed from the pool's workers and leases, and every choice compared
    with the scan's."""
    index = pool._index
    assert expected(pool.workers, pool.holder_count) == index.snapshot()
    held: dict[str, dict[str, Lease]] = {}
    for lease in pool.leases.values():
        held.setdefault(lease.instance_id, {})[lease.client] = lease
    assert held == pool._held
    for client in CLIENTS:
        mine = {k for k in pool.leases if k[0] == client}
        assert bool(mine) == pool.holds_any(client)
    for identity in ("a", "b", "c", "lab"):
        theirs = [lease for k, lease in pool.leases.items() if k[0].partition("/")[0] == identity]
        assert len(theirs) == pool.leases_held(identity)
    for n in range(1, N + 1):
        for ip in (f"192.0.2.{n}", f"198.51.100.{n}"):
            assert scan_by_ip(pool, ip) is pool.by_ip(ip)
    for spec in SPECS:
        warm = WarmPool(spec, 1)
        wanted = index.idle_count(lambda k, s=spec: not k[2] and s.accepts(k[0], k[1]))
        assert len(pool.warm_idle(warm)) == wanted
        for client in (None, "a", "lab/1"):
            for local_ok in (False, True):
                for prefer_local in (False, True):
                    for exclude in ((), ("i-1", "i-2"), ("local:x",)):
                        args = dict(local_ok=local_ok, prefer_local=prefer_local, exclude=exclude)
                        want = scan_choice(pool, spec, client, **args)  # type: ignore[arg-type]
                        got = pool.choose_ready(spec, client, **args)  # type: ignore[arg-type]
                        assert want is got, (spec, client, args)


workers = st.integers(1, N)
clients = st.sampled_from(CLIENTS)
times = st.floats(T0, T0 + 100, allow_nan=False).map(lambda t: round(t))  # ties happen
steps = st.one_of(
    st.tuples(st.just("adopt"), workers, st.integers(0, 2), st.booleans(), times),
    st.tuples(st.just("local"), workers, times),
    st.tuples(st.just("ready"), workers, times),
    st.tuples(st.just("terminating"), workers),
    st.tuples(st.just("revert"), workers),
    st.tuples(st.just("remove"), workers, times),
    st.tuples(st.just("interrupt"), workers, times),
    st.tuples(st.just("lift"), workers),
    st.tuples(st.just("hand_out"), workers, clients, times),
    st.tuples(st.just("end_lease"), workers, clients),
    st.tuples(st.just("ping"), workers, clients, times),
    st.tuples(st.just("release"), workers, clients, times, st.integers(0, 2)),
    st.tuples(st.just("restore"), workers, clients, times),
)


def apply(pool: Pool, step: tuple[object, ...]) -> None:
    """One transition; but for `adopt` and `local`, `n` picks one of the pool's workers (when
    it has any), so that sequences keep meeting the same workers."""
    name, n, *rest = step
    if name not in ("adopt", "local") and pool.workers:
        picked = list(pool.workers.values())[int(n) % len(pool.workers)]  # type: ignore[call-overload]
        if not picked.local:
            n = picked.instance_id.removeprefix("i-")
    instance_id, ip = f"i-{n}", f"192.0.2.{n}"
    worker = pool.workers.get(instance_id)
    if name == "adopt" and worker is None:
        kind, ready, now = rest
        spec = KINDS[int(kind)]  # type: ignore[call-overload]
        public_ip = ip if ready else None
        made = Instance(instance_id, spec.instance_type, spec.market, "running", public_ip, T0)
        pool.adopt(made, float(now), price=0.5, ready=bool(ready))  # type: ignore[arg-type]
    elif name == "local":
        pool.add_local(LocalWorker(str(n), f"198.51.100.{n}"), Market.SPOT, float(rest[0]))  # type: ignore[arg-type]
    elif name == "ready":
        pool.mark_ready(instance_id, ip, float(rest[0]))  # type: ignore[arg-type]
    elif name == "terminating" and worker is not None:
        pool.mark_terminating(worker)
    elif name == "revert" and worker is not None:
        pool.revert_ready(worker)
    elif name == "remove":
        pool.remove(instance_id, float(rest[0]))  # type: ignore[arg-type]
    elif name == "interrupt" and worker is not None:
        pool.interrupt(worker, Interruption("spot_interruption", None, float(rest[0])))  # type: ignore[arg-type]
    elif name == "lift" and worker is not None:
        pool.lift(worker)
    elif name == "hand_out" and worker is not None and worker.ip is not None:
        pool.hand_out(worker, str(rest[0]), float(rest[1]))  # type: ignore[arg-type]
    elif name == "end_lease":
        lease = pool.leases.get((str(rest[0]), instance_id))
        if lease is not None:
            pool.end_lease(lease)
    elif name == "ping":
        pool.ping(ip, str(rest[0]), float(rest[1]))  # type: ignore[arg-type]
    elif name == "release":
        client, now, count = rest
        pool.release(ip, str(client), float(now), warm=WarmPool(C7I, int(count)))  # type: ignore[arg-type, call-overload]
    elif name == "restore" and worker is not None and worker.ip is not None:
        client, now = rest
        lease = Lease(str(client), instance_id, worker.ip, T0, float(now))  # type: ignore[arg-type]
        pool.restore([], [lease])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(steps, min_size=20, max_size=80), st.sampled_from([None, 1, 2]))
def test_indexes_match_a_recomputation_after_random_transitions(
    sequence: list[tuple[object, ...]], capacity: int | None
) -> None:
    """After each transition of a random sequence, the indexes equal what a scan of the
    pool's tables gives, and `choose_ready`, `by_ip` and the warm count agree with scans."""
    pool = Pool(Limits(100, None, 900.0, clients_per_worker=capacity))
    for step in sequence:
        apply(pool, step)
        check(pool)


def test_many_stale_entries_are_swept() -> None:
    """A worker pinged again and again leaves no heap growing without bound."""
    pool = Pool(Limits(10, None, 900.0))
    made = Instance("i-1", C7I.instance_type, C7I.market, "running", "192.0.2.1", T0)
    pool.adopt(made, T0, price=0.5, ready=True)
    for t in range(10_000):
        pool.ping("192.0.2.1", "a", T0 + t)
    heaps = pool._index._heaps
    assert sum(len(h) for h in heaps.values()) < 200
    check(pool)
