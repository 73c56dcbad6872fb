"""The `compute-broker-client` command: one broker request from the shell.

Exit codes: 0 success, 1 the broker answered ERROR (or an unexpected reply), 2 usage error,
3 the broker timed out or could not be reached, 4 `ping` found the worker interrupted (being
taken away, e.g. a spot interruption: get another one), 5 the broker wants a token or did not
accept the one given.

The token comes from --token, --token-file or $COMPUTE_BROKER_TOKEN. It is never printed: usage
errors about it say what is wrong with it, not what it is.

Every argument is checked here against what the broker accepts (protocol.md) before anything
is sent, so a bad value is always a usage error (exit 2, argparse's `error: argument X: ...`),
never a request the broker refuses (exit 1): `burst 0` and `burst 1000` fail the same way.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import math
import os
import re
import stat
import sys
from typing import Callable, Sequence, TypeVar

from compute_broker_client import (
    DEFAULT_HOST,
    DEFAULT_PORT,
    MAX_BURST,
    TOKEN_RULE,
    AuthError,
    BrokerClient,
    BrokerError,
    BrokerProtocolError,
    BrokerTimeout,
    BrokerUnavailable,
    WorkerInterrupted,
    __version__,
)

EXIT_OK = 0
EXIT_BROKER_ERROR = 1
EXIT_USAGE = 2
EXIT_UNAVAILABLE = 3
EXIT_INTERRUPTED = 4
EXIT_AUTH = 5

MAX_TOKEN_FILE_BYTES = 4096

PROG = "compute-broker-client"

T = TypeVar("T")


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the exit code (argparse exits 2 itself on bad usage)."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.error("a command is required")
    # The environment's defaults are checked like the options they stand for.
    port = args.port
    if port is None:
        port = _from_environment(parser, "COMPUTE_BROKER_PORT", _port, DEFAULT_PORT)
    client_id = args.client_id
    if client_id is None:
        client_id = _from_environment(parser, "COMPUTE_BROKER_CLIENT_ID", _client_id, "")
    token = args.token
    if token is None and args.token_file is not None:
        token = _read_token_file(parser, args.token_file)
    if token is None:
        token = _from_environment(parser, "COMPUTE_BROKER_TOKEN", _token, "")
    try:
        client = BrokerClient(
            host=args.host,
            port=port,
            timeout=args.timeout,
            connect_retries=args.retries,
            client_id=client_id,
            token=token,
        )
        output = _run(client, args)
    except ValueError as exc:  # the library's own checks; the parser's should come first
        parser.error(str(exc))
    except WorkerInterrupted as exc:
        print(f"{PROG}: {exc}; get another worker", file=sys.stderr)
        return EXIT_INTERRUPTED
    except AuthError as exc:
        print(exc.line, file=sys.stderr)
        print(f"{PROG}: {exc}", file=sys.stderr)
        return EXIT_AUTH
    except BrokerError as exc:
        print(exc.line, file=sys.stderr)
        return EXIT_BROKER_ERROR
    except BrokerProtocolError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return EXIT_BROKER_ERROR
    except (BrokerTimeout, BrokerUnavailable) as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except KeyboardInterrupt:
        return 130
    print(output)
    return EXIT_OK


def _run(client: BrokerClient, args: argparse.Namespace) -> str:
    command: str = args.command
    if command == "get":
        return client.get_worker(type=args.type, market=args.market, wait=args.wait)
    if command == "ping":
        client.ping(args.ip)
        return "OK"
    if command == "release":
        client.release(args.ip)
        return "OK"
    if command == "status":
        return json.dumps(client.status(), indent=2)
    if command == "burst":
        return "\n".join(client.burst(args.n))
    if command == "help":
        return client.help()
    raise AssertionError(f"unhandled command {command}")


# -- argument checks: each returns the value to use or raises ArgumentTypeError --------------

_DIGITS = re.compile(r"[0-9]+\Z")
_CLIENT_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}\Z")  # protocol.md, "Client identity"
_TOKEN = re.compile(r"[\x21-\x7e]{16,256}\Z")  # protocol.md, "Access control"
_INSTANCE_TYPE = re.compile(r"[a-z][a-z0-9-]*\.[a-z0-9-]+\Z")  # as the broker checks it
_MARKETS = ("spot", "on-demand")


def _whole(text: str, low: int, high: int | None, what: str) -> int:
    if not _DIGITS.match(text) or int(text) < low or (high is not None and int(text) > high):
        raise argparse.ArgumentTypeError(f"must be {what}, not {text!r}")
    return int(text)


def _port(text: str) -> int:
    return _whole(text, 1, 65535, "a port number from 1 to 65535")


def _retries(text: str) -> int:
    return _whole(text, 0, None, "a whole number >= 0")


def _burst_count(text: str) -> int:
    return _whole(text, 1, MAX_BURST, f"a whole number from 1 to {MAX_BURST}")


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a number of seconds > 0, not {text!r}")
    return value


def _client_id(text: str) -> str:
    if text and not _CLIENT_ID.match(text):
        raise argparse.ArgumentTypeError(
            f"must be 1-64 characters of A-Z a-z 0-9 . _ : - (or empty: none), not {text!r}"
        )
    return text


def _token(text: str) -> str:
    # Never quote the value: it is a secret, and the message may reach a terminal or a log.
    token = text.strip()
    if not _TOKEN.match(token):
        raise argparse.ArgumentTypeError(f"must be {TOKEN_RULE} (the value is not shown)")
    return token


def _read_token_file(parser: argparse.ArgumentParser, path: str) -> str:
    """The token in file `path` (its only word; blanks around it are dropped)."""
    try:
        with open(path, "rb") as file:
            mode = os.fstat(file.fileno()).st_mode
            data = file.read(MAX_TOKEN_FILE_BYTES + 1)
    except OSError as exc:
        parser.error(f"argument --token-file: cannot read {path}: {exc.strerror or exc}")
    if stat.S_IMODE(mode) & 0o077:
        print(
            f"{PROG}: warning: {path} can be read by group or others; run: chmod 600 {path}",
            file=sys.stderr,
        )
    try:
        return _token(data.decode("ascii"))
    except (UnicodeDecodeError, argparse.ArgumentTypeError):
        parser.error(f"argument --token-file: {path} must hold one token: {TOKEN_RULE}")


def _instance_type(text: str) -> str:
    if not _INSTANCE_TYPE.match(text):
        raise argparse.ArgumentTypeError(
            f"must be an EC2 instance type such as c7i.8xlarge, not {text!r}"
        )
    return text


def _market(text: str) -> str:
    if text.lower() not in _MARKETS:
        raise argparse.ArgumentTypeError(f"must be spot or on-demand, not {text!r}")
    return text.lower()


def _ip(text: str) -> str:
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an IP address, not {text!r}") from None


def _from_environment(
    parser: argparse.ArgumentParser, name: str, check: Callable[[str], T], default: T
) -> T:
    """The checked value of environment variable `name`, or `default` if it is unset or empty."""
    text = os.environ.get(name, "")
    if not text:
        return default
    try:
        return check(text)
    except argparse.ArgumentTypeError as exc:
        parser.error(f"${name} {exc}")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Ask a compute-broker for EC2 workers.",
        epilog="exit codes: 0 ok, 1 broker error, 2 usage error, 3 timeout or unreachable, "
        "4 the worker is interrupted (ping), 5 the broker wants a token or refused it",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument(
        "--host", help=f"broker host (default: $COMPUTE_BROKER_HOST or {DEFAULT_HOST})"
    )
    parser.add_argument(
        "--port",
        type=_port,
        help=f"broker port (default: $COMPUTE_BROKER_PORT or {DEFAULT_PORT})",
    )
    parser.add_argument(
        "--timeout",
        type=_seconds,
        default=10.0,
        help="seconds to wait for connecting and for a reply; `get` waits its --wait "
        "(or 300 s) on top (default: 10)",
    )
    parser.add_argument(
        "--retries",
        type=_retries,
        default=3,
        help="times to retry a refused connection, after a random wait below 0.5 s, 1 s, "
        "2 s, ... (default: 3)",
    )
    parser.add_argument(
        "--client-id",
        type=_client_id,
        help="lease identity sent as client=ID (default: $COMPUTE_BROKER_CLIENT_ID, else none: "
        "the broker knows this host by its IP, so `get` and a later `release` match)",
    )
    tokens = parser.add_mutually_exclusive_group()
    tokens.add_argument(
        "--token",
        type=_token,
        help="access token, sent as AUTH on each connection (default: $COMPUTE_BROKER_TOKEN). "
        "WARNING: other users of this machine can see a command line (ps, /proc): prefer "
        "$COMPUTE_BROKER_TOKEN or --token-file",
    )
    tokens.add_argument(
        "--token-file",
        metavar="FILE",
        help="read the access token from FILE (keep it mode 600)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    get = sub.add_parser("get", help="get a worker; prints its IP")
    get.add_argument("--type", type=_instance_type, help="EC2 instance type, e.g. c7i.8xlarge")
    get.add_argument("--market", type=_market, help="spot or on-demand")
    get.add_argument("--wait", type=_seconds, help="seconds the broker may wait for a launch")
    ping = sub.add_parser(
        "ping", help="keep a worker and your lease alive; exit 4 if it is interrupted"
    )
    ping.add_argument("ip", type=_ip, help="the worker's IP address")
    release = sub.add_parser("release", help="end your lease on a worker")
    release.add_argument("ip", type=_ip, help="the worker's IP address")
    sub.add_parser("status", help="print the broker's status as JSON")
    burst = sub.add_parser(
        "burst", help=f"launch up to N (1-{MAX_BURST}) workers now; prints their instance ids"
    )
    burst.add_argument("n", type=_burst_count, metavar="N")
    sub.add_parser("help", help="print the broker's command list")
    return parser
