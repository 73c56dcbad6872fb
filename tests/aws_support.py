"""AWS fault injection for tests: botocore `before-send` hooks that answer like AWS.

A `before-send` handler that returns an `AWSResponse` replaces the HTTP exchange; botocore then
parses it and retries it exactly as it would a real AWS error (throttling, 5xx, capacity).
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

from botocore.awsrequest import AWSResponse

from broker.ec2 import Ec2Cloud


class _Body:
    def __init__(self, data: bytes) -> None:
        self.data = data

    def stream(self, **_: Any) -> Iterator[bytes]:
        yield self.data


def ec2_error(status: int, code: str, message: str) -> AWSResponse:
    body = (
        '<?xml version="1.0" encoding="UTF-8"?>\n<Response><Errors><Error>'
        f"<Code>{code}</Code><Message>{message}</Message>"
        "</Error></Errors><RequestID>injected</RequestID></Response>"
    ).encode()
    return AWSResponse("https://ec2.injected/", status, {}, _Body(body))


def inject(cloud: Ec2Cloud, operation: str, responses: list[AWSResponse]) -> list[int]:
    """Answer the next `operation` attempts with `responses`, then let requests through.

    Returns a list that grows by one per attempt sent."""
    attempts: list[int] = []
    pending = list(responses)

    def hook(**_: Any) -> AWSResponse | None:
        attempts.append(1)
        return pending.pop(0) if pending else None

    cloud.client.meta.events.register(f"before-send.ec2.{operation}", hook)
    return attempts


def closed_loopback_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port
