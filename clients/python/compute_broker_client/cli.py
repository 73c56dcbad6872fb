"""The `compute-broker-client` command: one broker request from the shell.

Exit codes: 0 success, 1 the broker answered ERROR (or an unexpected reply), 2 usage error,
3 the broker timed out or could not be reached, 4 `ping` found the worker interrupted (being
taken away, e.g. a spot interruption: get another one).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Sequence

from compute_broker_client import (
    DEFAULT_HOST,
    DEFAULT_PORT,
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

PROG = "compute-broker-client"


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the exit code (argparse exits 2 itself on bad usage)."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_usage(sys.stderr)
        print(f"{PROG}: error: a command is required", file=sys.stderr)
        return EXIT_USAGE
    try:
        client = BrokerClient(
            host=args.host,
            port=args.port,
            timeout=args.timeout,
            connect_retries=args.retries,
            client_id=args.client_id,
        )
        output = _run(client, args)
    except ValueError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except WorkerInterrupted as exc:
        print(f"{PROG}: {exc}; get another worker", file=sys.stderr)
        return EXIT_INTERRUPTED
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


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Ask a compute-broker for EC2 workers.",
        epilog="exit codes: 0 ok, 1 broker error, 2 usage error, 3 timeout or unreachable, "
        "4 the worker is interrupted (ping)",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument(
        "--host", help=f"broker host (default: $COMPUTE_BROKER_HOST or {DEFAULT_HOST})"
    )
    parser.add_argument(
        "--port",
        type=int,
        help=f"broker port (default: $COMPUTE_BROKER_PORT or {DEFAULT_PORT})",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=10.0,
        help="seconds to wait for connecting and for a reply; `get` waits its --wait "
        "(or 300 s) on top (default: 10)",
    )
    parser.add_argument(
        "--retries",
        type=int,
        default=3,
        help="times to retry a refused connection, with backoff (default: 3)",
    )
    parser.add_argument(
        "--client-id",
        default=os.environ.get("COMPUTE_BROKER_CLIENT_ID", ""),
        help="lease identity sent as client=ID (default: $COMPUTE_BROKER_CLIENT_ID, else none: "
        "the broker knows this host by its IP, so `get` and a later `release` match)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    get = sub.add_parser("get", help="get a worker; prints its IP")
    get.add_argument("--type", help="EC2 instance type, e.g. c7i.8xlarge")
    get.add_argument("--market", help="spot or on-demand")
    get.add_argument("--wait", type=float, help="seconds the broker may wait for a launch")
    ping = sub.add_parser(
        "ping", help="keep a worker and your lease alive; exit 4 if it is interrupted"
    )
    ping.add_argument("ip")
    release = sub.add_parser("release", help="end your lease on a worker")
    release.add_argument("ip")
    sub.add_parser("status", help="print the broker's status as JSON")
    burst = sub.add_parser("burst", help="launch up to N workers now; prints their instance ids")
    burst.add_argument("n", type=int, metavar="N")
    sub.add_parser("help", help="print the broker's command list")
    return parser
