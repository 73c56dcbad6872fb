"""EC2 interruption events as plain code: EventBridge bodies (plain and SNS-wrapped) in, values
out; anything else is Unrecognised, never an exception; deadlines and their formatting."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest

from broker.interruptions import (
    EVENT_PATTERN,
    GONE_STATES,
    InterruptionWarning,
    RebalanceRecommendation,
    StateChange,
    Unrecognised,
    format_deadline,
    parse_event,
)

# 2026-11-23T12:32:56Z
EVENT_TIME = datetime(2026, 11, 23, 12, 32, 56, tzinfo=UTC).timestamp()
INSTANCE = "i-1234567890abcdef0"


def event(detail_type: str, detail: Any, **fields: Any) -> dict[str, Any]:
    """An EventBridge event shaped like the EC2 user guide's examples."""
    return {
        "version": "0",
        "id": "12345678-1234-1234-1234-123456789012",
        "detail-type": detail_type,
        "source": "aws.ec2",
        "account": "123456789012",
        "time": "2026-11-23T12:32:56Z",
        "region": "us-east-2",
        "resources": [f"arn:aws:ec2:us-east-2a:instance/{INSTANCE}"],
        "detail": detail,
        **fields,
    }


def spot_warning(action: str = "terminate") -> dict[str, Any]:
    return event(
        "EC2 Spot Instance Interruption Warning",
        {"instance-id": INSTANCE, "instance-action": action},
    )


def sns_wrapped(message: str) -> str:
    """The body SQS holds when EventBridge publishes to SNS and SNS (without raw message
    delivery) to SQS."""
    return json.dumps(
        {
            "Type": "Notification",
            "MessageId": "22b80b92-fdea-4c2c-8f9d-bdfb0c7bf324",
            "TopicArn": "arn:aws:sns:us-east-2:123456789012:ec2-events",
            "Message": message,
            "Timestamp": "2026-11-23T12:32:57.012Z",
            "SignatureVersion": "1",
            "Signature": "EXAMPLE",
            "SigningCertURL": "https://sns.us-east-2.amazonaws.com/cert.pem",
            "UnsubscribeURL": "https://sns.us-east-2.amazonaws.com/?Action=Unsubscribe",
        }
    )


def test_spot_interruption_warning_gives_a_deadline_two_minutes_after_the_event() -> None:
    """The warning carries no interruption time: EC2 acts two minutes after sending it."""
    expected = InterruptionWarning(INSTANCE, EVENT_TIME + 120, EVENT_TIME, "terminate")
    assert expected == parse_event(json.dumps(spot_warning()))


def test_stop_warning_has_the_same_two_minutes() -> None:
    """instance-action stop: the same deadline, the action kept."""
    expected = InterruptionWarning(INSTANCE, EVENT_TIME + 120, EVENT_TIME, "stop")
    assert expected == parse_event(json.dumps(spot_warning("stop")))


def test_hibernate_warning_is_due_at_once() -> None:
    """Hibernation starts when the warning is sent: no two minutes."""
    expected = InterruptionWarning(INSTANCE, EVENT_TIME, EVENT_TIME, "hibernate")
    assert expected == parse_event(json.dumps(spot_warning("hibernate")))


def test_warning_without_an_action_is_still_a_warning() -> None:
    """A missing instance-action is read as terminate rather than losing the warning."""
    body = event("EC2 Spot Instance Interruption Warning", {"instance-id": INSTANCE})
    expected = InterruptionWarning(INSTANCE, EVENT_TIME + 120, EVENT_TIME, "terminate")
    assert expected == parse_event(json.dumps(body))


def test_rebalance_recommendation() -> None:
    """The rebalance recommendation names the instance and nothing else."""
    body = event("EC2 Instance Rebalance Recommendation", {"instance-id": INSTANCE})
    assert RebalanceRecommendation(INSTANCE, EVENT_TIME) == parse_event(json.dumps(body))


@pytest.mark.parametrize(
    ("state", "alive"),
    [
        ("pending", True),
        ("running", True),
        ("stopping", False),
        ("stopped", False),
        ("shutting-down", False),
        ("terminated", False),
    ],
)
def test_state_change_keeps_the_state(state: str, alive: bool) -> None:
    """Every EC2 state parses; only pending and running are alive."""
    body = event(
        "EC2 Instance State-change Notification", {"instance-id": INSTANCE, "state": state}
    )
    parsed = parse_event(json.dumps(body))
    assert StateChange(INSTANCE, state, EVENT_TIME) == parsed
    assert isinstance(parsed, StateChange)
    assert alive == parsed.is_alive


def test_sns_wrapped_event_is_unwrapped() -> None:
    """An SNS notification's Message string holds the EventBridge event."""
    expected = InterruptionWarning(INSTANCE, EVENT_TIME + 120, EVENT_TIME, "terminate")
    assert expected == parse_event(sns_wrapped(json.dumps(spot_warning())))


def test_sns_wrapped_garbage_is_unrecognised() -> None:
    """A notification whose Message is not an event object is Unrecognised."""
    for message in ("not json", "[1, 2]", json.dumps({"source": "aws.ec2"})):
        assert isinstance(parse_event(sns_wrapped(message)), Unrecognised)
    no_message = json.dumps({"Type": "Notification", "Message": 42})
    expected = Unrecognised("SNS notification without a JSON object message")
    assert expected == parse_event(no_message)


def test_milliseconds_and_offsets_in_time_are_read() -> None:
    """RFC 3339 variants of the same instant give the same time."""
    for time in ("2026-11-23T12:32:56.000Z", "2026-11-23T13:32:56+01:00", "2026-11-23T12:32:56"):
        body = event("EC2 Instance Rebalance Recommendation", {"instance-id": INSTANCE}, time=time)
        assert RebalanceRecommendation(INSTANCE, EVENT_TIME) == parse_event(json.dumps(body))


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ("", "not a JSON object"),
        ("{", "not a JSON object"),
        ("null", "not a JSON object"),
        ('"a string"', "not a JSON object"),
        ("[]", "not a JSON object"),
        ("\ud800", "not a JSON object"),
        ("[" * 100_000, "not a JSON object"),
        (json.dumps({"Type": "Notification"}), "SNS notification without a JSON object message"),
        (json.dumps({**spot_warning(), "source": "aws.autoscaling"}), "source 'aws.autoscaling'"),
        (json.dumps({k: v for k, v in spot_warning().items() if k != "source"}), "source null"),
        (
            json.dumps(event("EC2 AMI State Change", {"ImageId": "ami-1"})),
            "detail-type 'EC2 AMI State Change'",
        ),
        (
            json.dumps({**spot_warning(), "time": "yesterday"}),
            "EC2 Spot Instance Interruption Warning: time 'yesterday'",
        ),
        (
            json.dumps({**spot_warning(), "time": 1795000000}),
            "EC2 Spot Instance Interruption Warning: time 1795000000",
        ),
        (
            json.dumps(event("EC2 Spot Instance Interruption Warning", None)),
            "EC2 Spot Instance Interruption Warning: no detail.instance-id",
        ),
        (
            json.dumps(event("EC2 Instance Rebalance Recommendation", {"instance-id": ""})),
            "EC2 Instance Rebalance Recommendation: no detail.instance-id",
        ),
        (
            json.dumps(event("EC2 Instance Rebalance Recommendation", {"instance-id": 7})),
            "EC2 Instance Rebalance Recommendation: no detail.instance-id",
        ),
        (
            json.dumps(
                event(
                    "EC2 Spot Instance Interruption Warning",
                    {"instance-id": INSTANCE, "instance-action": ["terminate"]},
                )
            ),
            "EC2 Spot Instance Interruption Warning: instance-action ['terminate']",
        ),
        (
            json.dumps(event("EC2 Instance State-change Notification", {"instance-id": INSTANCE})),
            "EC2 Instance State-change Notification: no detail.state",
        ),
    ],
)
def test_anything_else_is_unrecognised_with_a_reason(body: str, reason: str) -> None:
    """Bad JSON, other sources and detail-types, missing or mistyped fields: no exception."""
    assert Unrecognised(reason) == parse_event(body)


def test_format_deadline_is_iso_utc_to_the_second() -> None:
    """The PING reply's form: ISO 8601, UTC, Z, whole seconds (rounded down)."""
    assert format_deadline(EVENT_TIME + 120) == "2026-11-23T12:34:56Z"
    assert format_deadline(EVENT_TIME + 120.999) == "2026-11-23T12:34:56Z"
    assert format_deadline(0.0) == "1970-01-01T00:00:00Z"


def test_warning_deadline_formats_as_the_ping_reply_shows_it() -> None:
    """From an event sent at 12:32:56Z, the reply names 12:34:56Z."""
    parsed = parse_event(json.dumps(spot_warning()))
    assert isinstance(parsed, InterruptionWarning)
    assert format_deadline(parsed.deadline) == "2026-11-23T12:34:56Z"


def test_event_pattern_selects_the_three_kinds_and_only_ending_states() -> None:
    """One rule: EC2's warning and recommendation, and state changes that end an instance."""
    expected = {
        "source": ["aws.ec2"],
        "$or": [
            {
                "detail-type": [
                    "EC2 Spot Instance Interruption Warning",
                    "EC2 Instance Rebalance Recommendation",
                ]
            },
            {
                "detail-type": ["EC2 Instance State-change Notification"],
                "detail": {
                    "state": ["stopping", "stopped", "shutting-down", "terminated", "running"]
                },
            },
        ],
    }
    assert expected == json.loads(json.dumps(EVENT_PATTERN))
    assert GONE_STATES == ("stopping", "stopped", "shutting-down", "terminated")
