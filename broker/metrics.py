"""What the broker counts, for Prometheus: plain counters the broker feeds, rendered on demand.

Recording is plain Python (dicts of numbers and small histograms), so the engine and the
server can always hold a `Metrics` and call its methods whether or not the HTTP listener is
on, and this module imports without the `monitoring` extra. Only `exposition()` needs
prometheus-client: it registers this object as a custom collector in a `CollectorRegistry` of
its own (never the global one) and lets prometheus-client write the text format.

Call the methods from the Trio thread (the adapters time their `to_thread` calls around the
`await`, not inside the thread): nothing here takes a lock.

Label values are kept to a bounded set: commands outside the protocol's become `other`, and a
reason, code, type or operation that does not look like an identifier (a sentence, an error
message) becomes `other`, so a mistake cannot create a series per message.
"""

from __future__ import annotations

import bisect
import importlib.util
import math
import re
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any, Final

import attrs

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry, Metric

PREFIX: Final = "compute_broker"
# The classic Prometheus text format. Every name here is a legacy-valid one, so this is exactly
# what generate_latest writes, and every Prometheus version reads it.
CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"
COMMANDS: Final = frozenset(
    {"GET_WORKER", "PING", "RELEASE", "STATUS", "BURST", "HELP", "QUIT", "ALIVE"}
)
OTHER: Final = "other"
# Requests take from microseconds (STATUS) to minutes (a GET_WORKER that waits for a launch).
REQUEST_BUCKETS: Final = (
    0.001,
    0.005,
    0.025,
    0.1,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
)
AWS_BUCKETS: Final = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
MONITORING_PACKAGES: Final = {"prometheus_client": "prometheus-client", "h11": "h11"}
_LABEL: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:/-]{0,63}")

# How reply lines map to a request's outcome (the first matching prefix wins; see protocol.md).
_OUTCOMES: Final = (
    ("ERROR: budget", "budget"),
    ("ERROR: max_workers reached", "max_workers"),
    ("ERROR: launch failed", "launch_failed"),
    ("ERROR: launch timed out", "launch_timeout"),
    ("ERROR: no worker ready after", "wait_expired"),
    ("ERROR: no worker free after", "wait_expired"),
    ("ERROR: registry unavailable", "registry_unavailable"),
    ("ERROR: cloud unreachable", "cloud_unreachable"),
    ("ERROR: Worker not found", "not_found"),
    ("ERROR: Worker not wanted", "not_wanted"),
    ("ERROR: not a compute-broker client", "bad_request"),
    ("ERROR: Worker interrupted", "interrupted"),
    ("ERROR: broker shutting down", "shutting_down"),
    ("ERROR: internal error", "internal_error"),
    ("ERROR: usage", "bad_request"),
    ("ERROR: Unknown command", "bad_request"),
    ("ERROR: line too long", "bad_request"),
    ("ERROR: line is not valid UTF-8", "bad_request"),
)


def outcome_of(reply: str) -> str:
    """A request's outcome label from its reply line: `ok`, a refusal's kind, or `error`."""
    if not reply.startswith("ERROR"):
        return "ok"
    for prefix, outcome in _OUTCOMES:
        if reply.startswith(prefix):
            return outcome
    return "error"


def label(value: object) -> str:
    """`value` as a label value when it looks like an identifier or code; else `other`."""
    text = str(value)
    return text if _LABEL.fullmatch(text) else OTHER


def missing_monitoring_packages() -> list[str]:
    """The `monitoring` extra's packages that are not installed (pip names); [] when none."""
    return [pip for module, pip in MONITORING_PACKAGES.items() if not _importable(module)]


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ValueError:  # a module set to None in sys.modules (how tests hide one)
        return False


@attrs.define
class Histogram:
    """Counts of observations per bucket (upper bounds, inclusive) and their sum."""

    bounds: tuple[float, ...]
    counts: list[int] = attrs.field()
    total: float = 0.0

    @counts.default
    def _zeros(self) -> list[int]:
        return [0] * (len(self.bounds) + 1)  # the last one is +Inf

    def observe(self, value: float) -> None:
        """Count one observation."""
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value

    def cumulative(self) -> list[tuple[float, int]]:
        """(upper bound, observations at or below it) for every bucket, +Inf last."""
        running = 0
        rows = []
        for bound, count in zip((*self.bounds, math.inf), self.counts, strict=True):
            running += count
            rows.append((bound, running))
        return rows


@attrs.frozen
class StatusFigures:
    """The gauges one STATUS document gives (see protocol.md for the fields)."""

    workers: Mapping[tuple[str, str, str], int] = attrs.field(factory=dict)  # (state, type, market)
    leases: int = 0
    launches_in_flight: int = 0
    max_workers: float | None = None
    run_rate: float = 0.0
    max_hourly_cost: float | None = None
    budget: Mapping[str, Mapping[str, float | None]] = attrs.field(factory=dict)  # period -> ...
    failed_offerings: int = 0

    @classmethod
    def from_status(cls, document: Mapping[str, Any]) -> StatusFigures:
        """The figures of a STATUS document; missing or malformed parts count as absent."""
        workers: dict[tuple[str, str, str], int] = {}
        for worker in _dicts(document.get("workers")):
            key = (
                label(worker.get("state")),
                label(worker.get("type")),
                label(worker.get("market")),
            )
            workers[key] = workers.get(key, 0) + 1
        totals = _dict(document.get("totals"))
        budget = _dict(document.get("budget"))
        periods = {}
        for period in ("day", "month"):
            figures = _dict(budget.get(period))
            if figures:
                periods[period] = {
                    name: _number(figures.get(name)) for name in ("spent", "committed", "limit")
                }
        run_rate = _number(budget.get("run_rate_per_hour"))
        if run_rate is None:
            run_rate = _number(totals.get("run_rate_per_hour"))
        max_hourly = _number(budget.get("max_hourly_cost", totals.get("max_hourly_cost")))
        return cls(
            workers=workers,
            leases=len(_dicts(document.get("leases"))),
            launches_in_flight=int(_number(totals.get("launches_in_flight")) or 0),
            max_workers=_number(totals.get("max_workers")),
            run_rate=run_rate or 0.0,
            max_hourly_cost=max_hourly,
            budget=periods,
            failed_offerings=len(_dicts(_dict(document.get("capacity")).get("failed_offerings"))),
        )


class Metrics:
    """The broker's counters, gauges and histograms, and their Prometheus exposition."""

    def __init__(self) -> None:
        self.requests: dict[tuple[str, str], int] = {}
        self.request_seconds: dict[str, Histogram] = {}
        self.connections_open = 0
        self.connections_accepted = 0
        self.connections_refused: dict[str, int] = {}
        self.launched_workers: dict[tuple[str, str], int] = {}
        self.launch_failures: dict[str, int] = {}
        self.fallbacks = 0
        self.interruptions: dict[str, int] = {}
        self.aws_seconds: dict[tuple[str, str], Histogram] = {}
        self.aws_errors: dict[tuple[str, str, str], int] = {}
        self.registry_errors: dict[str, int] = {}
        self.healthy: bool | None = None
        self.status = StatusFigures()
        self._registry: CollectorRegistry | None = None

    # --- what the broker calls ----------------------------------------------------------------

    def request(self, command: str, outcome: str, seconds: float) -> None:
        """One request served: its command (wire name), outcome (`outcome_of`) and duration.
        On every request's path: the usual case is two dict look-ups and a bisect."""
        key = (command, outcome)
        count = self.requests.get(key)
        if count is None:  # a new pair: check the labels once
            name = command.upper() if command.upper() in COMMANDS else OTHER
            key = (name, label(outcome))
            count = self.requests.get(key, 0)
            self.request_seconds.setdefault(name, Histogram(REQUEST_BUCKETS))
        self.requests[key] = count + 1
        self.request_seconds[key[0]].observe(max(0.0, seconds))

    def connection_opened(self) -> None:
        """A client connection was accepted (and is now open)."""
        self.connections_accepted += 1
        self.connections_open += 1

    def connection_closed(self) -> None:
        """An accepted connection closed (refused ones included)."""
        self.connections_open = max(0, self.connections_open - 1)

    def connection_refused(self, reason: str) -> None:
        """A connection was turned away (`too_many_connections`, `not_allowed`)."""
        key = label(reason)
        self.connections_refused[key] = self.connections_refused.get(key, 0) + 1

    def launched(self, instance_type: str, market: str, count: int = 1) -> None:
        """EC2 accepted a launch of `count` workers."""
        key = (label(instance_type), label(market))
        self.launched_workers[key] = self.launched_workers.get(key, 0) + count

    def launch_failed(self, reason: str) -> None:
        """A launch attempt failed: the AWS error code, or `timeout`, `probe`, ..."""
        key = label(reason)
        self.launch_failures[key] = self.launch_failures.get(key, 0) + 1

    def fallback(self) -> None:
        """A launch got its workers from a later offering than the first it wanted."""
        self.fallbacks += 1

    def interrupted(self, reason: str) -> None:
        """A worker began to be taken away (`spot_interruption`, `rebalance_recommendation`,
        `budget`)."""
        key = label(reason)
        self.interruptions[key] = self.interruptions.get(key, 0) + 1

    def aws_call(
        self, service: str, operation: str, seconds: float, error: str | None = None
    ) -> None:
        """One AWS API call (`ec2`, `RunInstances`), how long it took, and its error code."""
        key = (label(service), label(operation))
        self.aws_seconds.setdefault(key, Histogram(AWS_BUCKETS)).observe(max(0.0, seconds))
        if error is not None:
            error_key = (*key, label(error))
            self.aws_errors[error_key] = self.aws_errors.get(error_key, 0) + 1

    def registry_error(self, operation: str) -> None:
        """A registry operation failed (`put_lease`, `list_workers`, ...)."""
        key = label(operation)
        self.registry_errors[key] = self.registry_errors.get(key, 0) + 1

    def update_from_status(self, document: Mapping[str, Any]) -> None:
        """Set the gauges (workers, leases, spend, run rate) from a STATUS document."""
        self.status = StatusFigures.from_status(document)

    def set_healthy(self, healthy: bool) -> None:
        """What the last health check said (`compute_broker_healthy`)."""
        self.healthy = healthy

    # --- exposition ---------------------------------------------------------------------------

    @property
    def registry(self) -> CollectorRegistry:
        """A registry of our own with these metrics and the process' (CPU, memory, fds)."""
        if self._registry is None:
            try:
                from prometheus_client import CollectorRegistry, ProcessCollector
            except ImportError as exc:
                raise ImportError(
                    "metrics need the monitoring extra: pip install 'compute-broker[monitoring]'"
                ) from exc
            registry = CollectorRegistry(auto_describe=False)
            registry.register(self)
            ProcessCollector(registry=registry)
            self._registry = registry
        return self._registry

    def exposition(self) -> bytes:
        """Every metric in the Prometheus text format (`CONTENT_TYPE`)."""
        registry = self.registry  # first: it says which extra is missing
        from prometheus_client import generate_latest

        return generate_latest(registry)

    def collect(self) -> Iterator[Metric]:
        """The metric families, as prometheus-client's custom collectors yield them."""
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        def counter(
            name: str, doc: str, labels: tuple[str, ...], rows: Mapping[Any, int]
        ) -> Metric:
            family = CounterMetricFamily(f"{PREFIX}_{name}", doc, labels=labels)
            for key, value in sorted(rows.items()):
                family.add_metric(key if isinstance(key, tuple) else (key,), value)
            return family

        def gauge(
            name: str, doc: str, labels: tuple[str, ...], rows: Mapping[Any, float]
        ) -> Metric:
            family = GaugeMetricFamily(f"{PREFIX}_{name}", doc, labels=labels)
            for key, value in sorted(rows.items()):
                family.add_metric(key if isinstance(key, tuple) else (key,), value)
            return family

        def histogram(
            name: str, doc: str, labels: tuple[str, ...], rows: Mapping[Any, Histogram]
        ) -> Metric:
            family = HistogramMetricFamily(f"{PREFIX}_{name}", doc, labels=labels)
            for key, hist in sorted(rows.items()):
                buckets = [(_bound(bound), count) for bound, count in hist.cumulative()]
                family.add_metric(key if isinstance(key, tuple) else (key,), buckets, hist.total)
            return family

        s = self.status
        yield counter(
            "requests",
            "Requests served, by command and outcome.",
            ("command", "outcome"),
            self.requests,
        )
        yield histogram(
            "request_duration_seconds",
            "Time from a complete request line to its reply.",
            ("command",),
            self.request_seconds,
        )
        yield gauge(
            "connections_open", "Client connections open now.", (), {(): self.connections_open}
        )
        yield counter(
            "connections", "Client connections accepted.", (), {(): self.connections_accepted}
        )
        yield counter(
            "connections_refused",
            "Client connections turned away, by reason.",
            ("reason",),
            self.connections_refused,
        )
        yield counter(
            "workers_launched",
            "Workers EC2 accepted to launch, by type and market.",
            ("type", "market"),
            self.launched_workers,
        )
        yield counter(
            "launch_failures",
            "Launch attempts that failed, by reason (AWS error code).",
            ("reason",),
            self.launch_failures,
        )
        yield counter(
            "fallbacks",
            "Launches served by a later offering than the first wanted.",
            (),
            {(): self.fallbacks},
        )
        yield counter(
            "interruptions",
            "Workers that began to be taken away, by reason.",
            ("reason",),
            self.interruptions,
        )
        yield histogram(
            "aws_call_duration_seconds",
            "AWS API calls' duration, by service and operation.",
            ("service", "operation"),
            self.aws_seconds,
        )
        yield counter(
            "aws_call_errors",
            "AWS API calls that failed, by service, operation and error code.",
            ("service", "operation", "code"),
            self.aws_errors,
        )
        yield counter(
            "registry_errors",
            "Registry operations that failed, by operation.",
            ("operation",),
            self.registry_errors,
        )
        if self.healthy is not None:
            yield gauge(
                "healthy", "1 while /healthz answers 200, else 0.", (), {(): float(self.healthy)}
            )
        yield gauge(
            "workers",
            "Workers in this broker's pool, by state, type and market.",
            ("state", "type", "market"),
            s.workers,
        )
        yield gauge("leases", "Leases held now.", (), {(): s.leases})
        yield gauge(
            "launches_in_flight", "Workers being launched now.", (), {(): s.launches_in_flight}
        )
        if s.max_workers is not None:
            yield gauge("max_workers", "The max_workers cap.", (), {(): s.max_workers})
        yield gauge(
            "run_rate_dollars_per_hour",
            "What the pool's running workers cost per hour.",
            (),
            {(): s.run_rate},
        )
        if s.max_hourly_cost is not None:
            yield gauge(
                "max_hourly_cost_dollars_per_hour",
                "The max_hourly_cost cap.",
                (),
                {(): s.max_hourly_cost},
            )
        for figure, doc in (
            ("spent", "Dollars spent in the current period (day, month)."),
            ("committed", "Dollars spent plus running workers' unused cover: what the cap checks."),
            ("limit", "The period's dollar cap (absent: no cap)."),
        ):
            rows = {
                period: value
                for period, figures in s.budget.items()
                if (value := figures.get(figure)) is not None
            }
            yield gauge(f"budget_{figure}_dollars", doc, ("period",), rows)
        yield gauge(
            "failed_offerings",
            "Offerings skipped for now after a capacity error.",
            (),
            {(): s.failed_offerings},
        )


def _bound(bound: float) -> str:
    """A bucket's `le` label as prometheus-client writes it: `0.005`, `1.0`, `+Inf`."""
    return "+Inf" if math.isinf(bound) else repr(float(bound))


def _dict(value: object) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _dicts(value: object) -> list[Mapping[str, Any]]:
    return [item for item in value if isinstance(item, Mapping)] if isinstance(value, list) else []


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None
