"""The least-privilege IAM policy for a config: what `compute-broker iam-policy` prints.

`policy(config)` is pure: it reads the config and writes the identity-based policy that allows
exactly the AWS calls the broker makes with that config, each on the resources it touches
(docs/iam.md says why each statement is there):

- RunInstances for the allowed instance types and markets, from the AMI, into the subnets and
  security groups (and with the key pair) of the config, with the pool tag on the request;
- CreateTags only as part of RunInstances (`ec2:CreateAction`), so the pool tag can never be
  put on an instance the broker did not launch;
- TerminateInstances only on instances that carry the pool's tag;
- DescribeInstances and (with `spot_price_history`) DescribeSpotPriceHistory, which EC2 does
  not scope to resources;
- the DynamoDB actions of the registry on its table, and the SQS actions on the configured
  queues; with `setup`, what `compute-broker setup` needs as well, in statements of their own.

STS GetCallerIdentity (the start-up credentials check) needs no permission. `tests/test_iam.py`
compares the actions with the AWS operations the adapters call.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any, Final
from urllib.parse import urlsplit

from broker.config_validate import Config
from broker.ec2 import POOL_TAG
from broker.model import Market

VERSION: Final = "2012-10-17"
# The largest managed policy IAM accepts, counted without whitespace.
MANAGED_POLICY_MAX_CHARS: Final = 6144

# API operations whose IAM actions are not just the operation's own name. A RunInstances that
# tags what it launches (TagSpecifications) is also authorised as CreateTags, with
# ec2:CreateAction=RunInstances; AWS authorises each part of a TransactWriteItems as the action
# it performs (the broker's transactions have Put, Update and Delete parts, no ConditionCheck),
# a DeleteMessageBatch as DeleteMessage, and asks no permission for GetCallerIdentity.
IAM_ACTIONS: Final[Mapping[str, tuple[str, ...]]] = {
    "ec2:RunInstances": ("ec2:RunInstances", "ec2:CreateTags"),
    "dynamodb:TransactWriteItems": (
        "dynamodb:PutItem",
        "dynamodb:UpdateItem",
        "dynamodb:DeleteItem",
    ),
    "sqs:DeleteMessageBatch": ("sqs:DeleteMessage",),
    "sts:GetCallerIdentity": (),
}

# The registry's reads and writes (`broker.dynamo.DynamoRegistry`), and DescribeTable for the
# start-up check; `compute-broker setup` (`broker.dynamo_table.ensure_table`) adds the rest.
REGISTRY_ACTIONS: Final = (
    "dynamodb:DescribeTable",
    "dynamodb:GetItem",
    "dynamodb:PutItem",
    "dynamodb:UpdateItem",
    "dynamodb:DeleteItem",
    "dynamodb:Query",
)
REGISTRY_SETUP_ACTIONS: Final = (
    "dynamodb:CreateTable",
    "dynamodb:DescribeTable",
    "dynamodb:DescribeTimeToLive",
    "dynamodb:UpdateTimeToLive",
)
# The burst queue: the broker only reads its depth (`broker.sqs.SqsQueue`).
BURST_QUEUE_ACTIONS: Final = ("sqs:GetQueueAttributes",)
# The EC2 events queue (`broker.sqs.SqsEventQueue`, and the start-up check).
EVENTS_QUEUE_ACTIONS: Final = (
    "sqs:ReceiveMessage",
    "sqs:DeleteMessage",
    "sqs:GetQueueAttributes",
)
EVENTS_QUEUE_SETUP_ACTIONS: Final = (
    "sqs:GetQueueUrl",
    "sqs:CreateQueue",
    "sqs:GetQueueAttributes",
    "sqs:SetQueueAttributes",
)

_ACCOUNT = re.compile(r"\d{12}|\*")
# Regional SQS endpoints: sqs.<region>.amazonaws.com[.cn], or the legacy
# <region>.queue.amazonaws.com.
_SQS_HOST_REGION = (
    re.compile(r"sqs\.([a-z]{2}(?:-[a-z]+)+-\d+)\."),
    re.compile(r"([a-z]{2}(?:-[a-z]+)+-\d+)\.queue\."),
)

Statement = dict[str, Any]


def allowed_types(config: Config) -> tuple[str, ...]:
    """The instance types RunInstances is allowed for: `instance_type`, then `instance_types`.

    A GET_WORKER naming another type is refused by EC2 (UnauthorizedOperation) under this
    policy."""
    return tuple(dict.fromkeys((config.instance_type, *config.instance_types)))


def allowed_markets(config: Config) -> tuple[Market, ...]:
    """The markets RunInstances is allowed for: both, today. A GET_WORKER may ask for
    `market=on-demand` whatever `market` and `on_demand_fallback` say, and no config key limits
    that yet; when one does, this is the one place that reads it."""
    del config  # no key narrows the markets yet
    return (Market.SPOT, Market.ON_DEMAND)


def policy(
    config: Config,
    *,
    account: str = "*",
    setup: bool = False,
    events_queue: str | None = None,
) -> dict[str, Any]:
    """The IAM policy document for `config` (a JSON-ready dict).

    `account` is the 12-digit AWS account of the broker's resources, or `*` (any); the region
    is the config's, or `*` when it names none. Queue ARNs take their account (and region, when
    the URL says it) from the queue URL. With `setup`, statements for `compute-broker setup`
    are added: the registry table's creation, and the events queue's (named `events_queue`, or
    the one `events_queue_url` names). Raises ConfigError without `ami_id`, ValueError for an
    account that is neither 12 digits nor `*`.
    """
    if not _ACCOUNT.fullmatch(account):
        raise ValueError(f"account must be 12 digits or * (got {account!r})")
    config.validate_for_aws()  # ami_id is set
    arns = _Arns(_partition(config.region), config.region or "*", account)
    statements = [*_launch_statements(config, arns), *_instance_statements(config, arns)]
    if config.registry == "dynamodb":
        table = arns.make("dynamodb", f"table/{config.registry_table}")
        statements.append(_allow("Registry", REGISTRY_ACTIONS, [table]))
        if setup:
            statements.append(_allow("RegistrySetup", REGISTRY_SETUP_ACTIONS, [table]))
    burst = config.burst_policy
    if burst.mode == "auto" and burst.queue_url:
        queue = arns.queue(burst.queue_url)
        statements.append(_allow("BurstQueueDepth", BURST_QUEUE_ACTIONS, [queue]))
    if config.events_queue_url:
        queue = arns.queue(config.events_queue_url)
        statements.append(_allow("EventsQueue", EVENTS_QUEUE_ACTIONS, [queue]))
    if setup and (events_queue or config.events_queue_url):
        queue = (
            arns.make("sqs", events_queue)
            if events_queue
            else arns.queue(config.events_queue_url or "")
        )
        statements.append(_allow("EventsQueueSetup", EVENTS_QUEUE_SETUP_ACTIONS, [queue]))
    return {"Version": VERSION, "Statement": statements}


def render(document: Mapping[str, Any]) -> str:
    """The policy as the JSON `compute-broker iam-policy` prints."""
    return json.dumps(document, indent=2)


def actions(document: Mapping[str, Any]) -> set[str]:
    """Every action any statement of `document` allows."""
    found: set[str] = set()
    for statement in document["Statement"]:
        action = statement["Action"]
        found.update([action] if isinstance(action, str) else action)
    return found


def _launch_statements(config: Config, arns: _Arns) -> list[Statement]:
    """RunInstances and the tagging that comes with it. The conditions sit on the instance
    resource, the one every launch creates and tags; the other resources a launch uses or
    creates are named (the AMI, subnets, security groups, key pair) or are created by it
    (network interface, volumes, the spot request) and cannot be tagged by the request."""
    pool = {f"aws:RequestTag/{POOL_TAG}": config.pool_name}
    markets = allowed_markets(config)
    instances = arns.make("ec2", "instance/*")
    subnets = config.subnets or ((config.subnet_id,) if config.subnet_id else ())
    used = [
        arns.image(config.ami_id or ""),
        *_named_or_any(arns, "subnet", subnets),
        *_named_or_any(arns, "security-group", config.security_group_ids),
        arns.make("ec2", "network-interface/*"),
        arns.make("ec2", "volume/*"),
    ]
    if config.key_name is not None:
        used.append(arns.make("ec2", f"key-pair/{config.key_name}"))
    if Market.SPOT in markets:
        used.append(arns.make("ec2", "spot-instances-request/*"))
    launch = _allow(
        "LaunchWorkers",
        ["ec2:RunInstances"],
        [instances],
        {
            "StringEquals": {
                "ec2:InstanceType": list(allowed_types(config)),
                "ec2:InstanceMarketType": [market.value for market in markets],
                **pool,
            }
        },
    )
    tag = _allow(
        "TagWorkersAtLaunch",
        ["ec2:CreateTags"],
        [instances],
        {"StringEquals": {"ec2:CreateAction": "RunInstances", **pool}},
    )
    return [launch, _allow("LaunchFromTheImageIntoTheNetwork", ["ec2:RunInstances"], used), tag]


def _instance_statements(config: Config, arns: _Arns) -> list[Statement]:
    terminate = _allow(
        "TerminatePoolWorkers",
        ["ec2:TerminateInstances"],
        [arns.make("ec2", "instance/*")],
        {"StringEquals": {f"ec2:ResourceTag/{POOL_TAG}": config.pool_name}},
    )
    # EC2's Describe* actions take no resource ARNs: "*" is the only resource they accept.
    describe = ["ec2:DescribeInstances"]
    if config.spot_price_history:
        describe.append("ec2:DescribeSpotPriceHistory")
    return [terminate, _allow("DescribeWorkers", describe, ["*"])]


def _named_or_any(arns: _Arns, kind: str, ids: Sequence[str]) -> list[str]:
    """The ARNs of the configured subnets or security groups; without any, EC2 picks the
    default VPC's, which the config cannot name: any of that kind."""
    return [arns.make("ec2", f"{kind}/{i}") for i in ids] or [arns.make("ec2", f"{kind}/*")]


def _allow(
    sid: str,
    actions: Sequence[str],
    resources: Sequence[str],
    condition: Mapping[str, Any] | None = None,
) -> Statement:
    statement: Statement = {
        "Sid": sid,
        "Effect": "Allow",
        "Action": list(dict.fromkeys(actions)),
        "Resource": list(dict.fromkeys(resources)),
    }
    if condition is not None:
        statement["Condition"] = dict(condition)
    return statement


def _partition(region: str | None) -> str:
    """The partition of a region's ARNs (None or "*": the commercial one)."""
    region = region or ""
    if region.startswith("cn-"):
        return "aws-cn"
    if region.startswith("us-gov-"):
        return "aws-us-gov"
    return "aws"


class _Arns:
    """ARNs in one partition, region and account."""

    def __init__(self, partition: str, region: str, account: str) -> None:
        self.partition = partition
        self.region = region
        self.account = account

    def make(self, service: str, resource: str) -> str:
        return f"arn:{self.partition}:{service}:{self.region}:{self.account}:{resource}"

    def image(self, ami_id: str) -> str:
        """AMI ARNs name no account: an image may be another account's (shared or public)."""
        return f"arn:{self.partition}:ec2:{self.region}::image/{ami_id}"

    def queue(self, url: str) -> str:
        """The ARN of the queue at `url` (https://sqs.<region>.amazonaws.com/<account>/<name>):
        the URL's account and region where it has them."""
        parts = urlsplit(url)
        path = [part for part in parts.path.split("/") if part]
        name = path[-1] if path else ""
        account = path[-2] if len(path) >= 2 and _ACCOUNT.fullmatch(path[-2]) else self.account
        region = self.region
        for pattern in _SQS_HOST_REGION:
            match = pattern.match(parts.hostname or "")
            if match:
                region = match.group(1)
                break
        return f"arn:{_partition(region)}:sqs:{region}:{account}:{name}"
