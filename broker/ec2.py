"""`Ec2Cloud`: the boto3 adapter implementing `broker.cloud.Cloud`.

The broker's instances carry a pool tag; every query filters on it, so the broker never sees
or touches other instances in the account.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import attrs
import trio

from broker.aws import call, make_client
from broker.cloud import CloudError, Instance, LaunchSpec, Market

NAME_TAG = "Name"
WORKER_NAME = "compute-broker-worker"
POOL_TAG = "compute-broker:pool"
MANAGED_TAG = "compute-broker:managed"
# The launch's ClientToken: after a crash between RunInstances and the registry write, the
# reconciler matches instances to the launch intent the registry kept.
LAUNCH_TOKEN_TAG = "compute-broker:launch-token"

LIVE_STATES = ("pending", "running")
# Everything that may still bill: what `compute-broker stop-all` terminates.
BILLABLE_STATES = ("pending", "running", "stopping", "stopped")
# Ids per DescribeInstances/TerminateInstances call; one page holds a whole batch.
BATCH_SIZE = 200
PAGE_SIZE = 1000

_NOT_FOUND = "InvalidInstanceID.NotFound"
_INSTANCE_ID = re.compile(r"\bi-[0-9a-f]+\b")


@attrs.frozen
class Ec2Settings:
    """Where and how workers are launched."""

    ami_id: str
    security_group_ids: tuple[str, ...]
    key_name: str | None
    subnet_id: str | None
    pool_name: str
    region: str | None


class Ec2Cloud:
    """Implements `broker.cloud.Cloud` with boto3; blocking calls run in threads."""

    def __init__(
        self, settings: Ec2Settings, limiter: trio.CapacityLimiter, client: Any = None
    ) -> None:
        self.settings = settings
        self.limiter = limiter
        self.client: Any = (
            client if client is not None else make_client("ec2", region=settings.region)
        )

    async def launch(self, spec: LaunchSpec, count: int, client_token: str) -> list[Instance]:
        """One RunInstances call for 1..count tagged instances, idempotent on `client_token`."""
        params: dict[str, Any] = {
            "ImageId": self.settings.ami_id,
            "InstanceType": spec.instance_type,
            "MinCount": 1,
            "MaxCount": count,
            "ClientToken": client_token,
            "SecurityGroupIds": list(self.settings.security_group_ids),
            "TagSpecifications": [{"ResourceType": "instance", "Tags": self._tags(client_token)}],
        }
        if self.settings.key_name is not None:
            params["KeyName"] = self.settings.key_name
        if self.settings.subnet_id is not None:
            params["SubnetId"] = self.settings.subnet_id
        if spec.market is Market.SPOT:
            params["InstanceMarketOptions"] = {
                "MarketType": "spot",
                "SpotOptions": {
                    "SpotInstanceType": "one-time",
                    "InstanceInterruptionBehavior": "terminate",
                },
            }
        response = await call(self.limiter, self.client.run_instances, **params)
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

    async def terminate(self, instance_ids: Sequence[str]) -> None:
        """Terminate these instances; ids EC2 no longer knows are ignored."""
        for batch in _batches(list(dict.fromkeys(instance_ids))):
            await self._terminate(batch)

    def _tags(self, client_token: str) -> list[dict[str, str]]:
        return [
            {"Key": NAME_TAG, "Value": WORKER_NAME},
            {"Key": POOL_TAG, "Value": self.settings.pool_name},
            {"Key": MANAGED_TAG, "Value": "true"},
            {"Key": LAUNCH_TOKEN_TAG, "Value": client_token},
        ]

    async def _describe(self, filters: list[dict[str, Any]]) -> list[Instance]:
        items = await call(self.limiter, self._describe_all_pages, filters)
        return [instance_from_description(item) for item in items]

    def _describe_all_pages(self, filters: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Blocking: every instance matching `filters`, across pages (one page per batch)."""
        paginator = self.client.get_paginator("describe_instances")
        pages = paginator.paginate(Filters=filters, PaginationConfig={"PageSize": PAGE_SIZE})
        return [
            item
            for page in pages
            for reservation in page["Reservations"]
            for item in reservation["Instances"]
        ]

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
