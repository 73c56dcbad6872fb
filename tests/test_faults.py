"""The fault suite (`bench/faults.py`) as tests: each scenario, with the shorter faults of the
default run, runs broker processes against the session's moto server, injects its fault and
must hold every invariant.

Slow (about two minutes in all on two cores): marked `slow`. Every wait inside
a scenario is bounded (socket timeouts, process and thread joins, polls with deadlines).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.fault_bench import Bench
from bench.fault_harness import Cloud
from bench.faults import KNOWN_BUGS, SCENARIOS, Scenario
from broker.sandbox import MotoHandle

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def bench(moto_server: MotoHandle, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bench]:
    cloud = Cloud(moto_server)
    try:
        yield Bench(cloud, Path(tmp_path_factory.mktemp("faults")), full=False)
    finally:
        cloud.close()


def _params() -> list[object]:
    params: list[object] = []
    for scenario in SCENARIOS:
        marks = []
        if scenario.name in KNOWN_BUGS:  # strict: a fix shows as XPASS, failing this test
            marks.append(pytest.mark.xfail(reason=KNOWN_BUGS[scenario.name], strict=True))
        params.append(pytest.param(scenario, id=scenario.name, marks=marks))
    return params


@pytest.mark.parametrize("scenario", _params())
def test_scenario_holds_every_invariant(bench: Bench, scenario: Scenario) -> None:
    """Under the scenario's fault, every invariant the scenario checks holds."""
    try:
        rows = scenario.run(bench)
    finally:
        bench.reset()
    assert rows, "the scenario produced no result"
    failed = [f"{row.scenario}: {check}" for row in rows for check in row.checks if not check.ok]
    assert failed == []
