"""The price table: built-in prices, overrides, unknown types."""

from __future__ import annotations

import pytest

from broker.cloud import Market
from broker.prices import PriceTable


def test_built_in_table_has_both_markets_of_common_types() -> None:
    """c7i.8xlarge: $1.428/h on demand, $0.50/h spot."""
    table = PriceTable.default()
    assert table.price("c7i.8xlarge", "on-demand") == 1.428
    assert table.price("c7i.8xlarge", "spot") == 0.50
    assert table.price("t3.micro", "spot") == 0.0031


def test_built_in_spot_prices_are_below_on_demand() -> None:
    """Every built-in type is cheaper on spot."""
    table = PriceTable.default()
    types = {instance_type for instance_type, _ in table.rates}
    assert len(types) == 14
    for instance_type in types:
        spot = table.price(instance_type, "spot")
        on_demand = table.price(instance_type, "on-demand")
        assert spot is not None
        assert on_demand is not None
        assert spot < on_demand


def test_unknown_type_or_market_has_no_price() -> None:
    """A type the table does not hold answers None, not 0."""
    table = PriceTable.default()
    assert table.price("x9.huge", "spot") is None
    assert table.price("c7i.8xlarge", "reserved") is None


def test_market_enum_values_look_up_like_strings() -> None:
    """The engine passes Market members; they find the same prices as the strings."""
    table = PriceTable.default()
    assert table.price("c5.large", "spot") == table.price("c5.large", Market.SPOT)
    assert table.price("c5.large", "on-demand") == table.price("c5.large", Market.ON_DEMAND)


def test_overrides_replace_one_market_and_keep_the_other() -> None:
    """Overriding spot alone leaves on-demand at the built-in price."""
    table = PriceTable.default().with_overrides({"c7i.8xlarge": {"spot": 0.42}})
    assert table.price("c7i.8xlarge", "spot") == 0.42
    assert table.price("c7i.8xlarge", "on-demand") == 1.428


def test_overrides_add_types_the_table_did_not_know() -> None:
    """A new type gets exactly the markets given."""
    table = PriceTable.default().with_overrides({"x2.large": {"on-demand": 2}})
    assert table.price("x2.large", "on-demand") == 2.0
    assert table.price("x2.large", "spot") is None


def test_overrides_return_a_new_table() -> None:
    """PriceTable is a value: with_overrides leaves the original alone."""
    original = PriceTable.default()
    original.with_overrides({"c7i.8xlarge": {"spot": 9.0}})
    assert original.price("c7i.8xlarge", "spot") == 0.50


def test_override_with_an_unknown_market_is_refused() -> None:
    """A typo in a market name raises instead of being ignored."""
    with pytest.raises(ValueError, match="unknown market 'spto'"):
        PriceTable.default().with_overrides({"c7i.8xlarge": {"spto": 0.4}})


def test_empty_table_knows_nothing() -> None:
    """PriceTable() holds no prices."""
    assert PriceTable().price("c7i.8xlarge", "spot") is None
