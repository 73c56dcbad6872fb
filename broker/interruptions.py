"""EC2 interruption events, as plain code: an SQS message body in, a frozen value out.

No I/O and no clock. An EventBridge rule (`EVENT_PATTERN`) puts EC2's events on an SQS queue,
as aws-node-termination-handler's queue mode does; the engine receives the bodies through the
`broker.cloud.EventQueue` port and asks `parse_event(body)` what each one says:

- "EC2 Spot Instance Interruption Warning" (`detail`: `instance-id`, `instance-action` =
  terminate | stop | hibernate) -> `InterruptionWarning`. The event carries no interruption
  time: EC2 sends it two minutes ahead, so the deadline is the event's `time` + 120 s, except
  for hibernate, which starts at once (no two-minute warning).
- "EC2 Instance Rebalance Recommendation" (`detail`: `instance-id`) -> `RebalanceRecommendation`.
- "EC2 Instance State-change Notification" (`detail`: `instance-id`, `state`) -> `StateChange`.
- Anything else -> `Unrecognised(reason)`; bad input never raises.

A body may also be an SNS notification wrapping the event (EventBridge -> SNS -> SQS without raw
delivery): `{"Type": "Notification", "Message": "<the event as a JSON string>"}`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, Final, TypeAlias

import attrs

from broker.values import show as _show

SOURCE: Final = "aws.ec2"
SPOT_INTERRUPTION: Final = "EC2 Spot Instance Interruption Warning"
REBALANCE_RECOMMENDATION: Final = "EC2 Instance Rebalance Recommendation"
STATE_CHANGE: Final = "EC2 Instance State-change Notification"

# EC2 sends the interruption warning this long before it acts.
WARNING_SECONDS: Final = 120.0
ALIVE_STATES: Final = ("pending", "running")
# The states a state change is worth queueing for: the instance is going or gone.
GONE_STATES: Final = ("stopping", "stopped", "shutting-down", "terminated")

# One EventBridge rule for all three kinds. State changes fire for every instance in the
# region, so only those that end an instance are sent.
EVENT_PATTERN: Final[Mapping[str, Any]] = {
    "source": [SOURCE],
    "$or": [
        {"detail-type": [SPOT_INTERRUPTION, REBALANCE_RECOMMENDATION]},
        # `running`: a launching worker is handed out at once (broker.bootwatch).
        {"detail-type": [STATE_CHANGE], "detail": {"state": [*GONE_STATES, "running"]}},
    ],
}


@attrs.frozen
class InterruptionWarning:
    """EC2 will stop, hibernate or terminate this spot instance at `deadline` (Unix seconds).

    `action` is EC2's `instance-action`; `event_time` is when EC2 sent the warning.
    """

    instance_id: str
    deadline: float
    event_time: float
    action: str = "terminate"


@attrs.frozen
class RebalanceRecommendation:
    """This spot instance is at elevated risk of interruption (no deadline yet)."""

    instance_id: str
    event_time: float


@attrs.frozen
class StateChange:
    """This instance entered EC2 state `state` (pending, running, stopping, ...) at `event_time`."""

    instance_id: str
    state: str
    event_time: float

    @property
    def is_alive(self) -> bool:
        """True while the instance can still become (or is) a usable worker."""
        return self.state in ALIVE_STATES


@attrs.frozen
class Unrecognised:
    """A message that is none of the above; `reason` is for the log."""

    reason: str


Ec2Event: TypeAlias = InterruptionWarning | RebalanceRecommendation | StateChange | Unrecognised


def parse_event(body: str) -> Ec2Event:
    """The event in an SQS message body: an EventBridge event, or one wrapped by SNS."""
    event = _json_object(body)
    if event is None:
        return Unrecognised("not a JSON object")
    if "detail-type" not in event and event.get("Type") == "Notification":
        event = _json_object(event.get("Message"))
        if event is None:
            return Unrecognised("SNS notification without a JSON object message")
    source, detail_type = event.get("source"), event.get("detail-type")
    if source != SOURCE:
        return Unrecognised(f"source {_show(source)}")
    if detail_type not in (SPOT_INTERRUPTION, REBALANCE_RECOMMENDATION, STATE_CHANGE):
        return Unrecognised(f"detail-type {_show(detail_type)}")
    event_time = _timestamp(event.get("time"))
    if event_time is None:
        return Unrecognised(f"{detail_type}: time {_show(event.get('time'))}")
    detail = event.get("detail")
    if not isinstance(detail, dict):
        detail = {}
    instance_id = detail.get("instance-id")
    if not isinstance(instance_id, str) or not instance_id:
        return Unrecognised(f"{detail_type}: no detail.instance-id")
    if detail_type == SPOT_INTERRUPTION:
        # Lenient on purpose: a warning without its action still means the worker is going.
        action = detail.get("instance-action", "terminate")
        if not isinstance(action, str):
            return Unrecognised(f"{detail_type}: instance-action {_show(action)}")
        lead = 0.0 if action == "hibernate" else WARNING_SECONDS
        return InterruptionWarning(instance_id, event_time + lead, event_time, action)
    if detail_type == REBALANCE_RECOMMENDATION:
        return RebalanceRecommendation(instance_id, event_time)
    state = detail.get("state")
    if not isinstance(state, str) or not state:
        return Unrecognised(f"{detail_type}: no detail.state")
    return StateChange(instance_id, state, event_time)


def format_deadline(deadline: float) -> str:
    """Unix seconds as ISO 8601 UTC to the (earlier) whole second: `2026-11-23T12:34:56Z`."""
    moment = datetime.fromtimestamp(math.floor(deadline), tz=UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def _json_object(text: Any) -> dict[str, Any] | None:
    if not isinstance(text, str | bytes):
        return None
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):  # JSONDecodeError and bad UTF-8 are ValueErrors
        return None
    return value if isinstance(value, dict) else None


def _timestamp(value: Any) -> float | None:
    """Unix seconds from EventBridge's RFC 3339 `time` (`2026-11-23T12:32:56Z`)."""
    if not isinstance(value, str):
        return None
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()
