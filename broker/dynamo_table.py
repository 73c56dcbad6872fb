"""The registry's DynamoDB table: its keys, creating it (`compute-broker setup`), and how a
record's plain values are written as DynamoDB attribute values and read back. Blocking
functions; `broker.dynamo.DynamoRegistry` is the adapter that uses them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from decimal import Decimal
from typing import Any, Final

import attrs
import botocore.exceptions

from broker.aws import cloud_error
from broker.cloud import CloudError
from broker.registry import ItemValue

PARTITION_KEY: Final = "pk"
SORT_KEY: Final = "sk"
TTL_ATTRIBUTE: Final = "expires_at"
# `ensure_table` polls DescribeTable while the table is being created.
TABLE_WAIT_DELAY: Final = 2
TABLE_WAIT_ATTEMPTS: Final = 60


def aws_code(exc: botocore.exceptions.ClientError) -> str:
    """The error code AWS answered with."""
    return str(exc.response.get("Error", {}).get("Code", ""))


@attrs.frozen
class TableSetup:
    """What `ensure_table` did: created the table, enabled TTL (both False: nothing to do)."""

    created: bool
    ttl_enabled: bool


def ensure_table(client: Any, table_name: str) -> TableSetup:
    """Blocking: create the registry table if absent (PAY_PER_REQUEST), wait until it is
    ACTIVE, and enable TTL on `expires_at`. Idempotent. Raises `CloudError`, also when a table
    of that name has other keys or TTL on another attribute."""
    try:
        created = _create_table(client, table_name)
        return TableSetup(created, _enable_ttl(client, table_name))
    except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as exc:
        raise cloud_error(exc) from exc


def _create_table(client: Any, table_name: str) -> bool:
    created = False
    try:
        table = client.describe_table(TableName=table_name)["Table"]
    except botocore.exceptions.ClientError as exc:
        if aws_code(exc) != "ResourceNotFoundException":
            raise
        try:
            client.create_table(
                TableName=table_name,
                AttributeDefinitions=[
                    {"AttributeName": PARTITION_KEY, "AttributeType": "S"},
                    {"AttributeName": SORT_KEY, "AttributeType": "S"},
                ],
                KeySchema=[
                    {"AttributeName": PARTITION_KEY, "KeyType": "HASH"},
                    {"AttributeName": SORT_KEY, "KeyType": "RANGE"},
                ],
                BillingMode="PAY_PER_REQUEST",
            )
            created = True
        except botocore.exceptions.ClientError as create_exc:
            if aws_code(create_exc) != "ResourceInUseException":  # another setup created it
                raise
        table = {"TableStatus": "CREATING"}
    if table["TableStatus"] != "ACTIVE":
        client.get_waiter("table_exists").wait(
            TableName=table_name,
            WaiterConfig={"Delay": TABLE_WAIT_DELAY, "MaxAttempts": TABLE_WAIT_ATTEMPTS},
        )
        table = client.describe_table(TableName=table_name)["Table"]
    keys = {(k["AttributeName"], k["KeyType"]) for k in table["KeySchema"]}
    if keys != {(PARTITION_KEY, "HASH"), (SORT_KEY, "RANGE")}:
        raise CloudError(
            "TableMismatch",
            f"table {table_name} exists with other keys than {PARTITION_KEY} (hash) and "
            f"{SORT_KEY} (range)",
        )
    return created


def _enable_ttl(client: Any, table_name: str) -> bool:
    ttl = client.describe_time_to_live(TableName=table_name)["TimeToLiveDescription"]
    status, attribute = ttl.get("TimeToLiveStatus"), ttl.get("AttributeName")
    if status in ("ENABLED", "ENABLING"):
        if attribute != TTL_ATTRIBUTE:
            raise CloudError(
                "TableMismatch",
                f"table {table_name} has TTL on {attribute}, not on {TTL_ATTRIBUTE}",
            )
        return False
    try:
        client.update_time_to_live(
            TableName=table_name,
            TimeToLiveSpecification={"Enabled": True, "AttributeName": TTL_ATTRIBUTE},
        )
    except botocore.exceptions.ClientError as exc:
        # Another setup enabled it since we looked: AWS refuses to enable it twice.
        if "already enabled" not in str(exc.response.get("Error", {}).get("Message", "")):
            raise
        return False
    return True


# --- attribute values ---------------------------------------------------------------------------


def encode(value: ItemValue) -> dict[str, Any]:
    """A plain value as a DynamoDB attribute value. Floats are written in their shortest
    exact decimal form, so they read back as the same float."""
    if value is None:
        return {"NULL": True}
    if isinstance(value, bool):
        return {"BOOL": value}
    if isinstance(value, int):
        return {"N": str(value)}
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"DynamoDB numbers are finite, not {value}")
        return {"N": str(Decimal(repr(value)))}
    if isinstance(value, str):
        return {"S": value}
    if isinstance(value, list):
        return {"L": [encode(v) for v in value]}
    raise TypeError(f"cannot store {type(value).__name__} in DynamoDB")


def decode(attribute: Mapping[str, Any]) -> Any:
    """A DynamoDB attribute value as a plain value; numbers as `Decimal` (exact)."""
    [(kind, raw)] = attribute.items()
    if kind == "NULL":
        return None
    if kind == "BOOL":
        return bool(raw)
    if kind == "N":
        return Decimal(raw)
    if kind == "S":
        return raw
    if kind == "L":
        return [decode(v) for v in raw]
    raise ValueError(f"unexpected DynamoDB attribute type {kind}")


def encode_item(item: Mapping[str, ItemValue]) -> dict[str, dict[str, Any]]:
    """A record's plain dict as DynamoDB attribute values."""
    return {name: encode(value) for name, value in item.items()}


def decode_item(item: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """A DynamoDB item as a plain dict (the keys `pk` and `sk` included)."""
    return {name: decode(value) for name, value in item.items()}
