"""Whether the broker is healthy, from what it observes: its reaper passes and the outcome of
its latest AWS calls. Pure: time is passed in. `/healthz` and the systemd watchdog ask it.

- The loops are **alive** while the reaper completes a pass at least every
  `STALL_PASSES` x reap_interval (plus a margin): a wedged event loop or a pass stuck on a call
  stops them, and systemd's watchdog restarts the service.
- The broker is **healthy** while the loops are alive and the latest EC2 call and the latest
  registry (DynamoDB) call succeeded.
"""

from __future__ import annotations

from typing import Final

import attrs

STALL_PASSES: Final = 3  # reaper passes that may be missed before the loops count as stalled
STALL_MARGIN: Final = 60.0  # seconds on top (a pass can take a while against a slow AWS)
REGISTRY_SERVICES: Final = frozenset({"dynamodb"})
CLOUD_SERVICES: Final = frozenset({"ec2"})


@attrs.define
class Health:
    """What the broker last saw of itself and of AWS."""

    reap_interval: float
    started_at: float
    last_pass: float | None = None
    failures: dict[str, str] = attrs.field(factory=dict)  # "ec2"/"registry" -> reason

    def reaper_pass(self, now: float) -> None:
        """The reaper completed a pass at `now`."""
        self.last_pass = now

    def aws_call(self, service: str, operation: str, error: str | None) -> None:
        """An AWS call finished: `error` is its error code, None when it succeeded."""
        if service in CLOUD_SERVICES:
            kind = "ec2"
        elif service in REGISTRY_SERVICES:
            kind = "registry"
        else:
            return
        if error is None:
            self.failures.pop(kind, None)
        else:
            self.failures[kind] = f"{kind}: last call failed: {operation}: {error}"

    def loops_alive(self, now: float) -> bool:
        """True while the reaper passes come on time (from the start until the first pass)."""
        since = self.started_at if self.last_pass is None else self.last_pass
        return now - since <= STALL_PASSES * self.reap_interval + STALL_MARGIN

    def check(self, now: float) -> tuple[bool, str]:
        """(healthy, reason): the reason names the first thing wrong, `ok` when nothing is."""
        if not self.loops_alive(now):
            since = self.started_at if self.last_pass is None else self.last_pass
            return False, f"reaper: no pass for {now - since:.0f}s"
        for kind in ("registry", "ec2"):
            if kind in self.failures:
                return False, self.failures[kind]
        return True, "ok"
