"""How a request to the engine can end other than with its answer; the server turns each into
its `ERROR` line (see protocol.md)."""

from __future__ import annotations

from broker.model import Interruption


class Refusal(Exception):
    """A request the engine cannot satisfy; `str()` is the reason for `ERROR: <reason>`."""


class WorkerNotFound(Exception):
    """PING or RELEASE of an IP the pool does not know."""


class WorkerInterrupted(Exception):
    """PING of a worker being taken away (spot interruption, rebalance, budget)."""

    def __init__(self, interruption: Interruption) -> None:
        super().__init__(interruption.reason)
        self.interruption = interruption
