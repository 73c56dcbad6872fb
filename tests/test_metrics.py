"""Metrics: what the broker records comes out of `exposition()` as prometheus-client's own
parser reads it. Pure code: no sockets, no clock."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
from prometheus_client import REGISTRY
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from broker.metrics import CONTENT_TYPE, Histogram, Metrics, missing_monitoring_packages, outcome_of
from tests.test_statuspage import sample_status


def scrape(metrics: Metrics) -> dict[str, Metric]:
    """The families of one exposition, by name."""
    return {f.name: f for f in text_string_to_metric_families(metrics.exposition().decode())}


def value(families: dict[str, Metric], family: str, sample: str, **labels: str) -> float | None:
    """The value of the sample with exactly these labels, or None when there is none."""
    for s in families[family].samples if family in families else []:
        if s.name == sample and s.labels == labels:
            return s.value
    return None


def test_requests_are_counted_by_command_and_outcome_with_a_latency_histogram() -> None:
    """Each request adds to its (command, outcome) counter and its command's histogram."""
    metrics = Metrics()
    metrics.request("GET_WORKER", "ok", 0.3)
    metrics.request("get_worker", "budget", 0.002)
    metrics.request("STATUS", "ok", 0.0004)
    families = scrape(metrics)
    requests = "compute_broker_requests"
    assert families[requests].type == "counter"
    assert value(families, requests, f"{requests}_total", command="GET_WORKER", outcome="ok") == 1
    assert (
        value(families, requests, f"{requests}_total", command="GET_WORKER", outcome="budget") == 1
    )
    assert value(families, requests, f"{requests}_total", command="STATUS", outcome="ok") == 1
    hist = "compute_broker_request_duration_seconds"
    assert families[hist].type == "histogram"
    assert value(families, hist, f"{hist}_count", command="GET_WORKER") == 2
    assert value(families, hist, f"{hist}_sum", command="GET_WORKER") == pytest.approx(0.302)
    assert value(families, hist, f"{hist}_bucket", command="GET_WORKER", le="0.005") == 1
    assert value(families, hist, f"{hist}_bucket", command="GET_WORKER", le="0.5") == 2
    assert value(families, hist, f"{hist}_bucket", command="STATUS", le="0.001") == 1


def test_labels_outside_the_known_set_become_other() -> None:
    """A command not in the protocol and a reason that is a sentence do not make new series."""
    metrics = Metrics()
    metrics.request("FROB", "ok", 0.0)
    metrics.launch_failed("InsufficientInstanceCapacity")
    metrics.launch_failed("We currently do not have sufficient capacity in the zone you asked")
    families = scrape(metrics)
    assert (
        value(
            families,
            "compute_broker_requests",
            "compute_broker_requests_total",
            command="other",
            outcome="ok",
        )
        == 1
    )
    failures = "compute_broker_launch_failures"
    assert value(families, failures, f"{failures}_total", reason="other") == 1
    assert (
        value(families, failures, f"{failures}_total", reason="InsufficientInstanceCapacity") == 1
    )


@pytest.mark.parametrize(
    ("reply", "outcome"),
    [
        ("54.214.3.7", "ok"),
        ("OK", "ok"),
        ('{"workers": []}', "ok"),
        ("ERROR: budget: max_daily_cost $50.00 for 2026-11-23 reached (...)", "budget"),
        ("ERROR: max_workers reached (10) across replicas", "max_workers"),
        ("ERROR: launch failed: InsufficientInstanceCapacity: no offering had", "launch_failed"),
        ("ERROR: launch timed out after 300s", "launch_timeout"),
        ("ERROR: no worker ready after 5s", "wait_expired"),
        ("ERROR: no worker free after 5s (max_workers reached (1))", "wait_expired"),
        ("ERROR: registry unavailable: ResourceNotFoundException", "registry_unavailable"),
        ("ERROR: cloud unreachable: timeout", "cloud_unreachable"),
        ("ERROR: Worker not found", "not_found"),
        ("ERROR: Worker interrupted 2026-11-23T15:43:45Z", "interrupted"),
        ("ERROR: broker shutting down", "shutting_down"),
        ("ERROR: internal error (logged by the broker)", "internal_error"),
        ("ERROR: usage: PING <ip> [client=ID]", "bad_request"),
        ("ERROR: Unknown command", "bad_request"),
        ("ERROR: line too long", "bad_request"),
        ("ERROR: something new", "error"),
    ],
)
def test_outcome_of_a_reply_line(reply: str, outcome: str) -> None:
    """Every reply protocol.md lists maps to a small, fixed set of outcomes."""
    assert outcome_of(reply) == outcome


def test_status_document_sets_the_worker_lease_and_budget_gauges() -> None:
    """Workers by state/type/market, leases, run rate, spend and caps come from STATUS."""
    metrics = Metrics()
    metrics.update_from_status(sample_status(spent_today=12.41))
    f = scrape(metrics)
    workers = "compute_broker_workers"
    assert f[workers].type == "gauge"
    assert value(f, workers, workers, state="ready", type="c7i.8xlarge", market="spot") == 2
    assert (
        value(f, workers, workers, state="launching", type="m7i.4xlarge", market="on-demand") == 1
    )
    assert value(f, "compute_broker_leases", "compute_broker_leases") == 2
    assert value(f, "compute_broker_launches_in_flight", "compute_broker_launches_in_flight") == 1
    assert value(f, "compute_broker_max_workers", "compute_broker_max_workers") == 10
    rate = "compute_broker_run_rate_dollars_per_hour"
    assert value(f, rate, rate) == pytest.approx(1.8064)
    cap = "compute_broker_max_hourly_cost_dollars_per_hour"
    assert value(f, cap, cap) == 10
    spent, committed = (
        "compute_broker_budget_spent_dollars",
        "compute_broker_budget_committed_dollars",
    )
    limit = "compute_broker_budget_limit_dollars"
    assert value(f, spent, spent, period="day") == pytest.approx(12.41)
    assert value(f, spent, spent, period="month") == pytest.approx(310.5)
    assert value(f, committed, committed, period="day") == pytest.approx(14.02)
    assert value(f, limit, limit, period="day") == 50
    assert value(f, limit, limit, period="month") is None  # no monthly cap: no series
    assert value(f, "compute_broker_failed_offerings", "compute_broker_failed_offerings") == 1


def test_a_later_status_replaces_the_gauges_of_workers_that_are_gone() -> None:
    """Series of a (state, type, market) that no longer has workers disappear."""
    metrics = Metrics()
    metrics.update_from_status(sample_status())
    metrics.update_from_status({"workers": [], "leases": []})
    f = scrape(metrics)
    assert f["compute_broker_workers"].samples == []
    assert value(f, "compute_broker_leases", "compute_broker_leases") == 0
    assert value(f, "compute_broker_max_workers", "compute_broker_max_workers") is None


def test_launches_failures_fallbacks_interruptions_connections_and_registry_errors() -> None:
    """Each event method adds to its own counter, with its labels."""
    metrics = Metrics()
    metrics.launched("c7i.8xlarge", "spot", 3)
    metrics.launched("c7i.8xlarge", "spot")
    metrics.launch_failed("timeout")
    metrics.fallback()
    metrics.interrupted("spot_interruption")
    metrics.interrupted("budget")
    metrics.connection_opened()
    metrics.connection_opened()
    metrics.connection_closed()
    metrics.connection_refused("too_many_connections")
    metrics.registry_error("put_lease")
    f = scrape(metrics)
    launched = "compute_broker_workers_launched"
    assert value(f, launched, f"{launched}_total", type="c7i.8xlarge", market="spot") == 4
    failures = "compute_broker_launch_failures"
    assert value(f, failures, f"{failures}_total", reason="timeout") == 1
    assert value(f, "compute_broker_fallbacks", "compute_broker_fallbacks_total") == 1
    interruptions = "compute_broker_interruptions"
    assert value(f, interruptions, f"{interruptions}_total", reason="spot_interruption") == 1
    assert value(f, interruptions, f"{interruptions}_total", reason="budget") == 1
    assert value(f, "compute_broker_connections_open", "compute_broker_connections_open") == 1
    assert value(f, "compute_broker_connections", "compute_broker_connections_total") == 2
    refused = "compute_broker_connections_refused"
    assert value(f, refused, f"{refused}_total", reason="too_many_connections") == 1
    registry = "compute_broker_registry_errors"
    assert value(f, registry, f"{registry}_total", operation="put_lease") == 1


def test_aws_calls_have_a_duration_histogram_and_errors_by_code() -> None:
    """aws_call records every call's duration, and failed ones by error code."""
    metrics = Metrics()
    metrics.aws_call("ec2", "RunInstances", 0.2)
    metrics.aws_call("ec2", "RunInstances", 1.4, error="InsufficientInstanceCapacity")
    metrics.aws_call("dynamodb", "PutItem", 0.01)
    f = scrape(metrics)
    hist = "compute_broker_aws_call_duration_seconds"
    assert value(f, hist, f"{hist}_count", service="ec2", operation="RunInstances") == 2
    assert value(f, hist, f"{hist}_bucket", service="ec2", operation="RunInstances", le="0.25") == 1
    assert value(f, hist, f"{hist}_count", service="dynamodb", operation="PutItem") == 1
    errors = "compute_broker_aws_call_errors"
    assert (
        value(
            f,
            errors,
            f"{errors}_total",
            service="ec2",
            operation="RunInstances",
            code="InsufficientInstanceCapacity",
        )
        == 1
    )
    assert (
        value(
            f,
            errors,
            f"{errors}_total",
            service="dynamodb",
            operation="PutItem",
            code="InsufficientInstanceCapacity",
        )
        is None
    )


def test_healthy_gauge_appears_once_health_was_checked() -> None:
    """compute_broker_healthy is 1 or 0 after set_healthy, absent before."""
    metrics = Metrics()
    assert "compute_broker_healthy" not in scrape(metrics)
    metrics.set_healthy(False)
    assert value(scrape(metrics), "compute_broker_healthy", "compute_broker_healthy") == 0


def test_histogram_buckets_are_inclusive_upper_bounds() -> None:
    """An observation equal to a bound counts in that bound's bucket (Prometheus `le`)."""
    histogram = Histogram((0.1, 1.0))
    for observation in (0.1, 0.5, 1.0, 7.0):
        histogram.observe(observation)
    assert histogram.cumulative() == [(0.1, 1), (1.0, 3), (float("inf"), 4)]
    assert histogram.total == pytest.approx(8.6)


def test_each_metrics_has_its_own_registry_with_process_metrics() -> None:
    """Nothing goes to prometheus-client's global registry; the process' own figures come too."""
    one, two = Metrics(), Metrics()
    one.fallback()
    assert value(scrape(two), "compute_broker_fallbacks", "compute_broker_fallbacks_total") == 0
    assert REGISTRY.get_sample_value("compute_broker_fallbacks_total") is None
    assert "process_resident_memory_bytes" in scrape(one)
    assert CONTENT_TYPE.startswith("text/plain; version=0.0.4")


@pytest.mark.slow  # runs a Python process
def test_recording_works_without_the_monitoring_extra() -> None:
    """Without prometheus-client the broker still records; exposition names the extra."""
    script = textwrap.dedent(
        """
        import sys
        sys.modules["prometheus_client"] = None  # as if not installed
        sys.modules["h11"] = None
        from broker.metrics import Metrics, missing_monitoring_packages
        metrics = Metrics()
        metrics.request("PING", "ok", 0.001)
        metrics.update_from_status({"workers": []})
        assert metrics.requests == {("PING", "ok"): 1}
        print(missing_monitoring_packages())
        try:
            metrics.exposition()
        except ImportError as exc:
            print(exc)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stdout.splitlines() == [
        "['prometheus-client', 'h11']",
        "metrics need the monitoring extra: pip install 'compute-broker[monitoring]'",
    ]
    assert missing_monitoring_packages() == []
