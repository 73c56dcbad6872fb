"""Fault scenarios: SIGKILL at each point of a launch and of a reap, then a restart; two
replicas under a launch storm and under budget storms."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from bench import fault_checks as checks
from bench.fault_bench import (
    PRICE,
    Bench,
    Result,
    caps_of,
    cover,
    kill_rule,
    latency_figures,
    launched,
    outcome_counts,
    pool_checks,
    rate_in_registry,
    today,
    wait_consistent,
)
from bench.fault_harness import storm, wait_until
from bench.fault_inject import Request, not_dry_run

Match = Callable[[Request], bool] | None

# (where the broker dies, the request that kills it, killed after AWS carried it out?)
LAUNCH_POINTS: list[tuple[str, str, str, Match, bool]] = [
    (
        "after the charge and its intent (one write), before the counter",
        "dynamodb",
        "UpdateItem",
        lambda r: r.has("counter#instances") and r.has("ADD"),
        False,
    ),
    ("after the counter, before RunInstances", "ec2", "RunInstances", not_dry_run, False),
    (
        "after RunInstances, before the worker write",
        "dynamodb",
        "PutItem",
        lambda r: r.has("worker#"),
        False,
    ),
    (
        "after the worker write, before the intent settles",
        "dynamodb",
        "TransactWriteItems",
        lambda r: r.has("intent#") and r.has('"Delete"'),
        False,
    ),
    (
        "after the lease write, before the reply",
        "dynamodb",
        "TransactWriteItems",
        lambda r: r.has("lease#"),
        True,
    ),
]

REAP_POINTS: list[tuple[str, str, str, Match, bool]] = [
    (
        "reap: after marking it terminating, before TerminateInstances",
        "ec2",
        "TerminateInstances",
        None,
        False,
    ),
    (
        "reap: after TerminateInstances, before the registry delete",
        "dynamodb",
        "DeleteItem",
        lambda r: r.has("worker#"),
        False,
    ),
]

# Kill scenarios: short launch_timeout so that an intent no instance answers settles soon;
# the dollar caps are set (far away) so that the run rate is kept in the registry too.
KILL_SETTINGS: dict[str, Any] = {
    "launch_timeout": 8.0,
    "max_hourly_cost": 50.0,
    "max_daily_cost": 100.0,
}


def kill_in_launch(bench: Bench, point: int) -> list[Result]:
    """SIGKILL at one point of a GET_WORKER's launch; restart; the client retries."""
    label, service, operation, match, after = LAUNCH_POINTS[point]
    started = time.monotonic()
    cloud = bench.cloud
    pool = bench.pool("kill")
    config = bench.config(pool, **KILL_SETTINGS)
    cloud.boot_delay(0.3)
    with bench.brokers() as start:
        first = start(config)
        rule = cloud.injector.add(kill_rule(first, service, operation, match, after=after))
        cut = first.ask("GET_WORKER client=a", timeout=30)
        died = wait_until(lambda: not first.alive(), 10)
        restarted = time.monotonic()
        second = start(config)
        retry = second.ask("GET_WORKER client=a", timeout=40)
        served = time.monotonic() - restarted  # the client's wait, before the checks' waits
        outcomes = [cut, retry]
        found = [
            checks.holds(
                "killed at that point", died and rule.applied == 1, f"exit {first.proc.poll()}"
            ),
            checks.one_reply_each(outcomes, may_be_cut=1),
            checks.holds("the retry after the restart got a worker", retry.ok, repr(retry.reply)),
            *pool_checks(bench, pool, [retry], timeout=25),
        ]
        view = cloud.registry(pool)
        found += [
            checks.holds(
                "no second launch",
                launched(cloud, pool) == 1,
                f"{launched(cloud, pool)} instance(s)",
            ),
            checks.ledger_exact(view),
            _run_rate_check(cloud, pool),
        ]
        figures = {
            "restart to worker": f"{served:.1f}s",
            "adopted": len(second.events("worker.adopted")),
            "intents settled": len(second.events("launch.intent_settled")),
            "counter repaired": len(second.events("registry.counter_repaired")),
        }
    return [
        Result(
            f"SIGKILL in a launch: {label}",
            f"kill -9 on {operation}",
            tuple(found),
            figures,
            time.monotonic() - started,
        )
    ]


def kill_in_reap(bench: Bench, point: int) -> list[Result]:
    """SIGKILL while an idle worker is reaped; restart; the worker is gone, the registry
    agrees, and the ledger charged the time it ran, no more."""
    label, service, operation, match, after = REAP_POINTS[point]
    started = time.monotonic()
    cloud = bench.cloud
    pool = bench.pool("reap")
    # A cover much longer than the worker lives, so a refund that did not happen shows.
    config = bench.config(
        pool, **{**KILL_SETTINGS, "launch_timeout": 300.0}, idle_timeout=2.0, reap_interval=0.5
    )
    with bench.brokers() as start:
        first = start(config)
        given = first.ask("GET_WORKER client=a", timeout=30)
        rule = cloud.injector.add(kill_rule(first, service, operation, match, after=after))
        died = wait_until(lambda: not first.alive(), 20)
        restarted = time.monotonic()
        start(config)
        gone = wait_until(lambda: not cloud.live(pool), 20)
        gone_at = time.time()
        terminated_after = time.monotonic() - restarted
        wait_consistent(cloud, pool, 10)
        live, view = cloud.live(pool), cloud.registry(pool)
        found = [
            checks.holds(
                "killed at that point", died and rule.applied == 1, f"exit {first.proc.poll()}"
            ),
            checks.one_reply_each([given]),
            checks.holds(
                "the idle worker is terminated after the restart",
                gone,
                f"{terminated_after:.1f}s after the restart",
            ),
            checks.accounted(live, view),
            checks.settled(view, live),
            _charged_for_its_life(cloud, pool, view, gone_at),
            _run_rate_check(cloud, pool),
        ]
        figures = {
            "terminated after restart": f"{terminated_after:.1f}s",
            "instances": launched(cloud, pool),
        }
    return [
        Result(
            f"SIGKILL in a reap: {label.removeprefix('reap: ')}",
            f"kill -9 on {operation}",
            tuple(found),
            figures,
            time.monotonic() - started,
        )
    ]


def _charged_for_its_life(cloud: Any, pool: str, view: Any, gone_at: float) -> checks.Check:
    """The ledger holds what the pool's one (ended) instance cost from its launch until it
    was seen gone, give or take 5 s: its unused cover was given back."""
    (instance,) = cloud.instances(pool).values()
    lived = gone_at - instance["LaunchTime"].timestamp()
    committed = sum(v for k, v in view.spend.items() if k.startswith("day:")) / checks.MICROS
    most = PRICE * (lived + 5) / 3600
    return checks.holds(
        "ledger: charged for the time it ran, the rest given back",
        committed <= most,
        f"committed ${committed:.4f}, {lived:.0f}s at ${PRICE}/h = ${PRICE * lived / 3600:.4f}",
    )


def _run_rate_check(cloud: Any, pool: str) -> checks.Check:
    """With max_hourly_cost, the registry's run rate is the running workers' prices."""
    expected = PRICE * len(cloud.live(pool))
    ok = wait_until(lambda: abs(rate_in_registry(cloud, pool) - expected) < 1e-6, 10, 0.5)
    rate = rate_in_registry(cloud, pool)
    return checks.holds(
        "run rate in the registry = running workers' prices",
        ok,
        f"${rate:.4g}/h, workers ${expected:.4g}/h",
    )


# --- two replicas ---------------------------------------------------------------------------

# How a refusal by each cap begins (after "ERROR: ").
REFUSALS = {
    "max_workers": "max_workers reached",
    "max_daily_cost": "budget: max_daily_cost",
    "max_hourly_cost": "budget: launching one",
}


def replicas_launch_storm(bench: Bench) -> list[Result]:
    """Two replicas, exclusive mode, max_workers 6: 30 clients at once, split across them."""
    cap = 6
    return _replica_storm(
        bench,
        "two replicas, launch storm",
        f"30 clients at once, exclusive, max_workers {cap}",
        {"max_workers": cap},
        clients=30,
        wait=5,
        expect="max_workers",
        bound=lambda pool, n: [
            checks.max_workers_held(n, cap),
            checks.holds("the cap bound: max_workers workers given", n == cap, f"{n} launched"),
        ],
    )


def replicas_daily_budget_storm(bench: Bench) -> list[Result]:
    """Two replicas, a daily cap that fits three launches: 30 clients at once."""
    cap = round(3.5 * cover(), 4)

    def bound(pool: str, n: int) -> list[checks.Check]:
        view = bench.cloud.registry(pool)
        return [
            checks.daily_held(view, today()[0], cap, n, cover()),
            checks.holds("the cap bound: 3 launches fit, 3 launched", n == 3, f"{n} launched"),
        ]

    return _replica_storm(
        bench,
        "two replicas, budget storm (daily)",
        f"30 clients at once, exclusive, max_daily_cost ${cap:g} (3.5 launches)",
        {"max_daily_cost": cap, "max_workers": 20},
        clients=30,
        wait=3,
        expect="max_daily_cost",
        bound=bound,
    )


def replicas_hourly_budget_storm(bench: Bench) -> list[Result]:
    """Two replicas, a run-rate cap that fits two workers: 20 clients at once."""
    cap = 2.5 * PRICE

    def bound(pool: str, n: int) -> list[checks.Check]:
        return [
            checks.hourly_held([PRICE] * n, cap),
            checks.holds("the cap bound: 2 workers fit, 2 launched", n == 2, f"{n} launched"),
        ]

    return _replica_storm(
        bench,
        "two replicas, budget storm (hourly)",
        f"20 clients at once, exclusive, max_hourly_cost ${cap:g}/h (2.5 workers)",
        {"max_hourly_cost": cap, "max_workers": 20},
        clients=20,
        wait=3,
        expect="max_hourly_cost",
        bound=bound,
    )


def _replica_storm(
    bench: Bench,
    name: str,
    fault: str,
    settings: dict[str, Any],
    *,
    clients: int,
    wait: float,
    expect: str,
    bound: Callable[[str, int], list[checks.Check]],
) -> list[Result]:
    started = time.monotonic()
    cloud = bench.cloud
    pool = bench.pool("storm")
    config = bench.config(pool, sharing="exclusive", clients_per_worker=1, **settings)
    cloud.boot_delay(1.0)  # well past a reconciliation's registry reads (see race-reconcile-launch)
    with bench.brokers() as start:
        a, b = bench.start_together(start, [config, config])
        lines = [f"GET_WORKER wait={wait:g} client=c{n}" for n in range(clients)]
        outcomes = storm(lambda n: (a, b)[n % 2].port, lines, timeout=60)
        n = launched(cloud, pool)
        found = [
            checks.one_reply_each(outcomes),
            checks.errors_are(outcomes, [REFUSALS[expect], "no worker free after"]),
            checks.refusals_true(outcomes, caps_of(config), expect=expect),
            *bound(pool, n),
            *pool_checks(bench, pool, outcomes, capacity=1),
        ]
        figures = {
            "replies": outcome_counts(outcomes),
            "instances": n,
            **latency_figures(outcomes),
        }
    return [Result(name, fault, tuple(found), figures, time.monotonic() - started)]
