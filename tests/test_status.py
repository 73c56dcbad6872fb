"""The STATUS document (broker/status.py) from a running engine on Trio's MockClock. (Its wire
form is in protocol.md; the budget and capacity parts are in tests/test_spending.py and
tests/test_launcher.py.)"""

from __future__ import annotations

import pytest
import trio
from trio.testing import MockClock

from broker.engine import Engine
from broker.model import WorkerRequest
from tests.engines import get_ip


async def test_status_reports_workers_leases_and_totals(
    autojump_clock: MockClock, engine: Engine
) -> None:
    """STATUS from a running engine carries each worker, each lease and the run rate."""
    ip = await get_ip(engine, WorkerRequest(), "a")
    await trio.sleep(12)
    status = engine.status()
    (worker,) = status["workers"]
    assert worker["ip"] == ip
    assert worker["state"] == "ready"
    assert worker["clients"] == 1
    assert worker["idle_seconds"] == pytest.approx(12, abs=0.01)
    assert worker["price_per_hour"] == 0.5
    assert status["leases"][0]["client"] == "a"
    assert status["totals"]["run_rate_per_hour"] == 0.5
    assert status["totals"]["by_state"]["ready"] == 1
