"""Per-identity limits, pure (time passed in): connections per peer address, requests a second,
open leases, launches a minute.

One `Limiter` per server. Each check answers None (go on) or the one `ERROR: limit: ...` line
to send, naming the config key and its value. An identity is a string: `Identity.key` from
`broker.access` (`token:<name>`, else the peer's address). Memory stays bounded whatever the
peers do: connection counts are dropped at zero, a rate bucket that has refilled is forgotten
(it holds nothing a new one would not), and at most `max_tracked` buckets are kept per kind.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Any, Final

import attrs

from broker.ratelimit import TokenBucket

MIN_SWEEP: Final = 1024  # buckets kept before the first sweep of refilled ones
LIMIT_PREFIX: Final = "ERROR: limit:"


def _positive_or_off(instance: object, attribute: attrs.Attribute[Any], value: Any) -> None:
    if value is not None and not (isinstance(value, int | float) and value > 0):
        raise ValueError(f"{attribute.name} must be > 0 or None (off), not {value!r}")


@attrs.frozen
class Limits:
    """The limits' values (config keys of the same names); None turns one off."""

    max_connections_per_peer: int | None = attrs.field(default=128, validator=_positive_or_off)
    max_requests_per_second: float | None = attrs.field(default=20.0, validator=_positive_or_off)
    request_burst: int = attrs.field(default=200, validator=_positive_or_off)
    max_leases_per_identity: int | None = attrs.field(default=256, validator=_positive_or_off)
    max_launches_per_minute: int | None = attrs.field(default=100, validator=_positive_or_off)
    max_tracked: int = attrs.field(default=10_000, validator=_positive_or_off)


@attrs.define
class _Buckets:
    """Token buckets by identity, least recently used first; refilled ones are forgotten."""

    capacity: float
    rate: float
    max_tracked: int
    _table: OrderedDict[str, TokenBucket] = attrs.field(init=False, factory=OrderedDict)
    _sweep_at: int = attrs.field(init=False, default=MIN_SWEEP)

    def __len__(self) -> int:
        return len(self._table)

    def take(self, key: str, now: float, count: int) -> float:
        """Take `count` tokens from `key`'s bucket (0 returned), or none if there are not that
        many: then the seconds until there will be. `count` must not exceed the capacity."""
        bucket = self._table.get(key)
        if bucket is None:
            bucket = self._table[key] = TokenBucket(self.capacity, self.rate)
        else:
            self._table.move_to_end(key)
        available = bucket.available(now)
        if available < count:
            return (count - available) / self.rate
        for _ in range(count):
            bucket.reserve(now)  # never waits: the tokens are there
        self._trim(now)
        return 0.0

    def forget_idle(self, now: float) -> None:
        """Drop every bucket that has refilled: it would behave as a new one."""
        for key in [k for k, b in self._table.items() if b.available(now) >= self.capacity]:
            del self._table[key]

    def _trim(self, now: float) -> None:
        # Sweeping when the table has doubled since the last sweep costs O(1) a call on average.
        if len(self._table) > self._sweep_at:
            self.forget_idle(now)
            self._sweep_at = max(MIN_SWEEP, 2 * len(self._table))
        while len(self._table) > self.max_tracked:
            self._table.popitem(last=False)  # forgiven: it gets a full bucket if it comes back


class Limiter:
    """The per-identity limits at work. Not thread-safe; the server's one Trio thread uses it."""

    def __init__(self, limits: Limits | None = None) -> None:
        self.limits = limits or Limits()
        self._connections: dict[str, int] = {}
        rate = self.limits.max_requests_per_second
        self._requests = (
            None
            if rate is None
            else _Buckets(self.limits.request_burst, rate, self.limits.max_tracked)
        )
        per_minute = self.limits.max_launches_per_minute
        self._launches = (
            None
            if per_minute is None
            else _Buckets(per_minute, per_minute / 60.0, self.limits.max_tracked)
        )

    @property
    def tracked(self) -> int:
        """How many identities (and peers) the limiter remembers now."""
        return len(self._connections) + len(self._requests or ()) + len(self._launches or ())

    def connection_opened(self, peer: str) -> str | None:
        """A connection from `peer` opened: None (counted; call `connection_closed` when it
        ends), or the reply to send before closing it (not counted)."""
        limit = self.limits.max_connections_per_peer
        open_now = self._connections.get(peer, 0)
        if limit is not None and open_now >= limit:
            return (
                f"{LIMIT_PREFIX} max_connections_per_peer ({limit}) connections from "
                "your address are open"
            )
        self._connections[peer] = open_now + 1
        return None

    def connection_closed(self, peer: str) -> None:
        """A connection that `connection_opened` counted has closed."""
        open_now = self._connections.get(peer, 0)
        if open_now <= 1:
            self._connections.pop(peer, None)
        else:
            self._connections[peer] = open_now - 1

    def request(self, identity: str, now: float) -> str | None:
        """A request line from `identity` at `now` (seconds, monotonic): None, or the refusal
        when it has used its burst and its rate."""
        if self._requests is None or self._requests.take(identity, now, 1) == 0:
            return None
        rate = self.limits.max_requests_per_second
        return f"{LIMIT_PREFIX} max_requests_per_second ({rate:g}) exceeded; slow down"

    def open_lease(self, identity: str, held: int) -> str | None:
        """May `identity`, which holds `held` leases now (as the pool counts them), open one
        more? None, or the refusal. A hand-out that refreshes a lease it holds is no new one."""
        limit = self.limits.max_leases_per_identity
        if limit is None or held < limit:
            return None
        return f"{LIMIT_PREFIX} max_leases_per_identity ({limit}) leases held; RELEASE one first"

    def launch(self, identity: str, now: float, count: int) -> str | None:
        """`identity` is about to launch `count` workers (a BURST, or a GET_WORKER that starts
        a launch): None (counted), or the refusal (nothing counted)."""
        limit = self.limits.max_launches_per_minute
        if self._launches is None or limit is None:
            return None
        if count > limit:
            return f"{LIMIT_PREFIX} max_launches_per_minute ({limit}) is less than {count}"
        wait = self._launches.take(identity, now, count)
        if wait == 0:
            return None
        return (
            f"{LIMIT_PREFIX} max_launches_per_minute ({limit}) reached; retry in {math.ceil(wait)}s"
        )

    def forget_idle(self, now: float) -> None:
        """Forget every identity whose buckets have refilled (call it now and then, e.g. each
        reaper pass; the limiter also does it as its tables grow)."""
        for buckets in (self._requests, self._launches):
            if buckets is not None:
                buckets.forget_idle(now)
