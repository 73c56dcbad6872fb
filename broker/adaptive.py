"""How long an idle worker is kept (`idle_policy`): pure code, time passed in.

`fixed` (the default) is the broker as it always was: RELEASE terminates a worker nobody holds
(the warm pool aside) and any other idle worker is reaped after `idle_timeout`. `linger` keeps
a released worker too, for `idle_timeout`. `adaptive` keeps an idle worker only while the
requests the broker has been seeing make keeping it pay (docs/adaptive-idle.md):

- the **break-even time** B = boot seconds x wait_cost_per_hour / price per hour: idling
  that long costs what one boot wait saved is worth;
- arrivals (GET_WORKERs that needed an idle or a new cloud worker) are taken as a Poisson
  process whose rate lambda is an exponentially decayed count of the recent ones
  (`ArrivalHistory`, time constant `MEMORY`);
- the k-th idle worker of its type and market (most recently used first: the order hand-out
  takes them in) is of use at the k-th arrival. Kept until then or for the H seconds its
  idle timeout still allows, it saves a wait worth (price x B) with probability P(N(H) >= k)
  and costs price x E[min(S_k, H)] = price / lambda x sum_{j=1..k} P(N(H) >= j). It is kept
  while lambda B P(N(H) >= k) >= sum_{j=1..k} P(N(H) >= j); for k = 1: while lambda B >= 1.

Bounds: never longer than `idle_timeout`; the reaper takes none sooner than `minimum` (one
reap interval) after its last activity; a worker without a known price is kept as `fixed`
keeps it.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterable, Mapping
from typing import Final

import attrs

from broker.model import Worker

MEMORY: Final = 3600.0  # seconds: the time constant of the arrival rate's decay
DEFAULT_BOOT_SECONDS: Final = 30.0  # the wait a kept worker saves, before any boot was seen
MAX_RANK: Final = 1000  # the k beyond which no idle worker is worth keeping (bounds the sums)


class IdlePolicy(enum.StrEnum):
    """The `idle_policy` config key."""

    FIXED = "fixed"
    LINGER = "linger"
    ADAPTIVE = "adaptive"


@attrs.frozen
class ArrivalHistory:
    """Recent arrivals as one exponentially decayed count: `weight` is the sum over arrivals
    of exp(-(at - t) / memory), as of `at`. Constant memory however many arrive."""

    weight: float = 0.0
    at: float = 0.0
    memory: float = MEMORY

    @classmethod
    def seeded(cls, arrivals: Iterable[float], memory: float = MEMORY) -> ArrivalHistory:
        """The history of these arrival times (Unix seconds, any order): what the broker
        knows at start-up (the registry's leases' start times; ended leases when it has them)."""
        history = cls(memory=memory)
        for when in arrivals:
            history = history.add(when)
        return history

    def add(self, when: float) -> ArrivalHistory:
        """The history with one more arrival at `when` (which may be older than the last)."""
        if self.weight == 0.0:
            return attrs.evolve(self, weight=1.0, at=when)
        if when >= self.at:
            decayed = self.weight * math.exp(-(when - self.at) / self.memory)
            return attrs.evolve(self, weight=decayed + 1.0, at=when)
        return attrs.evolve(self, weight=self.weight + math.exp(-(self.at - when) / self.memory))

    def rate(self, now: float) -> float:
        """Arrivals per second expected at `now`."""
        return self.weight * math.exp(-max(0.0, now - self.at) / self.memory) / self.memory


def break_even(price_per_hour: float, boot_seconds: float, wait_cost_per_hour: float) -> float:
    """Seconds of idling that cost what one saved boot wait is worth (inf for a free worker)."""
    if price_per_hour <= 0:
        return math.inf
    return boot_seconds * wait_cost_per_hour / price_per_hour


def worth_keeping(rate: float, break_even: float, horizon: float, rank: int) -> bool:
    """True if the `rank`-th idle worker, kept for at most `horizon` more seconds, is expected
    to save more (a wait worth `break_even` seconds of its price, at the rank-th arrival) than
    it costs idling until then, arrivals coming at `rate` per second."""
    if rate <= 0 or horizon <= 0 or rank > MAX_RANK:
        return False
    if math.isinf(break_even):
        return True
    tails = _poisson_tails(rate * horizon, rank)  # P(N >= 1), ..., P(N >= rank)
    return tails[-1] > 0 and rate * break_even * tails[-1] >= sum(tails)


def _poisson_tails(mean: float, count: int) -> list[float]:
    """[P(N >= j) for j in 1..count], N Poisson with `mean`."""
    term = math.exp(-mean)  # P(N = 0)
    below = 0.0
    tails = []
    for j in range(count):
        below += term
        tails.append(max(0.0, 1.0 - below))
        term *= mean / (j + 1)
    return tails


@attrs.frozen
class IdleRule:
    """What RELEASE and the reaper ask about an idle cloud worker nobody holds, at one time.

    `boot_seconds` holds the typical boot time of each type seen booting; others are taken to
    boot in `default_boot`."""

    policy: IdlePolicy
    idle_timeout: float
    minimum: float = 0.0
    wait_cost_per_hour: float = 0.0
    history: ArrivalHistory = ArrivalHistory()
    boot_seconds: Mapping[str, float] = attrs.field(factory=dict)
    default_boot: float = DEFAULT_BOOT_SECONDS

    @classmethod
    def fixed(cls, idle_timeout: float) -> IdleRule:
        """The broker as it always was."""
        return cls(IdlePolicy.FIXED, idle_timeout)

    def keeps_released(self, worker: Worker, rank: int, now: float) -> bool:
        """True if a worker RELEASE leaves unheld stays idle rather than being terminated;
        `rank`: 1 + the idle workers of its type and market there are already."""
        if self.policy is IdlePolicy.FIXED:
            return False
        if now - worker.last_activity >= self.idle_timeout:
            return False
        if self.policy is IdlePolicy.LINGER:
            return True
        return self._pays(worker, rank, now)

    def reaps(self, worker: Worker, rank: int, now: float) -> bool:
        """True if the reaper takes this idle worker now; `rank`: its place among the idle
        workers of its type and market, most recently used first (from 1)."""
        idle = now - worker.last_activity
        if idle >= self.idle_timeout:
            return True
        if self.policy is not IdlePolicy.ADAPTIVE or idle < self.minimum:
            return False
        if worker.price_per_hour is None:  # no break-even without a price: as `fixed`
            return False
        return not self._pays(worker, rank, now)

    def _pays(self, worker: Worker, rank: int, now: float) -> bool:
        price = worker.price_per_hour
        if price is None:  # no break-even without a price: released as `fixed` releases
            return False
        boot = self.boot_seconds.get(worker.instance_type, self.default_boot)
        horizon = worker.last_activity + self.idle_timeout - now
        return worth_keeping(
            self.history.rate(now),
            break_even(price, boot, self.wait_cost_per_hour),
            horizon,
            rank,
        )
