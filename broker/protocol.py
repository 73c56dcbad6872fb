"""The wire protocol, sans-IO: bytes in, commands out; replies as values, turned into bytes.

Nothing here touches a socket or a clock (see protocol.md for the contract). The server feeds
received bytes to a `LineReader`, asks it for the next request, hands the `Command` to the
engine and writes `reply.to_bytes()`.
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections.abc import Callable
from typing import Final

import attrs

from broker.cloud import Market
from broker.interruptions import format_deadline

MAX_LINE_BYTES: Final = 1024
MAX_BURST: Final = 100
MAX_ERROR_BYTES: Final = 4095  # an ERROR reply, LF excluded; longer reasons are cut to fit

# Every pattern below is ASCII by construction: `[0-9]` never matches other scripts' digits.
_CLIENT_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")
_INSTANCE_TYPE = re.compile(r"[a-z][a-z0-9-]*\.[a-z0-9-]+")
_INSTANCE_ID = re.compile(r"i-[0-9a-f]{8,17}")
_WHOLE_NUMBER = re.compile(r"[0-9]+")
_DECIMAL_NUMBER = re.compile(r"(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_BLANKS = re.compile(r"[ \t]+")  # the only word separators: ASCII space and tab

HELP_TEXT: Final = (
    "OK commands: GET_WORKER [type=T] [market=M] [wait=S] [client=ID] | PING <ip> [client=ID] | "
    "RELEASE <ip> [client=ID] | STATUS [all] | BURST <n> | AUTH <token> | HELP | QUIT"
)


# --- replies ---------------------------------------------------------------------------------


@attrs.frozen
class Reply:
    """One reply line. `close` asks the server to close the connection after sending it."""

    text: str
    close: bool = False

    @classmethod
    def ok(cls, detail: str = "") -> Reply:
        """`OK`, or `OK <detail>`."""
        return cls(f"OK {detail}" if detail else "OK")

    @classmethod
    def error(cls, reason: str, *, close: bool = False) -> Reply:
        """`ERROR: <reason>`: flattened to one line, escaped to ASCII, and cut (ending in
        `...`) to `MAX_ERROR_BYTES`, so that every error reply is short."""
        text = _ascii(f"ERROR: {_one_line(reason)}")
        if len(text) > MAX_ERROR_BYTES:
            text = _cut(f"ERROR: {_one_line(reason)}", MAX_ERROR_BYTES - 3) + "..."
        return cls(text, close=close)

    def to_bytes(self) -> bytes:
        """The reply as sent: one line of printable ASCII (anything else backslash-escaped,
        control characters included) and one LF."""
        return _ascii(self.text).encode("ascii") + b"\n"


def _one_line(text: str) -> str:
    return " ".join(text.split())


_CONTROL_ESCAPES: Final = {code: f"\\x{code:02x}" for code in (*range(0x20), 0x7F)}


def _ascii(text: str) -> str:
    """`text` as printable ASCII: control characters as `\\xNN`, the rest of Unicode as
    Python's backslash escapes (`\\xe9`, `\\u2028`, `\\U0001f600`)."""
    escaped = text.translate(_CONTROL_ESCAPES)
    return escaped.encode("ascii", "backslashreplace").decode("ascii")


def _cut(text: str, size: int) -> str:
    """The longest start of `text` whose ASCII form fits `size` (never half an escape)."""
    pieces: list[str] = []
    for char in text:
        piece = _ascii(char)
        size -= len(piece)
        if size < 0:
            break
        pieces.append(piece)
    return "".join(pieces)


UNKNOWN_COMMAND: Final = Reply("ERROR: Unknown command")
WORKER_NOT_FOUND: Final = Reply("ERROR: Worker not found")
WORKER_NOT_WANTED: Final = Reply("ERROR: Worker not wanted")  # ALIVE: power yourself off
WORKER_INTERRUPTED: Final = "ERROR: Worker interrupted"


def worker_interrupted(deadline: float | None) -> Reply:
    """`ERROR: Worker interrupted <deadline>`: EC2 (or the budget) takes the worker away at
    `deadline` (ISO 8601 UTC, whole seconds); without a known deadline, nothing follows."""
    if deadline is None:
        return Reply(WORKER_INTERRUPTED)
    return Reply(f"{WORKER_INTERRUPTED} {format_deadline(deadline)}")


LINE_TOO_LONG: Final = Reply.error("line too long", close=True)
NOT_UTF8: Final = Reply.error("line is not valid UTF-8")
TOO_MANY_CONNECTIONS: Final = Reply.error("too many connections", close=True)
BYE: Final = Reply("OK bye", close=True)


def _not_a_client(kind: str) -> Reply:
    return Reply.error(f"not a compute-broker client ({kind}); see protocol.md", close=True)


NOT_A_CLIENT_HTTP: Final = _not_a_client("HTTP")
NOT_A_CLIENT_TLS: Final = _not_a_client("TLS")
NOT_A_CLIENT_SSH: Final = _not_a_client("SSH")


# --- commands --------------------------------------------------------------------------------


@attrs.frozen
class GetWorker:
    """GET_WORKER: hand me a worker. None means the broker's default."""

    instance_type: str | None = None
    market: Market | None = None
    wait: float | None = None
    client: str | None = None


@attrs.frozen
class Ping:
    """PING <ip>: keep the worker and my lease alive."""

    ip: str
    client: str | None = None


@attrs.frozen
class Release:
    """RELEASE <ip>: end my lease; terminate the worker if nobody else holds it."""

    ip: str
    client: str | None = None


@attrs.frozen
class Status:
    """STATUS [all]: the pool as one JSON line; the caller's own leases, or (`all`, admin)
    every lease."""

    all: bool = False


@attrs.frozen
class Burst:
    """BURST <n>: launch up to n workers now."""

    count: int


@attrs.frozen
class Help:
    """HELP: list the commands."""


@attrs.frozen
class Quit:
    """QUIT: say goodbye and close."""


@attrs.frozen
class Alive:
    """ALIVE <instance-id>: a worker's watchdog asks whether the pool still wants it."""

    instance_id: str


@attrs.frozen
class Auth:
    """AUTH <token>: the connection runs as that token from now on (docs/security.md)."""

    token: str = attrs.field(repr=False)


@attrs.frozen
class Register:
    """REGISTER <name> <ip>: an agent registers (or keeps registered) a local worker."""

    name: str
    ip: str


@attrs.frozen
class Heartbeat:
    """HEARTBEAT <name>: an agent's local worker is still there."""

    name: str


@attrs.frozen
class Deregister:
    """DEREGISTER <name>: an agent's local worker leaves the pool."""

    name: str


Command = (
    GetWorker
    | Ping
    | Release
    | Status
    | Burst
    | Help
    | Quit
    | Alive
    | Auth
    | Register
    | Heartbeat
    | Deregister
)


@attrs.frozen
class WithToken:
    """A request that carried `token=<token>`: it runs as that token, this request only."""

    command: Command
    token: str = attrs.field(repr=False)


Request = Command | WithToken


@attrs.frozen
class BadRequest:
    """A line the broker cannot act on; `reply` says why (and whether to close)."""

    reply: Reply
    reason: str


_USAGE: Final = {
    "GET_WORKER": "GET_WORKER [type=T] [market=spot|on-demand] [wait=S] [client=ID]",
    "PING": "PING <ip> [client=ID]",
    "ALIVE": "ALIVE <instance-id>",
    "RELEASE": "RELEASE <ip> [client=ID]",
    "STATUS": "STATUS [all]",
    "BURST": f"BURST <n> (1-{MAX_BURST})",
    "HELP": "HELP",
    "QUIT": "QUIT",
    "AUTH": "AUTH <token>",
    "REGISTER": "REGISTER <name> <ip>",
    "HEARTBEAT": "HEARTBEAT <name>",
    "DEREGISTER": "DEREGISTER <name>",
}
# A local worker's name (as in the config's local_workers).
_LOCAL_NAME: Final = re.compile(r"[A-Za-z0-9_.-]{1,64}")
# A token: printable ASCII without spaces (docs/security.md); never quoted back.
_TOKEN_WORD: Final = re.compile(r"[!-~]{1,256}")


class _Usage(Exception):
    """A known command with bad arguments; the message is the detail."""


def parse(line: bytes) -> Request | BadRequest:
    """Parse one request line (without its LF; one trailing CR is ignored)."""
    line = line.removesuffix(b"\r")
    if len(line) > MAX_LINE_BYTES:
        return BadRequest(LINE_TOO_LONG, "line too long")
    return parse_line(line)


def parse_line(line: bytes) -> Request | BadRequest:
    """Parse one request line already framed (no LF, no CR, within the length limit)."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        return BadRequest(NOT_UTF8, "not utf-8")
    # Split on ASCII space and tab only: str.split() would also split on Unicode spaces and
    # control characters, so that a line of them would be the empty line (GET_WORKER).
    stripped = text.strip(" \t")
    if not stripped:
        return GetWorker()
    name, *args = _BLANKS.split(stripped)
    # ASCII upper-casing only: str.upper() folds `\u017ftatus` (long s) to STATUS and `qu\u0131t`
    # (dotless i) to QUIT.
    name = name.upper() if name.isascii() else ""
    if name not in _USAGE:
        return BadRequest(UNKNOWN_COMMAND, "unknown command")
    try:
        if name == "AUTH":
            return _parse_auth(args)
        args, token = _take_token(args) if "=" in stripped else (args, None)
        command = _PARSERS[name](args)
        return command if token is None else WithToken(command, token)
    except _Usage as exc:
        detail = f"{exc}; " if str(exc) else ""
        return BadRequest(Reply.error(f"usage: {detail}{_USAGE[name]}"), "bad arguments")


def _parse_auth(args: list[str]) -> Command:
    # Not _split: a token may contain `=`.
    if len(args) != 1:
        raise _Usage("")
    if not _TOKEN_WORD.fullmatch(args[0]):
        raise _Usage("the token must be printable ASCII")
    return Auth(args[0])


def _take_token(args: list[str]) -> tuple[list[str], str | None]:
    """The arguments without a `token=<t>` one, and the token."""
    rest: list[str] = []
    token: str | None = None
    for arg in args:
        key, sep, value = arg.partition("=")
        if sep and key.isascii() and key.lower() == "token":
            if token is not None:
                raise _Usage("token given twice")
            if not _TOKEN_WORD.fullmatch(value):
                raise _Usage("the token must be printable ASCII")
            token = value
        else:
            rest.append(arg)
    return rest, token


def _split(
    args: list[str], positional: int, keys: frozenset[str]
) -> tuple[list[str], dict[str, str]]:
    plain: list[str] = []
    options: dict[str, str] = {}
    for arg in args:
        key, sep, value = arg.partition("=")
        if not sep:
            plain.append(arg)
            continue
        key = key.lower() if key.isascii() else key  # ASCII case only (not the Kelvin sign)
        if key not in keys:
            raise _Usage(f"unknown argument {key!r}")
        if key in options:
            raise _Usage(f"{key} given twice")
        options[key] = value
    if len(plain) != positional:
        raise _Usage("")
    return plain, options


def _client(options: dict[str, str]) -> str | None:
    client = options.get("client")
    if client is not None and not _CLIENT_ID.fullmatch(client):
        raise _Usage("client must be 1-64 of A-Z a-z 0-9 . _ : -")
    return client


def _ip(word: str) -> str:
    # ipaddress accepts an IPv6 scope id of any characters (`fe80::1%anything`); no worker has
    # one, so the IP must be ASCII and carry none.
    try:
        if not word.isascii() or "%" in word:
            raise ValueError(word)
        return str(ipaddress.ip_address(word))
    except ValueError:
        raise _Usage(f"{word!r} is not an IP address") from None


def _parse_get_worker(args: list[str]) -> Command:
    _, options = _split(args, 0, frozenset({"type", "market", "wait", "client"}))
    instance_type = options.get("type")
    if instance_type is not None and not _INSTANCE_TYPE.fullmatch(instance_type):
        raise _Usage(f"type {instance_type!r} is not an EC2 instance type")
    market: Market | None = None
    if "market" in options:
        value = options["market"]
        try:
            market = Market(value.lower() if value.isascii() else value)
        except ValueError:
            raise _Usage("market must be spot or on-demand") from None
    wait: float | None = None
    if "wait" in options:
        # ASCII decimal forms only: float() also takes `inf`, `1_0`, `+5` and other scripts'
        # digits (`wait=\u0663` is 3.0 to float()).
        text = options["wait"]
        wait = float(text) if _DECIMAL_NUMBER.fullmatch(text) else math.nan
        if not (wait > 0 and math.isfinite(wait)):
            raise _Usage("wait must be a number of seconds > 0")
    return GetWorker(instance_type, market, wait, _client(options))


def _parse_alive(args: list[str]) -> Command:
    (instance_id,), _ = _split(args, 1, frozenset())
    if not _INSTANCE_ID.fullmatch(instance_id):
        raise _Usage(f"{instance_id!r} is not an EC2 instance id")
    return Alive(instance_id)


def _name(word: str) -> str:
    if not _LOCAL_NAME.fullmatch(word):
        raise _Usage("name must be 1-64 of A-Z a-z 0-9 _ . -")
    return word


def _parse_register(args: list[str]) -> Command:
    (name, ip), _ = _split(args, 2, frozenset())
    return Register(_name(name), _ip(ip))


def _parse_heartbeat(args: list[str]) -> Command:
    (name,), _ = _split(args, 1, frozenset())
    return Heartbeat(_name(name))


def _parse_deregister(args: list[str]) -> Command:
    (name,), _ = _split(args, 1, frozenset())
    return Deregister(_name(name))


def _parse_status(args: list[str]) -> Command:
    if not args:
        return Status()
    if len(args) == 1 and args[0].isascii() and args[0].lower() == "all":
        return Status(all=True)
    raise _Usage("")


def _parse_ping(args: list[str]) -> Command:
    (ip,), options = _split(args, 1, frozenset({"client"}))
    return Ping(_ip(ip), _client(options))


def _parse_release(args: list[str]) -> Command:
    (ip,), options = _split(args, 1, frozenset({"client"}))
    return Release(_ip(ip), _client(options))


def _parse_burst(args: list[str]) -> Command:
    (count,), _ = _split(args, 1, frozenset())
    # Not str.isdigit(): it is true for `\u00b2` (superscript two, which int() refuses) and
    # `\u0661` (Arabic-Indic one, which int() takes).
    if not _WHOLE_NUMBER.fullmatch(count) or not 1 <= int(count) <= MAX_BURST:
        raise _Usage(f"n must be a whole number from 1 to {MAX_BURST}")
    return Burst(int(count))


def _no_args(command: Command) -> Callable[[list[str]], Command]:
    def parse_none(args: list[str]) -> Command:
        _split(args, 0, frozenset())
        return command

    return parse_none


_PARSERS: Final[dict[str, Callable[[list[str]], Command]]] = {
    "GET_WORKER": _parse_get_worker,
    "PING": _parse_ping,
    "ALIVE": _parse_alive,
    "REGISTER": _parse_register,
    "HEARTBEAT": _parse_heartbeat,
    "DEREGISTER": _parse_deregister,
    "RELEASE": _parse_release,
    "BURST": _parse_burst,
    "STATUS": _parse_status,
    "HELP": _no_args(Help()),
    "QUIT": _no_args(Quit()),
}
