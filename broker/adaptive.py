"""How long an idle worker is kept (`idle_policy`): pure code, time passed in.

`fixed` (the default) is the broker as it always was: RELEASE terminates a worker nobody holds
(the warm pool aside) and any other idle worker is reaped after `idle_timeout`. `linger` keeps
a released worker too, for `idle_timeout`. `adaptive` keeps an idle worker only while the
requests the broker has been seeing make keeping it pay (docs/adaptive-idle.md):

- the **break-even time** B = boot seconds x wait_cost_per_hour / price per hour: idling
  that long costs what one boot wait saved is worth;
- arrivals (GET_WORKERs that needed an idle or a new cloud worker) are taken as a Poisson
  process whose rate lambda is an exponentially decayed count of the recent ones
  (`ArrivalHistory`, time constant `MEMORY`), scaled by when in the day they come on the
  complete days seen (`broker.dayprofile`): the time ahead against the recent past;
- the k-th idle worker of its type and market (most recently used first: the order hand-out
  takes them in) is of use at the k-th arrival. Kept until then or for the H seconds its
  idle timeout still allows, it saves a wait worth (price x B) with probability P(N(H) >= k)
  and costs price x E[min(S_k, H)] = price / lambda x sum_{j=1..k} P(N(H) >= j). It is kept
  while lambda B P(N(H) >= k) >= sum_{j=1..k} P(N(H) >= j); for k = 1: while lambda B >= 1;
- held workers are coming supply: each is released at 1/L a second (L: the seconds of
  holding per RELEASE over the recent leases, expired ones included: `LeaseLengths`), and a
  released worker goes on top of the idle ones, so the k-th idle worker is taken when
  arrivals first outnumber releases by k (`use_odds`: a walk, down at lambda, up at the
  release rate; without releases, the rule above).

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

from broker.dayprofile import DayProfile
from broker.model import Worker

MEMORY: Final = 3600.0  # seconds: the time constant of the arrival rate's decay
DEFAULT_BOOT_SECONDS: Final = 30.0  # the wait a kept worker saves, before any boot was seen
MAX_RANK: Final = 1000  # the k beyond which no idle worker is worth keeping (bounds the sums)
MAX_STEPS: Final = 2000  # events looked ahead at most (bounds the walk in `use_odds`)
TAIL: Final = 1e-12  # the Poisson tail below which later events are not looked at


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
    profile: DayProfile = attrs.field(factory=DayProfile)  # when in the day they come

    @classmethod
    def seeded(
        cls, arrivals: Iterable[float], memory: float = MEMORY, zone: str = "UTC"
    ) -> ArrivalHistory:
        """The history of these arrival times (Unix seconds, any order): what the broker
        knows at start-up (the registry's leases' start times; ended leases when it has them).
        `zone`: the lab's time zone, whose days the profile counts."""
        history = cls(memory=memory, profile=DayProfile(zone))
        for when in arrivals:
            history = history.add(when)
        return history

    def add(self, when: float) -> ArrivalHistory:
        """The history with one more arrival at `when` (which may be older than the last)."""
        profile = self.profile.add(when)
        if self.weight == 0.0:
            return attrs.evolve(self, weight=1.0, at=when, profile=profile)
        if when >= self.at:
            decayed = self.weight * math.exp(-(when - self.at) / self.memory)
            return attrs.evolve(self, weight=decayed + 1.0, at=when, profile=profile)
        older = math.exp(-(self.at - when) / self.memory)
        return attrs.evolve(self, weight=self.weight + older, profile=profile)

    def rate(self, now: float) -> float:
        """Arrivals per second of late: the decayed count over its time constant."""
        return self.weight * math.exp(-max(0.0, now - self.at) / self.memory) / self.memory

    def rate_ahead(self, now: float, horizon: float) -> float:
        """Arrivals per second expected over [now, now + horizon]: the recent rate, scaled by
        how the days seen compare the time ahead with the recent past (the day's shape over
        the horizon against its mean weighted as the decayed count weighs arrivals). The
        recent rate alone until a complete day of each kind needed has been seen."""
        recent = self.rate(now)
        if recent == 0.0:
            return 0.0
        ahead = self.profile.ahead(now, horizon)
        behind = self.profile.behind(now, self.memory)
        if ahead is None or behind is None or behind <= 0.0:
            return recent
        return recent * ahead / behind


def break_even(price_per_hour: float, boot_seconds: float, wait_cost_per_hour: float) -> float:
    """Seconds of idling that cost what one saved boot wait is worth (inf for a free worker)."""
    if price_per_hour <= 0:
        return math.inf
    return boot_seconds * wait_cost_per_hour / price_per_hour


def worth_keeping(
    rate: float, break_even: float, horizon: float, rank: int, releases: float = 0.0
) -> bool:
    """True if the `rank`-th idle worker, kept for at most `horizon` more seconds, is expected
    to save more (a wait worth `break_even` seconds of its price, when an arrival takes it)
    than it costs idling until then, arrivals coming at `rate` per second and held workers
    being released at `releases` per second (each released one is handed out first)."""
    if rate <= 0 or horizon <= 0 or rank > MAX_RANK:
        return False
    if math.isinf(break_even):
        return True
    used, idling = use_odds(rate, releases, horizon, rank)
    return used > 0 and break_even * used >= idling


def use_odds(rate: float, releases: float, horizon: float, rank: int) -> tuple[float, float]:
    """(P(T <= horizon), E[min(T, horizon)]) for the time T until an arrival takes the idle
    worker `rank` deep in the stack hand-out takes from the top: an arrival (at `rate`) takes
    the top one, a release (at `releases`) puts one on top. Without releases T is the
    rank-th arrival's time.

    Uniformized: events come at q = rate + releases, N(t) of them by t (Poisson); s_n is the
    chance the worker is still idle after n events (a walk from `rank` down with chance
    rate/q, absorbed at 0). Then P(T <= H) = sum_n P(N(H) = n) (1 - s_n) and
    E[min(T, H)] = (1/q) sum_n s_n P(N(H) >= n + 1)."""
    events = rate + releases
    mean = events * horizon
    if mean <= 0.0:
        return 0.0, 0.0
    down = rate / events
    # Events beyond `steps` are too unlikely to matter (or, past MAX_STEPS, not looked at: the
    # chance of use then reads low, which keeps fewer); a worker deeper than the steps left
    # can no longer be taken and stays idle (`stuck`), so the walk never grows past them.
    steps = min(MAX_STEPS, math.ceil(mean + 12.0 * math.sqrt(mean) + 12.0))
    depths = [0.0] * (rank + 1)  # depths[d]: the chance it is d deep now (0: taken)
    depths[rank] = 1.0
    stuck = 0.0
    below = 0.0  # P(N(H) <= n)
    used = idling = 0.0
    for n in range(steps + 1):
        idle = sum(depths[1:]) + stuck  # s_n
        if idle == 0.0:  # taken by now, whatever number of events comes after
            used += max(0.0, 1.0 - below)
            break
        term = math.exp(n * math.log(mean) - mean - math.lgamma(n + 1))  # P(N(H) = n)
        below += term
        used += term * (1.0 - idle)
        idling += idle * max(0.0, 1.0 - below)
        if below >= 1.0 - TAIL:
            break
        left = steps - n - 1  # events still looked at after this one
        after = [0.0] * max(1, min(len(depths) + 1, left + 1))
        after[0] = depths[0]
        for depth in range(1, len(depths)):
            for moved, chance in ((depth - 1, down), (depth + 1, 1.0 - down)):
                if moved < len(after):
                    after[moved] += depths[depth] * chance
                else:
                    stuck += depths[depth] * chance
        depths = after
    return used, idling / events


@attrs.frozen
class LeaseLengths:
    """How long leases last and how many end in RELEASE (rather than expiring), as decayed
    sums: recent ones count most (time constant `memory`). Constant memory however many end."""

    total: float = 0.0  # decayed sum of the lengths, as of `at`
    weight: float = 0.0  # decayed count, as of `at`
    released: float = 0.0  # decayed count of those that ended in RELEASE, as of `at`
    at: float = 0.0
    memory: float = MEMORY

    def add(self, ended: float, seconds: float, *, released: bool = True) -> LeaseLengths:
        """With one more lease that lasted `seconds`, ended at `ended`, by RELEASE or not."""
        one = 1.0 if released else 0.0
        if self.weight == 0.0:
            return attrs.evolve(self, total=seconds, weight=1.0, released=one, at=ended)
        if ended >= self.at:
            decay = math.exp(-(ended - self.at) / self.memory)
            return attrs.evolve(
                self, total=self.total * decay + seconds, weight=self.weight * decay + 1.0,
                released=self.released * decay + one, at=ended,
            )  # fmt: skip
        decay = math.exp(-(self.at - ended) / self.memory)
        return attrs.evolve(
            self, total=self.total + seconds * decay, weight=self.weight + decay,
            released=self.released + one * decay,
        )  # fmt: skip

    def mean(self) -> float | None:
        """The typical length in seconds; None before any lease ended."""
        return self.total / self.weight if self.weight > 0 else None

    def per_release(self) -> float | None:
        """Seconds of holding a lease per RELEASE that ends one (the mean length over the share
        released): a held worker comes back at 1/this a second. None before any RELEASE."""
        return self.total / self.released if self.released > 0 else None


@attrs.frozen
class IdleRule:
    """What RELEASE and the reaper ask about an idle cloud worker nobody holds, at one time.

    `boot_seconds` holds the typical boot time of each type seen booting; others are taken to
    boot in `default_boot`. `held` counts the cloud workers held now by type and market: each
    is taken to be released at 1/`lease_seconds` a second (exponential lease lengths; the
    seconds of holding per RELEASE, `LeaseLengths.per_release`), and a released one is handed
    out before the idle ones (unknown: none counted)."""

    policy: IdlePolicy
    idle_timeout: float
    minimum: float = 0.0
    wait_cost_per_hour: float = 0.0
    history: ArrivalHistory = ArrivalHistory()
    boot_seconds: Mapping[str, float] = attrs.field(factory=dict)
    default_boot: float = DEFAULT_BOOT_SECONDS
    held: Mapping[tuple[str, str], int] = attrs.field(factory=dict)  # by (type, market)
    lease_seconds: float | None = None  # seconds of holding per RELEASE

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
            self.history.rate_ahead(now, horizon),
            break_even(price, boot, self.wait_cost_per_hour),
            horizon,
            rank,
            self.release_rate(worker),
        )

    def release_rate(self, worker: Worker) -> float:
        """Releases expected per second of held workers of the worker's type and market."""
        if not self.lease_seconds:
            return 0.0
        held = self.held.get((worker.instance_type, str(worker.market)), 0)
        return held / self.lease_seconds
