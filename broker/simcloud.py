"""The simulated cloud of the policy simulator (`broker.simulate`): the `Cloud` and `JobQueue`
ports in memory, on the engine's clock, with a boot-time model.

An instance is pending for a boot time drawn from `BootModel`, then running with an address in
10.0.0.0/8 that nothing ever connects to; it keeps its launch, running and termination times
and its price (the config's price table at launch), from which the simulator adds up dollars.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Mapping, Sequence
from typing import Final

import attrs
import trio

from broker.clock import Clock
from broker.cloud import Instance, LaunchSpec, Market
from broker.model import LAUNCH_TOKEN_TAG
from broker.prices import PriceTable
from broker.traces import QueueDepth

POOL_TAG: Final = "compute-broker:pool"


# --- the boot-time model -------------------------------------------------------------------


@attrs.frozen
class BootTime:
    """Seconds from RunInstances to a usable worker: lognormal with this median and p95
    (equal: always the median)."""

    median: float
    p95: float

    def sample(self, rng: random.Random) -> float:
        """One boot time."""
        if self.p95 <= self.median:
            return self.median
        sigma = math.log(self.p95 / self.median) / 1.6449  # the normal's 95th percentile
        return self.median * math.exp(rng.gauss(0.0, sigma))


@attrs.frozen
class BootModel:
    """Boot times per instance type (`default` for the others). EC2 reports a spot instance
    running with its IP in about 15-20 s, and 45 s is not rare: the default."""

    default: BootTime = BootTime(20.0, 45.0)
    by_type: Mapping[str, BootTime] = attrs.field(factory=dict)

    @classmethod
    def parse(cls, specs: Sequence[str]) -> BootModel:
        """From `MEDIAN[:P95]` (every type) and `TYPE=MEDIAN[:P95]` items; ValueError if bad."""
        default, by_type = cls().default, {}
        for spec in specs:
            instance_type, _, times = spec.rpartition("=")
            median, _, p95 = times.partition(":")
            try:
                boot = BootTime(float(median), float(p95 or median))
            except ValueError:
                raise ValueError(f"boot time {spec!r}: want [TYPE=]MEDIAN[:P95] seconds") from None
            if not (0 <= boot.median <= boot.p95 and math.isfinite(boot.p95)):
                raise ValueError(f"boot time {spec!r}: want 0 <= MEDIAN <= P95")
            if instance_type:
                by_type[instance_type] = boot
            else:
                default = boot
        return cls(default, by_type)

    def sample(self, instance_type: str, rng: random.Random) -> float:
        """One boot time of this type."""
        return self.by_type.get(instance_type, self.default).sample(rng)


# --- the simulated cloud -------------------------------------------------------------------


@attrs.define
class SimInstance:
    """One simulated instance and what it cost."""

    instance_id: str
    instance_type: str
    market: Market
    ip: str
    token: str
    launched_at: float
    running_at: float
    price: float | None  # $/hour, from the price table at launch
    terminated_at: float | None = None

    def state(self, now: float) -> str:
        """EC2's state name at `now`."""
        if self.terminated_at is not None:
            return "terminated"
        return "running" if now >= self.running_at else "pending"


class SimCloud:
    """Implements `broker.cloud.Cloud` in memory on the engine's clock; keeps every instance
    (ids `i-sim…`, addresses in 10.0.0.0/8 that nothing ever connects to)."""

    def __init__(
        self,
        clock: Clock,
        prices: PriceTable,
        *,
        boot: BootModel | None = None,
        pool_name: str = "default",
        seed: int = 0,
    ) -> None:
        self.clock = clock
        self.prices = prices
        self.boot = boot if boot is not None else BootModel()
        self.pool_name = pool_name
        self.rng = random.Random(seed)
        self.instances: dict[str, SimInstance] = {}
        self.alive: dict[str, SimInstance] = {}
        self.run_instances_calls = 0
        self._numbers = itertools.count(1)

    async def launch(
        self,
        spec: LaunchSpec,
        count: int,
        client_token: str,
        *,
        subnet: str | None = None,
        requested_by: str | None = None,
    ) -> list[Instance]:
        await trio.lowlevel.checkpoint()
        self.run_instances_calls += 1
        now = self.clock.now()
        made = []
        for _ in range(count):
            n = next(self._numbers)
            instance = SimInstance(
                instance_id=f"i-sim{n:013x}",
                instance_type=spec.instance_type,
                market=spec.market,
                ip=f"10.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}",
                token=client_token,
                launched_at=now,
                running_at=now + self.boot.sample(spec.instance_type, self.rng),
                price=self.prices.price(spec.instance_type, spec.market),
            )
            self.instances[instance.instance_id] = self.alive[instance.instance_id] = instance
            made.append(self._view(instance, now))
        return made

    async def describe(self, instance_ids: Sequence[str]) -> list[Instance]:
        await trio.lowlevel.checkpoint()
        now = self.clock.now()
        found = (self.instances.get(i) for i in instance_ids)
        return [self._view(instance, now) for instance in found if instance is not None]

    async def list_pool(self) -> list[Instance]:
        await trio.lowlevel.checkpoint()
        now = self.clock.now()
        return [self._view(instance, now) for instance in self.alive.values()]

    async def launched(self, tokens: Sequence[str]) -> dict[str, int]:
        await trio.lowlevel.checkpoint()
        wanted = set(tokens)
        counts: dict[str, int] = {}
        for instance in self.instances.values():
            if instance.token in wanted:
                counts[instance.token] = counts.get(instance.token, 0) + 1
        return counts

    async def terminate(self, instance_ids: Sequence[str]) -> None:
        await trio.lowlevel.checkpoint()
        now = self.clock.now()
        for instance_id in instance_ids:
            instance = self.alive.pop(instance_id, None)
            if instance is not None:
                instance.terminated_at = now

    def gone_before(self, instance_id: str, when: float) -> bool:
        """True if the instance was terminated before `when`."""
        ended = self.instances[instance_id].terminated_at
        return ended is not None and ended < when

    def _view(self, instance: SimInstance, now: float) -> Instance:
        state = instance.state(now)
        return Instance(
            instance_id=instance.instance_id,
            instance_type=instance.instance_type,
            market=instance.market,
            state=state,
            public_ip=instance.ip if state == "running" else None,
            launched_at=instance.launched_at,
            tags={POOL_TAG: self.pool_name, LAUNCH_TOKEN_TAG: instance.token},
        )


class SimQueue:
    """Implements `broker.cloud.JobQueue`: the trace's depth at the engine's clock."""

    def __init__(self, clock: Clock, depths: Sequence[QueueDepth]) -> None:
        self.clock = clock
        self.depths = depths

    async def depth(self) -> int:
        await trio.lowlevel.checkpoint()
        now = self.clock.now()
        current = 0
        for change in self.depths:
            if change.at > now:
                break
            current = change.depth
        return current
