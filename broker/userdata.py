"""A worker's user data: the operator's own user data plus the watchdog that powers the worker
off when no broker wants it any more (broker/worker_watchdog.sh, docs/worker-watchdog.md).

Pure: settings and text in, text out. The script template is package data, read once at
import. The operator's user data is never replaced: it becomes the first part of a cloud-init
MIME multipart (the format `cloud-init devel make-mime` writes), the watchdog the second.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Callable
from email.message import Message
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from email.parser import Parser
from importlib import resources
from typing import Final

import attrs

EC2_USER_DATA_LIMIT: Final = 16 * 1024  # bytes, before base64 (RunInstances rejects more)
WATCHDOG_FILENAME: Final = "compute-broker-watchdog.sh"
OPERATOR_FILENAME: Final = "operator-user-data"
MIN_SECONDS: Final = 0.01  # the script keeps time in centiseconds
CLOUD_INIT_MIME_SNIFF: Final = 4096  # cloud-init takes data as MIME if these bytes say so

_TEMPLATE: Final = resources.files("broker").joinpath("worker_watchdog.sh").read_text("ascii")
_SETTINGS_BLOCK: Final = re.compile(
    r"^# --- settings \(broker/userdata\.py rewrites this block\) ---\n.*?"
    r"^# --- end of settings ---\n",
    re.M | re.S,
)
# A host goes into the script unquoted-safe: letters, digits, dots, hyphens, IPv6 colons.
_HOST: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9.:-]{0,252}")

# cloud-init's user-data formats by their first characters (cloudinit/handlers/__init__.py);
# the longest prefix wins, as in cloud-init.
_STARTS_WITH: Final = {
    "#!": "text/x-shellscript",
    "#cloud-config": "text/cloud-config",
    "#cloud-config-archive": "text/cloud-config-archive",
    "#cloud-config-jsonp": "text/cloud-config-jsonp",
    "#cloud-boothook": "text/cloud-boothook",
    "#include": "text/x-include-url",
    "#include-once": "text/x-include-once-url",
    "#part-handler": "text/part-handler",
    "## template: jinja": "text/jinja2",
}
_UNKNOWN_TYPE: Final = "text/plain"  # what cloud-init assumes for a part it cannot place

_Validator = Callable[[object, "attrs.Attribute[float]", float], None]


def _to_brokers(value: object) -> tuple[tuple[str, int], ...]:
    if isinstance(value, str) or not isinstance(value, list | tuple):
        raise TypeError(f"brokers must be a sequence of (host, port) pairs, not {value!r}")
    pairs = []
    for item in value:
        if not (isinstance(item, list | tuple) and len(item) == 2):
            raise TypeError(f"a broker must be a (host, port) pair, not {item!r}")
        host, port = item
        pairs.append((host, port))
    return tuple(pairs)


def _check_brokers(
    instance: object, attribute: object, value: tuple[tuple[object, object], ...]
) -> None:
    if not value:
        raise ValueError("the watchdog needs at least one broker address")
    for host, port in value:
        if not (isinstance(host, str) and _HOST.fullmatch(host)):
            raise ValueError(f"bad broker host {host!r}: want a name or an IP address")
        if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
            raise ValueError(f"bad broker port {port!r} for {host}: want 1-65535")


def _seconds(minimum: float, *, zero_allowed: bool = False) -> _Validator:
    """A validator: a finite number of seconds, at least `minimum` (or 0 if allowed)."""

    def check(instance: object, attribute: attrs.Attribute[float], value: float) -> None:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise TypeError(f"{attribute.name} must be a number of seconds, not {value!r}")
        if not math.isfinite(value) or (value < minimum and not (zero_allowed and value == 0)):
            least = f"0 or at least {minimum}" if zero_allowed else f"at least {minimum}"
            raise ValueError(f"{attribute.name} must be {least} seconds, not {value!r}")

    return check


@attrs.frozen
class WatchdogSettings:
    """What the watchdog on every worker is told: whom to ask, how often, and when to give up.

    `brokers` are tried in order each check; any one that answers counts (replicas). A worker
    powers off after `orphan_timeout` seconds without an OK, after two "not wanted" answers in
    a row, or `max_lifetime` seconds after boot (0: no limit).
    """

    brokers: tuple[tuple[str, int], ...] = attrs.field(
        converter=_to_brokers, validator=_check_brokers
    )
    interval: float = attrs.field(default=60.0, validator=_seconds(MIN_SECONDS))
    orphan_timeout: float = attrs.field(default=1800.0, validator=_seconds(MIN_SECONDS))
    max_lifetime: float = attrs.field(
        default=0.0, validator=_seconds(MIN_SECONDS, zero_allowed=True)
    )


def _shell_number(seconds: float) -> str:
    """Seconds as the script reads them: digits and at most two decimals, no exponent."""
    return f"{seconds:.2f}".rstrip("0").rstrip(".")


def watchdog_script(settings: WatchdogSettings) -> str:
    """The watchdog script with `settings` written in, without comment lines and indentation
    (a third of its size: EC2 allows 16 KB of user data in all)."""
    brokers = " ".join(f"{host}:{port}" for host, port in settings.brokers)
    block = (
        f"brokers='{brokers}'\n"
        f"interval={_shell_number(settings.interval)}\n"
        f"orphan_timeout={_shell_number(settings.orphan_timeout)}\n"
        f"max_lifetime={_shell_number(settings.max_lifetime)}\n"
    )
    script, count = _SETTINGS_BLOCK.subn(lambda _: block, _TEMPLATE)
    if count != 1:
        raise RuntimeError("worker_watchdog.sh has lost its settings block")
    shebang, title, *body = script.splitlines()
    kept = [line.strip() for line in body if line.strip() and not line.lstrip().startswith("#")]
    return "\n".join([shebang, title, *kept]) + "\n"


def content_type(user_data: str) -> str:
    """The MIME type cloud-init gives user data by its first characters; text/plain if none."""
    start = user_data.lstrip().lower()
    for prefix in sorted(_STARTS_WITH, key=len, reverse=True):
        if start.startswith(prefix):
            return _STARTS_WITH[prefix]
    return _UNKNOWN_TYPE


def _part(text: str, mime_type: str, filename: str) -> MIMEText:
    """One part as make-mime writes it; ASCII stays readable (7bit), anything else is base64."""
    charset = "us-ascii" if text.isascii() else "utf-8"
    part = MIMEText(text, mime_type.split("/", 1)[1], charset)
    part.add_header("Content-Disposition", "attachment", filename=filename)
    return part


def _container(operator_user_data: str, script: str) -> Message:
    """A multipart/mixed holding the operator's user data as it stands: a MIME multipart
    (cloud-init's test: `mime-version:` near the start) keeps its parts and boundary."""
    if "mime-version:" in operator_user_data[:CLOUD_INIT_MIME_SNIFF].lower():
        message = Parser().parsestr(operator_user_data)
        if message.is_multipart():
            if "MIME-Version" not in message:
                message["MIME-Version"] = "1.0"
            return message
        operator_part: Message = message
    else:
        operator_type = content_type(operator_user_data)
        operator_part = _part(operator_user_data, operator_type, OPERATOR_FILENAME)
    container = MIMEMultipart(boundary=_boundary(operator_user_data, script))
    container.attach(operator_part)
    return container


def _boundary(*texts: str) -> str:
    """A boundary derived from the content, so that the same inputs give the same user data
    (a retried RunInstances must repeat its parameters exactly for its ClientToken)."""
    digest = hashlib.sha256("\0".join(texts).encode()).hexdigest()
    boundary = f"==compute-broker-{digest[:32]}=="
    while any(boundary in text for text in texts):
        boundary = f"={boundary}="
    return boundary


def compose(operator_user_data: str | None, settings: WatchdogSettings | None) -> str | None:
    """The user data to launch a worker with.

    `settings` None (opted out): the operator's user data unchanged. No operator user data:
    the watchdog script alone. Otherwise a cloud-init multipart/mixed message: the operator's
    part first (its MIME type from its first line, or its own parts if it is already MIME),
    then the watchdog as text/x-shellscript. Raises ValueError past EC2's 16 KB limit.
    """
    if settings is None:
        return operator_user_data
    script = watchdog_script(settings)
    if operator_user_data is None or not operator_user_data.strip():
        user_data = script
    else:
        message = _container(operator_user_data, script)
        message.attach(_part(script, "text/x-shellscript", WATCHDOG_FILENAME))
        user_data = message.as_string()
    size = len(user_data.encode())
    if size > EC2_USER_DATA_LIMIT:
        operator = len((operator_user_data or "").encode())
        raise ValueError(
            f"user data too large for EC2: {size} bytes (the operator's {operator} bytes, "
            f"the worker watchdog's {len(script.encode())} bytes and the MIME wrapping) "
            f"> {EC2_USER_DATA_LIMIT} bytes; shorten the user data (cloud-init's "
            f"#include can fetch the rest) or opt out of the watchdog"
        )
    return user_data
