"""The $/hour price table: built-in approximate prices, overridable from the config.

Prices are approximate us-east-1 Linux rates. Spot prices move; the built-in spot figures are
rough (about 30% of on-demand unless better known) and exist so `max_hourly_cost` works out of
the box. Put real figures under `prices` in the config.
"""

from __future__ import annotations

from collections.abc import Mapping

import attrs

MARKETS = ("spot", "on-demand")

# instance type: (on-demand, spot) in $/hour.
_BUILT_IN: dict[str, tuple[float, float]] = {
    "t3.micro": (0.0104, 0.0031),
    "t3.small": (0.0208, 0.0062),
    "t3.large": (0.0832, 0.025),
    "c5.large": (0.085, 0.026),
    "c5.xlarge": (0.17, 0.051),
    "c5.2xlarge": (0.34, 0.102),
    "c5.4xlarge": (0.68, 0.20),
    "c5.9xlarge": (1.53, 0.46),
    "m5.2xlarge": (0.384, 0.115),
    "r5.4xlarge": (1.008, 0.30),
    "c6i.8xlarge": (1.36, 0.45),
    "c7i.8xlarge": (1.428, 0.50),
    "c7i.16xlarge": (2.856, 1.00),
    "m7i.8xlarge": (1.6128, 0.55),
}


@attrs.frozen
class PriceTable:
    """$/hour by (instance type, market); a pair it does not hold has no known price."""

    rates: Mapping[tuple[str, str], float] = attrs.field(factory=dict)

    @classmethod
    def default(cls) -> PriceTable:
        """The built-in table."""
        rates: dict[tuple[str, str], float] = {}
        for instance_type, (on_demand, spot) in _BUILT_IN.items():
            rates[instance_type, "on-demand"] = on_demand
            rates[instance_type, "spot"] = spot
        return cls(rates)

    def with_overrides(self, overrides: Mapping[str, Mapping[str, float]]) -> PriceTable:
        """A copy with `{instance_type: {market: price}}` added or replaced.

        Either market may be given alone; the other keeps its current price (or stays unknown).
        """
        rates = dict(self.rates)
        for instance_type, by_market in overrides.items():
            for market, price in by_market.items():
                if market not in MARKETS:
                    raise ValueError(f"unknown market {market!r} for {instance_type}")
                rates[instance_type, market] = float(price)
        return PriceTable(rates)

    def price(self, instance_type: str, market: str) -> float | None:
        """$/hour of one instance of this type in this market; None when unknown."""
        return self.rates.get((instance_type, str(market)))
