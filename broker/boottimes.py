"""When to ask EC2 again whether a launching worker is running: pure code, time passed in.

A worker is handed out the moment a DescribeInstances sees it running, so the delay between
EC2's `running` and the hand-out is the time to the next describe. Polling every
describe_interval wastes up to that interval on every cold start. Instead the broker learns
how long instances of each type take to boot and describes them on a schedule that tightens
as the expected boot time nears:

- while the expected time is far off, a check every `GAP` seconds (a failure is noticed);
- from just before the expected time, a check every `FAST` seconds for a short window;
- after it, checks at doubling gaps (FAST, 2 FAST, 4 FAST, ...) up to describe_interval, so
  a boot a little later than planned is still seen soon after it.

Until a type has been seen booting, the hint (the sandbox's boot time) is planned for, or
without one it is described every describe_interval, as before. The calls per launch stay
about what polling every 2 s costs, and one DescribeInstances covers every launching worker,
so concurrent launches share them.
"""

from __future__ import annotations

import statistics
from collections import deque
from typing import Final

import attrs

GAP: Final = 5.0  # seconds between checks while the expected boot time is far off
LEAD: Final = 0.25  # the fast checks start this long before the expected boot time
FAST: Final = 0.5  # seconds between the fast checks (the wait after running: FAST / 2 median)
WINDOW: Final = 1.0  # the fast checks go on this long (from LEAD before the expected time)
SAMPLES: Final = 20  # boots remembered per type
QUANTILE: Final = 0.25  # the expected boot time: this quantile of the remembered ones


@attrs.define
class BootTimes:
    """How long instances of each type took from launch until EC2 said running."""

    hint: float | None = None  # the boot time to plan for before any was seen
    _seen: dict[str, deque[float]] = attrs.field(factory=dict, alias="_seen")

    def observe(self, instance_type: str, seconds: float) -> None:
        """An instance of `instance_type` took about `seconds` from launch to running (the
        middle of the span between the last check that saw it pending and the first that saw
        it running)."""
        if seconds >= 0:
            self._seen.setdefault(instance_type, deque(maxlen=SAMPLES)).append(seconds)

    def expected(self, instance_type: str) -> float | None:
        """The boot time to plan for (a low quantile of those seen: a fast check or two too
        many costs less than a late hand-out); the hint, or None, until one was seen."""
        seen = self._seen.get(instance_type)
        if not seen:
            return self.hint
        ordered = sorted(seen)
        return ordered[int(QUANTILE * (len(ordered) - 1))]

    def typical(self) -> dict[str, float]:
        """The median boot time of each type seen booting: the wait a ready worker saves."""
        return {kind: statistics.median(seen) for kind, seen in self._seen.items() if seen}


def next_check(elapsed: float, expected: float | None, describe_interval: float) -> float:
    """Seconds after launch of the next check of a worker launched `elapsed` seconds ago
    (strictly later than `elapsed`)."""
    if expected is None:
        return (int(elapsed / describe_interval) + 1) * describe_interval
    start = max(FAST, expected - LEAD)
    end = start + WINDOW
    if elapsed < start:
        gap_check = (int(elapsed / GAP) + 1) * GAP
        return min(gap_check, start)
    if elapsed < end:
        return start + (int((elapsed - start) / FAST) + 1) * FAST
    # After the window: end + FAST, + 2 FAST, + 4 FAST, ... then every describe_interval.
    check, gap = end, FAST
    while check <= elapsed:
        check += gap
        gap = min(gap * 2, describe_interval)
    return check
