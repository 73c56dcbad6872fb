"""The preflight against the session's moto server: every check passes when the sandbox is set
up, and each missing piece (credentials, region, table, launch permission, queue) fails its own
check in one line that names the fix. EC2 refusals are injected as AWS sends them (botocore
`before-send` hooks); moto answers every DryRun RunInstances with DryRunOperation."""

from __future__ import annotations

import os
import re
import threading
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import attrs
import pytest
import structlog
import trio
from botocore.awsrequest import AWSResponse

from broker.aws import make_client
from broker.burst import BurstPolicy
from broker.checks import EXIT_CONFIG, EXIT_TEMPFAIL, Check, exit_status
from broker.cloud import LaunchSpec, Market
from broker.config_validate import Config
from broker.dynamo_table import ensure_table
from broker.ec2 import Ec2Cloud
from broker.preflight import run_checks
from broker.sandbox import MotoHandle, SandboxResources
from broker.sqs import ensure_events_queue
from tests.aws_support import closed_loopback_port, ec2_error, ec2_reply

DEADLINE = 30
CONFIG_PATH = "/etc/compute-broker/config.yaml"
# Twelve digits standing alone (not inside an id such as subnet-f874459532587fa51).
ACCOUNT_ID = re.compile(r"(?<![0-9A-Za-z])\d{12}(?![0-9A-Za-z])")
ENCODED = "AbCd0123456789EfGhEncodedBlobThatOnlyTheLogMayHold"
DENIAL_MESSAGE = (
    "You are not authorized to perform this operation. User: "
    "arn:aws:sts::123456789012:assumed-role/compute-broker/i-0abc is not authorized to perform: "
    "ec2:RunInstances on resource: arn:aws:ec2:us-east-1:123456789012:instance/* because no "
    f"identity-based policy allows the ec2:RunInstances action. Encoded authorization failure "
    f"message: {ENCODED}"
)

Answer = Callable[[], AWSResponse]


class Clients:
    """A client factory for `run_checks`: `broker.aws.make_client`, plus a `before-send` hook
    that records every request sent (operation and form parameters) and answers the operations
    in `answers` itself, as AWS would."""

    def __init__(self, answers: Mapping[str, Answer] | None = None) -> None:
        self.answers = dict(answers or {})
        self.services: list[str] = []
        self.sent: list[tuple[str, dict[str, str]]] = []

    def __call__(self, service: str, *, region: str | None, **settings: Any) -> Any:
        client = make_client(service, region=region, **settings)
        self.services.append(service)
        client.meta.events.register("before-send", self._before_send)
        return client

    def _before_send(self, request: Any, event_name: str, **_: Any) -> AWSResponse | None:
        operation = event_name.rsplit(".", 1)[-1]
        self.sent.append((operation, form(request)))
        answer = self.answers.get(operation)
        return answer() if answer is not None else None

    def params(self, operation: str) -> list[dict[str, str]]:
        return [params for sent, params in self.sent if sent == operation]


def form(request: Any) -> dict[str, str]:
    """A query-protocol request's parameters, as sent on the wire."""
    body = request.body or b""
    return dict(parse_qsl(body.decode() if isinstance(body, bytes) else str(body)))


def assert_printable(checks: Sequence[Check]) -> None:
    """Every check prints as one line, with no account id in it."""
    for check in checks:
        line = check.line()
        assert line.isprintable(), line  # no newline, tab or other control character
        assert ACCOUNT_ID.search(line) is None, line


def outcomes(checks: Sequence[Check]) -> list[tuple[str, bool]]:
    return [(check.name, check.ok) for check in checks]


def the(name: str, checks: Sequence[Check]) -> Check:
    (check,) = [check for check in checks if check.name == name]
    return check


@pytest.fixture
def config(resources: SandboxResources) -> Config:
    """A config whose every AWS resource exists: table, events queue, burst queue, and two
    types x two markets to launch in the sandbox's subnet."""
    suffix = uuid.uuid4().hex[:8]
    table = f"preflight-{suffix}"
    ensure_table(make_client("dynamodb", region="us-east-1"), table)
    sqs = make_client("sqs", region="us-east-1")
    events_url = ensure_events_queue(sqs, f"preflight-events-{suffix}")
    jobs_url = sqs.create_queue(QueueName=f"preflight-jobs-{suffix}")["QueueUrl"]
    return Config(
        region="us-east-1",
        pool_name=f"preflight-{suffix}",
        ami_id=resources.ami_id,
        instance_types=("c6i.8xlarge",),
        on_demand_fallback=True,
        security_group_ids=(resources.security_group_id,),
        key_name=resources.key_name,
        subnet_id=resources.subnet_id,
        registry_table=table,
        events_queue_url=events_url,
        burst_policy=BurstPolicy(mode="auto", queue_url=jobs_url),
    )


async def checked(config: Config, clients: Clients | None = None, **options: Any) -> list[Check]:
    with trio.fail_after(DEADLINE):
        checks = await run_checks(config, client_factory=clients or Clients(), **options)
    assert_printable(checks)
    return checks


async def test_every_check_passes_against_the_set_up_sandbox(config: Config) -> None:
    """With the table, both queues and the launch resources in place, every check is ok and
    the exit status is 0; the launch was only a dry run of each offering."""
    clients = Clients()
    checks = await checked(config, clients)
    assert outcomes(checks) == [
        ("region", True),
        ("credentials", True),
        ("table", True),
        ("launch", True),
        ("queue", True),
        ("queue", True),
    ]
    assert exit_status(checks) == 0
    assert checks[1].line() == "ok   credentials: arn:aws:sts::<account>:user/moto"
    launches = clients.params("RunInstances")
    assert len(launches) == 4  # c7i/c6i x spot/on-demand, one subnet
    assert {"true"} == {params["DryRun"] for params in launches}
    instances = make_client("ec2", region="us-east-1").describe_instances(
        Filters=[{"Name": "tag:compute-broker:pool", "Values": [config.pool_name]}]
    )
    assert instances["Reservations"] == []


async def test_memory_registry_skips_the_table(config: Config) -> None:
    """With registry: memory there is no table to check, and none is asked about."""
    clients = Clients()
    checks = await checked(attrs.evolve(config, registry="memory"), clients)
    assert "table" not in [check.name for check in checks]
    assert all(check.ok for check in checks)
    assert "dynamodb" not in clients.services


async def test_dry_run_sends_what_a_launch_sends(
    config: Config, resources: SandboxResources
) -> None:
    """The dry run's RunInstances parameters are a real launch's (image, type, market, subnet,
    groups, key, tags), plus DryRun; ClientTokens differ (botocore fills in a random one)."""
    launched: list[dict[str, str]] = []

    def record(request: Any, **_: Any) -> None:
        launched.append(form(request))

    cloud = Ec2Cloud(resources.ec2_settings(config.pool_name), trio.CapacityLimiter(2))
    cloud.launch_client.meta.events.register("before-send.ec2.RunInstances", record)
    with trio.fail_after(DEADLINE):
        instances = await cloud.launch(LaunchSpec("c7i.8xlarge", Market.SPOT), 1, "token-1")
        await cloud.terminate([instance.instance_id for instance in instances])
    clients = Clients()
    await checked(attrs.evolve(config, instance_types=()), clients)
    dry_runs = [p for p in clients.params("RunInstances") if p["InstanceType"] == "c7i.8xlarge"]
    spot = [p for p in dry_runs if "InstanceMarketOptions.MarketType" in p]
    assert len(spot) == 1
    expected = {
        key: "preflight" if value == "token-1" else value
        for key, value in launched[0].items()
        if key != "ClientToken"
    }
    dry_run = {key: value for key, value in spot[0].items() if key != "ClientToken"}
    assert dry_run == {**expected, "DryRun": "true"}


async def test_no_credentials_fails_in_one_line_and_asks_nothing_else(
    config: Config, moto_server: MotoHandle, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Without credentials anywhere in the chain, the credentials check fails at once naming
    the ways to give some (instance role, LoadCredential, the key file), no request is sent, no
    other check runs, and the exit status is EX_CONFIG."""
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    empty = tmp_path / "empty"
    empty.write_text("")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(empty))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(empty))
    # Whatever would be sent may only reach loopback: the sandbox's endpoint, and no instance
    # metadata service (link-local, where botocore looks for an instance role).
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_server.endpoint_url)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    clients = Clients()
    with trio.fail_after(5):
        checks = await checked(config, clients)
    assert outcomes(checks) == [("region", True), ("credentials", False)]
    line = checks[1].line()
    assert line.startswith("FAIL credentials: no AWS credentials found"), line
    for way in ("instance role", "LoadCredential=", "/etc/compute-broker/aws-credentials"):
        assert way in line
    assert clients.sent == []
    assert exit_status(checks) == EXIT_CONFIG


async def test_unknown_region_fails_before_any_client_is_made(config: Config) -> None:
    """A region botocore does not know fails the region check with a suggestion, and nothing
    else is tried (it would only time out on an endpoint that does not exist)."""
    clients = Clients()
    checks = await checked(attrs.evolve(config, region="eu-west-9"), clients)
    assert outcomes(checks) == [("region", False)]
    assert "did you mean eu-west-" in checks[0].fix
    assert clients.services == []
    assert exit_status(checks) == EXIT_CONFIG


async def test_missing_aws_profile_fails_in_one_line(
    config: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    """AWS_PROFILE naming a profile that does not exist fails `region` (where the AWS
    configuration is first read) with the fix, instead of a traceback."""
    monkeypatch.setenv("AWS_PROFILE", "no-such-profile")
    clients = Clients()
    checks = await checked(config, clients)
    assert outcomes(checks) == [("region", False)]
    assert "no-such-profile" in checks[0].detail
    assert "AWS_PROFILE" in checks[0].fix
    assert clients.services == []
    assert exit_status(checks) == EXIT_CONFIG


async def test_unreachable_aws_is_a_transient_failure(
    config: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When the endpoint refuses connections the credentials check fails as transient, and the
    exit status is EX_TEMPFAIL: systemd should try again later."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{closed_loopback_port()}")
    checks = await checked(config)
    assert outcomes(checks) == [("region", True), ("credentials", False)]
    assert checks[1].transient
    assert "cannot reach AWS" in checks[1].detail
    assert exit_status(checks) == EXIT_TEMPFAIL


async def test_missing_table_fails_the_table_check_with_the_setup_command(config: Config) -> None:
    """A table that does not exist fails `table` with the setup command for this config."""
    absent = f"absent-{uuid.uuid4().hex[:8]}"
    checks = await checked(attrs.evolve(config, registry_table=absent), config_path=CONFIG_PATH)
    assert (
        f"FAIL table: {absent} not found in us-east-1; "
        f"run: compute-broker setup --config {CONFIG_PATH}"
    ) == the("table", checks).line()
    assert all(check.ok for check in checks if check.name != "table")
    assert exit_status(checks) == EXIT_CONFIG


async def test_table_with_other_keys_fails_the_table_check(config: Config) -> None:
    """A table of that name with other keys than pk/sk is not the registry's."""
    name = f"other-keys-{uuid.uuid4().hex[:8]}"
    make_client("dynamodb", region="us-east-1").create_table(
        TableName=name,
        AttributeDefinitions=[{"AttributeName": "id", "AttributeType": "S"}],
        KeySchema=[{"AttributeName": "id", "KeyType": "HASH"}],
        BillingMode="PAY_PER_REQUEST",
    )
    checks = await checked(attrs.evolve(config, registry_table=name))
    table = the("table", checks)
    assert not table.ok
    assert f"{name} has keys id (hash); the registry needs pk (hash) and sk (range)" in table.detail


async def test_dry_run_denial_fails_launch_with_the_code_and_logs_the_reason(
    config: Config,
) -> None:
    """EC2's UnauthorizedOperation (HTTP 403) fails `launch` naming the code, the offering and
    the IAM actions to allow; the ARNs and the encoded reason go to the log, not the line."""
    clients = Clients(
        {"RunInstances": lambda: ec2_error(403, "UnauthorizedOperation", DENIAL_MESSAGE)}
    )
    with structlog.testing.capture_logs() as logs:
        checks = await checked(config, clients)
    launch = the("launch", checks)
    assert not launch.ok
    assert launch.line().startswith(
        "FAIL launch: UnauthorizedOperation: not allowed to launch c7i.8xlarge spot in "
        f"{config.subnet_id} (4 of 4 offerings refused); allow ec2:RunInstances and ec2:CreateTags"
    ), launch.line()
    assert ENCODED not in launch.line()
    assert "arn:" not in launch.line()
    refused = [entry for entry in logs if entry["event"] == "preflight.refused"]
    assert len(refused) == 4
    assert ENCODED in refused[0]["message"]
    assert all(check.ok for check in checks if check.name != "launch")
    assert exit_status(checks) == EXIT_CONFIG


@pytest.mark.parametrize(
    ("code", "status", "fix_names"),
    [
        ("InvalidAMIID.NotFound", 400, "ami_id"),
        ("InvalidKeyPair.NotFound", 400, "key_name: null"),
        ("InvalidGroup.NotFound", 400, "security_group_ids"),
        ("InvalidSubnetID.NotFound", 400, "subnet_id or subnets"),
    ],
)
async def test_dry_run_errors_fail_launch_with_the_setting_to_fix(
    config: Config, code: str, status: int, fix_names: str
) -> None:
    """Each launch parameter EC2 rejects fails `launch` with AWS's code and message and a fix
    naming the config key (and the region, where the resource must be)."""
    message = "The resource does not exist (account 123456789012)"
    clients = Clients({"RunInstances": lambda: ec2_error(status, code, message)})
    checks = await checked(config, clients)
    launch = the("launch", checks)
    assert not launch.ok
    assert launch.detail.startswith(f"{code} for c7i.8xlarge spot in {config.subnet_id}")
    assert "(account <account>)" in launch.detail
    assert fix_names in launch.fix
    assert not launch.transient


async def test_throttled_dry_run_is_a_transient_failure(config: Config) -> None:
    """RunInstances throttled (after botocore's retry) fails `launch` as transient."""
    clients = Clients(
        {"RunInstances": lambda: ec2_error(503, "RequestLimitExceeded", "Request limit exceeded.")}
    )
    checks = await checked(attrs.evolve(config, instance_types=()), clients)
    launch = the("launch", checks)
    assert (launch.ok, launch.transient) == (False, True)
    assert "RequestLimitExceeded" in launch.detail
    assert exit_status(checks) == EXIT_TEMPFAIL


async def test_a_dry_run_that_launches_fails_launch(config: Config) -> None:
    """An endpoint that launches despite DryRun fails `launch` rather than pass silently."""
    launched = (
        '<RunInstancesResponse xmlns="http://ec2.amazonaws.com/doc/2016-11-15/">'
        "<reservationId>r-0123456789abcdef0</reservationId><instancesSet><item>"
        "<instanceId>i-0123456789abcdef0</instanceId></item></instancesSet>"
        "</RunInstancesResponse>"
    )
    clients = Clients({"RunInstances": lambda: ec2_reply(200, launched)})
    checks = await checked(attrs.evolve(config, instance_types=()), clients)
    launch = the("launch", checks)
    assert not launch.ok
    assert "DryRunIgnored" in launch.detail
    assert "i-0123456789abcdef0" in launch.detail


async def test_a_check_without_an_answer_fails_after_its_deadline(config: Config) -> None:
    """A check whose AWS call hangs fails as transient after `check_timeout`; the others
    still report."""
    release = threading.Event()

    def hang() -> AWSResponse:
        release.wait(DEADLINE)
        return ec2_error(500, "InternalError", "released")

    clients = Clients({"RunInstances": hang})
    try:
        checks = await checked(config, clients, check_timeout=1)
    finally:
        release.set()
    launch = the("launch", checks)
    assert "FAIL launch: no answer from AWS within 1 s; " in launch.line()
    assert launch.transient
    assert all(check.ok for check in checks if check.name != "launch")


@pytest.mark.parametrize(
    ("key", "fix"),
    [
        ("events_queue_url", "run: compute-broker setup --config {path} --events-queue {name}"),
        ("burst_policy.queue_url", "create the queue {name} in us-east-1"),
    ],
)
async def test_missing_queue_fails_the_queue_check(
    config: Config, moto_server: MotoHandle, key: str, fix: str
) -> None:
    """A configured queue that does not exist fails `queue`, naming the key and the queue
    (not its URL, which holds the account id), with how to create it."""
    name = f"absent-{uuid.uuid4().hex[:8]}"
    url = f"{moto_server.endpoint_url}/123456789012/{name}"
    if key == "events_queue_url":
        config = attrs.evolve(config, events_queue_url=url)
    else:
        config = attrs.evolve(config, burst_policy=BurstPolicy(mode="auto", queue_url=url))
    checks = await checked(config, config_path=CONFIG_PATH)
    failed = [check for check in checks if not check.ok]
    assert outcomes(failed) == [("queue", False)]
    assert (
        failed[0]
        .line()
        .startswith(
            f"FAIL queue: {key}: {name} not found in us-east-1; "
            + fix.format(path=CONFIG_PATH, name=name)
        )
    ), failed[0].line()
    assert exit_status(checks) == EXIT_CONFIG


async def test_launch_without_ami_fails_without_asking_ec2(config: Config) -> None:
    """No ami_id: `launch` fails naming the key and its variable; no RunInstances is sent."""
    clients = Clients()
    checks = await checked(attrs.evolve(config, ami_id=None), clients)
    assert (
        the("launch", checks).line()
        == "FAIL launch: ami_id is not set; set ami_id in the config or COMPUTE_BROKER_AMI_ID"
    )
    assert clients.params("RunInstances") == []


def test_check_lines_are_one_line_without_account_ids() -> None:
    """Whatever a check is given, it prints as one line, account ids and encoded
    authorization messages left out; an ok line carries no fix."""
    failed = Check(
        "credentials",
        False,
        "refused:\n arn:aws:iam::123456789012:role/broker\tEncoded authorization failure "
        "message: Zm9vYmFy",
        "ask\naccount 210987654321",
    )
    assert failed.line() == (
        "FAIL credentials: refused: arn:aws:iam::<account>:role/broker Encoded authorization "
        "failure message: (in the log); ask account <account>"
    )
    assert Check("table", True, "fine", "unused").line() == "ok   table: fine"
    assert (
        str(Check("launch", True, "ami-012345678901234567"))
        == "ok   launch: ami-012345678901234567"
    )


def test_exit_status_tells_config_failures_from_transient_ones() -> None:
    """0 when all pass, EX_TEMPFAIL (75) when only transient checks failed, EX_CONFIG (78) as
    soon as one failure is the setup's."""
    ok = Check("region", True, "us-east-1")
    transient = Check("launch", False, "throttled", transient=True)
    config_failure = Check("table", False, "absent")
    assert exit_status([ok]) == 0
    assert exit_status([ok, transient]) == EXIT_TEMPFAIL
    assert exit_status([ok, transient, config_failure]) == EXIT_CONFIG
    assert (EXIT_CONFIG, EXIT_TEMPFAIL) == (78, 75)
