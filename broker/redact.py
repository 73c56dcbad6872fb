"""What an AWS error text gives away, and the forms of it others may see: a client
(`public_error`) and the operator's check output (`for_operator`). The log keeps the full
text."""

from __future__ import annotations

import re
from typing import Final

_ARN: Final = re.compile(r"\barn:aws[a-z-]*:[A-Za-z0-9_+=,.@:/*-]*")
# Twelve digits standing alone: not inside an id such as subnet-f874459532587fa51.
_ACCOUNT_ID: Final = re.compile(r"(?<![0-9A-Za-z])[0-9]{12}(?![0-9A-Za-z])")
_ACCESS_KEY_ID: Final = re.compile(r"\b(?:AKIA|ASIA|AIDA|AROA|AIPA|ANPA|ANVA|AGPA)[A-Z0-9]{12,}\b")
_ENCODED_MESSAGE: Final = re.compile(
    r"(Encoded authorization failure message:)\s*[A-Za-z0-9_+/=-]+", re.IGNORECASE
)


def public_error(text: str) -> str:
    """An error reply as a client may see it: AWS account ids, ARNs (which carry account ids
    and IAM principal names), AWS key ids and encoded authorization messages replaced by
    placeholders. The server logs the full text."""
    text = _ENCODED_MESSAGE.sub(r"\1 <redacted>", text)
    text = _ARN.sub("<arn>", text)
    text = _ACCESS_KEY_ID.sub("<key-id>", text)
    return _ACCOUNT_ID.sub("<account>", text)


def for_operator(text: str) -> str:
    """`text` on one line for `compute-broker check`: account ids and encoded authorization
    messages left out (ARNs stay: they name the principal and the resource to fix)."""
    text = _ENCODED_MESSAGE.sub(r"\1 (in the log)", text)
    return " ".join(_ACCOUNT_ID.sub("<account>", text).split())
