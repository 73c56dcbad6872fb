"""Config value kinds: what each accepts, how it converts, and the one-line message when not."""

from __future__ import annotations

from typing import Any

import pytest

from broker.config_validate import Config, ConfigError
from broker.values import parse_duration

# --- values and their messages ----------------------------------------------------------------


def test_boolean_is_not_an_integer() -> None:
    """true is not 1 for an integer key."""
    with pytest.raises(
        ConfigError, match=r"^config: max_workers: must be an integer >= 1 \(got true\)$"
    ):
        Config.from_dict({"max_workers": True})


@pytest.mark.parametrize(
    ("key", "value", "problem"),
    [
        ("listen_port", 70000, "must be an integer 0..65535 (got 70000)"),
        ("worker_port", 0, "must be an integer 1..65535 (got 0)"),
        ("max_connections", 0, "must be an integer >= 1 (got 0)"),
        ("max_hourly_cost", 0, "must be a number > 0 (got 0)"),
        ("max_hourly_cost", "5", "must be a number > 0 (got '5')"),
        ("probe", "yes please", "must be true or false (got 'yes please')"),
        ("market", "spto", "must be one of spot, on-demand (got 'spto')"),
        ("log_level", "verbose", "must be one of debug, info, warning, error (got 'verbose')"),
        ("listen_host", "", "must be a non-empty string (got '')"),
        ("listen_host", None, "must be a non-empty string (got null)"),
        ("pool_name", "lab a", "must be 1-64 characters of A-Z a-z 0-9 _ . - (got 'lab a')"),
        ("ami_id", "ubuntu", "must look like ami-0123456789abcdef0 (got 'ubuntu')"),
        ("subnet_id", "sn-1", "must look like subnet-0123456789abcdef0 (got 'sn-1')"),
        ("region", "Europe", "must look like an AWS region (us-east-1) (got 'Europe')"),
        ("instance_type", "big", "must look like an EC2 instance type (c7i.8xlarge) (got 'big')"),
        ("security_group_ids", "sg-0123abcd", "must be a list of strings (got 'sg-0123abcd')"),
        ("idle_timeout", "soon", "must be a duration > 0 (got 'soon')"),
        ("reap_interval", "2m", "must be a duration > 0 and <= 60s (got '2m')"),
        ("shutdown_grace", -1, "must be a duration >= 0 (got -1)"),
    ],
)
def test_bad_value_names_the_key_and_what_is_wrong(key: str, value: Any, problem: str) -> None:
    """Each kind of value error is one line: `config: <key>: must ... (got <value>)`."""
    with pytest.raises(ConfigError) as caught:
        Config.from_dict({key: value})
    assert str(caught.value) == f"config: {key}: {problem}"


def test_instance_tags_are_taken_as_written() -> None:
    """instance_tags: string keys and values by EC2's rules, kept in order."""
    tags = {"project": "lab-a", "cost-center": "4711", "team/owner": "Ana Müller", "empty": ""}
    assert Config.from_dict({"instance_tags": tags}).instance_tags == tags


@pytest.mark.parametrize(
    ("tags", "problem"),
    [
        ({"aws:createdBy": "x"}, "instance_tags.aws:createdBy: the broker sets this tag itself"),
        ({"AWS:x": "x"}, "instance_tags.AWS:x: the broker sets this tag itself"),
        ({"compute-broker:pool": "x"}, "instance_tags.compute-broker:pool: the broker sets"),
        ({"Name": "mine"}, "instance_tags.Name: the broker sets this tag itself"),
        ({"k" * 129: "x"}, "instance_tags: must have keys of 1-128 characters"),
        ({"cost-center": 4711}, "instance_tags.cost-center: must be a string (quote numbers"),
        ({"p": "v" * 257}, "instance_tags.p: must be up to 256 letters"),
        ({"p": "a;b"}, "instance_tags.p: must be up to 256 letters"),
        ({"a!": "b"}, "instance_tags.a!: a tag key may hold letters, digits"),
        ({f"k{n}": "v" for n in range(46)}, "instance_tags: must have at most 45 tags"),
    ],
)
def test_instance_tags_refuse_what_ec2_or_the_broker_would(
    tags: dict[Any, Any], problem: str
) -> None:
    """A tag EC2 would refuse, or one of the broker's own, is a config error naming it."""
    with pytest.raises(ConfigError) as caught:
        Config.from_dict({"instance_tags": tags})
    assert str(caught.value).startswith(f"config: {problem}")


def test_bad_list_item_names_its_index() -> None:
    """An item of a list is located as key[index]."""
    with pytest.raises(ConfigError) as caught:
        Config.from_dict({"security_group_ids": ["sg-0123abcd", "default"]})
    assert str(caught.value) == (
        "config: security_group_ids[1]: must look like sg-0123456789abcdef0 (got 'default')"
    )


def test_price_for_an_unknown_market_suggests_the_closest() -> None:
    """prices.<type>.spto is a typo of spot."""
    with pytest.raises(ConfigError) as caught:
        Config.from_dict({"prices": {"c7i.8xlarge": {"spto": 0.4}}})
    expected = "config: prices.c7i.8xlarge.spto: unknown market (did you mean spot?)"
    assert str(caught.value) == expected


def test_price_for_something_that_is_not_an_instance_type_is_rejected() -> None:
    """The keys under prices must look like EC2 types."""
    with pytest.raises(ConfigError) as caught:
        Config.from_dict({"prices": {"c7i": {"spot": 0.4}}})
    assert str(caught.value) == "config: prices.c7i: not an EC2 instance type (like c7i.8xlarge)"


def test_price_entry_must_be_a_mapping_of_markets() -> None:
    """prices.<type> given as a bare number is rejected with the expected shape."""
    with pytest.raises(ConfigError, match=r"^config: prices\.c7i\.8xlarge: must be a mapping"):
        Config.from_dict({"prices": {"c7i.8xlarge": 0.4}})


def test_null_is_accepted_only_where_the_type_allows_it() -> None:
    """Optional keys take null; the others reject it."""
    config = Config.from_dict({"region": None, "max_hourly_cost": None, "key_name": None})
    assert config.region is None
    with pytest.raises(
        ConfigError, match=r"^config: idle_timeout: must be a duration > 0 \(got null\)$"
    ):
        Config.from_dict({"idle_timeout": None})


def test_long_or_multiline_values_stay_on_one_short_line() -> None:
    """The quoted value is repr'd and cut, so the message is always one line."""
    with pytest.raises(ConfigError) as caught:
        Config.from_dict({"pool_name": "line one\nline two " + "x" * 200})
    message = str(caught.value)
    assert len(message.splitlines()) == 1
    assert len(message) < 160


# --- durations --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("written", "seconds"),
    [(90, 90.0), (0.5, 0.5), ("90", 90.0), ("90s", 90.0), ("15m", 900.0), ("1h", 3600.0),
     ("1.5h", 5400.0), ("2d", 172800.0), (" 10 s ", 10.0)],
)  # fmt: skip
def test_duration_accepts_seconds_or_a_unit(written: Any, seconds: float) -> None:
    """Durations are numbers of seconds or strings with s, m, h, d; stored as float seconds."""
    assert Config.from_dict({"launch_timeout": written}).launch_timeout == seconds
    assert parse_duration(written) == seconds


@pytest.mark.parametrize(
    "written", ["soon", "5 minutes", "1w", "-5s", "15M", True, [5], 0, float("inf")]
)
def test_duration_rejects_anything_else(written: Any) -> None:
    """No other units, signs, booleans, lists, zero or infinity."""
    with pytest.raises(
        ConfigError, match=r"^config: launch_timeout: must be a duration > 0 \(got "
    ):
        Config.from_dict({"launch_timeout": written})


def test_zero_is_a_valid_duration_where_the_key_allows_it() -> None:
    """shutdown_grace and sandbox_boot_time may be 0; others may not."""
    config = Config.from_dict({"shutdown_grace": 0, "sandbox_boot_time": "0s"})
    assert config.shutdown_grace == 0.0
    assert config.sandbox_boot_time == 0.0


def test_reap_interval_may_be_exactly_sixty_seconds() -> None:
    """The upper bound is inclusive: 1m is allowed."""
    assert Config.from_dict({"reap_interval": "1m"}).reap_interval == 60.0
