"""Small value helpers shared by the config schema and the pure policy modules that validate
their own sections (warm_pool, burst_policy): durations and how errors quote values."""

from __future__ import annotations

import math
import re
from typing import Any, Final

SHOWN_CHARS: Final = 60  # how much of a bad value an error message quotes
_DURATION: Final = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*([smhd]?)")
_UNIT_SECONDS: Final = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(value: Any) -> float | None:
    """Seconds from a number or a string like `90`, `90s`, `15m`, `1.5h`, `2d`; None if neither."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, str):
        match = _DURATION.fullmatch(value.strip())
        if match:
            return float(match[1]) * _UNIT_SECONDS[match[2]]
    return None


def show(value: Any) -> str:
    """A value as an error message quotes it: YAML-ish, one line, short."""
    if value is None:
        shown = "null"
    elif isinstance(value, bool):
        shown = "true" if value else "false"
    else:
        shown = repr(value)
    return shown if len(shown) <= SHOWN_CHARS else shown[: SHOWN_CHARS - 3] + "..."
