"""Loading the config: the YAML file, its errors, and COMPUTE_BROKER_<KEY> overrides."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import pytest

from broker.config_load import load_config
from broker.config_validate import Config, ConfigError


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


def test_key_given_twice_is_rejected(tmp_path: Path) -> None:
    """YAML would silently keep the last one; the broker refuses the file."""
    message = error_of(tmp_path, "listen_port: 9000\nprobe: true\nlisten_port: 9001\n")
    assert message == "config: not valid YAML: duplicate key 'listen_port' (line 3, column 1)"


def test_quoted_number_in_the_file_is_a_string_and_rejected(tmp_path: Path) -> None:
    """Types are strict: listen_port: "9000" is not an integer."""
    assert (
        error_of(tmp_path, 'listen_port: "9000"\n')
        == "config: listen_port: must be an integer 0..65535 (got '9000')"
    )


def test_price_error_names_the_nested_key_path(tmp_path: Path) -> None:
    """A bad price names prices.<type>.<market>."""
    assert (
        error_of(tmp_path, "prices:\n  c7i.8xlarge:\n    spot: -1\n")
        == "config: prices.c7i.8xlarge.spot: must be a number >= 0 (got -1)"
    )


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
