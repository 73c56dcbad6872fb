"""When to ask EC2 again whether a launching worker is running: pure code, time passed in.

A worker is handed out the moment a DescribeInstances sees it running, so the delay between
EC2's `running` and the hand-out is the time to the next describe. Polling every
describe_interval wastes up to that interval on every cold start and spends most of its calls
long before anything can have booted. Instead the broker remembers the last SAMPLES boots of
each type (from the RunInstances answer to the middle of the span between the last check
that saw it pending and the first that saw it running) and spends describes where `running`
is likely:

- before the window, a check every GAP seconds only (a failed launch is noticed; with the
  events queue, EC2's `running` or `terminated` is acted on at once anyway);
- from the EARLY quantile of the remembered boots a check every 2 FAST, from the LIKELY
  quantile every FAST, up to the LATE quantile plus FAST plus the spread over the number
  remembered (how far past the latest seen the next boot tends to land): a boot in the dense
  part is seen FAST / 2 after `running` at the median;
- after the window, doubling gaps up to describe_interval: a boot a little later than the
  window is still seen soon, a straggler costs what polling costs.

Quantiles, not a mean: the window covers the spread actually seen, and one slow boot in twenty
does not stretch it. Where it opens and turns dense weighs recent boots more (a boot's weight
halves every RECENT boots after it): boot times drift, and the last few say most about the
next; where it ends does not, so one stuck boot cannot stretch it either. Polling spends
about center / describe_interval calls on a boot at the window's center, and a boot lands
mid-window on average, so the window holds at most twice that: a spread too wide for FAST
widens the gaps, not the calls. The price: a boot earlier than the window (about one in ten)
is seen at its first check.

The anchor is this broker's RunInstances answer, not EC2's LaunchTime: that is in whole
seconds, and its up to 1 s of truncation would pass for boot-time spread. A span wider than
SPAN (the one before the window's first check) is cut to SPAN before its middle is taken: a
boot seen at the window's first check most likely came shortly before it, and the full span's
middle would drag the window seconds early; the cut still lets a type that got faster be
learned, SPAN / 2 a launch.

Simulated (tests/test_boottimes.py: ten brokers, forty launches each): boots like EC2's
(normal, 16 s, sd 1.5 s) are seen 0.26 s after `running` at the median, 91 % within 1 s,
with 6.3 describes per launch against 8.5 for polling every 2 s; with an sd of 3 s, 0.34 s,
82 % and 7.8. The cold benchmark's boots (5-7 s, each later than all before, the hardest order
for a learned plan) come out near the seed's describes (see README, Benchmarks). One
DescribeInstances covers every launching worker, so concurrent launches share these calls.

Until a type has been seen booting, the hint (the sandbox's boot time) is planned for, or
without one it is described every UNSEEN describe_intervals (0.9 s with the shipped 2 s): the
first boot of a type costs about twice polling's calls, once per type and process, and is
seen within 0.9 s (with the events queue, at once).
"""

from __future__ import annotations

import bisect
import math
import statistics
from collections import deque
from typing import Final

import attrs

GAP: Final = 10.0  # seconds between checks long before the window
FAST: Final = 0.4  # seconds between checks where a boot is likely (median wait: FAST / 2)
EARLY: Final = 0.1  # the window opens at this quantile of the boots remembered ...
LIKELY: Final = 0.4  # ... is checked every 2 FAST up to this one, every FAST from it ...
LATE: Final = 0.9  # ... up to this one, plus FAST, plus the spread over the number remembered
UNSEEN: Final = 0.45  # a type never seen booting: a describe every this many describe_intervals
SPAN: Final = 2.0  # seconds: the widest span between pending and running a boot is placed in
SAMPLES: Final = 20  # boots remembered per type
RECENT: Final = 4.0  # a remembered boot's weight halves every this many boots after it


@attrs.frozen
class BootPlan:
    """What the describe schedule of one type plans for (seconds after launch)."""

    early: float  # the earliest likely boot
    likely: float  # from here on a boot is likely
    late: float  # the latest likely boot
    samples: int  # boots it was learned from

    def window(self, describe_interval: float) -> list[float]:
        """The planned checks from the window's opening to its end (after it: doubling gaps
        from the last two)."""
        start = max(FAST, self.early)
        likely = max(start, self.likely)
        if likely - start < FAST:
            likely = start  # too close for a sparse stretch: dense from the start
        end = self.late + FAST + (self.late - self.early) / self.samples
        # Polling spends about center / describe_interval calls on a boot at the center, and
        # a boot lands mid-window on average: the window holds at most twice that. A wider
        # spread widens the gaps, not the calls.
        most = max(2.0, (self.early + self.late) / describe_interval)
        scale = max(1.0, ((likely - start) / (2 * FAST) + (end - likely) / FAST) / most)
        fast = min(FAST * scale, describe_interval)
        sparse = min(2 * fast, describe_interval)
        # Evenly from start to likely, no gap above `sparse`; then every `fast` past `end`.
        steps = math.ceil((likely - start) / sparse - 1e-9)
        checks = [start + (likely - start) * k / steps for k in range(steps)]
        checks += [likely + fast * k for k in range(math.ceil((end - likely) / fast) + 1)]
        return checks


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

    def estimate(self, instance_type: str, pending: float, running: float) -> float:
        """The boot time to remember for an instance last seen pending `pending` seconds after
        launch and first seen running at `running`: the middle of that span, counted as SPAN
        at most once the type has a plan (the span before the window's first check is wide
        only because the schedule chose not to look; its middle would drag the window far
        earlier than the boots are)."""
        if self.plan(instance_type) is not None:
            pending = max(pending, running - SPAN)
        return (pending + running) / 2

    def plan(self, instance_type: str) -> BootPlan | None:
        """The boots to plan for: recency-weighted quantiles of those seen; the hint, or
        None, until one was."""
        seen = self._seen.get(instance_type)
        if not seen:
            return None if self.hint is None else BootPlan(self.hint, self.hint, self.hint, 1)
        # Where the window opens and turns dense: a boot's weight halves every RECENT boots
        # after it, since boot times drift (time of day, a new AMI, a busier zone) and the
        # last few say most about the next.
        last = len(seen) - 1
        weighted = sorted((boot, 0.5 ** ((last - age) / RECENT)) for age, boot in enumerate(seen))
        total = sum(weight for _, weight in weighted)

        def quantile(q: float) -> float:
            below = 0.0
            for boot, weight in weighted:
                below += weight
                if below >= q * total * (1 - 1e-9):
                    return boot
            return weighted[-1][0]

        ordered = sorted(seen)  # the latest likely boot: unweighted, a stuck one is ignored
        late = ordered[math.ceil(LATE * last)]
        return BootPlan(quantile(EARLY), quantile(LIKELY), max(late, quantile(LIKELY)), len(seen))

    def typical(self) -> dict[str, float]:
        """The median boot time of each type seen booting: the wait a ready worker saves."""
        return {kind: statistics.median(seen) for kind, seen in self._seen.items() if seen}


def next_check(elapsed: float, plan: BootPlan | None, describe_interval: float) -> float:
    """Seconds after launch of the next check of a worker launched `elapsed` seconds ago
    (strictly later than `elapsed`)."""
    if plan is None:
        gap = describe_interval * UNSEEN
        return (math.floor(elapsed / gap) + 1) * gap
    checks = plan.window(describe_interval)
    if elapsed < checks[0]:
        gap_check = (math.floor(elapsed / GAP) + 1) * GAP
        return gap_check if gap_check < checks[0] - FAST else checks[0]
    if elapsed < checks[-1]:
        return checks[bisect.bisect_right(checks, elapsed)]
    # After it: doubling gaps, then every describe_interval.
    check, step = checks[-1], checks[-1] - checks[-2] if len(checks) > 1 else FAST
    while check <= elapsed and step < describe_interval:
        step = min(2 * step, describe_interval)
        check += step
    if check <= elapsed:
        check += (math.floor((elapsed - check) / describe_interval) + 1) * describe_interval
    return check
