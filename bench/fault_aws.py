"""Fault scenarios on the AWS side: EC2 throttling, 5xx, slow answers and capacity errors;
the endpoint down, then back; DynamoDB conflicts between replicas and throttling."""

from __future__ import annotations

import threading
import time
from typing import Any

from bench import fault_checks as checks
from bench.fault_bench import (
    Bench,
    Result,
    caps_of,
    latency_figures,
    launched,
    outcome_counts,
    pool_checks,
    wait_consistent,
)
from bench.fault_harness import (
    Outcome,
    Rule,
    dynamodb_error,
    ec2_error,
    not_dry_run,
    storm,
    transaction_conflict,
    wait_until,
)

FALLBACK_TYPE = "c6i.8xlarge"


def ec2_faults(bench: Bench) -> list[Result]:
    """One broker, exclusive mode (every client needs a launch), through four EC2 faults in
    turn: throttling, 5xx, 5 s answers, no capacity (last: capacity failures are remembered
    for five minutes)."""
    cloud = bench.cloud
    pool = bench.pool("ec2")
    # Reconciliations every 3 s, not every second: the RELEASE below must not race one (that
    # race is a known bug, shown deterministically by `reconcile_races_release`).
    config = bench.config(
        pool, sharing="exclusive", instance_types=[FALLBACK_TYPE], reap_interval=3.0
    )
    cloud.boot_delay(0.2)
    rows: list[Result] = []
    with bench.brokers() as start:
        broker = start(config)

        # Throttling: RunInstances twice, DescribeInstances three times.
        began = time.monotonic()
        rules = [
            cloud.injector.add(
                Rule(
                    "ec2",
                    "RunInstances",
                    not_dry_run,
                    times=2,
                    reply=ec2_error("RequestLimitExceeded", "Request limit exceeded.", 503),
                )
            ),
            cloud.injector.add(
                Rule(
                    "ec2",
                    "DescribeInstances",
                    times=3,
                    reply=ec2_error("RequestLimitExceeded", "Request limit exceeded.", 503),
                )
            ),
        ]
        throttled = broker.ask("GET_WORKER client=throttled", timeout=60)
        rows.append(
            _ec2_row(
                bench,
                pool,
                "EC2 throttling",
                "RequestLimitExceeded: 2 RunInstances, 3 DescribeInstances",
                [throttled],
                rules,
                expect_instances=1,
                began=began,
            )
        )

        # 5xx: RunInstances 500 then 503, DescribeInstances 500 twice, TerminateInstances 503.
        began = time.monotonic()
        cloud.injector.clear()
        rules = [
            cloud.injector.add(
                Rule(
                    "ec2",
                    "RunInstances",
                    not_dry_run,
                    times=1,
                    reply=ec2_error("InternalError", "An internal error.", 500),
                )
            ),
            cloud.injector.add(
                Rule(
                    "ec2",
                    "RunInstances",
                    not_dry_run,
                    times=1,
                    reply=ec2_error("Unavailable", "Service unavailable.", 503),
                )
            ),
            cloud.injector.add(
                Rule(
                    "ec2",
                    "DescribeInstances",
                    times=2,
                    reply=ec2_error("InternalError", "An internal error.", 500),
                )
            ),
            cloud.injector.add(
                Rule(
                    "ec2",
                    "TerminateInstances",
                    times=2,
                    reply=ec2_error("Unavailable", "Service unavailable.", 503),
                )
            ),
        ]
        served = broker.ask("GET_WORKER client=errors", timeout=60)
        released = broker.ask(f"RELEASE {throttled.reply} client=throttled", timeout=60)
        rows.append(
            _ec2_row(
                bench,
                pool,
                "EC2 5xx",
                "500/503 on 2 RunInstances, 2 DescribeInstances, 2 Terminate",
                [served, released],
                rules,
                expect_instances=2,
                began=began,
                released=[throttled.reply or ""],
            )
        )

        # Slow: RunInstances and two DescribeInstances answer after 5 s; the broker keeps
        # serving others meanwhile.
        began = time.monotonic()
        cloud.injector.clear()
        rules = [
            cloud.injector.add(Rule("ec2", "RunInstances", not_dry_run, times=1, delay=5.0)),
            cloud.injector.add(Rule("ec2", "DescribeInstances", times=2, delay=5.0)),
        ]
        slow: list[Outcome] = []
        waiter = threading.Thread(
            target=lambda: slow.append(broker.ask("GET_WORKER client=slow", timeout=60))
        )
        waiter.start()
        wait_until(lambda: rules[0].applied > 0, 10, 0.05)
        meanwhile = [broker.ask("HELP", timeout=10) for _ in range(5)]
        waiter.join(70)
        row = _ec2_row(
            bench,
            pool,
            "EC2 slow answers (5 s)",
            "RunInstances and 2 DescribeInstances answer after 5 s",
            slow + meanwhile,
            rules,
            expect_instances=3,
            began=began,
            released=[throttled.reply or ""],
        )
        quick = max(o.seconds for o in meanwhile)
        rows.append(
            _with(
                row,
                checks.holds(
                    "others served meanwhile, under 1 s",
                    quick < 1.0,
                    f"HELP in {quick:.2f}s at most",
                ),
                {"GET_WORKER": f"{slow[0].seconds:.1f}s" if slow else "none"},
            )
        )
        rows.append(_capacity(bench, broker, pool, config))
    return rows


def _capacity(bench: Bench, broker: Any, pool: str, config: dict[str, Any]) -> Result:
    """No capacity for the default type: the fallback type launches; then none for either:
    one ERROR line naming the code; then answered without asking EC2. Every charge for an
    offering without capacity is given back."""
    cloud = bench.cloud
    began = time.monotonic()
    cloud.injector.clear()
    wait_consistent(cloud, pool, 10)
    before = _committed(cloud, pool)
    known = set(cloud.instances(pool))
    ice = ec2_error(
        "InsufficientInstanceCapacity",
        "We currently do not have sufficient capacity in the Availability Zone.",
        500,
    )
    default = cloud.injector.add(
        Rule("ec2", "RunInstances", lambda r: not_dry_run(r) and r.has("c7i.8xlarge"), reply=ice)
    )
    fell_back = broker.ask("GET_WORKER client=fallback", timeout=60)
    fallback = cloud.injector.add(Rule("ec2", "RunInstances", not_dry_run, reply=ice))
    refused = broker.ask("GET_WORKER client=nocapacity", timeout=60)
    asked = default.applied + fallback.applied
    remembered = broker.ask("GET_WORKER client=remembered", timeout=60)
    asked_again = default.applied + fallback.applied - asked
    new = {iid: i for iid, i in cloud.instances(pool).items() if iid not in known}
    types = sorted(i["InstanceType"] for i in new.values())
    outcomes = [fell_back, refused, remembered]
    found = [
        checks.one_reply_each(outcomes),
        checks.holds(
            "the fallback type launched",
            fell_back.ok and types == [FALLBACK_TYPE],
            f"{fell_back.reply}, launched {types}",
        ),
        checks.holds(
            "no capacity: one ERROR line with the code",
            (refused.reply or "").startswith("ERROR: launch failed: InsufficientInstanceCapacity"),
            repr(refused.reply),
        ),
        checks.holds(
            "failed offerings not asked again for a while",
            asked_again == 0 and "no capacity recently" in (remembered.reply or ""),
            f"{asked_again} RunInstances; {remembered.reply!r}",
        ),
        *pool_checks(bench, pool, [fell_back], capacity=1),
    ]
    after = _committed(cloud, pool)
    view = cloud.registry(pool)
    covers = sum(
        float(w["price_per_hour"]) * (float(w["paid_until"]) - float(w["launched_at"])) / 3600
        for iid, w in view.cloud_workers().items()
        if iid in new
    )
    found.append(
        checks.holds(
            "every charge for an offering without capacity given back",
            abs(after - before - covers) < 0.001,
            f"ledger +${after - before:.4f}, new worker's cover ${covers:.4f}",
        )
    )
    figures = {"ICE answered": default.applied + fallback.applied, "instances": len(new)}
    return Result(
        "EC2 capacity errors",
        "InsufficientInstanceCapacity for one type, then both",
        tuple(found),
        figures,
        time.monotonic() - began,
    )


def _committed(cloud: Any, pool: str) -> float:
    spend = cloud.registry(pool).spend
    return sum(v for k, v in spend.items() if k.startswith("day:")) / checks.MICROS


def _ec2_row(
    bench: Bench,
    pool: str,
    name: str,
    fault: str,
    outcomes: list[Outcome],
    rules: list[Rule],
    *,
    expect_instances: int,
    began: float,
    released: list[str] | None = None,
) -> Result:
    cloud = bench.cloud
    applied = sum(r.applied for r in rules)
    wanted = sum(r.times or 0 for r in rules)
    n = launched(cloud, pool)
    found = [
        checks.holds("the faults were injected", applied == wanted, f"{applied} of {wanted}"),
        checks.one_reply_each(outcomes),
        checks.holds(
            "every request served",
            all(o.ok for o in outcomes),
            "; ".join(repr(o.reply) for o in outcomes if not o.ok),
        ),
        checks.holds(
            "one instance per launch (retries reuse the ClientToken)",
            n == expect_instances,
            f"{n} instances in the pool",
        ),
        *pool_checks(bench, pool, outcomes, released=released or [], capacity=1),
    ]
    figures = {"faults": applied, **latency_figures(outcomes)}
    return Result(name, fault, tuple(found), figures, time.monotonic() - began)


def _with(row: Result, check: checks.Check, figures: dict[str, Any]) -> Result:
    return Result(
        row.scenario, row.fault, (*row.checks, check), {**row.figures, **figures}, row.seconds
    )


# --- the endpoint down ----------------------------------------------------------------------


def endpoint_down(bench: Bench) -> list[Result]:
    """The AWS endpoint (EC2 and DynamoDB) refuses connections for 10 s (30 s with --full),
    then comes back: every request meanwhile gets one line in bounded time, a held worker
    keeps being served, and afterwards launches work and the registry agrees with EC2."""
    cloud = bench.cloud
    down_for = 30.0 if bench.full else 10.0
    pool = bench.pool("down")
    config = bench.config(pool)
    cloud.boot_delay(0.2)
    began = time.monotonic()
    with bench.brokers() as start:
        broker = start(config)
        held = broker.ask("GET_WORKER client=a", timeout=30)
        ip = held.reply
        requests = [
            f"PING {ip} client=a",
            "GET_WORKER client=a",
            f"GET_WORKER type={FALLBACK_TYPE} client=b wait=20",
            "STATUS",
        ]
        during: list[Outcome] = []
        cloud.proxy.stop()
        down_at = time.monotonic()
        n = 0
        threads: list[threading.Thread] = []
        while time.monotonic() - down_at < down_for:
            line = requests[n % len(requests)]
            thread = threading.Thread(
                target=lambda line=line: during.append(broker.ask(line, timeout=120))
            )
            thread.start()
            threads.append(thread)
            n += 1
            time.sleep(1.0)
        cloud.proxy.start()
        up_at = time.monotonic()
        for thread in threads:
            thread.join(150)
        recovered = broker.ask(f"GET_WORKER type={FALLBACK_TYPE} client=c", timeout=120)
        recovery = time.monotonic() - up_at
        # A held worker is handed out again without a registry write (PING writes the
        # worker's activity, so it may answer "registry unavailable": protocol.md says so).
        warm = [o for o in during if o.line == requests[1]]
        warm_ok = sum(o.ok for o in warm)
        longest = max((o.seconds for o in during), default=0.0)
        found = [
            checks.one_reply_each([held, *during, recovered]),
            checks.errors_are(
                during, ["cloud unreachable", "registry unavailable", "no worker ready after"]
            ),
            checks.holds(
                "every reply within 60 s while down", longest < 60, f"longest {longest:.1f}s"
            ),
            checks.holds(
                "the held worker handed out again while down",
                warm_ok == len(warm),
                f"{warm_ok} of {len(warm)}",
            ),
            checks.holds(
                "a launch works once it is back",
                recovered.ok,
                f"{recovered.reply!r} {recovery:.1f}s after",
            ),
            *pool_checks(bench, pool, [held, recovered], timeout=20),
            checks.holds(
                "no launch doubled by the outage",
                launched(cloud, pool) == 2,
                f"{launched(cloud, pool)} instances",
            ),
        ]
        figures = {
            "down": f"{down_for:g}s",
            "requests while down": outcome_counts(during),
            "longest reply": f"{longest:.1f}s",
            "launch after": f"{recovery:.1f}s",
        }
    return [
        Result(
            f"AWS endpoint down {down_for:g} s, then back",
            "connections to EC2 and DynamoDB refused",
            tuple(found),
            figures,
            time.monotonic() - began,
        )
    ]


# --- DynamoDB -------------------------------------------------------------------------------


WRITES = ("PutItem", "UpdateItem", "DeleteItem", "TransactWriteItems")
REFUSED = ("max_workers reached", "no worker free after")
CONFLICTED = "registry unavailable: TransactionConflict"


def dynamodb_faults(bench: Bench) -> list[Result]:
    """Two replicas, exclusive mode. First DynamoDB throttles every fourth write and every
    fifth read while clients get workers (launches), PING and ask again; then, on a second
    pair of replicas, both claim the same six ready workers at once (conditional checks
    decide, and every fourth transaction is cancelled as conflicting)."""
    cloud = bench.cloud
    cap = 10
    pool = bench.pool("ddb")
    # No reconciliation while DynamoDB is throttled (reap_interval 60 s): a reconciliation
    # whose registry reads are slow drops fresh workers, a known bug that
    # `reconcile_races_launch` shows deterministically. So each client stays on its replica.
    config = bench.config(pool, sharing="exclusive", max_workers=cap, reap_interval=60.0)
    cloud.boot_delay(0.2)
    rows: list[Result] = []
    with bench.brokers() as start:
        a, b = bench.start_together(start, [config, config])

        def to(n: int) -> int:
            return (a, b)[n % 2].port

        began = time.monotonic()
        throttle = dynamodb_error(
            "ProvisionedThroughputExceededException",
            "The level of configured provisioned throughput for the table was exceeded.",
        )
        rules = [cloud.injector.add(Rule("dynamodb", op, every=4, reply=throttle)) for op in WRITES]
        rules += [
            cloud.injector.add(Rule("dynamodb", op, every=5, reply=throttle))
            for op in ("GetItem", "Query")
        ]
        first = storm(to, [f"GET_WORKER wait=30 client=t{n}" for n in range(4)], timeout=60)
        pings = [f"PING {o.reply} client=t{n}" for n, o in enumerate(first)]
        again = storm(to, pings, timeout=60) + storm(to, [o.line for o in first], timeout=60)
        throttled = sum(r.applied for r in rules)
        for rule in rules:
            cloud.injector.remove(rule)
        everything = [*first, *again]
        found = [
            checks.holds("DynamoDB throttled", throttled > 0, f"{throttled} requests"),
            checks.one_reply_each(everything),
            checks.holds(
                "every request served",
                all(o.ok for o in everything),
                "; ".join(repr(o.reply) for o in everything if not o.ok)[:200],
            ),
            *pool_checks(bench, pool, everything, capacity=1),
        ]
        figures = {
            "throttled": throttled,
            "requests": len(everything),
            **latency_figures(everything),
        }
        rows.append(
            Result(
                "DynamoDB throttling",
                "every 4th write, every 5th read throttled; 4 launches, PINGs, asks again",
                tuple(found),
                figures,
                time.monotonic() - began,
            )
        )
    rows.extend(_claims_race(bench, cap))
    return rows


def _claims_race(bench: Bench, cap: int) -> list[Result]:
    cloud = bench.cloud
    pool = bench.pool("claims")
    config = bench.config(pool, sharing="exclusive", max_workers=cap, reap_interval=0.5)
    with bench.brokers() as start:
        a, b = bench.start_together(start, [config, config])

        def to(n: int) -> int:
            return (a, b)[n % 2].port

        began = time.monotonic()
        burst = a.ask("BURST 6", timeout=60)
        ready = wait_until(lambda: all(_ready(x) == 6 for x in (a, b)), 20, 0.2)
        conflict = cloud.injector.add(
            Rule("dynamodb", "TransactWriteItems", every=4, reply=transaction_conflict())
        )
        outcomes = storm(to, [f"GET_WORKER wait=5 client=k{n}" for n in range(12)], timeout=60)
        cloud.injector.remove(conflict)
        n = launched(cloud, pool)
        found = [
            checks.holds(
                "both replicas saw the 6 new ready workers first",
                ready and burst.ok,
                repr(burst.reply)[:40],
            ),
            checks.one_reply_each(outcomes),
            # Conflicts that persist past the broker's retries are "registry unavailable".
            checks.errors_are(outcomes, [*REFUSED, CONFLICTED]),
            checks.refusals_true(
                outcomes, caps_of(config), expect="max_workers", besides=[CONFLICTED]
            ),
            checks.max_workers_held(n, cap),
            checks.holds(
                "max_workers bound: 6 ready + 4 launched given out",
                len(checks.granted(outcomes)) == cap,
                outcome_counts(outcomes),
            ),
            *pool_checks(bench, pool, outcomes, capacity=1),
        ]
        figures = {
            "replies": outcome_counts(outcomes),
            "conflicts injected": conflict.applied,
            **latency_figures(outcomes),
        }
    return [
        Result(
            "DynamoDB: two replicas claim the same workers",
            "12 clients, 6 ready workers, max_workers 10; every 4th transaction conflicts",
            tuple(found),
            figures,
            time.monotonic() - began,
        )
    ]


def _ready(broker: Any) -> int:
    try:
        workers = broker.status()["workers"]
    except ValueError:
        return 0
    return sum(1 for w in workers if w["state"] == "ready")


def reconcile_races_release(bench: Bench) -> list[Result]:
    """A RELEASE terminates a worker while a reconciliation is between its EC2 snapshot and
    its adoptions (its first registry read is slow: 3 s). The terminated instance must not
    come back: not as a worker, not as an IP handed to the next client."""
    cloud = bench.cloud
    pool = bench.pool("race")
    config = bench.config(pool, sharing="exclusive", reap_interval=2.0)
    began = time.monotonic()
    with bench.brokers() as start:
        broker = start(config)
        given = broker.ask("GET_WORKER client=a", timeout=30)
        (instance_id,) = cloud.live(pool)
        slow = cloud.injector.add(
            Rule("dynamodb", "Query", lambda r: r.has("worker#"), delay=3.0, times=1)
        )
        raced = wait_until(lambda: slow.applied == 1, 10, 0.02)  # a reconciliation waits
        released = broker.ask(f"RELEASE {given.reply} client=a", timeout=30)
        terminated = wait_until(lambda: instance_id not in cloud.live(pool), 5, 0.05)
        # Until the next reconciliation would notice: does the terminated worker come back?
        came_back = wait_until(
            lambda: any(w["instance_id"] == instance_id for w in broker.status()["workers"]),
            5,
            0.05,
        )
        after = broker.ask("GET_WORKER client=b", timeout=30)
        adopted = [e for e in broker.events("worker.adopted") if e["instance_id"] == instance_id]
        found = [
            checks.holds(
                "the RELEASE terminated the worker during the slow reconciliation",
                raced and released.ok and terminated,
                repr(released.reply),
            ),
            checks.one_reply_each([given, released, after]),
            checks.holds(
                "a terminated instance is not adopted back",
                not came_back and not adopted,
                f"{len(adopted)} adoption(s) of {instance_id}",
            ),
            checks.holds(
                "a terminated instance's IP is never handed out",
                after.ok and after.reply != given.reply,
                f"next client got {after.reply!r}, the terminated worker was {given.reply}",
            ),
            *pool_checks(bench, pool, [after], capacity=1),
        ]
        figures = {"adopted back": len(adopted), "handed out again": after.reply == given.reply}
    return [
        Result(
            "reconciliation races a RELEASE",
            "registry read 3 s slow while a RELEASE terminates the worker",
            tuple(found),
            figures,
            time.monotonic() - began,
        )
    ]


def reconcile_races_launch(bench: Bench) -> list[Result]:
    """A worker is launched, booted and leased while a reconciliation waits for its second
    registry read (3 s slow), so the registry's workers it read first do not have it. The
    held worker must stay: its holder's PINGs answer OK throughout."""
    cloud = bench.cloud
    pool = bench.pool("stale")
    config = bench.config(pool, sharing="exclusive", reap_interval=1.0)
    cloud.boot_delay(0.2)
    began = time.monotonic()
    with bench.brokers() as start:
        broker = start(config)
        slow = cloud.injector.add(
            Rule("dynamodb", "Query", lambda r: r.has("lease#"), delay=3.0, times=1)
        )
        raced = wait_until(lambda: slow.applied == 1, 10, 0.02)  # it has read the workers
        given = broker.ask("GET_WORKER client=a", timeout=30)
        pings: list[Outcome] = []
        # Until two more reconciliations have begun (each reads the workers once).
        marker = cloud.injector.add(Rule("dynamodb", "Query", lambda r: r.has("worker#")))
        deadline = time.monotonic() + 15
        while marker.applied < 2 and time.monotonic() < deadline:
            pings.append(broker.ask(f"PING {given.reply} client=a", timeout=30))
            time.sleep(0.1)
        lost = [o for o in pings if o.reply != "OK"]
        gone = broker.events("worker.gone_elsewhere")
        other = broker.ask("GET_WORKER client=b", timeout=30)
        found = [
            checks.holds(
                "the worker was launched and leased during the slow reconciliation",
                raced and given.ok and slow.applied == 1,
                repr(given.reply),
            ),
            checks.one_reply_each([given, *pings, other]),
            checks.holds(
                "the held worker's PINGs answer OK throughout",
                not lost and bool(pings),
                f"{len(lost)} of {len(pings)} PINGs: {lost[0].reply!r}" if lost else "",
            ),
            checks.holds(
                "a running worker is not dropped as gone elsewhere",
                not gone,
                f"{len(gone)} worker.gone_elsewhere",
            ),
            *pool_checks(bench, pool, [given, other], capacity=1),
        ]
        figures = {"PINGs": len(pings), "Worker not found": len(lost)}
    return [
        Result(
            "reconciliation races a launch",
            "registry read 3 s slow while a worker is launched and leased",
            tuple(found),
            figures,
            time.monotonic() - began,
        )
    ]
