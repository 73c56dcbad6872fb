"""`Ec2Cloud`: the boto3 adapter implementing `broker.cloud.Cloud`.

The broker's instances carry a pool tag; every query filters on it, so the broker never sees
or touches other instances in the account.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Final

import attrs
import structlog
import trio

from broker.aws import call, make_client
from broker.clock import wall_time
from broker.cloud import Cloud, CloudError, Instance, LaunchSpec, Market
from broker.ratelimit import TokenBucket
from broker.retry import Retry, Retrying

NAME_TAG = "Name"
WORKER_NAME = "compute-broker-worker"
POOL_TAG = "compute-broker:pool"
MANAGED_TAG = "compute-broker:managed"
# The launch's ClientToken: after a crash between RunInstances and the registry write, the
# reconciler matches instances to the launch intent the registry kept.
LAUNCH_TOKEN_TAG = "compute-broker:launch-token"
# Who caused the launch (`Cloud.launch`'s `requested_by`), for cost allocation.
CLIENT_TAG = "compute-broker:client"
TAG_VALUE_MAX = 256  # EC2's limit on a tag value
_NOT_IN_A_TAG = re.compile(r"[^\w .:/=+\-@]")  # what EC2 refuses in a tag value

LIVE_STATES = ("pending", "running")
# Everything that may still bill: what `compute-broker stop-all` terminates.
BILLABLE_STATES = ("pending", "running", "stopping", "stopped")
# Ids per DescribeInstances/TerminateInstances call; one page holds a whole batch.
BATCH_SIZE = 200
PAGE_SIZE = 1000

# EC2's request bucket for non-mutating actions (Describe*): 100 tokens, 20 a second.
DESCRIBE_BURST = 100
DESCRIBE_RATE = 20.0
SPOT_PRODUCT = "Linux/UNIX"

# EC2's server-side errors that say nothing about the request itself. botocore names a 5xx
# whose body is not an AWS error (an HTML page from a proxy) by its status code.
_TRANSIENT_ERRORS: Final = frozenset(
    {"InternalError", "InternalFailure", "ServiceUnavailable", "Unavailable"}
    | {"500", "502", "503", "504"}
)
_NOT_FOUND = "InvalidInstanceID.NotFound"
_INSTANCE_ID = re.compile(r"\bi-[0-9a-f]+\b")


def _retryable(error: Exception) -> bool:
    """Worth sending again as it was: throttled, a transient server error, or unreachable;
    never a capacity error (another offering may have capacity now)."""
    return (
        isinstance(error, CloudError)
        and not error.capacity
        and (error.throttled or error.unreachable or error.code in _TRANSIENT_ERRORS)
    )


# RunInstances retries, with the same ClientToken: at most 5 requests, full jitter, waits drawn
# below 0.5, 1, 2 and 4 s (7.5 s at most in all). The engine's launch_timeout bounds the time.
LAUNCH_RETRY: Final = Retry(on=_retryable, attempts=5, wait_initial=0.5, wait_max=10.0)

_log = structlog.get_logger("broker.ec2")


@attrs.frozen
class Ec2Settings:
    """Where and how workers are launched."""

    ami_id: str
    security_group_ids: tuple[str, ...]
    key_name: str | None
    subnet_id: str | None
    pool_name: str
    region: str | None
    # The user data every worker gets (the operator's plus the watchdog: broker.userdata).
    user_data: str | None = None
    # The config's instance_tags (cost allocation), as (key, value) pairs.
    tags: tuple[tuple[str, str], ...] = ()


class Ec2Cloud:
    """Implements `broker.cloud.Cloud` with boto3; blocking calls run in threads.

    RunInstances goes through `launch_client`, which must not retry (botocore's standard mode
    would spend ~15 s retrying InsufficientInstanceCapacity, an HTTP 500, before the broker
    could try another offering): the adapter retries throttling and transient failures itself
    (`LAUNCH_RETRY`), and capacity errors reach the caller after one request. Every other call
    has botocore's standard retries. Every DescribeInstances request first takes a token from
    `describe_bucket`.
    """

    def __init__(
        self,
        settings: Ec2Settings,
        limiter: trio.CapacityLimiter,
        client: Any = None,
        *,
        launch_client: Any = None,
        describe_bucket: TokenBucket | None = None,
    ) -> None:
        self.settings = settings
        self.limiter = limiter
        self.client: Any = (
            client if client is not None else make_client("ec2", region=settings.region)
        )
        self.launch_client: Any = (
            launch_client
            if launch_client is not None
            else make_client("ec2", region=settings.region, max_attempts=0)
        )
        self.describe_bucket = (
            describe_bucket
            if describe_bucket is not None
            else TokenBucket(DESCRIBE_BURST, DESCRIBE_RATE)
        )

    async def launch(
        self,
        spec: LaunchSpec,
        count: int,
        client_token: str,
        *,
        subnet: str | None = None,
        requested_by: str | None = None,
    ) -> list[Instance]:
        """One RunInstances for 1..count tagged instances, idempotent on `client_token`, in
        `subnet` (default: the configured one). Throttling and transient failures are retried
        with the same token; any other error, capacity errors first of all, is raised at once.
        The instances carry the broker's tags, the config's `instance_tags` and `requested_by`."""
        params: dict[str, Any] = {
            "ImageId": self.settings.ami_id,
            "InstanceType": spec.instance_type,
            "MinCount": 1,
            "MaxCount": count,
            "ClientToken": client_token,
            "SecurityGroupIds": list(self.settings.security_group_ids),
            "TagSpecifications": [
                {"ResourceType": "instance", "Tags": self._tags(client_token, requested_by)}
            ],
            # A worker that powers itself off (its watchdog, docs/worker-watchdog.md) is
            # terminated, not stopped: a stopped instance still bills for its volumes.
            "InstanceInitiatedShutdownBehavior": "terminate",
        }
        if self.settings.user_data is not None:
            params["UserData"] = self.settings.user_data
        if self.settings.key_name is not None:
            params["KeyName"] = self.settings.key_name
        subnet = subnet if subnet is not None else self.settings.subnet_id
        if subnet is not None:
            params["SubnetId"] = subnet
        if spec.market is Market.SPOT:
            params["InstanceMarketOptions"] = {
                "MarketType": "spot",
                "SpotOptions": {
                    "SpotInstanceType": "one-time",
                    "InstanceInterruptionBehavior": "terminate",
                },
            }
        response = await self._run_instances(params)
        return [
            instance_from_description(item, market=spec.market) for item in response["Instances"]
        ]

    async def describe(self, instance_ids: Sequence[str]) -> list[Instance]:
        """Describe these instances, one DescribeInstances call per 200 ids; unknown ids are
        left out (the `instance-id` filter, unlike `InstanceIds=`, does not fail on them)."""
        instances: list[Instance] = []
        for batch in _batches(list(dict.fromkeys(instance_ids))):
            instances += await self._describe([{"Name": "instance-id", "Values": batch}])
        return instances

    async def list_pool(self, states: Sequence[str] = LIVE_STATES) -> list[Instance]:
        """This pool's instances in `states` (default: pending and running)."""
        return await self._describe(
            [
                {"Name": f"tag:{POOL_TAG}", "Values": [self.settings.pool_name]},
                {"Name": "instance-state-name", "Values": list(states)},
            ]
        )

    async def launched(self, tokens: Sequence[str]) -> dict[str, int]:
        """Instances per launch token, any state: one DescribeInstances per 200 tokens."""
        counts: dict[str, int] = {}
        for batch in _batches(list(dict.fromkeys(tokens))):
            filters = [
                {"Name": f"tag:{POOL_TAG}", "Values": [self.settings.pool_name]},
                {"Name": f"tag:{LAUNCH_TOKEN_TAG}", "Values": batch},
            ]
            for instance in await self._describe(filters):
                if instance.launch_token is not None:
                    counts[instance.launch_token] = counts.get(instance.launch_token, 0) + 1
        return counts

    async def terminate(self, instance_ids: Sequence[str]) -> None:
        """Terminate these instances; ids EC2 no longer knows are ignored. An instance EC2
        describes without this pool's tag is left alone and logged (`terminate.refused`): the
        broker checks the tag itself, as its IAM policy does (docs/iam.md), so a record that
        names another instance (an edited registry, another pool's) cannot end it."""
        for batch in _batches(list(dict.fromkeys(instance_ids))):
            strangers = {
                instance.instance_id
                for instance in await self.describe(batch)
                if instance.tags.get(POOL_TAG) != self.settings.pool_name
            }
            if strangers:
                _log.error(
                    "terminate.refused",
                    reason="not tagged with this pool",
                    pool=self.settings.pool_name,
                    instance_ids=sorted(strangers),
                )
            ours = [instance_id for instance_id in batch if instance_id not in strangers]
            if ours:
                await self._terminate(ours)

    async def spot_prices(self, instance_types: Sequence[str]) -> dict[str, float]:
        """The current Linux spot price ($/hour) of each type, from DescribeSpotPriceHistory.

        A type is priced at its highest price across the Region's Availability Zones: launches
        may go to any configured subnet, and a budget should not assume the cheapest zone.
        Types EC2 reports no price for (unknown, not offered in the Region) are left out.
        Raises `CloudError`, e.g. UnauthorizedOperation when the account may not ask.
        """
        types = list(dict.fromkeys(instance_types))
        if not types:
            return {}
        now = datetime.fromtimestamp(wall_time(), tz=UTC)
        history = await call(self.limiter, self._spot_price_history, types, now)
        prices: dict[str, float] = {}
        for entry in history:
            instance_type = entry["InstanceType"]
            price = float(entry["SpotPrice"])
            prices[instance_type] = max(price, prices.get(instance_type, price))
        return prices

    def _spot_price_history(self, types: list[str], now: datetime) -> list[dict[str, Any]]:
        """Blocking: with StartTime now, EC2 answers the price in effect in each zone."""
        paginator = self.client.get_paginator("describe_spot_price_history")
        pages = paginator.paginate(
            InstanceTypes=types, ProductDescriptions=[SPOT_PRODUCT], StartTime=now, EndTime=now
        )
        return [entry for page in pages for entry in page["SpotPriceHistory"]]

    def _tags(self, client_token: str, requested_by: str | None) -> list[dict[str, str]]:
        """The config's tags first, then the broker's (config validation refuses the broker's
        keys, so none is overridden)."""
        tags = [{"Key": key, "Value": value} for key, value in self.settings.tags]
        tags += [
            {"Key": NAME_TAG, "Value": WORKER_NAME},
            {"Key": POOL_TAG, "Value": self.settings.pool_name},
            {"Key": MANAGED_TAG, "Value": "true"},
            {"Key": LAUNCH_TOKEN_TAG, "Value": client_token},
        ]
        if requested_by:
            value = _NOT_IN_A_TAG.sub("_", requested_by)[:TAG_VALUE_MAX]
            tags.append({"Key": CLIENT_TAG, "Value": value})
        return tags

    async def _run_instances(self, params: dict[str, Any]) -> Any:
        """RunInstances retried by `LAUNCH_RETRY`; `params` (its ClientToken) is the same each
        time, so EC2 launches once."""

        def log_retry(retrying: Retrying) -> None:
            error = retrying.error
            _log.warning(
                "launch.retry",
                code=error.code if isinstance(error, CloudError) else type(error).__name__,
                attempt=retrying.attempt,
                delay=round(retrying.wait, 3),
                client_token=params["ClientToken"],
            )

        return await LAUNCH_RETRY.run(
            lambda: call(self.limiter, self.launch_client.run_instances, **params),
            on_retry=log_retry,
        )

    async def _describe(self, filters: list[dict[str, Any]]) -> list[Instance]:
        """Every instance matching `filters`, one page (one bucket token) per request."""
        items: list[dict[str, Any]] = []
        page_token: str | None = None
        while True:
            await trio.sleep(self.describe_bucket.reserve(trio.current_time()))
            params: dict[str, Any] = {"Filters": filters, "MaxResults": PAGE_SIZE}
            if page_token:
                params["NextToken"] = page_token
            page = await call(self.limiter, self.client.describe_instances, **params)
            items += [
                item for reservation in page["Reservations"] for item in reservation["Instances"]
            ]
            page_token = page.get("NextToken")
            if not page_token:
                return [instance_from_description(item) for item in items]

    async def _terminate(self, instance_ids: list[str]) -> None:
        """TerminateInstances fails as a whole when one id is unknown: drop the ids named in
        the error and try again; if the error names none of them, go one id at a time."""
        remaining = instance_ids
        while remaining:
            try:
                await call(self.limiter, self.client.terminate_instances, InstanceIds=remaining)
                return
            except CloudError as exc:
                if exc.code != _NOT_FOUND:
                    raise
                unknown = set(_INSTANCE_ID.findall(exc.message)) & set(remaining)
                if not unknown:
                    if len(remaining) == 1:
                        return
                    for instance_id in remaining:
                        await self._terminate([instance_id])
                    return
                remaining = [i for i in remaining if i not in unknown]


def instance_from_description(item: Mapping[str, Any], *, market: Market | None = None) -> Instance:
    """An `Instance` from one item of RunInstances' or DescribeInstances' `Instances`.

    The market is read from `InstanceLifecycle` unless given (a launch knows what it asked for).
    """
    if market is None:
        market = Market.SPOT if item.get("InstanceLifecycle") == "spot" else Market.ON_DEMAND
    return Instance(
        instance_id=item["InstanceId"],
        instance_type=item["InstanceType"],
        market=market,
        state=item["State"]["Name"],
        public_ip=item.get("PublicIpAddress") or None,
        launched_at=item["LaunchTime"].timestamp(),
        tags={tag["Key"]: tag["Value"] for tag in item.get("Tags", [])},
    )


def _batches(ids: list[str]) -> Iterator[list[str]]:
    for start in range(0, len(ids), BATCH_SIZE):
        yield ids[start : start + BATCH_SIZE]


def _implements_cloud(cloud: Ec2Cloud) -> Cloud:
    """mypy checks here that `Ec2Cloud` implements `Cloud`."""
    return cloud
