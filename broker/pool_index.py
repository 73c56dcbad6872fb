"""The pool's indexes over its workers, so a hand-out, a PING and a RELEASE cost the same
whatever the pool's size: workers by IP, and the workers that may be handed out in the order
`Pool.choose_ready` prefers them.

Only `broker.pool.Pool` uses this module, from its transitions: every change of a worker's
state, interruption, IP, last activity or holder count is followed by `ReadyIndex.update`
(or `join`/`leave` when it enters or leaves the pool). No I/O, no clock.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Collection, Iterator
from typing import Final

from broker.model import Market, Worker

# A worker's kind: what a spec's `accepts` and the local preference look at.
Kind = tuple[str, Market, bool]  # (instance_type, market, local)
# A heap entry: holder count, minus last activity, join order (unique: ties stop here), worker.
Entry = tuple[int, float, int, Worker]

COMPACT_SLACK: Final = 64  # stale heap entries tolerated beyond the live ones (times 1)


def kind_of(worker: Worker) -> Kind:
    return (worker.instance_type, worker.market, worker.local)


class ReadyIndex:
    """Available workers (ready, not interrupted) of each kind in one heap per kind, ordered
    by (holders, most recent activity first, join order): the top of a heap is the worker
    `Pool.choose_ready` would pick among that kind. Entries are replaced, not edited: a
    change pushes a new entry and the old one is skipped when it reaches the top (and swept
    when stale entries outnumber live ones). Also workers by IP, and join order."""

    def __init__(self) -> None:
        self._heaps: dict[Kind, list[Entry]] = {}
        self._live: dict[str, Entry] = {}  # instance id -> its current entry (available only)
        self._order: dict[str, int] = {}  # instance id -> join order (the pool's dict order)
        self._joined = 0
        self._by_ip: dict[str, dict[str, Worker]] = {}  # every worker with an IP, any state
        self._idle: dict[Kind, int] = {}  # available workers nobody holds, per kind
        self._available: dict[Kind, int] = {}  # available workers, per kind

    # --- membership ---------------------------------------------------------------------------

    def join(self, worker: Worker, holders: int) -> None:
        """`worker` was added to the pool's workers (at the end of its order)."""
        self._joined += 1
        self._order[worker.instance_id] = self._joined
        if worker.ip is not None:
            self._by_ip.setdefault(worker.ip, {})[worker.instance_id] = worker
        self.update(worker, holders)

    def leave(self, worker: Worker) -> None:
        """`worker` was removed from the pool."""
        self._drop(worker)
        self._order.pop(worker.instance_id, None)
        if worker.ip is not None:
            same_ip = self._by_ip.get(worker.ip)
            if same_ip is not None:
                same_ip.pop(worker.instance_id, None)
                if not same_ip:
                    del self._by_ip[worker.ip]

    def ip_set(self, worker: Worker, old_ip: str | None) -> None:
        """`worker`'s IP changed from `old_ip`."""
        if old_ip == worker.ip:
            return
        if old_ip is not None:
            same_ip = self._by_ip.get(old_ip, {})
            same_ip.pop(worker.instance_id, None)
            if not same_ip:
                self._by_ip.pop(old_ip, None)
        if worker.ip is not None:
            self._by_ip.setdefault(worker.ip, {})[worker.instance_id] = worker

    def update(self, worker: Worker, holders: int) -> None:
        """`worker`'s availability, activity or holder count may have changed."""
        if not worker.available or worker.instance_id not in self._order:
            self._drop(worker)
            return
        old = self._live.get(worker.instance_id)
        entry = (holders, -worker.last_activity, self._order[worker.instance_id], worker)
        if old is not None and old[:3] == entry[:3]:
            return
        kind = kind_of(worker)
        if old is None:
            self._available[kind] = self._available.get(kind, 0) + 1
            if holders == 0:
                self._idle[kind] = self._idle.get(kind, 0) + 1
        elif (old[0] == 0) != (holders == 0):
            self._idle[kind] += 1 if holders == 0 else -1
        self._live[worker.instance_id] = entry
        heap = self._heaps.setdefault(kind, [])
        heapq.heappush(heap, entry)
        if len(heap) > 2 * len(self._live) + COMPACT_SLACK:
            self._compact(kind)

    def _drop(self, worker: Worker) -> None:
        old = self._live.pop(worker.instance_id, None)
        if old is not None:
            kind = kind_of(worker)
            self._available[kind] -= 1
            if old[0] == 0:
                self._idle[kind] -= 1

    def _compact(self, kind: Kind) -> None:
        live = self._live
        heap = [e for e in self._heaps[kind] if live.get(e[3].instance_id) is e]
        heapq.heapify(heap)
        self._heaps[kind] = heap

    # --- queries ------------------------------------------------------------------------------

    def order(self, instance_id: str) -> int:
        """Where the worker stands in the pool's order (its dict's insertion order)."""
        return self._order[instance_id]

    def with_ip(self, ip: str) -> Iterator[Worker]:
        """The workers with this IP, any state, in the pool's order."""
        same_ip = self._by_ip.get(ip)
        if not same_ip:
            return iter(())
        if len(same_ip) == 1:
            return iter(same_ip.values())
        return iter(sorted(same_ip.values(), key=lambda w: self._order[w.instance_id]))

    def is_available(self, instance_id: str) -> bool:
        """True if the index holds the worker as one to hand out."""
        return instance_id in self._live

    def kinds(self) -> Collection[Kind]:
        """The kinds of the available workers (a handful: types x markets x local)."""
        return [kind for kind, heap in self._heaps.items() if heap]

    def held_counts(self) -> dict[Kind, int]:
        """Available workers someone holds, per kind (those with any)."""
        return {
            kind: held
            for kind, available in self._available.items()
            if (held := available - self._idle.get(kind, 0))
        }

    def idle_count(self, wanted: Callable[[Kind], bool]) -> int:
        """How many available workers nobody holds are of a kind `wanted` accepts."""
        return sum(n for kind, n in self._idle.items() if n and wanted(kind))

    def first(
        self,
        fits: Callable[[Kind], bool],
        capacity: int | None,
        exclude: Collection[str],
        prefer_local: bool,
    ) -> Worker | None:
        """The worker to hand out among the kinds that `fits`: local ones first when
        `prefer_local` (else cloud ones first), then fewest holders (fewer than `capacity`),
        then most recent activity, then join order; none in `exclude`."""
        chosen: tuple[tuple[bool, int, float, int], Worker] | None = None
        for kind in self.kinds():
            if not fits(kind):
                continue
            entry = self.best(kind, capacity, exclude)
            if entry is None:
                continue
            holders, recent_first, order, worker = entry
            rank = (kind[2] != prefer_local, holders, recent_first, order)  # False sorts first
            if chosen is None or rank < chosen[0]:
                chosen = (rank, worker)
        return None if chosen is None else chosen[1]

    def best(self, kind: Kind, capacity: int | None, exclude: Collection[str]) -> Entry | None:
        """The first entry of `kind` in hand-out order that is not in `exclude` and has fewer
        than `capacity` holders (any number when None); None if there is none."""
        heap = self._heaps.get(kind)
        if not heap:
            return None
        live = self._live
        skipped: list[Entry] = []
        found: Entry | None = None
        while heap:
            top = heap[0]
            if live.get(top[3].instance_id) is not top:
                heapq.heappop(heap)  # stale: replaced or no longer available
                continue
            if capacity is not None and top[0] >= capacity:
                break  # every later entry has at least as many holders
            if top[3].instance_id in exclude:
                skipped.append(heapq.heappop(heap))
                continue
            found = top
            break
        for entry in skipped:
            heapq.heappush(heap, entry)
        return found

    # --- checking (tests) ---------------------------------------------------------------------

    def snapshot(self) -> dict[str, object]:
        """The index's content in plain values, for a test to compare with `expected`."""
        order = sorted(self._order, key=self._order.__getitem__)
        rank = {instance_id: n for n, instance_id in enumerate(order)}
        return {
            "order": order,
            "live": {i: (e[0], e[1], rank[i]) for i, e in self._live.items()},
            "by_ip": {ip: sorted(ws) for ip, ws in self._by_ip.items()},
            "idle": {k: n for k, n in self._idle.items() if n},
            "held": self.held_counts(),
            "heaps_hold_live": all(
                any(e is entry for e in self._heaps.get(kind_of(entry[3]), ()))
                for entry in self._live.values()
            ),
        }


def expected(workers: dict[str, Worker], holders: Callable[[str], int]) -> dict[str, object]:
    """What `ReadyIndex.snapshot` must be for these workers, recomputed from scratch."""
    order = {instance_id: n for n, instance_id in enumerate(workers)}
    available = [w for w in workers.values() if w.available]
    by_ip: dict[str, list[str]] = {}
    for worker in workers.values():
        if worker.ip is not None:
            by_ip.setdefault(worker.ip, []).append(worker.instance_id)
    idle: dict[Kind, int] = {}
    held: dict[Kind, int] = {}
    for worker in available:
        counts = held if holders(worker.instance_id) else idle
        counts[kind_of(worker)] = counts.get(kind_of(worker), 0) + 1
    return {
        "order": list(order),
        "live": {
            w.instance_id: (holders(w.instance_id), -w.last_activity, order[w.instance_id])
            for w in available
        },
        "by_ip": {ip: sorted(ids) for ip, ids in by_ip.items()},
        "idle": idle,
        "held": held,
        "heaps_hold_live": True,
    }
