"""Capacity fallback, as plain code: which offerings a launch tries, in which order, and which
recently failed offerings it skips.

An offering is one (instance type, market, subnet). A spec lists the acceptable types and
markets (`LaunchSpec.types`, `.markets`); the config lists the subnets. A launch tries every
spot offering (types in order, each in every subnet) before any on-demand one. When EC2 answers
a capacity error for an offering, it is remembered as failed for `FAILED_OFFERING_SECONDS`, so
the next requests go straight to the next offering. Times are passed in.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

import attrs

from broker.cloud import LaunchSpec, Market

FAILED_OFFERING_SECONDS: Final = 300.0  # how long a capacity failure keeps an offering skipped


@attrs.frozen
class Offering:
    """One place and way to buy a worker."""

    instance_type: str
    market: Market
    subnet: str | None

    @property
    def spec(self) -> LaunchSpec:
        """The plain spec the cloud port launches."""
        return LaunchSpec(self.instance_type, self.market)

    def describe(self) -> str:
        """`c7i.8xlarge spot in subnet-0abc` (for logs, STATUS and errors)."""
        where = f" in {self.subnet}" if self.subnet else ""
        return f"{self.instance_type} {self.market}{where}"


@attrs.frozen
class FailedOffering:
    """An offering EC2 had no capacity for, skipped until `until`."""

    offering: Offering
    code: str
    failed_at: float
    until: float


def offerings(spec: LaunchSpec, subnets: Sequence[str | None]) -> list[Offering]:
    """Every offering the spec accepts, in the order a launch tries them."""
    places = list(subnets) or [None]
    return [
        Offering(instance_type, market, subnet)
        for market in spec.markets
        for instance_type in spec.types
        for subnet in places
    ]


@attrs.define
class OfferingMemory:
    """Offerings that failed for lack of capacity recently."""

    hold_for: float = FAILED_OFFERING_SECONDS
    _failed: dict[Offering, FailedOffering] = attrs.field(factory=dict, init=False)

    def fail(self, offering: Offering, code: str, now: float) -> None:
        """EC2 answered `code` (a capacity error) for this offering."""
        self._failed[offering] = FailedOffering(offering, code, now, now + self.hold_for)

    def succeeded(self, offering: Offering) -> None:
        """A launch of this offering worked: forget its failure."""
        self._failed.pop(offering, None)

    def available(self, candidates: Sequence[Offering], now: float) -> list[Offering]:
        """The candidates not failed recently, in order."""
        self._forget(now)
        return [offering for offering in candidates if offering not in self._failed]

    def failed(self, now: float) -> list[FailedOffering]:
        """The offerings skipped now, oldest failure first."""
        self._forget(now)
        return sorted(self._failed.values(), key=lambda f: f.failed_at)

    def _forget(self, now: float) -> None:
        for offering in [o for o, f in self._failed.items() if f.until <= now]:
            del self._failed[offering]
