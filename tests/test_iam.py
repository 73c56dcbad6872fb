"""`broker.iam`: the policy allows exactly the AWS operations the code calls, each launch, tag
and termination only under its condition, and it is well-formed IAM JSON. Pure: no network.

The operations are found by reading the broker's source with `ast`: every attribute named
like a boto3 client method of EC2, DynamoDB, SQS or STS (`client.run_instances`, also when it
is passed to `call(...)` rather than called), every `get_paginator("...")` and every
`get_waiter("...")`. A new call the policy has no line for fails
`test_policy_allows_exactly_the_operations_the_code_calls`.
"""

from __future__ import annotations

import ast
import functools
import json
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import botocore.session
import pytest
import trio
import yaml
from botocore import xform_name

from broker import cli
from broker.aws import OPERATIONS
from broker.cloud import LaunchSpec, Market
from broker.config_validate import Config, ConfigError
from broker.ec2 import POOL_TAG, Ec2Cloud, Ec2Settings
from broker.iam import (
    IAM_ACTIONS,
    MANAGED_POLICY_MAX_CHARS,
    actions,
    allowed_markets,
    policy,
    render,
)
from broker.preflight import dry_run_params, offerings

BROKER = Path(__file__).resolve().parent.parent / "broker"
SERVICES = ("ec2", "dynamodb", "sqs", "sts")
# sandbox.py creates the embedded moto cloud's AMI, subnet and key pair: it never talks to AWS.
NOT_AGAINST_AWS = frozenset({"sandbox.py"})
# The functions only `compute-broker setup` runs (broker.dynamo_table.ensure_table and
# broker.sqs.ensure_events_queue, with their helpers): their operations are in --setup only.
SETUP_FUNCTIONS = frozenset(
    {
        "ensure_table",
        "_create_table",
        "_enable_ttl",
        "ensure_events_queue",
        "_create_queue",
        "_queue_arn_and_policy",
    }
)
ACCOUNT = "111122223333"
EVENTS_URL = f"https://sqs.eu-west-1.amazonaws.com/{ACCOUNT}/compute-broker-events"
JOBS_URL = f"https://sqs.eu-west-1.amazonaws.com/{ACCOUNT}/jobs"
# The resources a launch creates and cannot tag with TagSpecifications of ResourceType instance.
CREATED_WITH_A_LAUNCH = ("network-interface/*", "volume/*", "spot-instances-request/*")


# --- reading the source -------------------------------------------------------------------


class _Models:
    """botocore's names of the four services' operations, paginators and waiters."""

    def __init__(self) -> None:
        session = botocore.session.get_session()
        self.methods: dict[str, list[str]] = {}
        self.waiters: dict[str, list[str]] = {}
        self.operations: dict[str, set[str]] = {}
        for service in SERVICES:
            model = session.get_service_model(service)
            self.operations[service] = set(model.operation_names)
            for name in model.operation_names:
                self.methods.setdefault(xform_name(name), []).append(f"{service}:{name}")
            if service in ("ec2", "dynamodb"):  # SQS and STS have no waiters
                waiters = session.get_waiter_model(service)
                for waiter in waiters.waiter_names:
                    operation = waiters.get_waiter(waiter).operation
                    self.waiters.setdefault(xform_name(waiter), []).append(f"{service}:{operation}")

    def operation(self, names: Mapping[str, list[str]], name: str) -> str:
        (found,) = names[name]  # a name two services share would need telling apart
        return found


MODELS = _Models()


class _Calls(ast.NodeVisitor):
    """The AWS operations a module refers to, each with the functions it appears in."""

    def __init__(self) -> None:
        self.found: dict[str, set[str]] = {}
        self.services: set[str] = set()
        self._functions = ["<module>"]

    def _add(self, operation: str) -> None:
        self.found.setdefault(operation, set()).add(self._functions[-1])

    def visit_FunctionDef(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        self._functions.append(node.name)
        self.generic_visit(node)
        self._functions.pop()

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_Attribute(self, node: ast.Attribute) -> None:
        if node.attr in MODELS.methods:
            self._add(MODELS.operation(MODELS.methods, node.attr))
        self.generic_visit(node)

    def visit_Call(self, node: ast.Call) -> None:
        name = node.func.attr if isinstance(node.func, ast.Attribute) else ""
        name = name or (node.func.id if isinstance(node.func, ast.Name) else "")
        first = node.args[0] if node.args else None
        literal = first.value if isinstance(first, ast.Constant) else None
        if isinstance(literal, str):
            if name == "get_paginator":
                self._add(MODELS.operation(MODELS.methods, literal))
            elif name == "get_waiter":
                self._add(MODELS.operation(MODELS.waiters, literal))
            elif name in ("make_client", "client", "client_factory"):
                self.services.add(literal)
        self.generic_visit(node)


def walk(source: str) -> _Calls:
    calls = _Calls()
    calls.visit(ast.parse(source))
    return calls


@functools.cache
def code_calls() -> tuple[dict[str, set[str]], set[str]]:
    """Every AWS operation the broker's modules refer to (with the functions it is in), and
    every service they make clients for (read once per test run)."""
    found: dict[str, set[str]] = {}
    services: set[str] = set()
    for path in sorted(BROKER.glob("*.py")):
        if path.name in NOT_AGAINST_AWS:
            continue
        calls = walk(path.read_text())
        for operation, functions in calls.found.items():
            found.setdefault(operation, set()).update(functions)
        services |= calls.services
    return found, services


def iam_actions(operations: Iterable[str]) -> set[str]:
    return {action for op in operations for action in IAM_ACTIONS.get(op, (op,))}


# --- configs ------------------------------------------------------------------------------


def make_config(**overrides: Any) -> Config:
    values: dict[str, Any] = {
        "pool_name": "lab-a",
        "region": "eu-west-1",
        "ami_id": "ami-0123456789abcdef0",
        "instance_type": "c7i.8xlarge",
        "instance_types": ["c6i.8xlarge", "m7i.8xlarge"],
        "subnets": ["subnet-0123456789abcdef0", "subnet-0fedcba9876543210"],
        "security_group_ids": ["sg-0123456789abcdef0"],
        "key_name": "lab-key",
        **overrides,
    }
    return Config.from_dict(values)


def everything(**overrides: Any) -> Config:
    """A config that uses every AWS feature: registry, spot prices, burst and events queues."""
    return make_config(
        registry="dynamodb",
        spot_price_history=True,
        events_queue_url=EVENTS_URL,
        burst_policy={"mode": "auto", "queue_url": JOBS_URL},
        **overrides,
    )


def statements(document: Mapping[str, Any], action: str) -> list[dict[str, Any]]:
    return [s for s in document["Statement"] if action in s["Action"]]


def by_sid(document: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    return {s["Sid"]: s for s in document["Statement"]}


# --- the actions match the code -----------------------------------------------------------


def test_the_walk_finds_calls_called_passed_paginated_and_waited_for() -> None:
    """A client method called, passed to `call`, paginated or waited on is an operation."""
    calls = walk(
        "def f(client):\n"
        "    client.create_snapshot(VolumeId='v')\n"
        "    call(limiter, client.delete_queue, QueueUrl=u)\n"
        "    client.get_paginator('scan')\n"
        "    client.get_waiter('instance_running')\n"
    )
    assert {
        "ec2:CreateSnapshot",
        "sqs:DeleteQueue",
        "dynamodb:Scan",
        "ec2:DescribeInstances",
    } == set(calls.found)


def test_policy_allows_exactly_the_operations_the_code_calls() -> None:
    """With every feature and --setup, the policy's actions are the IAM actions of every AWS
    operation in the broker's source, no more and no fewer."""
    found, _ = code_calls()
    assert iam_actions(found) == actions(policy(everything(), setup=True))


def test_serving_policy_leaves_out_what_only_setup_calls() -> None:
    """Without --setup, the actions are those of operations called outside setup's functions."""
    found, _ = code_calls()
    serving = {op for op, functions in found.items() if functions - SETUP_FUNCTIONS}
    assert iam_actions(serving) == actions(policy(everything()))
    assert "dynamodb:CreateTable" not in actions(policy(everything()))


def test_clients_know_exactly_the_operations_the_code_calls() -> None:
    """The clients' cut-down models (`broker.aws.OPERATIONS`) hold every AWS operation in the
    broker's source, the sandbox's too, and no other."""
    found, _ = code_calls()
    everywhere = set(found) | set(walk((BROKER / "sandbox.py").read_text()).found)
    assert everywhere == {f"{service}:{op}" for service, ops in OPERATIONS.items() for op in ops}


def test_every_client_the_code_makes_is_of_a_service_the_walk_reads() -> None:
    """A client of a fifth service would go unread by the walk: make the walk read it."""
    _, services = code_calls()
    assert services <= set(SERVICES)
    assert {"ec2", "dynamodb", "sqs", "sts"} == services


def test_every_action_is_an_operation_of_its_service() -> None:
    """No misspelt action: each one names an operation botocore knows."""
    for action in actions(policy(everything(), setup=True)):
        service, name = action.split(":")
        assert name in MODELS.operations[service], action


def test_get_caller_identity_needs_no_permission() -> None:
    """The credentials check is in the code, and in no statement."""
    found, _ = code_calls()
    assert "sts:GetCallerIdentity" in found
    assert not any(a.startswith("sts:") for a in actions(policy(everything(), setup=True)))


# --- statements follow the config ---------------------------------------------------------


def test_registry_memory_asks_nothing_of_dynamodb() -> None:
    """No DynamoDB statement without the DynamoDB registry."""
    document = policy(make_config(registry="memory"), setup=True)
    assert not any(a.startswith("dynamodb:") for a in actions(document))


def test_registry_actions_are_on_the_table_only() -> None:
    """The registry's actions name the table's ARN, in the config's region and the account."""
    document = policy(make_config(registry_table="lab-registry"), account=ACCOUNT)
    registry = by_sid(document)["Registry"]
    assert [f"arn:aws:dynamodb:eu-west-1:{ACCOUNT}:table/lab-registry"] == registry["Resource"]
    assert "dynamodb:CreateTable" not in registry["Action"]


def test_spot_price_history_off_drops_its_action() -> None:
    """DescribeSpotPriceHistory only with spot_price_history."""
    assert "ec2:DescribeSpotPriceHistory" in actions(policy(make_config()))
    off = policy(make_config(spot_price_history=False))
    assert "ec2:DescribeSpotPriceHistory" not in actions(off)
    assert "ec2:DescribeInstances" in actions(off)


def test_queues_get_their_own_actions_on_their_own_arns() -> None:
    """The burst queue may only be read; the events queue received from and deleted from."""
    sids = by_sid(policy(everything()))
    assert sids["BurstQueueDepth"]["Action"] == ["sqs:GetQueueAttributes"]
    assert [f"arn:aws:sqs:eu-west-1:{ACCOUNT}:jobs"] == sids["BurstQueueDepth"]["Resource"]
    assert {"sqs:ReceiveMessage", "sqs:DeleteMessage", "sqs:GetQueueAttributes"} == set(
        sids["EventsQueue"]["Action"]
    )
    assert [f"arn:aws:sqs:eu-west-1:{ACCOUNT}:compute-broker-events"] == sids["EventsQueue"][
        "Resource"
    ]


def test_no_queue_no_sqs() -> None:
    """Without queues (or with bursting manual) the policy has no SQS action."""
    config = make_config(burst_policy={"mode": "manual", "queue_url": JOBS_URL})
    assert not any(a.startswith("sqs:") for a in actions(policy(config, setup=True)))


def test_queue_arn_takes_account_and_region_from_the_url() -> None:
    """A queue's ARN is built from its URL; a URL without a region (a local endpoint) takes
    the config's."""
    legacy = f"https://us-west-2.queue.amazonaws.com/{ACCOUNT}/old"
    local = "http://127.0.0.1:5000/123456789012/local"
    for url, arn in [
        (legacy, f"arn:aws:sqs:us-west-2:{ACCOUNT}:old"),
        (local, "arn:aws:sqs:eu-west-1:123456789012:local"),
    ]:
        document = policy(make_config(events_queue_url=url))
        assert [arn] == by_sid(document)["EventsQueue"]["Resource"]


def test_setup_statements_are_separate_and_name_the_queue_setup_creates() -> None:
    """--setup adds RegistrySetup and EventsQueueSetup; --events-queue names the queue."""
    plain = by_sid(policy(make_config()))
    assert not {"RegistrySetup", "EventsQueueSetup"} & set(plain)
    sids = by_sid(policy(make_config(), setup=True, events_queue="ec2-events", account=ACCOUNT))
    assert {"dynamodb:CreateTable", "dynamodb:UpdateTimeToLive"} <= set(
        sids["RegistrySetup"]["Action"]
    )
    assert [f"arn:aws:sqs:eu-west-1:{ACCOUNT}:ec2-events"] == sids["EventsQueueSetup"]["Resource"]
    assert "sqs:CreateQueue" in sids["EventsQueueSetup"]["Action"]


def test_account_is_any_unless_given_and_region_any_when_the_config_names_none() -> None:
    """`*` stands for what the config cannot say."""
    document = policy(make_config(region=None))
    assert by_sid(document)["Registry"]["Resource"] == ["arn:aws:dynamodb:*:*:table/compute-broker"]
    china = policy(make_config(region="cn-north-1"), account=ACCOUNT)
    assert by_sid(china)["Registry"]["Resource"] == [
        f"arn:aws-cn:dynamodb:cn-north-1:{ACCOUNT}:table/compute-broker"
    ]


def test_account_must_be_twelve_digits_and_ami_id_is_required() -> None:
    """A policy cannot be made for an account typo or without the AMI."""
    with pytest.raises(ValueError, match="12 digits"):
        policy(make_config(), account="1234")
    with pytest.raises(ConfigError, match="ami_id"):
        policy(make_config(ami_id=None))


def test_launch_resources_are_the_configured_ones() -> None:
    """The AMI, subnets, security groups and key pair of the config, by ARN."""
    used = by_sid(policy(make_config(), account=ACCOUNT))["LaunchFromTheImageIntoTheNetwork"]
    ec2 = f"arn:aws:ec2:eu-west-1:{ACCOUNT}:"
    assert set(used["Resource"]) == {
        "arn:aws:ec2:eu-west-1::image/ami-0123456789abcdef0",
        ec2 + "subnet/subnet-0123456789abcdef0",
        ec2 + "subnet/subnet-0fedcba9876543210",
        ec2 + "security-group/sg-0123456789abcdef0",
        ec2 + "key-pair/lab-key",
        *(ec2 + created for created in CREATED_WITH_A_LAUNCH),
    }


def test_unset_subnets_and_groups_mean_any_and_no_key_pair_means_none() -> None:
    """EC2 picks the default VPC's subnet and group, which the config cannot name."""
    config = make_config(subnets=[], subnet_id=None, security_group_ids=[], key_name=None)
    used = by_sid(policy(config))["LaunchFromTheImageIntoTheNetwork"]["Resource"]
    assert "arn:aws:ec2:eu-west-1:*:subnet/*" in used
    assert "arn:aws:ec2:eu-west-1:*:security-group/*" in used
    assert not [arn for arn in used if ":key-pair/" in arn]
    single = by_sid(policy(make_config(subnets=[], subnet_id="subnet-0aaaaaaaaaaaaaaaa")))
    subnets = [a for a in single["LaunchFromTheImageIntoTheNetwork"]["Resource"] if "subnet/" in a]
    assert subnets == ["arn:aws:ec2:eu-west-1:*:subnet/subnet-0aaaaaaaaaaaaaaaa"]


def test_both_markets_are_allowed_until_a_config_key_narrows_them() -> None:
    """A GET_WORKER may ask market=on-demand whatever the config says: both are allowed."""
    for config in [make_config(), make_config(market="on-demand", on_demand_fallback=False)]:
        assert allowed_markets(config) == (Market.SPOT, Market.ON_DEMAND)
        condition = by_sid(policy(config))["LaunchWorkers"]["Condition"]["StringEquals"]
        assert condition["ec2:InstanceMarketType"] == ["spot", "on-demand"]


# --- conditions, as data ------------------------------------------------------------------


def test_every_launch_tag_and_terminate_statement_carries_its_condition() -> None:
    """RunInstances on instances only for the types, markets and pool tag; the other launch
    resources only by name or as what the launch creates; CreateTags only within
    RunInstances; TerminateInstances only on the pool's instances."""
    document = policy(everything(), setup=True)
    instance = "arn:aws:ec2:eu-west-1:*:instance/*"
    runs = statements(document, "ec2:RunInstances")
    assert len(runs) == 2
    for statement in runs:
        if instance in statement["Resource"]:
            assert [instance] == statement["Resource"]
            condition = statement["Condition"]["StringEquals"]
            assert condition["ec2:InstanceType"] == ["c7i.8xlarge", "c6i.8xlarge", "m7i.8xlarge"]
            assert {"spot", "on-demand"} == set(condition["ec2:InstanceMarketType"])
            assert condition[f"aws:RequestTag/{POOL_TAG}"] == "lab-a"
        else:
            assert "Condition" not in statement
            for arn in statement["Resource"]:
                assert arn != "*" and ":instance/" not in arn
                named = re.search(r"/(ami|subnet|sg)-[0-9a-f]+$|/lab-key$", arn)
                assert named or arn.endswith(CREATED_WITH_A_LAUNCH), arn
    (tag,) = statements(document, "ec2:CreateTags")
    assert [instance] == tag["Resource"]
    assert {"ec2:CreateAction": "RunInstances", f"aws:RequestTag/{POOL_TAG}": "lab-a"} == tag[
        "Condition"
    ]["StringEquals"]
    (terminate,) = statements(document, "ec2:TerminateInstances")
    assert [instance] == terminate["Resource"]
    assert {f"ec2:ResourceTag/{POOL_TAG}": "lab-a"} == terminate["Condition"]["StringEquals"]
    for statement in [*runs, tag, terminate]:
        assert len(statement["Action"]) == 1  # each condition is written for one action


def _launch_context(params: Mapping[str, Any]) -> dict[str, Any]:
    """The condition keys and resources EC2 evaluates for one RunInstances request."""
    market = "spot" if params.get("InstanceMarketOptions") else "on-demand"
    tags = {
        tag["Key"]: tag["Value"]
        for spec in params.get("TagSpecifications", [])
        if spec["ResourceType"] == "instance"
        for tag in spec["Tags"]
    }
    keys = {"ec2:InstanceType": params["InstanceType"], "ec2:InstanceMarketType": market}
    keys |= {f"aws:RequestTag/{key}": value for key, value in tags.items()}
    keys["ec2:CreateAction"] = "RunInstances"
    named = [f"image/{params['ImageId']}"]
    named += [f"security-group/{group}" for group in params.get("SecurityGroupIds", [])]
    named += [f"subnet/{params['SubnetId']}"] if "SubnetId" in params else []
    named += [f"key-pair/{params['KeyName']}"] if "KeyName" in params else []
    return {"keys": keys, "named": named}


def _holds(condition: Mapping[str, Mapping[str, Any]], keys: Mapping[str, str]) -> bool:
    """StringEquals, the only operator the policy uses: every key present with a listed value."""
    assert {"StringEquals"} == set(condition)
    for key, wanted in condition["StringEquals"].items():
        values = [wanted] if isinstance(wanted, str) else wanted
        if keys.get(key) not in values:
            return False
    return True


def _allowed(document: Mapping[str, Any], params: Mapping[str, Any]) -> bool:
    """Whether the policy allows this RunInstances with its tags on every resource it names:
    the instance under the conditions, each named resource by its ARN (subnets and groups by
    wildcard when the config names none), and the tagging."""
    context = _launch_context(params)
    sids = by_sid(document)
    if not _holds(sids["LaunchWorkers"]["Condition"], context["keys"]):
        return False
    if not _holds(sids["TagWorkersAtLaunch"]["Condition"], context["keys"]):
        return False
    used = sids["LaunchFromTheImageIntoTheNetwork"]["Resource"]
    return all(
        any(re.fullmatch(arn.split(":", 5)[5].replace("*", ".*"), name) for arn in used)
        for name in context["named"]
    )


def test_every_dry_run_of_the_start_up_check_is_allowed() -> None:
    """The preflight's DryRun of every offering satisfies the conditions and names only
    allowed resources (EC2 would answer DryRunOperation, not UnauthorizedOperation)."""
    config = make_config(on_demand_fallback=True)
    document = policy(config)
    for offering in offerings(config):
        assert _allowed(document, dry_run_params(config, offering)), offering


async def test_every_launch_the_adapter_sends_is_allowed() -> None:
    """What `Ec2Cloud.launch` sends for each allowed type and market and subnet passes."""
    config = make_config()
    document = policy(config)
    sent: list[dict[str, Any]] = []

    class LaunchClient:
        def run_instances(self, **params: Any) -> dict[str, Any]:
            sent.append(params)
            return {"Instances": []}

    settings = Ec2Settings(
        ami_id=config.ami_id or "",
        security_group_ids=config.security_group_ids,
        key_name=config.key_name,
        subnet_id=None,
        pool_name=config.pool_name,
        region=config.region,
    )
    cloud = Ec2Cloud(
        settings, trio.CapacityLimiter(1), client=object(), launch_client=LaunchClient()
    )
    for instance_type in ("c7i.8xlarge", "m7i.8xlarge"):
        for market in Market:
            for subnet in config.subnets:
                await cloud.launch(LaunchSpec(instance_type, market), 2, "token", subnet=subnet)
    assert len(sent) == 8
    assert all(_allowed(document, params) for params in sent)
    refused = {**sent[0], "InstanceType": "p5.48xlarge"}
    assert not _allowed(document, refused)


def test_launches_outside_the_config_are_refused() -> None:
    """Another type, AMI, subnet, group, or pool tag fails the policy."""
    config = make_config()
    document = policy(config)
    (offering, *_) = offerings(config)
    params = dry_run_params(config, offering)
    assert _allowed(document, params)
    other_pool = [
        {**spec, "Tags": [{"Key": POOL_TAG, "Value": "lab-b"}]}
        for spec in params["TagSpecifications"]
    ]
    for change in [
        {"InstanceType": "p5.48xlarge"},
        {"ImageId": "ami-0fffffffffffffff0"},
        {"SubnetId": "subnet-0ccccccccccccccc0"},
        {"SecurityGroupIds": ["sg-0eeeeeeeeeeeeeee0"]},
        {"KeyName": "someone-elses"},
        {"TagSpecifications": other_pool},
        {"TagSpecifications": []},
    ]:
        assert not _allowed(document, {**params, **change}), change


def test_terminate_condition_holds_for_the_pools_own_tag_only() -> None:
    """The tag the adapter launches with satisfies TerminatePoolWorkers; another pool's, or
    none, does not."""
    document = policy(make_config())
    condition = by_sid(document)["TerminatePoolWorkers"]["Condition"]
    tag = f"ec2:ResourceTag/{POOL_TAG}"
    assert _holds(condition, {tag: "lab-a"})
    assert not _holds(condition, {tag: "lab-b"})
    assert not _holds(condition, {})


# --- well-formed IAM JSON -----------------------------------------------------------------

_OPERATORS = {
    f"{prefix}{base}{suffix}"
    for base in (
        "StringEquals",
        "StringNotEquals",
        "StringEqualsIgnoreCase",
        "StringNotEqualsIgnoreCase",
        "StringLike",
        "StringNotLike",
        "NumericEquals",
        "NumericNotEquals",
        "NumericLessThan",
        "NumericLessThanEquals",
        "NumericGreaterThan",
        "NumericGreaterThanEquals",
        "DateEquals",
        "DateNotEquals",
        "DateLessThan",
        "DateLessThanEquals",
        "DateGreaterThan",
        "DateGreaterThanEquals",
        "Bool",
        "BinaryEquals",
        "IpAddress",
        "NotIpAddress",
        "ArnEquals",
        "ArnLike",
        "ArnNotEquals",
        "ArnNotLike",
    )
    for prefix in ("", "ForAllValues:", "ForAnyValue:")
    for suffix in ("", "IfExists")
} | {"Null"}
_ACTION = re.compile(r"[a-z0-9-]+:[A-Za-z0-9*]+")
_ARN = re.compile(r"arn:aws(-cn|-us-gov)?:[a-z0-9-]+:([a-z0-9-]+|\*)?:(\d{12}|\*)?:\S+")
_CONDITION_KEY = re.compile(r"[A-Za-z0-9-]+:[A-Za-z0-9_./:-]+")


def _strings(value: Any) -> list[str]:
    values = [value] if isinstance(value, str) else value
    assert isinstance(values, list) and values, value
    assert all(isinstance(v, str) and v for v in values), value
    return values


def validate(document: Mapping[str, Any]) -> None:
    """A small schema of identity-based policies: what IAM's validator would refuse."""
    assert {"Version", "Statement"} == set(document)
    assert document["Version"] == "2012-10-17"
    assert isinstance(document["Statement"], list) and document["Statement"]
    sids = [statement["Sid"] for statement in document["Statement"]]
    assert len(sids) == len(set(sids))
    for statement in document["Statement"]:
        assert set(statement) <= {"Sid", "Effect", "Action", "Resource", "Condition"}
        assert re.fullmatch(r"[A-Za-z0-9]+", statement["Sid"])
        assert statement["Effect"] in ("Allow", "Deny")
        for action in _strings(statement["Action"]):
            assert _ACTION.fullmatch(action), action
        for resource in _strings(statement["Resource"]):
            assert resource == "*" or _ARN.fullmatch(resource), resource
        for operator, keys in statement.get("Condition", {}).items():
            assert operator in _OPERATORS, operator
            assert isinstance(keys, dict) and keys
            for key, values in keys.items():
                assert _CONDITION_KEY.fullmatch(key), key
                _strings(values)


def test_policies_are_well_formed_iam_json() -> None:
    """Every variant validates and survives a JSON round trip."""
    for document in [
        policy(make_config()),
        policy(everything(), setup=True, account=ACCOUNT),
        policy(make_config(registry="memory", region=None, key_name=None, subnets=[])),
        policy(make_config(), setup=True, events_queue="ec2-events"),
    ]:
        validate(document)
        assert document == json.loads(render(document))


def test_the_validator_refuses_what_iam_refuses() -> None:
    """The schema check is not vacuous."""
    good = policy(make_config())
    for broken in [
        {**good, "Version": "2008-10-17"},
        {**good, "Statement": [{**good["Statement"][0], "Effect": "Permit"}]},
        {**good, "Statement": [{**good["Statement"][0], "Action": "RunInstances"}]},
        {**good, "Statement": [{**good["Statement"][0], "Resource": "instance/*"}]},
        {**good, "Statement": [{**good["Statement"][0], "Condition": {"StringIs": {"a:b": "c"}}}]},
        {**good, "Statement": [{**good["Statement"][0], "Sid": "has space"}]},
    ]:
        with pytest.raises(AssertionError):
            validate(broken)


def test_a_large_config_fits_a_managed_policy() -> None:
    """Ten types, six subnets, five groups, every feature: under IAM's 6,144 characters."""
    config = everything(
        instance_types=[f"c7i.{n}xlarge" for n in (2, 4, 8, 12, 16, 24, 48)] + ["m7i.metal-48xl"],
        subnets=[f"subnet-0{n}{'a' * 15}" for n in range(6)],
        security_group_ids=[f"sg-0{n}{'b' * 15}" for n in range(5)],
    )
    document = policy(config, setup=True, account=ACCOUNT)
    assert len("".join(json.dumps(document).split())) <= MANAGED_POLICY_MAX_CHARS


# --- the command --------------------------------------------------------------------------


def test_iam_policy_command_prints_the_policy(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`compute-broker iam-policy --config FILE --account ID` prints `policy()` as JSON."""
    path = tmp_path / "config.yaml"
    path.write_text(f"ami_id: ami-0123456789abcdef0\nevents_queue_url: {EVENTS_URL}\n")
    assert cli.main(["iam-policy", "--config", str(path), "--account", ACCOUNT, "--setup"]) == 0
    printed = json.loads(capsys.readouterr().out)
    config = Config.from_dict({"ami_id": "ami-0123456789abcdef0", "events_queue_url": EVENTS_URL})
    assert policy(config, account=ACCOUNT, setup=True) == printed


def test_iam_policy_command_refuses_a_config_without_ami_and_a_bad_account(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """No ami_id: exit 78 naming the key; a bad --account: exit 2."""
    path = tmp_path / "config.yaml"
    path.write_text("pool_name: lab-a\n")
    assert cli.main(["iam-policy", "--config", str(path)]) == 78
    assert "ami_id" in capsys.readouterr().err
    path.write_text("ami_id: ami-0123456789abcdef0\n")
    assert cli.main(["iam-policy", "--config", str(path), "--account", "12345"]) == 2
    assert "12 digits" in capsys.readouterr().err


def test_docs_example_is_what_the_command_prints() -> None:
    """docs/iam.md's example policy is the one its example config gives (regenerate it with
    `compute-broker iam-policy --config CONFIG --account 111122223333`)."""
    text = (BROKER.parent / "docs" / "iam.md").read_text()
    example_config = re.search(r"```yaml\n(.*?)```", text, re.S)
    example_policy = re.search(r"```json\n(.*?)```", text, re.S)
    assert example_config is not None and example_policy is not None
    config = Config.from_dict(yaml.safe_load(example_config.group(1)))
    assert json.loads(example_policy.group(1)) == policy(config, account=ACCOUNT)
    assert example_policy.group(1) == render(policy(config, account=ACCOUNT)) + "\n"
