"""Access control and per-identity limits through a real server on loopback (docs/security.md):
every role against the commands, AUTH and token=, other people's leases, the allowlist from
127.0.0.2, each limit, and what STATUS reveals."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import trio
from trio.testing import MockClock

from broker.access import AccessPolicy, TokenEntry
from broker.clock import Clock
from broker.cloud import LaunchSpec, Market
from broker.engine import Engine, EngineSettings
from broker.gate import Gate
from broker.limits import Limiter, Limits
from broker.memory_registry import MemoryRegistry
from broker.model import Limits as PoolLimits
from broker.prices import PriceTable
from broker.server import Server, ServerSettings
from tests.fakes import FakeCloud
from tests.harness import LineClient

SPEC = LaunchSpec("c7i.8xlarge", Market.SPOT)
ALICE = "alice-token-0123456789"
BOB = "bob-token-0123456789ab"
ADMIN = "admin-token-0123456789"
TOKENS = (
    TokenEntry.from_secret("alice", "use", ALICE),
    TokenEntry.from_secret("bob", "use", BOB),
    TokenEntry.from_secret("root", "admin", ADMIN),
)
NO_LIMITS = Limits(None, None, 1, None, None)


@asynccontextmanager
async def broker(
    policy: AccessPolicy, limits: Limits = NO_LIMITS, **settings: Any
) -> AsyncIterator[int]:
    """A broker with this gate on a free loopback port (its port)."""
    async with broker_and_engine(policy, limits, **settings) as (_, port):
        yield port


@asynccontextmanager
async def broker_and_engine(
    policy: AccessPolicy, limits: Limits = NO_LIMITS, **settings: Any
) -> AsyncIterator[tuple[Engine, int]]:
    """An engine on a fake cloud and a server with this gate, on a free loopback port."""
    clock = Clock()
    engine = Engine(
        FakeCloud(clock, boot_time=0.01),
        EngineSettings(
            default_spec=SPEC, limits=PoolLimits(10, None, 900.0), describe_interval=0.01
        ),
        clock,
        PriceTable.default(),
        MemoryRegistry("test"),
    )
    server = Server(
        engine,
        ServerSettings(host="127.0.0.1", port=0, **settings),
        Gate(policy, Limiter(limits)),
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(engine.run)
        listeners = await nursery.start(server.run)
        yield engine, listeners[0].socket.getsockname()[1]
        nursery.cancel_scope.cancel()


async def connect(port: int, token: str | None = None, source: str | None = None) -> LineClient:
    stream = await trio.open_tcp_stream("127.0.0.1", port, local_address=source)
    client = LineClient(stream)
    if token is not None:
        assert await client.ask(f"AUTH {token}") == "OK"
    return client


async def test_roles_against_the_commands(autojump_clock: MockClock) -> None:
    """Without a token: only HELP, QUIT, ALIVE; `use`: GET_WORKER, its own PING and RELEASE, a
    summary STATUS, no BURST; `admin`: everything, anyone's worker, the full STATUS."""
    async with broker(AccessPolicy.build(tokens=TOKENS)) as port:
        anonymous = await connect(port)
        assert await anonymous.ask("GET_WORKER") == "ERROR: auth required"
        assert await anonymous.ask("STATUS") == "ERROR: auth required"
        assert (await anonymous.ask("HELP")).startswith("OK commands:")
        assert await anonymous.ask(f"AUTH {ALICE}x") == "ERROR: auth required (token not accepted)"
        alice = await connect(port, ALICE)
        bob = await connect(port, BOB)
        admin = await connect(port, ADMIN)
        ip = await alice.ask("GET_WORKER")
        assert ip.startswith("198.51.100.")
        assert await alice.ask(f"PING {ip}") == "OK"
        assert await bob.ask(f"PING {ip}") == (
            "ERROR: not allowed: PING of a worker you hold no lease on"
        )
        assert await bob.ask(f"RELEASE {ip}") == (
            "ERROR: not allowed: RELEASE of a worker you hold no lease on"
        )
        assert await alice.ask("BURST 1") == "ERROR: not allowed: BURST needs the admin role"
        own = json.loads(await bob.ask("STATUS"))
        assert own["view"] == "own"
        assert own["leases"] == []
        assert ip not in json.dumps(own)
        assert json.loads(await admin.ask("STATUS"))["leases"] == []  # its own: none
        assert json.loads(await admin.ask("STATUS"))["totals"]["leases"] == 1
        full = json.loads(await admin.ask("STATUS all"))
        assert [lease["client"] for lease in full["leases"]] == ["token:alice"]
        assert await alice.ask("STATUS all") == (
            "ERROR: not allowed: STATUS all needs the admin role"
        )
        assert (await admin.ask("BURST 1")).startswith("OK 1 ")
        assert await admin.ask(f"PING {ip}") == "OK"
        assert await alice.ask(f"RELEASE {ip}") == "OK"
        for client in (anonymous, alice, bob, admin):
            await client.aclose()


async def test_a_token_on_one_request_and_leases_belong_to_the_token(
    autojump_clock: MockClock,
) -> None:
    """`token=` identifies that request only; a lease belongs to the token's name (and
    client=), not to the address, so two people on one address are two owners."""
    async with broker(AccessPolicy.build(tokens=TOKENS)) as port:
        shared = await connect(port)
        ip = await shared.ask(f"GET_WORKER client=job1 token={ALICE}")
        assert ip.startswith("198.51.100.")
        assert await shared.ask("GET_WORKER") == "ERROR: auth required"
        assert await shared.ask(f"RELEASE {ip} token={BOB}") == (
            "ERROR: not allowed: RELEASE of a worker you hold no lease on"
        )
        assert await shared.ask(f"RELEASE {ip} client=job1 token={ALICE}") == "OK"
        await shared.aclose()


async def test_address_roles_serve_instruments_without_tokens(autojump_clock: MockClock) -> None:
    """An instrument on a network with a role (127.0.0.1/32: use) needs no token; the seed's
    empty-line GET_WORKER works from there."""
    policy = AccessPolicy.build(allow_cidrs=["127.0.0.0/8"], address_roles={"127.0.0.1/32": "use"})
    async with broker(policy) as port:
        instrument = await connect(port)
        await instrument.send(b"\n")
        assert (await instrument.readline()).startswith(b"198.51.100.")
        assert await instrument.ask("BURST 1") == "ERROR: not allowed: BURST needs the admin role"
        await instrument.aclose()


async def test_the_allowlist_closes_other_addresses_before_a_line_is_read(
    autojump_clock: MockClock,
) -> None:
    """allow_cidrs [127.0.0.1/32]: a connection from 127.0.0.2 is closed without a word and
    launches nothing; 127.0.0.1 is served."""
    policy = AccessPolicy.build(allow_cidrs=["127.0.0.1/32"])
    async with broker(policy) as port:
        stranger = await connect(port, source="127.0.0.2")
        await stranger.send(b"GET_WORKER\n")
        assert await stranger.at_eof()
        await stranger.aclose()
        friend = await connect(port, source="127.0.0.1")
        status = json.loads(await friend.ask("STATUS"))
        assert status["totals"]["workers"] == 0
        await friend.aclose()


async def test_each_per_identity_limit_answers_one_error_line(autojump_clock: MockClock) -> None:
    """Connections per address, requests per second, leases per identity, launches per
    minute: each over-limit request gets one `ERROR: limit: ...` line; others go on."""
    limits = Limits(
        max_connections_per_peer=2,
        max_requests_per_second=0.001,
        request_burst=3,
        max_leases_per_identity=1,
        max_launches_per_minute=2,
    )
    async with broker(AccessPolicy.build(), limits) as port:
        first, second = await connect(port), await connect(port)
        third = await connect(port)
        assert (await third.readline()).startswith(b"ERROR: limit: max_connections_per_peer (2)")
        assert await third.at_eof()
        assert (await first.ask("GET_WORKER client=a")).startswith("198.51.100.")
        assert (await first.ask("GET_WORKER client=b")).startswith(
            "ERROR: limit: max_leases_per_identity (1)"
        )
        assert (await second.ask("HELP")).startswith("OK commands:")  # the burst's third
        assert (await second.ask("HELP")).startswith("ERROR: limit: max_requests_per_second")
        other = await connect(port, source="127.0.0.4")  # another identity
        assert (await other.ask("BURST 3")).startswith("ERROR: limit: max_launches_per_minute (2)")
        assert (await other.ask("BURST 2")).startswith("OK 2 ")
        await other.aclose()
        for client in (first, second, third):
            await client.aclose()


async def test_one_peer_at_its_connection_limit_locks_nobody_else_out(
    autojump_clock: MockClock,
) -> None:
    """A peer holding its maximum of silent connections: another address is still served."""
    limits = Limits(max_connections_per_peer=20, max_requests_per_second=None)
    async with broker(AccessPolicy.build(), limits, max_connections=30) as port:
        hogs = [await connect(port, source="127.0.0.3") for _ in range(20)]
        refused = await connect(port, source="127.0.0.3")
        assert (await refused.readline()).startswith(b"ERROR: limit: max_connections_per_peer")
        other = await connect(port, source="127.0.0.1")
        assert (await other.ask("GET_WORKER")).startswith("198.51.100.")
        assert json.loads(await other.ask("STATUS"))["totals"]["workers"] == 1
        for client in [*hogs, refused, other]:
            await client.aclose()


async def test_status_all_lists_every_lease_and_status_only_the_callers() -> None:
    """2,000 leases of other identities: STATUS stays a short line (the caller holds none),
    STATUS all lists all 2,000 (rendered off the event loop)."""
    with trio.fail_after(30):
        async with broker_and_engine(AccessPolicy.build()) as (engine, port):
            client = await connect(port)
            ip = await client.ask("GET_WORKER client=first")
            assert ip.startswith("198.51.100.")
            # Leases of other hosts, put in the pool as a replica merge would.
            worker = next(iter(engine.pool.workers.values()))
            for n in range(2000):
                engine.pool.hand_out(worker, f"10.0.{n // 250}.{n % 250}", 0.0)
            own = await client.ask("STATUS")
            every = json.loads(await client.ask("STATUS all"))
            await client.aclose()
    assert len(own) < 4096
    assert json.loads(own)["totals"]["leases"] == 2001
    assert len(every["leases"]) == 2001
