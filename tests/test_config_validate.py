"""Config as a value and validation against the schema: unknown keys, AWS requirements."""

from __future__ import annotations

import attrs
import pytest

from broker.adaptive import IdlePolicy
from broker.config_validate import Config, ConfigError
from broker.wiring import engine_settings


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


def test_idle_policy_is_fixed_by_default_and_reaches_the_engine() -> None:
    """The default keeps the old broker; adaptive and its wait cost reach the engine's knobs."""
    assert engine_settings(Config()).idle_policy is IdlePolicy.FIXED
    config = Config.from_dict({"idle_policy": "adaptive", "wait_cost_per_hour": 20})
    settings = engine_settings(config)
    assert (settings.idle_policy, settings.wait_cost_per_hour) == (IdlePolicy.ADAPTIVE, 20.0)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"idle_policy": "smart"}, "config: idle_policy: must be one of fixed, linger, adaptive"),
        ({"wait_cost_per_hour": 0}, "config: wait_cost_per_hour: must be a number > 0"),
        ({"wait_cost_per_hour": "50$"}, "config: wait_cost_per_hour: must be a number > 0"),
    ],
)
def test_idle_policy_and_wait_cost_are_checked(data: dict[str, object], message: str) -> None:
    """An unknown policy or a wait cost that is not a positive number is refused by name."""
    with pytest.raises(ConfigError) as caught:
        Config.from_dict(data)
    assert str(caught.value).startswith(message)
