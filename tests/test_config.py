"""The config schema: one field per key, Config mirrors it, every default and example valid."""

from __future__ import annotations

from typing import Any

import attrs
import pytest

from broker.config import FIELDS
from broker.config_load import load_config
from broker.config_validate import Config
from broker.wiring import ec2_settings, engine_settings


def test_defaults_without_a_file_are_the_documented_ones() -> None:
    """No file and no environment: every key at the default the brief lists."""
    config = load_config(None, {})
    assert config == Config()
    assert config.listen_host == "0.0.0.0"
    assert config.listen_port == 9000
    assert config.pool_name == "default"
    assert config.region is None
    assert config.ami_id is None
    assert config.instance_type == "c7i.8xlarge"
    assert config.market == "spot"
    assert config.security_group_ids == ()
    assert config.worker_port == 2560
    assert config.probe is False
    assert config.probe_timeout == 2.0
    assert config.idle_timeout == 900.0
    assert config.reap_interval == 60.0
    assert config.launch_timeout == 300.0
    assert config.describe_interval == 2.0
    assert config.max_workers == 10
    assert config.max_hourly_cost is None
    assert config.prices == {}
    assert config.client_timeout == 30.0
    assert config.max_connections == 1024
    assert config.shutdown_grace == 10.0
    assert config.aws_max_concurrency == 8
    assert config.log_format == "auto"
    assert config.log_level == "info"
    assert config.sandbox_boot_time == 3.0


def test_schema_and_config_attributes_name_the_same_keys_in_order() -> None:
    """Config has exactly one attribute per schema field, in the schema's order."""
    assert [a.name for a in attrs.fields(Config)] == [field.name for field in FIELDS]


@pytest.mark.parametrize("field", FIELDS, ids=lambda field: field.name)
def test_every_example_in_the_schema_is_valid(field: Any) -> None:
    """The documented example of each key passes that key's validation."""
    config = Config.from_dict({field.name: field.example})
    assert getattr(config, field.name) == field.kind.check(field.example)


def test_instance_tags_and_lease_history_reach_the_ec2_adapter_and_the_engine() -> None:
    """instance_tags go to the EC2 settings in order; lease_history_days to the engine (none
    and 90 by default)."""
    assert (Config().instance_tags, Config().lease_history_days) == ({}, 90)
    config = Config.from_dict(
        {"instance_tags": {"project": "lab-a", "cost-center": "4711"}, "lease_history_days": 0}
    )
    assert ec2_settings(config).tags == (("project", "lab-a"), ("cost-center", "4711"))
    assert engine_settings(config).lease_history_days == 0
