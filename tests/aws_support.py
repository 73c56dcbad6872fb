"""AWS fault injection for tests: botocore `before-send` hooks that answer like AWS.

A `before-send` handler that returns an `AWSResponse` replaces the HTTP exchange; botocore then
parses it and retries it exactly as it would a real AWS error (throttling, 5xx, capacity).
`Ec2Cloud` sends RunInstances through its retry-less `launch_client` and retries in the
adapter; hooks for it go there, hooks for every other operation on `client`.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qsl

import boto3
from botocore.awsrequest import AWSResponse

from broker.ec2 import Ec2Cloud


def full_client(service: str, region: str | None = "us-east-1") -> Any:
    """A boto3 client with botocore's whole service model, for what a test does beside the
    broker: `broker.aws.make_client`'s clients know only the operations the broker calls."""
    return boto3.session.Session().client(service, region_name=region or "us-east-1")  # type: ignore[call-overload]


class _Body:
    def __init__(self, data: bytes) -> None:
        self.data = data

    def stream(self, **_: Any) -> Iterator[bytes]:
        yield self.data


def ec2_error(status: int, code: str, message: str) -> AWSResponse:
    """An EC2 error reply, as AWS words it."""
    return ec2_reply(
        status,
        "<Response><Errors><Error>"
        f"<Code>{code}</Code><Message>{message}</Message>"
        "</Error></Errors><RequestID>injected</RequestID></Response>",
    )


def ec2_reply(status: int, xml: str) -> AWSResponse:
    """An EC2 reply with this status and XML document (without the XML declaration)."""
    body = f'<?xml version="1.0" encoding="UTF-8"?>\n{xml}'.encode()
    return AWSResponse("https://ec2.injected/", status, {}, _Body(body))


def client_for(cloud: Ec2Cloud, operation: str) -> Any:
    """The boto3 client through which `cloud` sends `operation`."""
    return cloud.launch_client if operation == "RunInstances" else cloud.client


def inject(cloud: Ec2Cloud, operation: str, responses: list[AWSResponse]) -> list[dict[str, str]]:
    """Answer the next `operation` attempts with `responses`, then let requests through.

    Returns a list that grows by one per attempt sent: the request's form parameters
    (`ClientToken`, `InstanceType`, `SubnetId`, ...), as sent on the wire."""
    attempts: list[dict[str, str]] = []
    pending = list(responses)

    def hook(request: Any, **_: Any) -> AWSResponse | None:
        body = request.body or b""
        text = body.decode() if isinstance(body, bytes) else str(body)
        attempts.append(dict(parse_qsl(text)))
        return pending.pop(0) if pending else None

    client_for(cloud, operation).meta.events.register(f"before-send.ec2.{operation}", hook)
    return attempts


def closed_loopback_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port
