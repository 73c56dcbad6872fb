"""`broker.aws`'s cut-down service models: a client has the operations the broker calls, with
every shape they use, and the endpoints of every partition for the services it uses."""

from __future__ import annotations

import botocore.session
import pytest

from broker.aws import OPERATIONS, make_client


@pytest.mark.parametrize("service", sorted(OPERATIONS))
def test_a_client_has_exactly_the_operations_the_broker_calls(service: str) -> None:
    """Every operation in OPERATIONS, no other; their input and output shapes whole."""
    model = make_client(service, region="eu-west-1").meta.service_model
    full = botocore.session.get_session().get_service_model(service)
    assert OPERATIONS[service] == set(model.operation_names)
    for name in OPERATIONS[service]:
        ours, theirs = model.operation_model(name), full.operation_model(name)
        for shapes in ("input_shape", "output_shape"):
            assert repr(_walk(getattr(theirs, shapes))) == repr(_walk(getattr(ours, shapes)))
        assert [e.name for e in theirs.error_shapes] == [e.name for e in ours.error_shapes]


def test_error_shapes_are_all_kept() -> None:
    """`client.exceptions` knows every error the service models, not only the kept calls'."""
    ours = make_client("dynamodb", region="eu-west-1").meta.service_model
    full = botocore.session.get_session().get_service_model("dynamodb")
    assert {s.name for s in full.error_shapes} == {s.name for s in ours.error_shapes}


@pytest.mark.parametrize(
    ("service", "region", "url"),
    [
        ("ec2", "eu-west-1", "https://ec2.eu-west-1.amazonaws.com"),
        ("ec2", "cn-north-1", "https://ec2.cn-north-1.amazonaws.com.cn"),
        ("dynamodb", "us-gov-west-1", "https://dynamodb.us-gov-west-1.amazonaws.com"),
        ("sqs", "ap-southeast-2", "https://sqs.ap-southeast-2.amazonaws.com"),
        ("sts", "us-east-1", "https://sts.us-east-1.amazonaws.com"),
    ],
)
def test_endpoints_are_those_of_the_whole_model(
    service: str, region: str, url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each service's endpoint in each partition is where full botocore would send it."""
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    full = botocore.session.get_session().create_client(service, region_name=region)
    assert full.meta.endpoint_url == make_client(service, region=region).meta.endpoint_url
    assert url == full.meta.endpoint_url


def _walk(shape: object, depth: int = 0) -> object:
    """A shape as nested (name, type, members) tuples, cut at a depth (shapes can recurse)."""
    if shape is None or depth > 6:
        return None
    name, kind = getattr(shape, "name", None), getattr(shape, "type_name", None)
    members = getattr(shape, "members", None) or {}
    inner = [getattr(shape, attr, None) for attr in ("member", "key", "value")]
    return (
        name,
        kind,
        sorted((k, _walk(v, depth + 1)) for k, v in members.items()),
        [_walk(s, depth + 1) for s in inner if s is not None],
    )
