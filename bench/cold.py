"""Cold hand-out delay: from the instance becoming `running` to the GET_WORKER answer.

    .venv/bin/python bench/cold.py [--launches 8] [--boot 5] [--registry dynamodb]

The broker runs as deployed (`compute-broker serve --config`, shipped `describe_interval`)
against a moto server in this process whose instances stay `pending` for a boot delay
(`broker.sandbox.install_boot_delay`), then `running`. Launch i boots in
`boot + 2 * i / launches` seconds: the boot times spread over one shipped describe interval,
so the launches see every phase of the broker's polling rather than one. Each launch is a
GET_WORKER from a new client on an empty pool; the RELEASE after it terminates the worker.
Measured per launch: delay = answer time - the moment moto turned the instance `running`
(the same monotonic clock: moto and the client are this process), and the DescribeInstances
calls moto served between the request and the answer.

The seed's pattern on the same moto and the same boot times (`seed_cold`): RunInstances, then
DescribeInstances of that instance every 2 s until it is running with an IP.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
from typing import Any

from procs import Broker, Moto, Placement, pin_self, request

SEED_POLL = 2.0  # seconds: the seed's wait_for_instance sleeps this long between polls
SPREAD = 2.0  # seconds over which the launches' boot times are spread


def boot_times(launches: int, boot: float) -> list[float]:
    return [boot + SPREAD * i / launches for i in range(launches)]


def broker_cold(
    moto: Moto,
    placement: Placement,
    launches: int,
    boot: float,
    registry: str = "dynamodb",
    trace: list[str] | None = None,
) -> dict[str, Any]:
    """The deployed broker's cold hand-outs; delays (s) and Describe calls per launch. With
    `trace`, one line per launch is appended to it: when the describes came, in seconds
    relative to the instance's `running`."""
    delays, totals, describes = [], [], []
    with Broker(moto, placement, registry=registry) as broker:
        for i, seconds in enumerate(boot_times(launches, boot)):
            moto.set_boot_delay(seconds)
            sent = time.monotonic()
            ip = request(broker.port, f"GET_WORKER client=cold{i}")
            answered = time.monotonic()
            if ip.startswith("ERROR"):
                raise RuntimeError(f"cold GET_WORKER failed: {ip}")
            running = moto.running_at(ip)
            assert running is not None, f"moto has no instance with IP {ip}"
            delays.append(answered - running)
            totals.append(answered - sent)
            calls = [t for t in moto.describe_calls if sent <= t <= answered]
            describes.append(len(calls))
            if trace is not None:
                trace.append(
                    f"launch {i} (boot {seconds:g} s): describes at "
                    + " ".join(f"{t - running:+.2f}" for t in calls)
                    + f", answered {answered - running:+.2f}"
                )
            reply = request(broker.port, f"RELEASE {ip} client=cold{i}")
            if reply != "OK":
                raise RuntimeError(f"RELEASE failed: {reply}")
    return summarize(delays, totals, describes)


def seed_cold(moto: Moto, launches: int, boot: float) -> dict[str, Any]:
    """The seed's launch-and-poll on the same moto, the launches side by side (each in a
    thread, as the seed serves each client in one)."""
    from broker.aws import make_client

    ec2 = make_client("ec2", region="us-east-1")
    res = moto.resources
    results: list[tuple[float, float, int]] = []
    lock = threading.Lock()

    def launch_and_poll(seconds: float) -> None:
        sent = time.monotonic()
        with lock:  # the boot delay applies to the instances created after it is set
            moto.set_boot_delay(seconds)
            reply = ec2.run_instances(
                ImageId=res.ami_id,
                InstanceType="c7i.8xlarge",
                KeyName=res.key_name,
                SecurityGroupIds=[res.security_group_id],
                SubnetId=res.subnet_id,
                MinCount=1,
                MaxCount=1,
            )
        instance_id = reply["Instances"][0]["InstanceId"]
        polls = 0
        try:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                polls += 1
                found = ec2.describe_instances(InstanceIds=[instance_id])
                instance = found["Reservations"][0]["Instances"][0]
                ip = instance.get("PublicIpAddress")
                if instance["State"]["Name"] == "running" and ip:
                    answered = time.monotonic()
                    running = moto.running_at(ip)
                    assert running is not None
                    with lock:
                        results.append((answered - running, answered - sent, polls))
                    return
                time.sleep(SEED_POLL)
        finally:
            ec2.terminate_instances(InstanceIds=[instance_id])

    threads = [
        threading.Thread(target=launch_and_poll, args=(seconds,))
        for seconds in boot_times(launches, boot)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if len(results) != launches:
        raise RuntimeError("a seed-style launch did not become running")
    return summarize([r[0] for r in results], [r[1] for r in results], [r[2] for r in results])


def summarize(delays: list[float], totals: list[float], describes: list[int]) -> dict[str, Any]:
    return {
        "launches": len(delays),
        "delay_median_s": round(statistics.median(delays), 3),
        "delay_max_s": round(max(delays), 3),
        "total_median_s": round(statistics.median(totals), 3),
        "describes_per_launch": round(statistics.mean(describes), 2),
        "describes_max": max(describes),
    }


def table(rows: list[tuple[str, dict[str, Any]]], boot: float) -> str:
    lines = [
        f"| cold GET_WORKER (boot {boot:g}-{boot + SPREAD:g} s) | launches "
        "| delay after running, median s | max s | request to answer, median s "
        "| DescribeInstances per launch (max) |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, r in rows:
        lines.append(
            f"| {name} | {r['launches']} | {r['delay_median_s']:.2f} | {r['delay_max_s']:.2f} "
            f"| {r['total_median_s']:.2f} | {r['describes_per_launch']:.1f} "
            f"({r['describes_max']}) |"
        )
    lines.append("target: median <= 0.3 s, max <= 1 s after running")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--launches", type=int, default=8)
    parser.add_argument("--boot", type=float, default=5.0, help="seconds pending (the least)")
    parser.add_argument("--registry", default="dynamodb", choices=["memory", "dynamodb"])
    parser.add_argument("--no-seed", action="store_true", help="skip the seed-style reference")
    parser.add_argument("--no-pin", action="store_true")
    parser.add_argument(
        "--trace", action="store_true", help="print each launch's describes (s from running)"
    )
    args = parser.parse_args()
    placement = Placement.default(not args.no_pin)
    pin_self(placement.generator)
    moto = Moto()
    trace: list[str] | None = [] if args.trace else None
    try:
        rows = [
            (
                f"broker (registry {args.registry})",
                broker_cold(moto, placement, args.launches, args.boot, args.registry, trace),
            )
        ]
        if not args.no_seed:
            rows.append(
                ("seed pattern (poll every 2 s)", seed_cold(moto, args.launches, args.boot))
            )
    finally:
        moto.stop()
    if trace:
        print("\n".join(trace))
    print(table(rows, args.boot))


if __name__ == "__main__":
    main()
