"""The kinds of config values: each a docs label and a check that validates and converts.

A `Kind` is what the schema (`broker/config.py`) says a key's type is. Its check takes a value as
parsed from YAML and returns the converted value (durations as float seconds, lists as tuples,
`local_workers` as `LocalWorker`s) or raises `Invalid` with the problem and where below the
value it lies; validation (`broker/config_validate.py`) prefixes the key. Nothing here knows the
keys.
"""

from __future__ import annotations

import difflib
import ipaddress
import math
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import attrs

from broker.burst import BURST_POLICY_LABEL, BurstPolicy, BurstPolicyError
from broker.model import LocalWorker
from broker.schedule import WARM_POOL_LABEL, ScheduleError, WarmPoolSchedule, warm_pool_kind_check
from broker.values import parse_duration
from broker.values import show as _show

INSTANCE_TYPE = re.compile(r"[a-z][a-z0-9-]*\.[a-z0-9-]+")  # as in broker/protocol.py
MARKETS = ("spot", "on-demand")


class Invalid(Exception):
    """A value failed its check; `path` locates the bad part below the value checked."""

    def __init__(self, problem: str, path: tuple[str | int, ...] = ()) -> None:
        super().__init__(problem)
        self.problem = problem
        self.path = path

    def below(self, step: str | int) -> Invalid:
        """The same problem, one level further from the root."""
        return Invalid(self.problem, (step, *self.path))


@attrs.frozen
class Kind:
    """A key's type: its label in the docs and the check that validates and converts a value.

    `text` marks kinds whose values are text, so an environment value is taken as written when
    YAML would read it as something else (`COMPUTE_BROKER_POOL_NAME=2024`).
    """

    label: str
    check: Callable[[Any], Any]
    text: bool = False


def _must(rule: str, value: Any) -> Invalid:
    """`must <rule> (got <value>)`, the value shown short and on one line."""
    return Invalid(f"must {rule} (got {_show(value)})")


def text(pattern: str | None = None, rule: str = "") -> Kind:
    """A non-empty string, matching `pattern` in full if given (`rule` says how, for messages)."""
    compiled = re.compile(pattern) if pattern else None

    def check(value: Any) -> str:
        if not isinstance(value, str) or not value:
            raise _must(rule or "be a non-empty string", value)
        if compiled is not None and not compiled.fullmatch(value):
            raise _must(rule, value)
        return value

    return Kind("string", check, text=True)


def choice(*options: str) -> Kind:
    """One of `options`, as written."""

    def check(value: Any) -> str:
        if value not in options or not isinstance(value, str):
            raise _must(f"be one of {', '.join(options)}", value)
        return value

    return Kind(" | ".join(options), check, text=True)


def integer(low: int, high: int | None = None) -> Kind:
    """An integer from `low` up to `high` (inclusive; None: no upper bound); not a boolean."""
    rule = f"be an integer {low}..{high}" if high is not None else f"be an integer >= {low}"

    def check(value: Any) -> int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise _must(rule, value)
        if value < low or (high is not None and value > high):
            raise _must(rule, value)
        return value

    return Kind("integer", check)


def number(low: float, *, inclusive: bool) -> Kind:
    """A finite number above `low` (or equal to it when `inclusive`), as a float."""
    rule = f"be a number {'>=' if inclusive else '>'} {low:g}"

    def check(value: Any) -> float:
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise _must(rule, value)
        number = float(value)
        if not math.isfinite(number) or number < low or (number == low and not inclusive):
            raise _must(rule, value)
        return number

    return Kind("number", check)


def boolean() -> Kind:
    """true or false (no 0, 1, yes or no)."""

    def check(value: Any) -> bool:
        if not isinstance(value, bool):
            raise _must("be true or false", value)
        return value

    return Kind("boolean", check)


def duration(
    *, allow_zero: bool = False, maximum: float | None = None, minimum: float | None = None
) -> Kind:
    """Seconds or a string with a unit (`broker.values.parse_duration`), as float seconds."""
    rule = f"be a duration {'>=' if allow_zero else '>'} 0"
    if minimum is not None:
        rule = f"be a duration >= {minimum:g}s"
    if maximum is not None:
        rule += f" and <= {maximum:g}s"

    def check(value: Any) -> float:
        seconds = parse_duration(value)
        if seconds is None or not math.isfinite(seconds):
            raise _must(rule, value)
        if seconds < 0 or (seconds == 0 and not allow_zero):
            raise _must(rule, value)
        if maximum is not None and seconds > maximum:
            raise _must(rule, value)
        if minimum is not None and seconds < minimum:
            raise _must(rule, value)
        return seconds

    return Kind("duration", check)


def optional(kind: Kind) -> Kind:
    """`kind`, or null."""

    def check(value: Any) -> Any:
        return None if value is None else kind.check(value)

    return Kind(f"{kind.label} or null", check, text=kind.text)


def list_of(kind: Kind) -> Kind:
    """A list whose items are each `kind`, as a tuple; a bad item is located by its index."""

    def check(value: Any) -> tuple[Any, ...]:
        if not isinstance(value, list | tuple):
            raise _must(f"be a list of {kind.label}s", value)
        items = []
        for index, item in enumerate(value):
            try:
                items.append(kind.check(item))
            except Invalid as exc:
                raise exc.below(index) from None
        return tuple(items)

    return Kind(f"list of {kind.label}s", check)


def mapping_of(key: Kind, value: Kind) -> Kind:
    """A mapping whose keys are each `key` and values each `value`, as a dict."""

    def check(data: Any) -> dict[Any, Any]:
        if not isinstance(data, dict):
            raise _must(f"be a mapping of {key.label} to {value.label}", data)
        checked = {}
        for item_key, item_value in data.items():
            try:
                checked[key.check(item_key)] = value.check(item_value)
            except Invalid as exc:
                raise exc.below(str(item_key)) from None
        return checked

    return Kind(f"mapping of {key.label} to {value.label}", check)


def local_worker() -> Kind:
    """A mapping with exactly `name` and `ip`, as a `LocalWorker`."""
    name_kind = text(r"[A-Za-z0-9_.-]{1,64}", "1-64 of A-Z a-z 0-9 _ . -")

    def check(value: Any) -> LocalWorker:
        if not isinstance(value, Mapping):
            raise _must("be a mapping with name and ip", value)
        unknown = sorted(str(key) for key in value if key not in ("name", "ip"))
        if unknown:
            raise Invalid("unknown key (a local worker has name and ip)", (unknown[0],))
        for key in ("name", "ip"):
            if key not in value:
                raise Invalid("is required", (key,))
        try:
            name = name_kind.check(value["name"])
        except Invalid as exc:
            raise exc.below("name") from None
        try:
            ip = str(ipaddress.ip_address(str(value["ip"])))
        except ValueError:
            raise Invalid(f"must be an IP address (got {_show(value['ip'])})", ("ip",)) from None
        return LocalWorker(name, ip)

    return Kind("local worker (name, ip)", check)


def price_table() -> Kind:
    """Instance type to {spot: $, on-demand: $}, either market alone; unknown markets rejected."""
    price = number(0, inclusive=True)

    def check(value: Any) -> dict[str, dict[str, float]]:
        if not isinstance(value, Mapping):
            raise _must("be a mapping of instance type to {spot: $, on-demand: $}", value)
        table: dict[str, dict[str, float]] = {}
        for instance_type, by_market in value.items():
            if not isinstance(instance_type, str) or not INSTANCE_TYPE.fullmatch(instance_type):
                raise Invalid("not an EC2 instance type (like c7i.8xlarge)", (str(instance_type),))
            if not isinstance(by_market, Mapping):
                raise _must("be a mapping like {spot: 0.5, on-demand: 1.4}", by_market).below(
                    instance_type
                )
            table[instance_type] = {}
            for market, amount in by_market.items():
                if market not in MARKETS:
                    problem = f"unknown market{suggestion(str(market), MARKETS)}"
                    raise Invalid(problem, (instance_type, str(market)))
                try:
                    table[instance_type][market] = price.check(amount)
                except Invalid as exc:
                    raise exc.below(market).below(instance_type) from None
        return table

    return Kind("mapping of instance type to {spot, on-demand}", check)


def burst_policy() -> Kind:
    """The `burst_policy` mapping, checked by `BurstPolicy.from_dict`."""

    def check(value: Any) -> BurstPolicy:
        try:
            return BurstPolicy.from_dict(value)
        except BurstPolicyError as exc:
            raise Invalid(exc.problem, exc.path) from None

    return Kind(BURST_POLICY_LABEL, check)


def warm_pool() -> Kind:
    """The `warm_pool` mapping, checked by `broker.schedule`."""

    def check(value: Any) -> WarmPoolSchedule:
        try:
            return warm_pool_kind_check(value)
        except ScheduleError as exc:
            raise Invalid(exc.problem, exc.path) from None

    return Kind(WARM_POOL_LABEL, check)


def timezone() -> Kind:
    """An IANA time zone name that this machine's zone database knows."""

    def check(value: Any) -> str:
        if not isinstance(value, str):
            raise _must("be an IANA time zone name (Europe/Berlin)", value)
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError, OSError):
            raise _must("be an IANA time zone name (Europe/Berlin)", value) from None
        return value

    return Kind("time zone", check, text=True)


# EC2 tag rules (docs: "Tag your Amazon EC2 resources"): keys 1-128 and values 0-256 of letters,
# digits, spaces and _ . : / = + - @; `aws:` is AWS's own. The broker's own tags (its `Name` and
# the `compute-broker:` ones, broker/ec2.py) cannot be set from the config, and a resource holds
# at most 50 tags, 5 of them the broker's.
TAG_CHARACTERS = re.compile(r"[\w .:/=+\-@]*")
TAG_KEY_MAX, TAG_VALUE_MAX = 128, 256
RESERVED_TAG_PREFIXES = ("aws:", "compute-broker:")
RESERVED_TAG_KEYS = frozenset({"Name"})
MAX_CONFIG_TAGS = 45


def instance_tags() -> Kind:
    """Tag key to tag value, both strings, by EC2's rules; the broker's own keys refused."""

    def check(value: Any) -> dict[str, str]:
        if not isinstance(value, Mapping):
            raise _must("be a mapping of tag key to tag value", value)
        if len(value) > MAX_CONFIG_TAGS:
            raise _must(f"have at most {MAX_CONFIG_TAGS} tags", f"{len(value)} tags")
        tags: dict[str, str] = {}
        for key, tag in value.items():
            if not isinstance(key, str) or not 0 < len(key) <= TAG_KEY_MAX:
                raise _must(f"have keys of 1-{TAG_KEY_MAX} characters", key)
            if not TAG_CHARACTERS.fullmatch(key):
                problem = "a tag key may hold letters, digits, spaces and _ . : / = + - @"
                raise Invalid(problem, (key,))
            if key.lower().startswith(RESERVED_TAG_PREFIXES) or key in RESERVED_TAG_KEYS:
                raise Invalid("the broker sets this tag itself (or AWS does)", (key,))
            if not isinstance(tag, str):
                raise _must('be a string (quote numbers: "4711")', tag).below(key)
            if len(tag) > TAG_VALUE_MAX or not TAG_CHARACTERS.fullmatch(tag):
                rule = f"be up to {TAG_VALUE_MAX} letters, digits, spaces and _ . : / = + - @"
                raise _must(rule, tag).below(key)
            tags[key] = tag
        return tags

    return Kind("mapping of tag key to tag value", check)


def suggestion(name: str, known: Iterable[str], fallback: str = "") -> str:
    """` (did you mean X?)` for the closest of `known`, else ` (fallback)`, else nothing."""
    close = difflib.get_close_matches(name, list(known), n=1)
    if close:
        return f" (did you mean {close[0]}?)"
    return f" ({fallback})" if fallback else ""
