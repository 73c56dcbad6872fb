"""The fault bench's invariants: each a function from what a scenario observed (client
outcomes, EC2's instances, the registry's items) to a `Check` that held or not, with the
figures that say why. Pure code: nothing here talks to a broker or to moto."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import attrs

from bench.fault_harness import Outcome, RegistryView

MICROS = 1_000_000
CENT = 0.01  # refusals print dollars with two decimals
IP = re.compile(r"\d+\.\d+\.\d+\.\d+")


@attrs.frozen
class Check:
    """One invariant of one scenario."""

    name: str
    ok: bool
    detail: str = ""

    def __str__(self) -> str:
        mark = "ok" if self.ok else "FAILED"
        return f"{mark}: {self.name}" + (f" ({self.detail})" if self.detail else "")


# --- replies ------------------------------------------------------------------------------


def one_reply_each(outcomes: Sequence[Outcome], *, may_be_cut: int = 0) -> Check:
    """Every request got exactly one reply line; at most `may_be_cut` requests (those in
    flight when a broker was killed) got none because the connection died with the broker."""
    endings = Counter(o.ending for o in outcomes)
    cut = endings.get("cut", 0)
    ok = endings.get("one", 0) + cut == len(outcomes) and cut <= may_be_cut
    detail = ", ".join(f"{n} {ending}" for ending, n in sorted(endings.items()))
    return Check("every request got exactly one reply line", ok, detail)


def granted(outcomes: Iterable[Outcome]) -> list[Outcome]:
    """The requests that got a worker's IP."""
    return [o for o in outcomes if o.reply is not None and IP.fullmatch(o.reply)]


def client_of(outcome: Outcome) -> str:
    """The identity the broker gives a loopback client (`127.0.0.1/<client=ID>`)."""
    match = re.search(r"\bclient=(\S+)", outcome.line)
    return "127.0.0.1" if match is None else f"127.0.0.1/{match.group(1)}"


def errors_are(outcomes: Iterable[Outcome], allowed: Sequence[str]) -> Check:
    """Every ERROR reply begins with one of `allowed` (after `ERROR: `)."""
    errors = [o.reply for o in outcomes if o.error and o.reply is not None]
    bad = [e for e in errors if not any(e.startswith(f"ERROR: {a}") for a in allowed)]
    kinds = Counter(_kind(e) for e in errors)
    detail = ", ".join(f"{n}x {k}" for k, n in kinds.most_common()) or "no errors"
    if bad:
        detail += f"; unexpected: {bad[0]!r}"
    return Check("errors are the expected ones", not bad, detail)


def _kind(error: str) -> str:
    return re.split(r"[:(\d$]", error.removeprefix("ERROR: "), maxsplit=1)[0].strip()


# --- the registry against EC2 ---------------------------------------------------------------


def accounted(live: set[str], view: RegistryView) -> Check:
    """Every instance EC2 runs for the pool is a worker in the registry, and every cloud
    worker in the registry runs in EC2."""
    known = set(view.cloud_workers())
    strays, ghosts = sorted(live - known), sorted(known - live)
    detail = f"{len(live)} running, {len(known)} in the registry"
    if strays:
        detail += f"; not in the registry: {', '.join(strays)}"
    if ghosts:
        detail += f"; not running: {', '.join(ghosts)}"
    return Check(
        "every running instance accounted for in the registry", not strays and not ghosts, detail
    )


def settled(view: RegistryView, live: set[str]) -> Check:
    """Nothing left over by a crash: no launch intent, and the pool-wide instance counter
    equals the instances running."""
    ok = not view.intents and view.reserved == len(live)
    detail = f"{len(view.intents)} intents, counter {view.reserved}, {len(live)} running"
    return Check("no intent left, instance counter = running instances", ok, detail)


def leases_kept(
    outcomes: Iterable[Outcome], view: RegistryView, released: Iterable[str] = ()
) -> Check:
    """Every worker a client was given (and did not release) is still leased to it."""
    held = {(lease["client"], lease["ip"]) for lease in view.leases}
    gone = set(released)
    missing = [
        f"{client_of(o)} {o.reply}"
        for o in granted(outcomes)
        if (client_of(o), o.reply) not in held and o.reply not in gone
    ]
    given = len(granted(outcomes))
    detail = f"{given} given, {len(view.leases)} leases in the registry"
    if missing:
        detail += f"; lost: {', '.join(missing[:3])}"
    return Check("no lease lost", not missing, detail)


def exclusive(outcomes: Iterable[Outcome], view: RegistryView, capacity: int = 1) -> Check:
    """No worker leased to more than `capacity` clients: in the replies (distinct clients
    per IP; nobody released) and in the registry (leases and `holders` per worker)."""
    clients: dict[str, set[str]] = {}
    for outcome in granted(outcomes):
        clients.setdefault(outcome.reply or "", set()).add(client_of(outcome))
    per_worker = Counter(lease["instance_id"] for lease in view.leases)
    holders = {k: int(w.get("holders", 0)) for k, w in view.workers.items()}
    over = [ip for ip, who in clients.items() if len(who) > capacity]
    over += [iid for iid, n in per_worker.items() if n > capacity]
    over += [iid for iid, n in holders.items() if n > capacity]
    detail = f"{len(clients)} workers given to {sum(len(w) for w in clients.values())} clients"
    if over:
        detail += f"; shared: {', '.join(str(x) for x in over[:3])}"
    return Check("no worker leased twice (exclusive)", not over, detail)


def ledger_exact(view: RegistryView, slack_seconds: float = 30.0) -> Check:
    """The committed dollars (every day's) equal the covers of the registry's workers (each
    its price from launch to `paid_until`), within `slack_seconds` of price: nothing charged for a
    launch that left no worker, nothing running uncharged. For scenarios where no worker
    ended."""
    expected = sum(
        float(w["price_per_hour"]) * (float(w["paid_until"]) - float(w["launched_at"])) / 3600
        for w in view.cloud_workers().values()
        if w.get("price_per_hour") is not None and w.get("paid_until") is not None
    )
    slack = sum(
        float(w["price_per_hour"]) * slack_seconds / 3600
        for w in view.cloud_workers().values()
        if w.get("price_per_hour") is not None
    )
    committed = sum(v for k, v in view.spend.items() if k.startswith("day:")) / MICROS
    ok = abs(committed - expected) <= slack + 1e-6
    detail = f"committed ${committed:.4f}, workers' covers ${expected:.4f}"
    return Check("ledger = covers of the workers (no leaked charge)", ok, detail)


# --- caps ------------------------------------------------------------------------------------


def max_workers_held(launched: int, cap: int) -> Check:
    """No more instances than max_workers were ever launched (none ended meanwhile)."""
    return Check("max_workers respected", launched <= cap, f"{launched} launched, cap {cap}")


def hourly_held(prices: Sequence[float], cap: float) -> Check:
    """The run rate of every instance ever launched (none ended) stayed under the cap."""
    rate = sum(prices)
    return Check(
        "max_hourly_cost respected",
        rate <= cap + 1e-9,
        f"${rate:.4g}/h of {len(prices)} instances, cap ${cap:g}/h",
    )


def daily_held(view: RegistryView, day: str, cap: float, launched: int, cover: float) -> Check:
    """The day's committed dollars stayed under max_daily_cost, and so did the launches'
    covers counted independently of the ledger."""
    committed = view.spend.get(f"day:{day}", 0) / MICROS
    by_count = launched * cover
    ok = committed <= cap + 1e-6 and by_count <= cap + 1e-6
    detail = f"ledger ${committed:.4f}, {launched} launches x ${cover:.4f}, cap ${cap:g}"
    return Check("max_daily_cost respected", ok, detail)


# --- refusals --------------------------------------------------------------------------------

_MAX_WORKERS = re.compile(r"max_workers reached \((\d+)\)( across replicas)?")
_PERIOD = re.compile(
    r"budget: max_(daily|monthly)_cost \$([\d.]+) for (\S+) reached \(spent \$([\d.]+), "
    r"committed \$([\d.]+) until running workers can be reaped, one more needs \$([\d.]+)\)"
)
_RATE = re.compile(
    r"budget: launching one (\S+) (\S+) \(\$([\d.]+)/h\) would raise the run rate from "
    r"\$([\d.]+)/h to \$([\d.]+)/h, above max_hourly_cost \$([\d.]+)/h"
)
_WAITED = re.compile(r"no worker free after [\d.]+s \((.*)\)")


@attrs.frozen
class Caps:
    """What a scenario's brokers were configured with, and the facts to check figures by."""

    max_workers: int | None = None
    max_hourly_cost: float | None = None
    max_daily_cost: float | None = None
    max_monthly_cost: float | None = None
    price: float = 0.0  # $/h of the one type launched
    cover: float = 0.0  # $ of one launch's cover
    day: str = ""  # the current day and month in the budget zone
    month: str = ""


def refusal_problem(reply: str, caps: Caps) -> str | None:
    """Why a cap refusal's figures are wrong (None: right, or not a cap refusal)."""
    reason = reply.removeprefix("ERROR: ")
    waited = _WAITED.fullmatch(reason)
    if waited:
        reason = waited.group(1)
    if m := _MAX_WORKERS.fullmatch(reason):
        return None if int(m.group(1)) == caps.max_workers else f"names {m.group(1)}"
    if m := _PERIOD.fullmatch(reason):
        daily = m.group(1) == "daily"
        cap = caps.max_daily_cost if daily else caps.max_monthly_cost
        label = caps.day if daily else caps.month
        limit, spent, committed, one_more = (float(m.group(i)) for i in (2, 4, 5, 6))
        if cap is None or abs(limit - cap) > CENT / 2:
            return f"names cap ${limit} (configured {cap})"
        if m.group(3) != label:
            return f"names period {m.group(3)} (now {label})"
        if abs(one_more - caps.cover) > CENT:
            return f"one more needs ${one_more} (a cover is ${caps.cover:.4f})"
        if committed + one_more <= limit - CENT or spent > committed + CENT:
            return f"figures do not bind: spent {spent}, committed {committed}, +{one_more}"
        return None
    if m := _RATE.fullmatch(reason):
        price, rate, after, cap = (float(m.group(i)) for i in (3, 4, 5, 6))
        if caps.max_hourly_cost is None or abs(cap - caps.max_hourly_cost) > 1e-3 * cap:
            return f"names cap ${cap}/h (configured {caps.max_hourly_cost})"
        if abs(price - caps.price) > 1e-3 * price:
            return f"names price ${price}/h (it is ${caps.price}/h)"
        if abs(rate + price - after) > 1e-3 * after or after <= cap or rate > cap + 1e-9:
            return f"figures do not bind: ${rate}/h + ${price}/h = ${after}/h vs ${cap}/h"
        return None
    return None


def refusals_true(
    outcomes: Iterable[Outcome],
    caps: Caps,
    *,
    expect: str | None = None,
    besides: Sequence[str] = (),
) -> Check:
    """Every refusal by a cap names a configured cap with figures that bind; with `expect`
    (e.g. "max_daily_cost"), the refusals name that cap, except errors that begin with one
    of `besides` (after `ERROR: `)."""
    refusals = [o.reply for o in outcomes if o.error and o.reply is not None]
    problems = [(r, p) for r in refusals if (p := refusal_problem(r, caps)) is not None]
    if expect is not None:
        problems += [
            (r, f"does not name {expect}")
            for r in refusals
            if expect not in r and not any(r.startswith(f"ERROR: {b}") for b in besides)
        ]
    detail = f"{len(refusals)} refusals"
    if problems:
        reply, problem = problems[0]
        detail += f"; {problem}: {reply!r}"
    return Check("every refusal names the cap that bound, true figures", not problems, detail)


def holds(name: str, ok: bool, detail: str = "") -> Check:
    """A scenario-specific invariant."""
    return Check(name, ok, detail)


def summarize(checks: Sequence[Check]) -> str:
    return f"{sum(c.ok for c in checks)}/{len(checks)}"


def figures_text(figures: Mapping[str, Any]) -> str:
    return ", ".join(f"{k} {v}" for k, v in figures.items())
