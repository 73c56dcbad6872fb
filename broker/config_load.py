"""Loading: a YAML file and `COMPUTE_BROKER_<KEY>` environment overrides, validated into a Config.

The file is read as UTF-8 and parsed by YAML's safe loader, made strict about keys given twice;
an environment variable's value is read as YAML too, except that a text key takes a value YAML
would read as something else as written. Every problem is one `ConfigError` line naming the
file, the key path or the variable. Validation itself is `broker/config_validate.py`.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping
from typing import Any

import yaml

from broker.config import ENV_PREFIX, FIELDS_BY_NAME, env_variable
from broker.config_kinds import Invalid
from broker.config_validate import Config, ConfigError, build, reject_unknown_keys

# The client libraries' variables share the prefix; the broker ignores them rather than refuse
# to start on a machine that also runs a client.
# Read by the clients (and the agent), or by the broker outside the config: never config keys.
CLIENT_VARIABLES = frozenset(
    {
        "COMPUTE_BROKER_HOST",
        "COMPUTE_BROKER_PORT",
        "COMPUTE_BROKER_CLIENT_ID",
        "COMPUTE_BROKER_TOKEN",
        "COMPUTE_BROKER_ACCESS_TOKEN",
    }
)


def load_config(path: str | os.PathLike[str] | None, environ: Mapping[str, str]) -> Config:
    """Read a YAML config file (None: defaults only), apply environment overrides, validate."""
    data = {} if path is None else _read_file(path)
    reject_unknown_keys(data)
    given: dict[str, tuple[Any, str]] = {name: (value, name) for name, value in data.items()}
    given.update(_environment_overrides(environ))
    return build(given)


def _read_file(path: str | os.PathLike[str]) -> dict[Any, Any]:
    shown = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as file:
            text = file.read()
    except FileNotFoundError:
        raise ConfigError(f"file not found: {shown}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"not valid UTF-8: {shown}") from None
    except OSError as exc:
        raise ConfigError(f"cannot read {shown}: {exc.strerror or exc}") from None
    try:
        data = _parse_yaml(text)
    except Invalid as exc:
        raise ConfigError(exc.problem) from None
    if data is None:  # an empty file (or one with only comments): all defaults
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"top level must be a mapping (got {type(data).__name__})")
    return data


def _environment_overrides(environ: Mapping[str, str]) -> dict[str, tuple[Any, str]]:
    overrides: dict[str, tuple[Any, str]] = {}
    for variable in sorted(environ):
        if not variable.startswith(ENV_PREFIX) or variable in CLIENT_VARIABLES:
            continue
        name = variable.removeprefix(ENV_PREFIX).lower()
        if name not in FIELDS_BY_NAME or variable != env_variable(name):
            close = difflib.get_close_matches(name, list(FIELDS_BY_NAME), n=1)
            hint = f" (did you mean {env_variable(close[0])}?)" if close else ""
            raise ConfigError(f"{variable}: no such config key{hint}")
        overrides[name] = (_environment_value(variable, environ[variable]), variable)
    return overrides


def _environment_value(variable: str, raw: str) -> Any:
    """An environment value read as YAML; a text key takes it as written unless it is text."""
    text = FIELDS_BY_NAME[variable.removeprefix(ENV_PREFIX).lower()].kind.text
    try:
        value = _parse_yaml(raw)
    except Invalid as exc:
        if text:
            return raw.strip()
        raise ConfigError(f"{variable}: {exc.problem}") from None
    if text and not (value is None or isinstance(value, str)):
        return raw.strip()
    return value


class _StrictLoader(yaml.SafeLoader):
    """YAML's safe loader, except that a key given twice in one mapping is an error."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        try:
            duplicate = key in seen
        except TypeError:  # an unhashable key: construct_mapping reports it
            continue
        if duplicate:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node, deep=True)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _parse_yaml(text: str) -> Any:
    try:
        return yaml.load(text, Loader=_StrictLoader)  # a SafeLoader subclass
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = exc.problem or str(exc).splitlines()[0]
        raise Invalid(f"not valid YAML: {problem}{where}") from None
    except yaml.YAMLError as exc:
        first_line = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise Invalid(f"not valid YAML: {first_line}") from None
