"""Traces for the policy simulator (`broker.simulate`): client sessions, as JSON lines.

One line per session, sorted by arrival:

    {"at": "2026-11-02T09:03:12Z", "duration": 2700, "ping": 60, "client": "lab/u3-1",
     "release": true}

- `at`: when the client sends GET_WORKER (ISO 8601, UTC unless it carries an offset);
- `duration`: seconds the client uses the worker once it has it;
- `ping`: seconds between its PINGs while it does (the client libraries: 60), `null` for none;
- `client`: its `client=` identity; `release`: whether it sends RELEASE at the end (`false`:
  it stops PINGing and goes away, as a killed script or a netcat user does);
- optional `type` and `market`: what the GET_WORKER names (absent: the broker's default).

A line `{"at": ..., "queue_depth": N}` sets the job queue's depth from then on (for
`burst_policy: {mode: auto}`). Blank lines and lines starting with `#` are skipped.

Traces come from four places: a file, `generate` (a lab day or a lab week, from a seed),
`from_log` (the broker's own `lease.started` / `lease.ended` events, as journald keeps them),
and `from_history` (the registry's lease history, `broker.history`).
"""

from __future__ import annotations

import datetime as dt
import json
import math
import random
import re
from collections.abc import Iterable, Iterator
from typing import Any, Final
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import attrs

from broker.model import Market
from broker.registry import LeaseHistoryRecord

GENERATED: Final = ("lab-day", "lab-week", "quick-week")
DEFAULT_START: Final = dt.date(2026, 11, 2)  # a Monday
DEFAULT_PING: Final = 60.0  # the client libraries' PING cadence


class TraceError(ValueError):
    """A trace or log line that cannot be read; `str()` names the line."""


@attrs.frozen
class Session:
    """One client's use of one worker: ask, use it `duration` seconds, PING, release or not."""

    at: float  # Unix seconds of the GET_WORKER
    duration: float
    client: str
    ping: float | None = DEFAULT_PING
    release: bool = True
    instance_type: str | None = None
    market: Market | None = None

    def to_json(self) -> str:
        """The session's trace line."""
        line: dict[str, Any] = {
            "at": _iso(self.at),
            "duration": _number(self.duration),
            "ping": None if self.ping is None else _number(self.ping),
            "client": self.client,
            "release": self.release,
        }
        if self.instance_type is not None:
            line["type"] = self.instance_type
        if self.market is not None:
            line["market"] = str(self.market)
        return json.dumps(line)


@attrs.frozen
class QueueDepth:
    """From `at` on, the job queue holds `depth` messages."""

    at: float
    depth: int

    def to_json(self) -> str:
        """The depth's trace line."""
        return json.dumps({"at": _iso(self.at), "queue_depth": self.depth})


@attrs.frozen
class Trace:
    """Sessions sorted by arrival, and the job queue's depth over time (often none)."""

    sessions: tuple[Session, ...]
    depths: tuple[QueueDepth, ...] = ()

    @property
    def start(self) -> float:
        """The first arrival or depth change (0.0 for an empty trace)."""
        times = [s.at for s in self.sessions[:1]] + [d.at for d in self.depths[:1]]
        return min(times, default=0.0)

    @property
    def last_depth_change(self) -> float:
        """When the job queue's depth last changes (the start if it never does)."""
        return self.depths[-1].at if self.depths else self.start

    def lines(self) -> Iterator[str]:
        """The trace as JSON lines, in time order."""
        events: list[Session | QueueDepth] = [*self.sessions, *self.depths]
        for event in sorted(events, key=lambda e: e.at):
            yield event.to_json()


def trace(sessions: Iterable[Session], depths: Iterable[QueueDepth] = ()) -> Trace:
    """A trace of these, sorted by time."""
    return Trace(
        tuple(sorted(sessions, key=lambda s: (s.at, s.client))),
        tuple(sorted(depths, key=lambda d: d.at)),
    )


# --- reading ---------------------------------------------------------------------------------


def read(lines: Iterable[str]) -> Trace:
    """Parse a trace's JSON lines; raises TraceError naming the first bad line."""
    sessions: list[Session] = []
    depths: list[QueueDepth] = []
    for number, raw in enumerate(lines, 1):
        text = raw.strip()
        if not text or text.startswith("#"):
            continue
        try:
            item = json.loads(text)
            if not isinstance(item, dict):
                raise ValueError("not a JSON object")
            if "queue_depth" in item:
                depths.append(QueueDepth(_time(item["at"]), _count(item["queue_depth"])))
            else:
                sessions.append(_session(item))
        except (ValueError, KeyError, TypeError) as exc:
            problem = f"missing {exc}" if isinstance(exc, KeyError) else str(exc)
            raise TraceError(f"line {number}: {problem}") from None
    return trace(sessions, depths)


def _session(item: dict[str, Any]) -> Session:
    unknown = set(item) - {"at", "duration", "ping", "client", "release", "type", "market"}
    if unknown:
        raise ValueError(f"unknown key {sorted(unknown)[0]!r}")
    ping = item.get("ping", DEFAULT_PING)
    release = item.get("release", True)
    if not isinstance(release, bool):
        raise ValueError("release must be true or false")
    client = item["client"]
    if not isinstance(client, str) or not client:
        raise ValueError("client must be a non-empty string")
    instance_type = item.get("type")
    if instance_type is not None and not isinstance(instance_type, str):
        raise ValueError("type must be a string")
    market = item.get("market")
    return Session(
        at=_time(item["at"]),
        duration=_seconds(item["duration"], "duration"),
        client=client,
        ping=None if ping is None else _seconds(ping, "ping", positive=True),
        release=release,
        instance_type=instance_type,
        market=None if market is None else Market(market),
    )


def _time(value: Any) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, str):
        raise ValueError(f"at must be an ISO 8601 time or Unix seconds, not {value!r}")
    try:
        moment = dt.datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(f"not an ISO 8601 time: {value!r}") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.UTC)
    return moment.timestamp()


def _seconds(value: Any, key: str, *, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{key} must be a number of seconds")
    if value < 0 or (positive and value == 0):
        raise ValueError(f"{key} must be {'above' if positive else 'at least'} 0")
    return float(value)


def _count(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError("queue_depth must be a whole number, at least 0")
    return value


def _iso(at: float) -> str:
    moment = dt.datetime.fromtimestamp(at, dt.UTC)
    text = moment.isoformat(timespec="milliseconds" if at % 1 else "seconds")
    return text.replace("+00:00", "Z")


def _number(value: float) -> float | int:
    return int(value) if value == int(value) else round(value, 3)


# --- the broker's own log ----------------------------------------------------------------------

_PRIORITY = re.compile(r"^<\d>")


def from_log(
    lines: Iterable[str], *, idle_timeout: float = 900.0, ping: float | None = DEFAULT_PING
) -> Trace:
    """A trace from the broker's log: one session per `lease.ended` event.

    The session arrived `waited_seconds` (from its `lease.started`, else 0) before its lease
    started, which was `duration_seconds` before the lease ended. A lease that ended
    `released` was released; one that `expired` was abandoned, and its client was active
    until `idle_timeout` (the logging broker's) before it expired. Lines may be JSON (as
    `journalctl -o cat` prints them, with or without a `<N>` priority), journald's own JSON
    (`journalctl -o json`, the event in MESSAGE), or anything else, which is skipped. The log
    does not say which type a client asked for: sessions ask for the default, and PING every
    `ping` seconds (the client libraries do, every 60 s).
    """
    waited: dict[tuple[str, str], float] = {}
    sessions: list[Session] = []
    for number, raw in enumerate(lines, 1):
        event = _event(raw)
        if event is None:
            continue
        name = event.get("event")
        key = (str(event.get("client")), str(event.get("instance_id")))
        try:
            if name == "lease.started":
                waited[key] = _seconds(event.get("waited_seconds", 0), "waited_seconds")
                continue
            if name != "lease.ended":
                continue
            ended = _time(event["timestamp"])
            duration = _seconds(event["duration_seconds"], "duration_seconds")
        except (KeyError, ValueError) as exc:
            problem = f"missing {exc}" if isinstance(exc, KeyError) else str(exc)
            raise TraceError(f"line {number}: {name}: {problem}") from None
        expired = event.get("reason") == "expired"
        sessions.append(
            Session(
                at=ended - duration - waited.pop(key, 0.0),
                duration=max(0.0, duration - idle_timeout) if expired else duration,
                client=key[0],
                ping=ping,
                release=not expired,
            )
        )
    return trace(sessions)


def from_history(
    records: Iterable[LeaseHistoryRecord],
    *,
    idle_timeout: float = 900.0,
    ping: float | None = DEFAULT_PING,
) -> Trace:
    """A trace from the registry's lease history (`compute-broker report`'s records): one
    session per lease, as `from_log` makes them, except that the history does not keep how long
    a client waited, so each session arrives when its lease started. A lease that `expired` was
    abandoned (its client active until `idle_timeout` before the end); one whose reply was
    undeliverable is left out (nobody used it); the others were released (a worker terminated
    or lost under its lease ended the session early: the history cannot say how long the client
    would have gone on)."""
    sessions = [
        Session(
            at=record.started_at,
            duration=(
                max(0.0, record.hours * 3600.0 - idle_timeout)
                if record.reason == "expired"
                else record.hours * 3600.0
            ),
            client=record.client,
            ping=ping,
            release=record.reason != "expired",
        )
        for record in records
        if record.reason != "reply_undeliverable"
    ]
    return trace(sessions)


def _event(raw: str) -> dict[str, Any] | None:
    text = _PRIORITY.sub("", raw.strip())
    if not text.startswith("{"):
        return None
    try:
        item = json.loads(text)
    except ValueError:
        return None
    if not isinstance(item, dict):
        return None
    message = item.get("MESSAGE")
    if isinstance(message, str) and "event" not in item:
        return _event(message)
    return item


# --- the generator -------------------------------------------------------------------------------


@attrs.frozen
class Burst:
    """Sessions arriving in one part of a lab day: `count` (min, max) of them, arriving
    around `center` (hh:mm) with a spread of `spread` minutes (normal), or uniformly between
    `center` and `until`; using the worker for a lognormal time of median `minutes`."""

    count: tuple[int, int]
    center: str
    minutes: float
    spread: float = 0.0
    until: str | None = None
    sigma: float = 0.6  # of the duration's logarithm


# A lab of about fifteen people with one shared broker. Bursts when sessions start (9:00 and
# 14:00), a quieter late morning and afternoon, a lunch gap, and an overnight batch.
WEEKDAY: Final = (
    Burst((8, 12), "09:00", 45, spread=10),
    Burst((3, 6), "09:45", 30, until="11:45"),
    Burst((0, 1), "12:00", 20, until="13:00"),
    Burst((6, 10), "14:00", 60, spread=10),
    Burst((3, 6), "15:00", 40, until="17:30"),
)
WEEKEND: Final = (Burst((2, 5), "10:00", 45, until="17:00"),)
BATCH: Final = Burst((2, 4), "19:00", 300, until="22:00", sigma=0.3)  # overnight jobs, ~5 h
WEEKEND_BATCH: Final = Burst((0, 2), "19:00", 300, until="22:00", sigma=0.3)
# The same lab running short analyses through the working day (quick-week): a session every
# few minutes, each a few minutes long, so a released worker is often asked for again soon.
QUICK_WEEKDAY: Final = (
    Burst((25, 40), "09:00", 8, until="12:00", sigma=0.5),
    Burst((2, 6), "12:00", 8, until="13:00", sigma=0.5),
    Burst((30, 45), "13:00", 8, until="18:00", sigma=0.5),
)
QUICK_WEEKEND: Final = (Burst((3, 8), "10:00", 8, until="17:00", sigma=0.5),)
ABANDONED: Final = 0.10  # scripts killed without cleanup: PINGs stop, no RELEASE
NETCAT: Final = 0.05  # people with netcat: no PING, no RELEASE, short sessions
SHORTEST: Final = 120.0
LONGEST: Final = 12 * 3600.0


def generate(
    kind: str, seed: int, *, start: dt.date = DEFAULT_START, timezone: str = "UTC"
) -> Trace:
    """A lab day (`lab-day`, on `start`) or a lab week (`lab-week`, seven days from `start`,
    quieter at the weekend), or a week of short analyses (`quick-week`), the same for the same
    seed. Times are wall times in `timezone`."""
    if kind not in GENERATED:
        raise ValueError(f"unknown trace kind {kind!r} (one of {', '.join(GENERATED)})")
    rng = random.Random(seed)
    try:
        zone = ZoneInfo(timezone)
    except (ValueError, ZoneInfoNotFoundError):
        raise ValueError(f"unknown time zone {timezone!r}") from None
    days = 1 if kind == "lab-day" else 7
    sessions: list[Session] = []
    for offset in range(days):
        day = start + dt.timedelta(days=offset)
        weekend = day.weekday() >= 5
        if kind == "quick-week":
            parts = [(part, False) for part in (QUICK_WEEKEND if weekend else QUICK_WEEKDAY)]
        else:
            parts = [(part, False) for part in (WEEKEND if weekend else WEEKDAY)]
        parts.append((WEEKEND_BATCH if weekend else BATCH, True))
        for part, batch in parts:
            for _ in range(rng.randint(*part.count)):
                sessions.append(_one(rng, day, zone, part, batch, len(sessions) + 1))
    return trace(sessions)


def _one(
    rng: random.Random, day: dt.date, zone: ZoneInfo, part: Burst, batch: bool, n: int
) -> Session:
    center = _wall(day, part.center, zone)
    if part.until is not None:
        at = rng.uniform(center, _wall(day, part.until, zone))
    else:
        at = center + 60 * max(-3 * part.spread, min(3 * part.spread, rng.gauss(0, part.spread)))
    duration = part.minutes * 60 * math.exp(rng.gauss(0, part.sigma))
    user = f"u{rng.randint(1, 15)}"
    roll = rng.random()
    if batch:
        return Session(round(at), round(min(LONGEST, duration)), f"lab/batch-{n}")
    if roll < NETCAT:
        short = min(duration, 600 * math.exp(rng.gauss(0, 0.5)))
        return Session(round(at), round(max(SHORTEST, short)), f"lab/{user}-nc-{n}", None, False)
    duration = round(max(SHORTEST, min(LONGEST, duration)))
    return Session(round(at), duration, f"lab/{user}-{n}", release=roll >= NETCAT + ABANDONED)


def _wall(day: dt.date, hhmm: str, zone: ZoneInfo) -> float:
    hour, minute = (int(part) for part in hhmm.split(":"))
    return dt.datetime.combine(day, dt.time(hour, minute), zone).timestamp()
