"""Config as a value and validation against the schema: unknown keys, AWS requirements."""

from __future__ import annotations

import attrs
import pytest

from broker.config_validate import Config, ConfigError


def test_config_is_frozen() -> None:
    """A Config is a value: attributes cannot be reassigned."""
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        Config().listen_port = 1  # type: ignore[misc]


def test_default_prices_are_not_shared_between_configs() -> None:
    """Each Config gets its own (empty) prices mapping."""
    assert Config().prices is not Config().prices


def test_security_group_ids_are_a_tuple_even_when_given_a_list() -> None:
    """The converter keeps the frozen Config free of lists, also through attrs.evolve."""
    assert attrs.evolve(Config(), security_group_ids=["sg-0123abcd"]).security_group_ids == (
        "sg-0123abcd",
    )


def test_unknown_key_without_a_close_match_points_at_the_reference() -> None:
    """Nothing similar: the message says where the list of keys is."""
    with pytest.raises(ConfigError) as caught:
        Config.from_dict({"frobnicate": 1})
    expected = "config: frobnicate: unknown key (compute-broker config-reference lists them)"
    assert str(caught.value) == expected


def test_validate_for_aws_requires_an_ami() -> None:
    """Without ami_id the broker cannot serve against AWS; the error says how to set it."""
    with pytest.raises(
        ConfigError, match=r"^config: ami_id: required to serve against AWS .*COMPUTE_BROKER_AMI_ID"
    ):
        Config().validate_for_aws()
    Config(ami_id="ami-0123456789abcdef0").validate_for_aws()
