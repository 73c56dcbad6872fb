"""The one clock seam: Unix time derived from Trio's clock.

Nothing else in the package reads the wall clock. Because `Clock.now()` follows
`trio.current_time()`, a test running under `trio.testing.MockClock` moves the broker's notion
of time (idle clocks, lease ages, reaping) by moving the mock clock.
"""

from __future__ import annotations

import time

import trio


class Clock:
    """Unix seconds, advancing with Trio's clock. Create it inside `trio.run`."""

    def __init__(self, epoch: float | None = None) -> None:
        start = time.time() if epoch is None else epoch
        self._offset = start - trio.current_time()

    def now(self) -> float:
        """The current time in Unix seconds."""
        return self._offset + trio.current_time()


def wall_time() -> float:
    """Unix seconds outside a Trio run (CLI commands, the sandbox)."""
    return time.time()
