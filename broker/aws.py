"""boto3 plumbing shared by the AWS adapters: client construction and one call wrapper.

Every blocking boto3 call goes through `call`, which runs it in a worker thread under a
`trio.CapacityLimiter` and turns botocore's exceptions into `broker.cloud.CloudError`; the
observers registered with `observe_calls` (metrics, health) hear of each call's outcome.
"""

from __future__ import annotations

import functools
import json
import os
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Final, ParamSpec, TypeVar

import boto3
import botocore.config
import botocore.exceptions
import botocore.loaders
import botocore.parsers
import botocore.session
import trio

from broker.cloud import CloudError

DEFAULT_REGION = "us-east-1"
# Long enough to keep AWS's own message, short enough for one reply line.
MAX_MESSAGE_LENGTH = 300

_P = ParamSpec("_P")
_T = TypeVar("_T")

# Told of every AWS call that finished: (service, operation, seconds, error code or None).
CallObserver = Callable[[str, str, float, str | None], None]
_observers: list[CallObserver] = []

# The operations the broker calls, by service (tests/test_iam.py walks the source: a call
# missing here fails there). Clients are built from models cut down to these: EC2's whole
# model (830 operations) and the endpoints of every AWS service held 11-12 MB of the
# deployed broker's settled RSS for a handful of calls (README, Benchmarks). A client has no
# method for any other operation.
OPERATIONS: Final[Mapping[str, frozenset[str]]] = {
    "ec2": frozenset(
        {
            "DescribeInstances",
            "DescribeSpotPriceHistory",
            "RunInstances",
            "TerminateInstances",
            # The sandbox's embedded moto cloud (broker.sandbox.prepare_resources).
            "AuthorizeSecurityGroupIngress",
            "CreateKeyPair",
            "CreateSecurityGroup",
            "DescribeImages",
            "DescribeKeyPairs",
            "DescribeSecurityGroups",
            "DescribeSubnets",
            "DescribeVpcs",
            "RegisterImage",
        }
    ),
    "dynamodb": frozenset(
        {
            "CreateTable",
            "DeleteItem",
            "DescribeTable",
            "DescribeTimeToLive",
            "GetItem",
            "PutItem",
            "Query",
            "TransactWriteItems",
            "UpdateItem",
            "UpdateTimeToLive",
        }
    ),
    "sqs": frozenset(
        {
            "CreateQueue",
            "DeleteMessageBatch",
            "GetQueueAttributes",
            "GetQueueUrl",
            "ReceiveMessage",
            "SetQueueAttributes",
        }
    ),
    "sts": frozenset({"GetCallerIdentity"}),
}


class _TrimmingFileLoader(botocore.loaders.JSONFileLoader):
    """botocore's JSON file loader, which cuts each service model in OPERATIONS down to those
    operations (with the shapes they use, and every error shape) and the endpoints file down to
    those services (in every partition)."""

    def load_file(self, file_path: str) -> Any:
        parts = os.path.normpath(file_path).split(os.sep)
        name, service = parts[-1], parts[-3] if len(parts) >= 3 else ""
        if name == "endpoints":
            text = _trimmed_text(super().load_file(file_path), _only_services)
        elif name == "service-2" and service in OPERATIONS:  # DATA/ec2/2016-11-15/service-2
            trim = functools.partial(_only_operations, keep=OPERATIONS[service])
            text = _trimmed_text(super().load_file(file_path), trim)
        else:
            return super().load_file(file_path)
        # Parsed again once the whole file's objects are freed, what is kept shares no
        # allocator pages with them (kept in place, it held most of those pages: ~10 MB).
        return None if text is None else json.loads(text, object_pairs_hook=OrderedDict)


def _trimmed_text(data: Any, trim: Callable[[Any], Any]) -> str | None:
    return None if data is None else json.dumps(trim(data))


def _only_operations(model: dict[str, Any], keep: frozenset[str]) -> dict[str, Any]:
    """A service model (service-2.json) with only the operations in `keep`."""
    shapes = model["shapes"]
    operations = {name: op for name, op in model["operations"].items() if name in keep}
    todo = [name for name, shape in shapes.items() if shape.get("exception")]
    for op in operations.values():
        todo += [op[key]["shape"] for key in ("input", "output") if key in op]
        todo += [error["shape"] for error in op.get("errors", ())]
    used: set[str] = set()
    while todo:
        name = todo.pop()
        if name not in used:
            used.add(name)
            todo.extend(_shape_references(shapes[name]))
    return {
        **model,
        "operations": operations,
        "shapes": {name: shape for name, shape in shapes.items() if name in used},
    }


def _shape_references(shape: Mapping[str, Any]) -> Iterator[str]:
    for key in ("member", "key", "value"):
        if key in shape:
            yield shape[key]["shape"]
    for member in shape.get("members", {}).values():
        yield member["shape"]


def _only_services(endpoints: dict[str, Any]) -> dict[str, Any]:
    """The endpoints file (every partition's regions and services) with only OPERATIONS'."""
    partitions = [
        {**p, "services": {k: v for k, v in p.get("services", {}).items() if k in OPERATIONS}}
        for p in endpoints["partitions"]
    ]
    return {**endpoints, "partitions": partitions}


# Service models are large JSON files: share one loader (and its cache) between sessions, so
# a second client costs milliseconds instead of a few hundred.
_LOADER = botocore.loaders.Loader(file_loader=_TrimmingFileLoader())

_UNREACHABLE = (
    botocore.exceptions.EndpointConnectionError,
    botocore.exceptions.ConnectTimeoutError,
    botocore.exceptions.ReadTimeoutError,
    botocore.exceptions.ConnectionClosedError,
)


def make_client(
    service: str,
    *,
    region: str | None,
    max_attempts: int = 5,
    connect_timeout: float = 5,
    read_timeout: float = 20,
) -> Any:
    """A boto3 client using the standard credential chain and botocore's standard retries.

    The endpoint comes from `AWS_ENDPOINT_URL` when set (boto3 reads it). Without `region`
    the configured one is used, else us-east-1. `max_attempts` is botocore's setting of that
    name, which counts retries: up to `max_attempts + 1` requests per call, so 0 sends exactly
    one request and leaves retrying to the caller.
    """
    botocore_session = botocore.session.Session()
    botocore_session.register_component("data_loader", _LOADER)
    session = boto3.session.Session(botocore_session=botocore_session, region_name=region)
    config = botocore.config.Config(
        retries={"mode": "standard", "max_attempts": max_attempts},
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
    )
    return session.client(  # type: ignore[call-overload]
        service, region_name=session.region_name or DEFAULT_REGION, config=config
    )


async def call(
    limiter: trio.CapacityLimiter,
    fn: Callable[_P, _T],
    /,
    *args: _P.args,
    **kwargs: _P.kwargs,
) -> _T:
    """Run the blocking `fn(*args, **kwargs)` in a thread; raise `CloudError` when it fails.

    Cancellation returns at once; the abandoned thread finishes (bounded by the client's
    timeouts) and keeps its limiter token until then.
    """
    started = trio.current_time()
    try:
        result = await trio.to_thread.run_sync(
            functools.partial(fn, *args, **kwargs), limiter=limiter, abandon_on_cancel=True
        )
    except (
        botocore.exceptions.ClientError,
        botocore.exceptions.BotoCoreError,
        botocore.parsers.ResponseParserError,
    ) as exc:
        error = cloud_error(exc)
        _tell(fn, trio.current_time() - started, error.code)
        raise error from exc
    _tell(fn, trio.current_time() - started, None)
    return result


def observe_calls(observer: CallObserver) -> Callable[[], None]:
    """Tell `observer` of every AWS call from now on; returns the function that stops it."""
    _observers.append(observer)
    return lambda: _observers.remove(observer)


def _tell(fn: Callable[..., Any], seconds: float, error: str | None) -> None:
    if not _observers:
        return
    client = getattr(fn, "__self__", None)
    meta = getattr(client, "meta", None)
    if meta is None:
        return  # not a client method (a paginator, a test double)
    service = meta.service_model.service_name
    name = getattr(fn, "__name__", "")
    operation = meta.method_to_api_mapping.get(name, name)
    for observer in list(_observers):
        observer(service, operation, seconds, error)


def cloud_error(exc: Exception) -> CloudError:
    """The `CloudError` for a boto3/botocore exception (one-line message)."""
    if isinstance(exc, botocore.exceptions.ClientError):
        error = exc.response.get("Error", {})
        code = error.get("Code") or "ClientError"
        return CloudError(code, _one_line(error.get("Message") or str(exc)))
    if isinstance(exc, _UNREACHABLE):
        return CloudError("EndpointUnreachable", _one_line(str(exc)), unreachable=True)
    if isinstance(exc, botocore.exceptions.NoCredentialsError):
        return CloudError("NoCredentials", "no AWS credentials found")
    if isinstance(exc, botocore.parsers.ResponseParserError):
        return CloudError("BadResponse", "could not parse the AWS response")
    return CloudError(type(exc).__name__, _one_line(str(exc)))


def _one_line(text: str) -> str:
    """Collapse whitespace (botocore messages can span lines) and cap the length."""
    flat = " ".join(text.split())
    if len(flat) > MAX_MESSAGE_LENGTH:
        return flat[: MAX_MESSAGE_LENGTH - 3] + "..."
    return flat
