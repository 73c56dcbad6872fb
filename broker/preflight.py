"""Preflight: check what `serve` needs from AWS, one line per check, before READY=1.

Checks, in order: the region is one AWS has; the credentials work (STS GetCallerIdentity);
the registry table exists with the broker's keys and is ACTIVE (registry: dynamodb only); EC2
would accept RunInstances with the configured launch parameters (DryRun, every configured
type x market x subnet); the configured SQS queues exist. The region and the credentials are
gates: when either fails nothing else is asked, since every other call would fail the same way
(or wait on timeouts). The rest run concurrently.

Every boto3 call runs off the event loop like the adapters' (`broker.aws.call`: a worker thread
under a `trio.CapacityLimiter`), clients are built in a thread too, and each check is bounded by
`CHECK_TIMEOUT`. A `Check` prints as one line with no account id in it; account ids, full ARNs
and AWS's encoded authorization messages go to the log (`preflight.identity`,
`preflight.refused`). See docs/preflight.md.
"""

from __future__ import annotations

import difflib
import functools
import os
import shlex
from collections.abc import Awaitable, Callable
from typing import Any, Final, Protocol

import attrs
import boto3
import botocore
import botocore.exceptions
import structlog
import trio

from broker.aws import DEFAULT_REGION, call, cloud_error, make_client
from broker.checks import LAUNCH_FIXES, LAUNCH_SETTINGS, NO_CREDENTIALS_FIX, Check
from broker.cloud import THROTTLING_ERRORS, CloudError, LaunchSpec, Market
from broker.config import env_variable
from broker.config_validate import Config
from broker.dynamo_table import PARTITION_KEY, SORT_KEY
from broker.ec2 import LAUNCH_TOKEN_TAG, MANAGED_TAG, NAME_TAG, POOL_TAG, WORKER_NAME

# The longest one check may take, retries included; a check that takes longer fails (transient).
CHECK_TIMEOUT: Final = 20.0
# Client settings for the checks: one retry, short timeouts, so a dead endpoint fails in seconds.
MAX_ATTEMPTS: Final = 1
CONNECT_TIMEOUT: Final = 3.0
READ_TIMEOUT: Final = 10.0
# Launch-token tag value of the dry runs (a real launch tags its ClientToken).
DRY_RUN_TOKEN: Final = "preflight"
# Queue attribute asked for: any one proves the queue exists and may be read.
QUEUE_ATTRIBUTE: Final = "ApproximateNumberOfMessages"

TABLE_USABLE: Final = frozenset({"ACTIVE", "UPDATING"})  # UPDATING tables serve reads/writes

# Codes that say AWS could not answer now, not that the request is wrong (with unreachable).
_TRANSIENT_CODES: Final = THROTTLING_ERRORS | {
    "InternalError",
    "InternalFailure",
    "InternalServerError",
    "ServiceUnavailable",
    "Unavailable",
    "500",
    "502",
    "503",
    "504",
}
_BAD_CREDENTIALS: Final = frozenset(
    {
        "InvalidClientTokenId",
        "SignatureDoesNotMatch",
        "ExpiredToken",
        "ExpiredTokenException",
        "UnrecognizedClientException",
        "AuthFailure",
        "IncompleteSignature",
        "InvalidAccessKeyId",
    }
)
_NO_CREDENTIALS: Final = frozenset(
    {"NoCredentials", "PartialCredentialsError", "CredentialRetrievalError", "ProfileNotFound"}
)
_QUEUE_MISSING: Final = frozenset({"AWS.SimpleQueueService.NonExistentQueue", "QueueDoesNotExist"})

_log = structlog.get_logger("broker.preflight")


class ClientFactory(Protocol):
    """Builds a boto3 client: `broker.aws.make_client`'s signature (tests wrap it to add hooks)."""

    def __call__(
        self,
        service: str,
        *,
        region: str | None,
        max_attempts: int = ...,
        connect_timeout: float = ...,
        read_timeout: float = ...,
    ) -> Any: ...


@attrs.frozen
class _Context:
    config: Config
    region: str
    limiter: trio.CapacityLimiter
    client_factory: ClientFactory
    config_option: str  # " --config FILE" for the commands a fix names, or ""

    async def client(self, service: str) -> Any:
        """A client for the checks, built in a thread (loading models and config files blocks).
        Raises `CloudError` (a profile that does not exist, a bad config file)."""
        build = functools.partial(
            self.client_factory,
            service,
            region=self.region,
            max_attempts=MAX_ATTEMPTS,
            connect_timeout=CONNECT_TIMEOUT,
            read_timeout=READ_TIMEOUT,
        )
        try:
            return await trio.to_thread.run_sync(build, limiter=self.limiter)
        except botocore.exceptions.BotoCoreError as exc:
            raise cloud_error(exc) from exc


async def run_checks(
    config: Config,
    *,
    config_path: str | os.PathLike[str] | None = None,
    client_factory: ClientFactory = make_client,
    limiter: trio.CapacityLimiter | None = None,
    check_timeout: float = CHECK_TIMEOUT,
) -> list[Check]:
    """Run every check that applies to `config`, in order: region, credentials, then table,
    launch and queues (concurrently). Stops after the region or the credentials fail.

    `config_path` is named in the fixes (`run: compute-broker setup --config FILE`). Never
    raises for what it finds; each check that asks AWS is bounded by `check_timeout` seconds.
    """
    limiter = limiter if limiter is not None else trio.CapacityLimiter(config.aws_max_concurrency)
    option = f" --config {shlex.quote(os.fspath(config_path))}" if config_path is not None else ""
    region, region_check = await trio.to_thread.run_sync(check_region, config)
    checks = [region_check]
    if not region_check.ok:
        return _logged(checks)
    context = _Context(config, region, limiter, client_factory, option)
    credentials = await _bounded(
        "credentials", check_timeout, functools.partial(check_credentials, context)
    )
    checks.append(credentials)
    if not credentials.ok:
        return _logged(checks)
    jobs: list[tuple[str, Callable[[], Awaitable[Check]]]] = []
    if config.registry == "dynamodb":
        jobs.append(("table", functools.partial(check_table, context)))
    jobs.append(("launch", functools.partial(check_launch, context)))
    for key, url in queue_urls(config):
        jobs.append(("queue", functools.partial(check_queue, context, key, url)))
    results: dict[int, Check] = {}

    async def run(index: int, name: str, job: Callable[[], Awaitable[Check]]) -> None:
        results[index] = await _bounded(name, check_timeout, job)

    async with trio.open_nursery() as nursery:
        for index, (name, job) in enumerate(jobs):
            nursery.start_soon(run, index, name, job)
    checks += [results[index] for index in range(len(jobs))]
    return _logged(checks)


def queue_urls(config: Config) -> list[tuple[str, str]]:
    """(config key, URL) of each SQS queue `serve` will use: the burst queue in auto mode and
    the events queue."""
    urls: list[tuple[str, str]] = []
    if config.burst_policy.mode == "auto" and config.burst_policy.queue_url:
        urls.append(("burst_policy.queue_url", config.burst_policy.queue_url))
    if config.events_queue_url:
        urls.append(("events_queue_url", config.events_queue_url))
    return urls


async def _bounded(name: str, seconds: float, job: Callable[[], Awaitable[Check]]) -> Check:
    """`job()` under a deadline; a job that outlives it is a transient failure."""
    with trio.move_on_after(seconds):
        return await job()
    return Check(
        name,
        False,
        f"no answer from AWS within {seconds:g} s",
        "check this machine's network path to AWS (proxy, firewall, DNS), then start again",
        transient=True,
    )


def _logged(checks: list[Check]) -> list[Check]:
    for check in checks:
        if check.ok:
            _log.info("preflight.ok", check=check.name, detail=check.detail)
        else:
            _log.error(
                "preflight.failed",
                check=check.name,
                detail=check.detail,
                fix=check.fix,
                transient=check.transient,
            )
    return checks


# --- region -----------------------------------------------------------------------------------


def check_region(config: Config) -> tuple[str, Check]:
    """Blocking (reads the AWS config file): the region `make_client` will use, and whether
    botocore knows it (a typo would otherwise show as timeouts on an endpoint that does not
    exist)."""
    try:
        session = boto3.session.Session()  # reads the profile: AWS_PROFILE must name one
        configured_region = session.region_name
    except botocore.exceptions.BotoCoreError as exc:  # ProfileNotFound, a bad config file
        return DEFAULT_REGION, Check(
            "region",
            False,
            f"the AWS configuration cannot be read: {cloud_error(exc).message}",
            "set AWS_PROFILE to a profile of the AWS config file, or unset it",
        )
    if config.region is not None:
        region, source = config.region, "from the config"
    elif configured_region:
        region, source = configured_region, "from AWS_REGION, AWS_DEFAULT_REGION or AWS config"
    else:
        region, source = DEFAULT_REGION, "none configured: the default"
    known = {
        name
        for partition in session.get_available_partitions()
        for name in session.get_available_regions("ec2", partition)
    }
    endpoint = os.environ.get("AWS_ENDPOINT_URL")
    where = f"; endpoint {endpoint} (AWS_ENDPOINT_URL)" if endpoint else ""
    if region in known:
        return region, Check("region", True, f"{region} ({source}){where}")
    close = difflib.get_close_matches(region, sorted(known), n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    return region, Check(
        "region",
        False,
        f"{region} ({source}) is not a region botocore {botocore.__version__} knows",
        f"set region in the config to an AWS region{hint}, or upgrade boto3 if it is new",
    )


# --- credentials ------------------------------------------------------------------------------


async def check_credentials(context: _Context) -> Check:
    """STS GetCallerIdentity: needs no permission, so it fails only for the credentials (or
    the network). The identity's ARN is shown with the account id left out; the log has it."""
    try:
        sts = await context.client("sts")
        identity = await call(context.limiter, sts.get_caller_identity)
    except CloudError as exc:
        return _credentials_failure(exc, context.region)
    _log.info(
        "preflight.identity",
        account=identity.get("Account"),
        arn=identity.get("Arn"),
        user_id=identity.get("UserId"),
    )
    return Check("credentials", True, str(identity.get("Arn", "?")))


def _credentials_failure(exc: CloudError, region: str) -> Check:
    if exc.code in _NO_CREDENTIALS:
        detail = "no AWS credentials found (environment, credentials and config files, "
        detail += "container and instance metadata)"
        if exc.code != "NoCredentials":
            detail = f"{exc.code}: {exc.message}"
        return Check("credentials", False, detail, NO_CREDENTIALS_FIX)
    if exc.code in _BAD_CREDENTIALS:
        return Check(
            "credentials",
            False,
            f"AWS refused the credentials ({exc})",
            "replace the access key where it is set (/etc/compute-broker/aws-credentials) or use "
            f"an instance role; a session token must be current; an opt-in region ({region}?) "
            "must be enabled for the account",
        )
    return _failure("credentials", exc)


def _failure(name: str, exc: CloudError, fix: str = "", *, prefix: str = "") -> Check:
    """A check that failed with `exc`: transient when AWS could not answer."""
    if exc.unreachable:
        return Check(
            name,
            False,
            f"{prefix}cannot reach AWS ({exc})",
            "check this machine's network path to AWS (proxy, firewall, DNS, AWS_ENDPOINT_URL)",
            transient=True,
        )
    if exc.code in _TRANSIENT_CODES:
        return Check(
            name, False, f"{prefix}AWS did not answer ({exc})", "start again", transient=True
        )
    return Check(name, False, f"{prefix}{exc}", fix or "see AWS's message")


# --- table ------------------------------------------------------------------------------------


async def check_table(context: _Context) -> Check:
    """DescribeTable: the registry table exists, has the keys `broker.dynamo` writes (pk hash,
    sk range, both strings) and takes reads and writes (ACTIVE, or UPDATING)."""
    name, region = context.config.registry_table, context.region
    setup = f"run: compute-broker setup{context.config_option}"
    try:
        dynamodb = await context.client("dynamodb")
        table = (await call(context.limiter, dynamodb.describe_table, TableName=name))["Table"]
    except CloudError as exc:
        if exc.code == "ResourceNotFoundException":
            return Check("table", False, f"{name} not found in {region}", setup)
        fix = ""
        if exc.code in ("AccessDeniedException", "AccessDenied"):
            fix = "allow dynamodb:DescribeTable and the actions in docs/registry.md on the table"
        return _failure("table", exc, fix)
    keys = {(key["AttributeName"], key["KeyType"]) for key in table.get("KeySchema", [])}
    types = {a["AttributeName"]: a["AttributeType"] for a in table.get("AttributeDefinitions", [])}
    wanted = {(PARTITION_KEY, "HASH"), (SORT_KEY, "RANGE")}
    if keys != wanted or types.get(PARTITION_KEY) != "S" or types.get(SORT_KEY) != "S":
        found = ", ".join(f"{n} ({kind.lower()})" for n, kind in sorted(keys)) or "none"
        return Check(
            "table",
            False,
            f"{name} has keys {found}; the registry needs {PARTITION_KEY} (hash) and "
            f"{SORT_KEY} (range), both strings",
            f"set registry_table to a new name and {setup}",
        )
    status = table.get("TableStatus", "?")
    if status == "CREATING":
        return Check(
            "table", False, f"{name} is still being created", "start again", transient=True
        )
    if status not in TABLE_USABLE:
        return Check("table", False, f"{name} is {status}", f"restore the table, or {setup}")
    return Check("table", True, f"{name} in {region}, {status}, keys {PARTITION_KEY}/{SORT_KEY}")


# --- launch -----------------------------------------------------------------------------------


@attrs.frozen
class Offering:
    """One combination a launch may use: type, market and subnet (None: EC2's default)."""

    instance_type: str
    market: Market
    subnet: str | None

    def __str__(self) -> str:
        return f"{self.instance_type} {self.market.value} in {self.subnet or 'the default subnet'}"


def offerings(config: Config) -> list[Offering]:
    """Every offering the default launch spec may try, in the order the engine tries them."""
    spec = LaunchSpec(
        config.instance_type,
        Market(config.market),
        config.instance_types,
        config.on_demand_fallback,
    )
    subnets: tuple[str | None, ...] = config.subnets or (config.subnet_id,)
    return [
        Offering(instance_type, market, subnet)
        for market in spec.markets
        for instance_type in spec.types
        for subnet in subnets
    ]


def dry_run_params(config: Config, offering: Offering) -> dict[str, Any]:
    """RunInstances parameters for a DryRun of `offering`: what `Ec2Cloud.launch` sends (the
    same tags, for IAM conditions on them), with DryRun set and no ClientToken of ours (botocore
    fills in a random one)."""
    params: dict[str, Any] = {
        "ImageId": config.ami_id,
        "InstanceType": offering.instance_type,
        "MinCount": 1,
        "MaxCount": 1,
        "SecurityGroupIds": list(config.security_group_ids),
        "TagSpecifications": [
            {
                "ResourceType": "instance",
                "Tags": [
                    {"Key": NAME_TAG, "Value": WORKER_NAME},
                    {"Key": POOL_TAG, "Value": config.pool_name},
                    {"Key": MANAGED_TAG, "Value": "true"},
                    {"Key": LAUNCH_TOKEN_TAG, "Value": DRY_RUN_TOKEN},
                ],
            }
        ],
        "InstanceInitiatedShutdownBehavior": "terminate",
        "DryRun": True,
    }
    if config.key_name is not None:
        params["KeyName"] = config.key_name
    if offering.subnet is not None:
        params["SubnetId"] = offering.subnet
    if offering.market is Market.SPOT:
        params["InstanceMarketOptions"] = {
            "MarketType": "spot",
            "SpotOptions": {
                "SpotInstanceType": "one-time",
                "InstanceInterruptionBehavior": "terminate",
            },
        }
    return params


async def check_launch(context: _Context) -> Check:
    """RunInstances with DryRun=True for every offering: EC2 answers DryRunOperation when the
    call would have succeeded (permissions, AMI, subnet, groups, key pair), else the error it
    would have raised. Capacity is not checked: a dry run launches nothing."""
    config = context.config
    if config.ami_id is None:
        return Check(
            "launch",
            False,
            "ami_id is not set",
            f"set ami_id in the config or {env_variable('ami_id')}",
        )
    try:
        ec2 = await context.client("ec2")
    except CloudError as exc:
        return _failure("launch", exc)
    wanted = offerings(config)
    outcomes: list[CloudError | None] = [None] * len(wanted)

    async def dry_run(index: int, offering: Offering) -> None:
        outcomes[index] = await _dry_run(context, ec2, offering)

    async with trio.open_nursery() as nursery:
        for index, offering in enumerate(wanted):
            nursery.start_soon(dry_run, index, offering)
    refused = [(o, e) for o, e in zip(wanted, outcomes, strict=True) if e is not None]
    if not refused:
        types = ", ".join(dict.fromkeys(o.instance_type for o in wanted))
        markets = ", ".join(dict.fromkeys(o.market.value for o in wanted))
        subnets = ", ".join(dict.fromkeys(o.subnet or "default" for o in wanted))
        return Check(
            "launch",
            True,
            f"RunInstances (DryRun) allowed with {config.ami_id} for {len(wanted)} "
            f"offering(s): types {types}; markets {markets}; subnets {subnets}",
        )
    offering, error = refused[0]
    count = f" ({len(refused)} of {len(wanted)} offerings refused)" if len(wanted) > 1 else ""
    if error.unreachable or error.code in _TRANSIENT_CODES:
        return _failure("launch", error)
    fix = LAUNCH_FIXES.get(error.code, f"check {LAUNCH_SETTINGS} against AWS's message")
    fix = fix.format(region=context.region)
    if error.code == "UnauthorizedOperation":  # AWS's message is ARNs and an encoded blob: logged
        detail = f"UnauthorizedOperation: not allowed to launch {offering}{count}"
    else:
        detail = f"{error.code} for {offering}{count}: {error.message}"
    return Check("launch", False, detail, fix)


async def _dry_run(context: _Context, ec2: Any, offering: Offering) -> CloudError | None:
    """None when EC2 says the launch would succeed; else the error it gave."""
    params = dry_run_params(context.config, offering)
    try:
        response = await call(context.limiter, ec2.run_instances, **params)
    except CloudError as exc:
        if exc.code == "DryRunOperation":
            return None
        cause = exc.__cause__
        full = (
            cause.response.get("Error", {})
            if isinstance(cause, botocore.exceptions.ClientError)
            else {}
        )
        _log.warning(
            "preflight.refused",
            offering=str(offering),
            code=exc.code,
            message=full.get("Message", exc.message),
        )
        return exc
    # EC2 never launches with DryRun set; an endpoint that did must not pass unnoticed.
    instance_ids = [item.get("InstanceId") for item in response.get("Instances", [])]
    _log.error("preflight.dry_run_launched", offering=str(offering), instance_ids=instance_ids)
    return CloudError(
        "DryRunIgnored", f"the endpoint launched {instance_ids} (terminate them: see the log)"
    )


# --- queues -----------------------------------------------------------------------------------


def queue_name(url: str) -> str:
    """The queue's name: the last part of its URL (the part before it is the account id)."""
    return url.rstrip("/").rsplit("/", 1)[-1]


async def check_queue(context: _Context, key: str, url: str) -> Check:
    """GetQueueAttributes on a configured queue URL: it exists and the broker may read it."""
    name, region = queue_name(url), context.region
    try:
        sqs = await context.client("sqs")
        await call(
            context.limiter,
            sqs.get_queue_attributes,
            QueueUrl=url,
            AttributeNames=[QUEUE_ATTRIBUTE],
        )
    except CloudError as exc:
        if exc.code in _QUEUE_MISSING:
            if key == "events_queue_url":
                fix = (
                    f"run: compute-broker setup{context.config_option} --events-queue {name}, "
                    "and set events_queue_url to the URL it prints"
                )
            else:
                fix = f"create the queue {name} in {region}, or correct {key}"
            return Check("queue", False, f"{key}: {name} not found in {region}", fix)
        fix = ""
        if "AccessDenied" in exc.code:
            fix = f"allow sqs:GetQueueAttributes on {name} to the broker"
        return _failure("queue", exc, fix, prefix=f"{key}: ")
    return Check("queue", True, f"{key}: {name} in {region}")
