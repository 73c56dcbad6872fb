"""The config: schema defaults, validation messages, durations, env overrides, generated docs."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs
import pytest

from broker.config import FIELDS
from broker.config_docs import reference_markdown, sample_yaml
from broker.config_load import load_config
from broker.config_validate import Config, ConfigError
from broker.values import parse_duration

DOCS = Path(__file__).resolve().parent.parent / "docs"


def load_text(tmp_path: Path, text: str, environ: Mapping[str, str] | None = None) -> Config:
    path = tmp_path / "config.yaml"
    path.write_text(text, encoding="utf-8")
    return load_config(path, environ or {})


def error_of(tmp_path: Path, text: str, environ: Mapping[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as caught:
        load_text(tmp_path, text, environ)
    message = str(caught.value)
    assert len(message.splitlines()) == 1
    return message


def env_error(environ: Mapping[str, str]) -> str:
    with pytest.raises(ConfigError) as caught:
        load_config(None, environ)
    return str(caught.value)


# --- defaults and the schema ------------------------------------------------------------------


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


# --- reading files ----------------------------------------------------------------------------


def test_file_values_replace_defaults_and_the_rest_keep_theirs(tmp_path: Path) -> None:
    """Keys in the file are checked and converted; keys left out keep their defaults."""
    config = load_text(
        tmp_path,
        "listen_port: 9100\n"
        "idle_timeout: 15m\n"
        "security_group_ids: [sg-0123abcd, sg-89ef4567]\n"
        "prices:\n  c7i.8xlarge: {spot: 0.4}\n  x2.large: {on-demand: 1, spot: 0.3}\n"
        "max_hourly_cost: 20\n",
    )
    assert config.listen_port == 9100
    assert config.idle_timeout == 900.0
    assert config.security_group_ids == ("sg-0123abcd", "sg-89ef4567")
    assert dict(config.prices) == {
        "c7i.8xlarge": {"spot": 0.4},
        "x2.large": {"on-demand": 1.0, "spot": 0.3},
    }
    assert config.max_hourly_cost == 20.0
    assert isinstance(config.max_hourly_cost, float)
    assert config.listen_host == "0.0.0.0"


def test_empty_file_means_every_key_at_its_default(tmp_path: Path) -> None:
    """A file with nothing but comments loads to the defaults."""
    assert load_text(tmp_path, "# nothing here yet\n") == Config()


def test_missing_file_is_reported_with_its_path(tmp_path: Path) -> None:
    """A path that does not exist: `config: file not found: <path>`."""
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match=r"^config: file not found: .*nope\.yaml$"):
        load_config(missing, {})


def test_a_directory_cannot_be_read_as_a_config(tmp_path: Path) -> None:
    """Other OS errors name the path and the reason."""
    with pytest.raises(ConfigError, match=r"^config: cannot read "):
        load_config(tmp_path, {})


def test_file_that_is_not_utf8_is_rejected(tmp_path: Path) -> None:
    """Bytes that are not UTF-8 are a one-line error, not a traceback."""
    path = tmp_path / "config.yaml"
    path.write_bytes(b"pool_name: caf\xe9\n")
    with pytest.raises(ConfigError, match=r"^config: not valid UTF-8: "):
        load_config(path, {})


def test_invalid_yaml_is_one_line_with_its_position(tmp_path: Path) -> None:
    """A YAML syntax error: `config: not valid YAML: <problem> (line L, column C)`."""
    message = error_of(tmp_path, "listen_port: 9000\nprobe: [true\n")
    assert message.startswith("config: not valid YAML: ")
    assert "(line 3, column 1)" in message


def test_top_level_must_be_a_mapping(tmp_path: Path) -> None:
    """A list (or scalar) at the top level is rejected."""
    assert error_of(tmp_path, "- a\n- b\n") == "config: top level must be a mapping (got list)"


def test_unknown_key_names_the_key_and_suggests_the_closest(tmp_path: Path) -> None:
    """A misspelt key is an error with a did-you-mean."""
    assert (
        error_of(tmp_path, "listen_prot: 9000\n")
        == "config: listen_prot: unknown key (did you mean listen_port?)"
    )


def test_unknown_key_without_a_close_match_points_at_the_reference() -> None:
    """Nothing similar: the message says where the list of keys is."""
    with pytest.raises(ConfigError) as caught:
        Config.from_dict({"frobnicate": 1})
    expected = "config: frobnicate: unknown key (compute-broker config-reference lists them)"
    assert str(caught.value) == expected


def test_key_given_twice_is_rejected(tmp_path: Path) -> None:
    """YAML would silently keep the last one; the broker refuses the file."""
    message = error_of(tmp_path, "listen_port: 9000\nprobe: true\nlisten_port: 9001\n")
    assert message == "config: not valid YAML: duplicate key 'listen_port' (line 3, column 1)"


# --- validation messages ----------------------------------------------------------------------


def test_quoted_number_in_the_file_is_a_string_and_rejected(tmp_path: Path) -> None:
    """Types are strict: listen_port: "9000" is not an integer."""
    assert (
        error_of(tmp_path, 'listen_port: "9000"\n')
        == "config: listen_port: must be an integer 0..65535 (got '9000')"
    )


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


def test_bad_list_item_names_its_index() -> None:
    """An item of a list is located as key[index]."""
    with pytest.raises(ConfigError) as caught:
        Config.from_dict({"security_group_ids": ["sg-0123abcd", "default"]})
    assert str(caught.value) == (
        "config: security_group_ids[1]: must look like sg-0123456789abcdef0 (got 'default')"
    )


def test_price_error_names_the_nested_key_path(tmp_path: Path) -> None:
    """A bad price names prices.<type>.<market>."""
    assert (
        error_of(tmp_path, "prices:\n  c7i.8xlarge:\n    spot: -1\n")
        == "config: prices.c7i.8xlarge.spot: must be a number >= 0 (got -1)"
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


# --- environment overrides --------------------------------------------------------------------


def test_environment_values_are_read_as_yaml() -> None:
    """Numbers, booleans, flow lists and mappings come through typed."""
    config = load_config(
        None,
        {
            "COMPUTE_BROKER_LISTEN_PORT": "9001",
            "COMPUTE_BROKER_PROBE": "true",
            "COMPUTE_BROKER_SECURITY_GROUP_IDS": "[sg-0123abcd, sg-89ef4567]",
            "COMPUTE_BROKER_IDLE_TIMEOUT": "1h",
            "COMPUTE_BROKER_PRICES": "{c7i.8xlarge: {spot: 0.45}}",
            "PATH": "/usr/bin",
        },
    )
    assert config.listen_port == 9001
    assert config.probe is True
    assert config.security_group_ids == ("sg-0123abcd", "sg-89ef4567")
    assert config.idle_timeout == 3600.0
    assert dict(config.prices) == {"c7i.8xlarge": {"spot": 0.45}}


def test_environment_wins_over_the_file_and_replaces_whole_values(tmp_path: Path) -> None:
    """An override replaces the file's value, prices included (no merge)."""
    config = load_text(
        tmp_path,
        "listen_port: 9100\nmax_workers: 3\nprices: {c5.large: {spot: 0.02}}\n",
        {
            "COMPUTE_BROKER_LISTEN_PORT": "9200",
            "COMPUTE_BROKER_PRICES": "{t3.micro: {spot: 0.003}}",
        },
    )
    assert config.listen_port == 9200
    assert config.max_workers == 3
    assert dict(config.prices) == {"t3.micro": {"spot": 0.003}}


def test_environment_override_fixes_a_bad_file_value(tmp_path: Path) -> None:
    """Only the value in effect is checked: the override replaces the file's bad one."""
    config = load_text(tmp_path, "listen_port: '9000'\n", {"COMPUTE_BROKER_LISTEN_PORT": "9000"})
    assert config.listen_port == 9000


def test_bad_environment_value_names_the_variable() -> None:
    """The error names COMPUTE_BROKER_<KEY>, not the key."""
    message = env_error({"COMPUTE_BROKER_LISTEN_PORT": "ninety"})
    assert (
        message == "config: COMPUTE_BROKER_LISTEN_PORT: must be an integer 0..65535 (got 'ninety')"
    )


def test_bad_nested_environment_value_names_the_variable_and_the_path() -> None:
    """Inside a mapping override the path follows the variable."""
    message = env_error({"COMPUTE_BROKER_PRICES": "{c5.large: {spot: -1}}"})
    assert message == "config: COMPUTE_BROKER_PRICES.c5.large.spot: must be a number >= 0 (got -1)"


def test_environment_value_that_is_not_yaml_names_the_variable() -> None:
    """A broken flow list is a YAML error reported against the variable."""
    message = env_error({"COMPUTE_BROKER_SECURITY_GROUP_IDS": "[sg-0123abcd"})
    assert message.startswith("config: COMPUTE_BROKER_SECURITY_GROUP_IDS: not valid YAML: ")


def test_unknown_environment_variable_with_the_prefix_is_an_error() -> None:
    """COMPUTE_BROKER_LISTEN_PROT names no key: error with a did-you-mean."""
    assert env_error({"COMPUTE_BROKER_LISTEN_PROT": "9000"}) == (
        "config: COMPUTE_BROKER_LISTEN_PROT: no such config key "
        "(did you mean COMPUTE_BROKER_LISTEN_PORT?)"
    )


def test_environment_variable_must_spell_the_key_in_upper_case() -> None:
    """COMPUTE_BROKER_listen_port is not COMPUTE_BROKER_LISTEN_PORT."""
    message = env_error({"COMPUTE_BROKER_listen_port": "9000"})
    assert message.endswith("no such config key (did you mean COMPUTE_BROKER_LISTEN_PORT?)")


def test_text_key_takes_an_environment_value_as_written() -> None:
    """POOL_NAME=2024 is the string 2024 and KEY_NAME=yes is 'yes', not an int or a bool."""
    config = load_config(
        None, {"COMPUTE_BROKER_POOL_NAME": "2024", "COMPUTE_BROKER_KEY_NAME": "yes"}
    )
    assert config.pool_name == "2024"
    assert config.key_name == "yes"


def test_empty_environment_value_is_null() -> None:
    """COMPUTE_BROKER_REGION= unsets the region; an empty value for a required key is an error."""
    assert load_config(None, {"COMPUTE_BROKER_REGION": ""}).region is None
    assert (
        env_error({"COMPUTE_BROKER_MAX_WORKERS": ""})
        == "config: COMPUTE_BROKER_MAX_WORKERS: must be an integer >= 1 (got null)"
    )


def test_client_library_variables_are_ignored_by_the_broker() -> None:
    """COMPUTE_BROKER_HOST/_PORT/_CLIENT_ID configure clients; a broker beside them still starts."""
    environ = {
        "COMPUTE_BROKER_HOST": "broker.lab",
        "COMPUTE_BROKER_PORT": "9100",
        "COMPUTE_BROKER_CLIENT_ID": "bench-1",
    }
    assert load_config(None, environ) == Config()


def test_variables_without_the_exact_prefix_are_ignored() -> None:
    """COMPUTE_BROKERX and other variables do not affect the config."""
    assert load_config(None, {"COMPUTE_BROKERX": "1", "HOME": "/root"}) == Config()


# --- AWS requirements -------------------------------------------------------------------------


def test_validate_for_aws_requires_an_ami() -> None:
    """Without ami_id the broker cannot serve against AWS; the error says how to set it."""
    with pytest.raises(
        ConfigError, match=r"^config: ami_id: required to serve against AWS .*COMPUTE_BROKER_AMI_ID"
    ):
        Config().validate_for_aws()
    Config(ami_id="ami-0123456789abcdef0").validate_for_aws()


# --- generated documents ----------------------------------------------------------------------


def test_sample_yaml_loads_to_the_default_config(tmp_path: Path) -> None:
    """The commented sample, as generated, is a valid config equal to Config()."""
    assert load_text(tmp_path, sample_yaml()) == Config()


def test_sample_yaml_shows_each_key_with_its_description() -> None:
    """Every key appears once, under a comment that starts its description."""
    sample = sample_yaml()
    for field in FIELDS:
        assert sample.count(f"\n{field.name}: ") == 1
        assert f"# {field.description.split()[0]}" in sample


def test_reference_has_one_table_row_per_key_and_explains_overrides() -> None:
    """The Markdown table lists every key; the text covers durations and the environment."""
    reference = reference_markdown()
    assert "| key | type | default | description | example |" in reference
    for field in FIELDS:
        assert reference.count(f"\n| `{field.name}` |") == 1
    assert "## Durations" in reference
    assert "COMPUTE_BROKER_<KEY>" in reference


@pytest.mark.parametrize(
    ("name", "generate", "command"),
    [
        ("config.md", reference_markdown, "config-reference"),
        ("sample-config.yaml", sample_yaml, "sample-config"),
    ],
)
def test_generated_docs_are_up_to_date(name: str, generate: Any, command: str) -> None:
    """docs/ holds exactly what the schema generates (no drift)."""
    written = (DOCS / name).read_text(encoding="utf-8")
    assert written == generate(), (
        f"docs/{name} is out of date with broker/config.py; regenerate it with "
        f"`compute-broker {command} > docs/{name}`"
    )
