"""A lower bound on the idle dollars of any idle policy on the generated quick week, at a median
wait of 0 (docs/adaptive-idle.md, "How far the quick week's target is").

    .venv/bin/python bench/idle_bound.py [--seeds 1 2 3]

Two parts, from the trace alone (no simulation):

- the abandoned sessions' tails: a client that stops without RELEASE leaves its worker idle
  until its lease expires, `idle_timeout` (900 s) after its last PING (or its GET_WORKER, for
  one that never PINGs), under every policy;
- serving half the requests from kept workers: while at least one worker is idle, arrivals
  take one at rate lambda, so a policy that does not see the future idles at least 1/lambda per
  hand-out from a kept worker. A median of 0 needs ceil((n + 1) / 2) of the n requests so
  served; the cheapest are the arrivals in the busiest windows (lambda: the sessions of that
  window of that day over its length, the generator's own rate), each costing 1/lambda.

Prices are the simulator configs' c7i.8xlarge spot at $0.50/h. The bound assumes exactly one
idle worker whenever one is kept, in exactly the busiest hours, with the true rates known; no
real policy reaches it. It treats arrivals as Poisson at those rates; the generator places a
drawn number of sessions uniformly in each window, close to that.
"""

from __future__ import annotations

import argparse
import datetime as dt
from typing import Final

from broker import traces

PRICE: Final = 0.50  # $/hour
IDLE_TIMEOUT: Final = 900.0


def _minutes(hhmm: str) -> int:
    hours, minutes = hhmm.split(":")
    return int(hours) * 60 + int(minutes)


def bound(seed: int) -> tuple[int, float, float, float]:
    """(requests, abandoned-tail $, serving $, total $) for the quick week of `seed`."""
    trace = traces.generate("quick-week", seed)
    windows = [(_minutes(b.center), _minutes(b.until or b.center)) for b in traces.QUICK_WEEKDAY]
    arrivals: dict[tuple[dt.date, int], int] = {}
    for session in trace.sessions:
        local = dt.datetime.fromtimestamp(session.at, dt.UTC)
        minute = local.hour * 60 + local.minute
        for index, (start, end) in enumerate(windows):
            if local.weekday() < 5 and start <= minute < end:
                key = (local.date(), index)
                arrivals[key] = arrivals.get(key, 0) + 1
    rates = []  # per request in a window: sessions an hour there
    for (_, index), count in arrivals.items():
        start, end = windows[index]
        rates += [count / ((end - start) / 60)] * count
    needed = (len(trace.sessions) + 2) // 2
    serving = sum(1 / rate for rate in sorted(rates, reverse=True)[:needed]) * PRICE
    tails = 0.0
    for session in trace.sessions:
        if session.release:
            continue
        last = 0.0
        if session.ping is not None:
            last = (session.duration // session.ping) * session.ping
            if last >= session.duration:
                last -= session.ping
        tails += max(0.0, last + IDLE_TIMEOUT - session.duration) / 3600 * PRICE
    return len(trace.sessions), tails, serving, tails + serving


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    args = parser.parse_args()
    print("| seed | requests | abandoned tails $ | serving half $ | at least $ |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    for seed in args.seeds:
        requests, tails, serving, total = bound(seed)
        print(f"| {seed} | {requests} | {tails:.2f} | {serving:.2f} | {total:.2f} |")


if __name__ == "__main__":
    main()
