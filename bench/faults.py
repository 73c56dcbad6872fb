"""Fault suite: brokers as processes against moto, every promise checked under every fault.

    .venv/bin/python -m bench.faults [--full] [--only WORD ...] [--out docs/faults.md]

Each scenario starts `compute-broker serve` processes (`--port 0`) against a moto server in
this process (DynamoDB serialised as in the sandbox), injects a fault (SIGKILL at a chosen
AWS request, AWS errors and slow answers, the endpoint down, hostile clients, a clock running
across midnight) and then checks invariants: every running instance accounted for in the
registry, no lease lost, no worker leased twice in exclusive mode, every cap respected, every
request answered by exactly one line, every refusal naming the cap that bound with true
figures. It prints one row per scenario and writes the table as Markdown (`--out`).

The default run takes about three minutes on two cores; `--full` adds the longer scenarios
(the endpoint down for 30 s instead of 10, a 10 s connect-and-close storm instead of 5).
Loopback only; every wait is bounded.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

import attrs

from bench import fault_aws, fault_clients, fault_crashes
from bench.fault_bench import Bench, Result
from bench.fault_checks import Check, figures_text, summarize
from bench.fault_harness import Cloud


@attrs.frozen
class Scenario:
    name: str
    run: Callable[[Bench], list[Result]]
    default: bool = True


def _launch_kill(point: int) -> Callable[[Bench], list[Result]]:
    return lambda bench: fault_crashes.kill_in_launch(bench, point)


def _reap_kill(point: int) -> Callable[[Bench], list[Result]]:
    return lambda bench: fault_crashes.kill_in_reap(bench, point)


SCENARIOS: list[Scenario] = [
    *(
        Scenario(f"kill-launch-{n + 1}", _launch_kill(n))
        for n in range(len(fault_crashes.LAUNCH_POINTS))
    ),
    *(Scenario(f"kill-reap-{n + 1}", _reap_kill(n)) for n in range(len(fault_crashes.REAP_POINTS))),
    Scenario("replicas-launch-storm", fault_crashes.replicas_launch_storm),
    Scenario("replicas-daily-budget-storm", fault_crashes.replicas_daily_budget_storm),
    Scenario("replicas-hourly-budget-storm", fault_crashes.replicas_hourly_budget_storm),
    Scenario("aws-ec2-faults", fault_aws.ec2_faults),
    Scenario("aws-endpoint-down", fault_aws.endpoint_down),
    Scenario("aws-dynamodb-replicas", fault_aws.dynamodb_faults),
    Scenario("clock-midnight-month-end", fault_clients.clock_jumps),
    Scenario("hostile-clients", fault_clients.hostile_clients),
]


def run(
    names: Sequence[str] = (), *, full: bool = False, echo: Callable[[str], None] = print
) -> list[Result]:
    """Run the scenarios (those whose name contains one of `names`; none: the default set,
    or all with `full`), echoing each row as it finishes."""
    chosen = [
        s for s in SCENARIOS if (any(n in s.name for n in names) if names else s.default or full)
    ]
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="faults-") as workdir:
        started = time.monotonic()
        cloud = Cloud()
        echo(f"sandbox cloud ready in {time.monotonic() - started:.1f}s")
        bench = Bench(cloud, Path(workdir), full=full)
        try:
            for scenario in chosen:
                began = time.monotonic()
                try:
                    rows = scenario.run(bench)
                except Exception as exc:
                    detail = "".join(traceback.format_exception_only(exc)).strip()
                    traceback.print_exc(file=sys.stderr)
                    rows = [
                        Result(
                            scenario.name,
                            "",
                            (Check("scenario ran to the end", False, detail),),
                            {},
                            time.monotonic() - began,
                        )
                    ]
                finally:
                    bench.reset()
                for row in rows:
                    echo(_console_row(row))
                results.extend(rows)
        finally:
            cloud.close()
    return results


def _console_row(row: Result) -> str:
    mark = "ok    " if row.ok else "FAILED"
    text = (
        f"{mark} {row.scenario} [{summarize(row.checks)}] {figures_text(row.figures)} "
        f"({row.seconds:.0f}s)"
    )
    failed = [f"\n         {check}" for check in row.checks if not check.ok]
    return text + "".join(failed)


def markdown(results: Sequence[Result], *, full: bool, seconds: float) -> str:
    """The table (and every check's detail) as Markdown."""
    passed = sum(r.ok for r in results)
    lines = [
        "| scenario | fault | invariants | figures | s |",
        "| --- | --- | --- | --- | ---: |",
    ]
    for r in results:
        failed = [c.name for c in r.checks if not c.ok]
        verdict = (
            f"{summarize(r.checks)} held"
            if not failed
            else (f"{summarize(r.checks)}; **failed:** {'; '.join(failed)}")
        )
        lines.append(
            f"| {r.scenario} | {r.fault} | {verdict} | {figures_text(r.figures)} "
            f"| {r.seconds:.0f} |"
        )
    lines += [
        "",
        f"{passed} of {len(results)} scenarios held every invariant "
        f"(`{'--full' if full else 'default'}` run, {seconds:.0f} s).",
        "",
        "<details><summary>Every check, with its figures</summary>",
        "",
    ]
    for r in results:
        lines.append(f"- **{r.scenario}**")
        lines.extend(f"  - {check}" for check in r.checks)
    lines += ["", "</details>", ""]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="every scenario, longer faults")
    parser.add_argument("--only", nargs="*", default=[], help="scenarios whose name has WORD")
    parser.add_argument("--out", type=Path, help="write the Markdown table here")
    parser.add_argument("--list", action="store_true", help="list the scenarios and exit")
    args = parser.parse_args(argv)
    if args.list:
        for scenario in SCENARIOS:
            print(scenario.name + ("" if scenario.default else " (--full)"))
        return 0
    started = time.monotonic()
    results = run(args.only, full=args.full)
    seconds = time.monotonic() - started
    table = markdown(results, full=args.full, seconds=seconds)
    print()
    print(table)
    if args.out is not None:
        args.out.write_text(table)
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
