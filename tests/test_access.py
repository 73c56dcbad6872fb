"""`broker.access` with plain values: the allowlist, tokens, roles, sessions, STATUS redaction
and AWS text in errors. No sockets, no clock; peers are address strings."""

from __future__ import annotations

import hmac
import json
import os
import re
from pathlib import Path
from typing import Any

import pytest

from broker import access
from broker.access import (
    AUTH_REQUIRED,
    TOKEN_NOT_ACCEPTED,
    WORKER_ADDRESS_ONLY,
    AccessConfigError,
    AccessPolicy,
    Denied,
    Identity,
    Role,
    Session,
    TokenEntry,
    Via,
    lease_owner,
    may,
    owner_key,
    owns,
    parse_token_env,
    parse_tokens,
    read_token_file,
    redact_status,
)

USE_TOKEN = "use-secret-0123456789abcdef"
ADMIN_TOKEN = "admin-secret-0123456789abcdef"
AGENT_TOKEN = "agent-secret-0123456789abcdef"
SECRETS = (USE_TOKEN, ADMIN_TOKEN, AGENT_TOKEN)


def tokens() -> tuple[TokenEntry, ...]:
    return (
        TokenEntry.from_secret("alice", "use", USE_TOKEN),
        TokenEntry.from_secret("ops", "admin", ADMIN_TOKEN),
        TokenEntry.from_secret("labpc", "agent", AGENT_TOKEN),
    )


def policy(**kwargs: Any) -> AccessPolicy:
    kwargs.setdefault("tokens", tokens())
    return AccessPolicy.build(**kwargs)


def identity(role: Role | None, name: str | None = "alice", peer: str = "10.1.2.7") -> Identity:
    if role is None:
        return Identity(peer, None, Via.NONE)
    return Identity(peer, role, Via.TOKEN, name)


# --- roles against commands ----------------------------------------------------------------

NOT_YOURS = "ERROR: not allowed: {} of a worker you hold no lease on"
NEEDS_USE = "ERROR: not allowed: {} needs the use or admin role"
NEEDS_ADMIN = "ERROR: not allowed: BURST needs the admin role"
NEEDS_AGENT = "ERROR: not allowed: {} needs the agent role"

# (command, own_lease): the reply for use, admin, agent and an anonymous peer (None: allowed).
MATRIX = [
    (("GET_WORKER", False), (None, None, NEEDS_USE, AUTH_REQUIRED)),
    (("PING", True), (None, None, NEEDS_USE, AUTH_REQUIRED)),
    (("PING", False), (NOT_YOURS, None, NEEDS_USE, AUTH_REQUIRED)),
    (("RELEASE", True), (None, None, NEEDS_USE, AUTH_REQUIRED)),
    (("RELEASE", False), (NOT_YOURS, None, NEEDS_USE, AUTH_REQUIRED)),
    (("STATUS", False), (None, None, NEEDS_USE, AUTH_REQUIRED)),
    (("BURST", False), (NEEDS_ADMIN, None, NEEDS_ADMIN, AUTH_REQUIRED)),
    (("REGISTER", False), (NEEDS_AGENT, None, None, AUTH_REQUIRED)),
    (("HEARTBEAT", False), (NEEDS_AGENT, None, None, AUTH_REQUIRED)),
    (("HELP", False), (None, None, None, None)),
    (("QUIT", False), (None, None, None, None)),
    (("ALIVE", False), (None, None, None, None)),
    (("AUTH", False), (None, None, None, None)),
]


@pytest.mark.parametrize(("request_", "replies"), MATRIX, ids=lambda v: str(v))
def test_every_role_against_every_command(
    request_: tuple[str, bool], replies: tuple[str | None, ...]
) -> None:
    """use: GET_WORKER, STATUS, PING/RELEASE of its own leases; admin: everything; agent: its
    two commands; anonymous: only HELP, QUIT, AUTH and ALIVE, else `auth required`."""
    command, own_lease = request_
    roles = (Role.USE, Role.ADMIN, Role.AGENT, None)
    got = tuple(may(identity(role), command, own_lease=own_lease) for role in roles)
    assert got == tuple(r.format(command) if r else None for r in replies)


def test_an_unknown_command_name_is_refused_to_every_role() -> None:
    """`may` fails closed: a command it does not know is not allowed, even to admin."""
    assert may(identity(Role.ADMIN), "FROB") == NEEDS_USE.format("FROB")


# --- identify: tokens, addresses, open ---------------------------------------------------------


def test_each_token_identifies_its_name_and_role() -> None:
    """A configured token gives its name and role, whatever the peer's address."""
    p = policy()
    assert p.identify("10.9.9.9", USE_TOKEN) == Identity("10.9.9.9", Role.USE, Via.TOKEN, "alice")
    assert p.identify("10.9.9.9", ADMIN_TOKEN) == Identity("10.9.9.9", Role.ADMIN, Via.TOKEN, "ops")
    assert p.identify("10.9.9.9", AGENT_TOKEN) == Identity(
        "10.9.9.9", Role.AGENT, Via.TOKEN, "labpc"
    )


@pytest.mark.parametrize(
    "wrong", [USE_TOKEN[:-1], USE_TOKEN + "x", USE_TOKEN.upper(), "x", "", "\udc80"]
)
def test_a_wrong_token_is_refused_and_does_not_fall_back_to_the_address(wrong: str) -> None:
    """A token that matches none is `auth required (token not accepted)`, even from an address
    that has a role of its own."""
    p = policy(address_roles={"10.1.2.0/24": "admin"})
    assert p.identify("10.1.2.7", wrong) == Denied(TOKEN_NOT_ACCEPTED, "token not accepted")
    assert TOKEN_NOT_ACCEPTED.startswith(AUTH_REQUIRED)


def test_every_token_is_compared_in_constant_time_whichever_matches(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The presented token is compared with every configured one by `hmac.compare_digest`,
    even after the first matched, so the time taken says nothing about which one did."""
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(access.hmac, "compare_digest", counting)
    p = policy()
    for presented in (USE_TOKEN, AGENT_TOKEN, "no-such-token-0123456789"):
        calls.clear()
        p.identify("10.1.2.7", presented)
        assert [b for _, b in calls] == [entry.digest for entry in p.tokens]
        assert {len(a) for a, _ in calls} == {32}  # digests: the length says nothing either


def test_an_address_role_goes_to_the_most_specific_network() -> None:
    """Without a token, the longest matching prefix of `address_roles` decides the role."""
    p = policy(address_roles={"10.1.0.0/16": "use", "10.1.2.7/32": "admin", "10.1.2.0/24": "agent"})
    assert p.identify("10.1.2.7", None) == Identity("10.1.2.7", Role.ADMIN, Via.ADDRESS)
    assert p.identify("10.1.2.8", None) == Identity("10.1.2.8", Role.AGENT, Via.ADDRESS)
    assert p.identify("10.1.9.9", None) == Identity("10.1.9.9", Role.USE, Via.ADDRESS)
    assert p.identify("10.2.0.1", None) == Identity("10.2.0.1", None, Via.NONE)


def test_a_token_outranks_the_address_role() -> None:
    """A valid token identifies the request as the token's, not as the address's role."""
    p = policy(address_roles={"10.1.2.0/24": "admin"})
    who = p.identify("10.1.2.7", USE_TOKEN)
    assert isinstance(who, Identity)
    assert (who.role, who.via) == (Role.USE, Via.TOKEN)


def test_an_ipv4_mapped_peer_matches_ipv4_networks() -> None:
    """A dual-stack listener reports `::ffff:10.1.2.7`; it counts as 10.1.2.7."""
    p = policy(allow_cidrs=["10.1.2.0/24"], address_roles={"10.1.2.0/24": "use"})
    assert p.admits("::ffff:10.1.2.7")
    assert p.identify("::ffff:10.1.2.7", None) == Identity("::ffff:10.1.2.7", Role.USE, Via.ADDRESS)


def test_without_tokens_or_address_roles_every_admitted_peer_is_admin() -> None:
    """Access control off (only an allowlist, or nothing): the broker as before, open to the
    peers it admits; a token a client sends anyway is ignored."""
    p = AccessPolicy.build(allow_cidrs=["10.1.2.0/24"])
    assert not p.enforcing
    assert p.identify("10.1.2.7", None) == Identity("10.1.2.7", Role.ADMIN, Via.OPEN)
    assert p.identify("10.1.2.7", "whatever-token-0123456789") == Identity(
        "10.1.2.7", Role.ADMIN, Via.OPEN
    )


def test_with_tokens_a_peer_without_one_is_anonymous() -> None:
    """Tokens configured, no address role: a peer that shows no token has no role."""
    assert policy().identify("10.1.2.7", None) == Identity("10.1.2.7", None, Via.NONE)


# --- sessions: AUTH for the connection, token= for one request ----------------------------------


def test_auth_makes_the_connection_the_tokens() -> None:
    """After `AUTH <token>` (None: reply OK) every request without a token is the token's."""
    session = Session(policy(), "10.1.2.7")
    assert session.who(None) == Identity("10.1.2.7", None, Via.NONE)
    assert session.auth(USE_TOKEN) is None
    assert session.who(None) == Identity("10.1.2.7", Role.USE, Via.TOKEN, "alice")


def test_a_token_on_one_request_identifies_only_that_request() -> None:
    """`token=` on a request identifies it; the connection stays what it was."""
    session = Session(policy(), "10.1.2.7")
    assert session.auth(USE_TOKEN) is None
    burst = session.who(ADMIN_TOKEN)
    assert isinstance(burst, Identity)
    assert may(burst, "BURST") is None
    assert session.who(None) == Identity("10.1.2.7", Role.USE, Via.TOKEN, "alice")


def test_a_refused_auth_changes_nothing() -> None:
    """A wrong `AUTH` is refused and the connection keeps the identity it had."""
    session = Session(policy(), "10.1.2.7")
    assert session.auth(USE_TOKEN) is None
    assert session.auth("wrong-token-0123456789") == Denied(
        TOKEN_NOT_ACCEPTED, "token not accepted"
    )
    assert session.who(None) == Identity("10.1.2.7", Role.USE, Via.TOKEN, "alice")


def test_a_wrong_token_on_a_request_is_refused_even_on_an_authenticated_connection() -> None:
    """A bad `token=` is not replaced by the connection's identity."""
    session = Session(policy(), "10.1.2.7")
    session.auth(ADMIN_TOKEN)
    assert session.who("wrong-token-0123456789") == Denied(TOKEN_NOT_ACCEPTED, "token not accepted")


def test_a_worker_address_outside_the_allowlist_may_only_send_alive() -> None:
    """A connection admitted only because it comes from a worker of the pool is anonymous:
    ALIVE, HELP and QUIT; a token, by AUTH or `token=`, is refused."""
    p = policy(allow_cidrs=["10.1.0.0/16"])
    assert not p.admits("54.1.2.3")
    session = Session(p, "54.1.2.3", worker_only=True)
    assert session.who(None) == Identity("54.1.2.3", None, Via.NONE)
    assert may(session.identity, "ALIVE") is None
    assert may(session.identity, "GET_WORKER") == AUTH_REQUIRED
    refused = Denied(WORKER_ADDRESS_ONLY, "token from a worker address")
    assert session.auth(ADMIN_TOKEN) == refused
    assert session.who(ADMIN_TOKEN) == refused
    assert session.who(None) == Identity("54.1.2.3", None, Via.NONE)


def test_a_session_starts_with_its_address_role() -> None:
    """An instrument on a subnet with a role needs no AUTH."""
    session = Session(policy(address_roles={"10.1.2.0/24": "use"}), "10.1.2.7")
    assert session.who(None) == Identity("10.1.2.7", Role.USE, Via.ADDRESS)


# --- the allowlist ---------------------------------------------------------------------------


def test_allow_cidrs_admits_only_the_listed_addresses() -> None:
    """`127.0.0.1/32` admits 127.0.0.1 and not 127.0.0.2; an unknown peer is not admitted."""
    p = policy(allow_cidrs=["127.0.0.1/32"])
    assert p.admits("127.0.0.1")
    assert not p.admits("127.0.0.2")
    assert not p.admits("::1")
    assert not p.admits("unknown")


def test_an_empty_allowlist_admits_anyone() -> None:
    """No `allow_cidrs`: every peer may connect (tokens or roles may still be required)."""
    p = policy()
    assert p.admits("203.0.113.9")
    assert p.admits("unknown")


def test_ipv6_networks_and_bare_addresses_are_allowed_too() -> None:
    """A bare address is that address alone; IPv6 networks match IPv6 peers (zone dropped)."""
    p = policy(allow_cidrs=["10.1.2.7", "fd00::/8"])
    assert p.admits("10.1.2.7")
    assert not p.admits("10.1.2.8")
    assert p.admits("fd00::1%eth0")
    assert not p.admits("fe80::1")


def test_a_cidr_with_host_bits_is_refused_with_both_readings() -> None:
    """`10.1.2.7/24` may mean the network or the address: the error offers both."""
    with pytest.raises(AccessConfigError) as caught:
        policy(allow_cidrs=["10.1.2.7/24"])
    assert str(caught.value) == (
        "allow_cidrs: 10.1.2.7/24 has host bits set: write 10.1.2.0/24 (the network) or "
        "10.1.2.7/32 (one address)"
    )
    with pytest.raises(AccessConfigError, match="not an address or CIDR: 'lab'"):
        policy(allow_cidrs=["lab"])


def test_a_bad_address_role_is_refused() -> None:
    """A role outside the allowlist (no peer could use it), an unknown role, and one network
    written twice are config errors."""
    with pytest.raises(AccessConfigError, match=r"10\.9\.0\.0/16 is not inside allow_cidrs"):
        policy(allow_cidrs=["10.1.0.0/16"], address_roles={"10.9.0.0/16": "use"})
    with pytest.raises(AccessConfigError, match="the role must be use, admin or agent"):
        policy(address_roles={"10.1.0.0/16": "root"})
    with pytest.raises(AccessConfigError, match=r"10\.1\.2\.7/32 is given twice"):
        policy(address_roles={"10.1.2.7": "use", "10.1.2.7/32": "admin"})


def test_two_tokens_with_one_name_or_one_secret_are_refused() -> None:
    """Names and secrets must be unique across the file and the environment."""
    twice = TokenEntry.from_secret("alice", "admin", "another-secret-0123456789")
    with pytest.raises(AccessConfigError, match="the same name"):
        policy(tokens=(*tokens(), twice))
    same_secret = TokenEntry.from_secret("bob", "use", USE_TOKEN)
    with pytest.raises(AccessConfigError, match="the same token"):
        policy(tokens=(*tokens(), same_secret))


# --- refusing to start -----------------------------------------------------------------------


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.53", "::1", "localhost", "LOCALHOST"])
def test_loopback_needs_no_access_control(host: str) -> None:
    """Listening on a loopback address is always allowed."""
    assert AccessPolicy.build().refuse_to_start(host) is None


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "", "10.1.2.1", "broker.lab.example"])
def test_a_network_address_without_access_control_is_refused_with_the_fix(host: str) -> None:
    """No tokens, address roles or allowlist on a network address: one line naming the fixes."""
    reason = AccessPolicy.build().refuse_to_start(host)
    assert reason is not None
    assert "\n" not in reason
    assert reason.startswith(f"refusing to listen on {host or 'every interface'} ")
    for fix in ("allow_cidrs", "tokens_file", "listen_host: 127.0.0.1", "insecure: true"):
        assert fix in reason


@pytest.mark.parametrize(
    "settings",
    [
        {"allow_cidrs": ["10.1.2.0/24"]},
        {"tokens": tokens()},
        {"address_roles": {"10.1.2.0/24": "use"}},
        {"insecure": True},
        {"allow_cidrs": ["0.0.0.0/0"], "insecure": True},
    ],
)
def test_any_access_control_or_insecure_lets_it_listen(settings: dict[str, Any]) -> None:
    """Tokens, address roles, an allowlist or `insecure: true` each allow 0.0.0.0."""
    assert AccessPolicy.build(**settings).refuse_to_start("0.0.0.0") is None


@pytest.mark.parametrize(
    "settings",
    [
        {"allow_cidrs": ["0.0.0.0/0"]},
        {"allow_cidrs": ["0.0.0.0/0", "::/0"]},
        {"tokens": tokens(), "address_roles": {"0.0.0.0/0": "use"}},
    ],
)
def test_an_allowlist_or_role_for_everyone_is_no_access_control(settings: dict[str, Any]) -> None:
    """`0.0.0.0/0` in the allowlist, or a role for `0.0.0.0/0`, lets anyone in: refused."""
    assert AccessPolicy.build(**settings).refuse_to_start("0.0.0.0") is not None


# --- leases ------------------------------------------------------------------------------------


def test_with_tokens_two_users_behind_one_nat_own_different_leases() -> None:
    """A token's lease is `token:<name>[/client]`, not the shared peer address."""
    nat = "198.51.100.4"
    alice = Identity(nat, Role.USE, Via.TOKEN, "alice")
    bob = Identity(nat, Role.USE, Via.TOKEN, "bob")
    assert lease_owner(alice, "main") == "token:alice/main"
    assert lease_owner(bob, "main") == "token:bob/main"
    assert lease_owner(alice, None) == "token:alice"
    assert not owns(bob, lease_owner(alice, "main"))
    assert owns(alice, "token:alice/main") and owns(alice, "token:alice")
    assert owner_key(lease_owner(alice, "main")) == alice.key == "token:alice"


def test_an_owner_gives_back_the_identity_it_counts_under() -> None:
    """The engine, which sees only lease owners, finds the limits' key from one."""
    for who in (
        Identity("10.0.0.5", Role.USE, Via.ADDRESS),
        Identity("fd00::5", Role.USE, Via.ADDRESS),
        Identity("fd00::5", Role.USE, Via.TOKEN, "a.b-c_d"),
    ):
        for client in (None, "main", "a:b.c-d"):
            assert owner_key(lease_owner(who, client)) == who.key


def test_without_a_token_a_lease_belongs_to_the_address_as_before() -> None:
    """Address and open identities keep today's `peer[/client]`, so leases survive upgrades."""
    who = Identity("10.0.0.5", Role.USE, Via.ADDRESS)
    assert lease_owner(who, "main") == "10.0.0.5/main"
    assert lease_owner(Identity("10.0.0.5", Role.ADMIN, Via.OPEN), None) == "10.0.0.5"
    assert owns(who, "10.0.0.5/other")
    assert not owns(who, "10.0.0.50/main")  # a prefix of the address is not the address
    assert not owns(who, None)


def test_an_identity_describes_itself_for_the_log_without_secrets() -> None:
    """The log shows the token's name or the address, the role and how it was got."""
    assert identity(Role.USE).describe() == "token alice (use)"
    assert Identity("10.1.2.7", Role.USE, Via.ADDRESS).describe() == "10.1.2.7 by address (use)"
    assert Identity("10.1.2.7", Role.ADMIN, Via.OPEN).describe() == "10.1.2.7 (admin)"
    assert Identity("10.1.2.7", None, Via.NONE).describe() == "10.1.2.7 (none)"


# --- token files and the environment -------------------------------------------------------------

TOKEN_FILE = f"""\
# name  role   token
alice   use    {USE_TOKEN}

ops     admin  {ADMIN_TOKEN}   # trailing words are not comments: see below
"""


def test_a_token_file_is_lines_of_name_role_token() -> None:
    """Blank lines and `#` lines are skipped; each other line is `name role token`."""
    text = f"# name role token\n\nalice use {USE_TOKEN}\n  ops\tadmin\t{ADMIN_TOKEN}\n"
    assert parse_tokens(text, "tokens") == tokens()[:2]


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        (f"alice use {USE_TOKEN} extra", "expected three words: name role token"),
        (f"alice {USE_TOKEN}", "expected three words: name role token"),
        (f"alice root {USE_TOKEN}", "the role must be use, admin or agent"),
        (f"alice {USE_TOKEN} use", "the role must be use, admin or agent"),
        (f"{USE_TOKEN}@x use {ADMIN_TOKEN}", "the name must be a letter, then up to 63"),
        ("alice use short", "the token must be 16-256 printable ASCII characters"),
        (f"alice use {USE_TOKEN}\u00e9", "the token must be 16-256 printable ASCII"),
    ],
)
def test_a_bad_token_line_names_the_line_and_never_quotes_it(line: str, problem: str) -> None:
    """Errors say which line and what is wrong, without a word of it (it may hold a token)."""
    with pytest.raises(AccessConfigError) as caught:
        parse_tokens(f"# tokens\n{line}\n", "tokens_file /etc/t")
    message = str(caught.value)
    assert message.startswith(f"tokens_file /etc/t line 2: {problem}")
    for secret in SECRETS:
        assert secret not in message


def test_a_repeated_name_or_token_in_a_file_names_both_lines() -> None:
    """The second line with a name or a token already seen is refused, naming the first."""
    with pytest.raises(AccessConfigError, match=r"line 2: the same name as line 1$"):
        parse_tokens(f"alice use {USE_TOKEN}\nalice admin {ADMIN_TOKEN}\n", "f")
    with pytest.raises(AccessConfigError, match=r"line 3: the same token as line 1$"):
        parse_tokens(f"alice use {USE_TOKEN}\n#\nbob admin {USE_TOKEN}\n", "f")


def test_the_environment_holds_one_token_line() -> None:
    """`COMPUTE_BROKER_ACCESS_TOKEN=name role token` is one token; anything else is refused."""
    assert parse_token_env(f"ops admin {ADMIN_TOKEN}") == tokens()[1]
    with pytest.raises(AccessConfigError, match="COMPUTE_BROKER_ACCESS_TOKEN: expected one line"):
        parse_token_env(f"ops admin {ADMIN_TOKEN}\nalice use {USE_TOKEN}")
    with pytest.raises(AccessConfigError, match="COMPUTE_BROKER_ACCESS_TOKEN line 1: expected"):
        parse_token_env(ADMIN_TOKEN)


def write_tokens(tmp_path: Path, mode: int) -> Path:
    path = tmp_path / "tokens"
    path.write_text(f"alice use {USE_TOKEN}\n")
    path.chmod(mode)
    return path


@pytest.mark.parametrize("mode", [0o600, 0o400])
def test_a_token_file_only_its_owner_can_open_is_read(tmp_path: Path, mode: int) -> None:
    """Mode 600 or 400: the tokens are read."""
    assert read_token_file(str(write_tokens(tmp_path, mode))) == tokens()[:1]


@pytest.mark.parametrize("mode", [0o640, 0o644, 0o604, 0o620, 0o660])
def test_a_token_file_open_to_group_or_others_is_refused_with_the_chmod(
    tmp_path: Path, mode: int
) -> None:
    """Any group or other permission bit: one line naming the file, its mode and the fix."""
    path = write_tokens(tmp_path, mode)
    with pytest.raises(AccessConfigError) as caught:
        read_token_file(str(path))
    assert str(caught.value) == (
        f"tokens_file {path} is open to group or others (mode {mode:04o}); run: chmod 600 {path}"
    )


def test_a_symlinked_token_file_is_judged_by_its_target(tmp_path: Path) -> None:
    """The mode checked is the file's the link points to (as mounted secrets are linked)."""
    target = write_tokens(tmp_path, 0o644)
    link = tmp_path / "link"
    link.symlink_to(target)
    with pytest.raises(AccessConfigError, match="mode 0644"):
        read_token_file(str(link))
    target.chmod(0o600)
    assert read_token_file(str(link)) == tokens()[:1]


def test_a_missing_or_odd_token_file_is_one_line(tmp_path: Path) -> None:
    """Not found, a directory, not UTF-8: each one line naming the file."""
    with pytest.raises(
        AccessConfigError, match=f"^tokens_file {re.escape(str(tmp_path))}/nope: not found$"
    ):
        read_token_file(str(tmp_path / "nope"))
    directory = tmp_path / "dir"
    directory.mkdir(mode=0o700)
    with pytest.raises(AccessConfigError, match=r"not a regular file$"):
        read_token_file(str(directory))
    binary = tmp_path / "binary"
    binary.write_bytes(b"alice use \xff" * 3)
    binary.chmod(0o600)
    with pytest.raises(AccessConfigError, match=r"not valid UTF-8$"):
        read_token_file(str(binary))


def test_a_bad_line_in_a_token_file_names_the_file(tmp_path: Path) -> None:
    """A bad line in a file is reported as `tokens_file <path> line <n>`."""
    path = tmp_path / "tokens"
    path.write_text(TOKEN_FILE)
    os.chmod(path, 0o600)
    with pytest.raises(
        AccessConfigError, match=f"^tokens_file {re.escape(str(path))} line 4: expected three"
    ):
        read_token_file(str(path))


# --- no token anywhere it could leak ---------------------------------------------------------


def test_no_token_or_its_digest_appears_in_any_repr_str_or_message() -> None:
    """Policies, entries, sessions, identities, refusals and errors never show a secret."""
    p = policy(address_roles={"10.1.2.0/24": "use"})
    session = Session(p, "10.1.2.7")
    session.auth(USE_TOKEN)
    shown: list[object] = [
        p,
        *p.tokens,
        session,
        session.who(None),
        session.who(ADMIN_TOKEN),
        session.who(USE_TOKEN + "x"),
        p.identify("10.1.2.7", AGENT_TOKEN),
    ]
    for bad in (f"a use {USE_TOKEN} {ADMIN_TOKEN}", f"a root {USE_TOKEN}", f"{USE_TOKEN} a b"):
        with pytest.raises(AccessConfigError) as caught:
            parse_tokens(bad, "f")
        shown.append(caught.value)
    with pytest.raises(AccessConfigError) as caught:
        policy(tokens=(*tokens(), TokenEntry.from_secret("bob", "use", USE_TOKEN)))
    shown.append(caught.value)
    texts = [text for obj in shown for text in (repr(obj), str(obj))]
    for secret in SECRETS:
        for text in texts:
            assert secret not in text
            assert secret[:12] not in text
    for entry in p.tokens:
        for text in texts:
            assert entry.digest.hex() not in text
            assert repr(entry.digest) not in text


# --- what STATUS reveals -----------------------------------------------------------------------


def status_document() -> dict[str, Any]:
    def worker(instance_id: str, ip: str) -> dict[str, Any]:
        return {"instance_id": instance_id, "ip": ip, "state": "ready", "clients": 1}

    def lease(client: str, instance_id: str, ip: str) -> dict[str, Any]:
        return {"client": client, "instance_id": instance_id, "ip": ip, "cost_usd": 0.1}

    return {
        "workers": [
            worker("i-0aaa00000000", "54.0.0.1"),
            worker("i-0bbb00000000", "54.0.0.2"),
            worker("i-0ccc00000000", "54.0.0.3"),
        ],
        "leases": [
            lease("token:alice/main", "i-0aaa00000000", "54.0.0.1"),
            lease("token:bob", "i-0bbb00000000", "54.0.0.2"),
            lease("10.0.0.9/x", "i-0ccc00000000", "54.0.0.3"),
        ],
        "totals": {"workers": 3, "run_rate_per_hour": 1.5},
        "budget": {"day": {"spent": 1.0, "limit": 50.0}},
        "capacity": {
            "failed_offerings": [{"offering": "c7i.8xlarge spot in subnet-0aaa"}],
            "fallbacks": [{"got": "c7i.8xlarge spot in subnet-0bbb"}, {"got": "x"}],
        },
        "secret_future_key": {"account": "123456789012"},
    }


def test_a_use_status_shows_the_summary_and_only_its_own_leases_and_workers() -> None:
    """`use` gets totals, budget, capacity counts, its leases and the workers they are on."""
    alice = Identity("198.51.100.4", Role.USE, Via.TOKEN, "alice")
    document = status_document()
    shown = redact_status(document, alice)
    assert shown == {
        "view": "own",
        "workers": [document["workers"][0]],
        "leases": [document["leases"][0]],
        "totals": document["totals"],
        "budget": document["budget"],
        "capacity": {"failed_offerings_count": 1, "fallbacks_count": 2},
    }
    text = json.dumps(shown)
    for hidden in ("54.0.0.2", "54.0.0.3", "i-0bbb", "i-0ccc", "bob", "10.0.0.9", "subnet-"):
        assert hidden not in text


def test_an_address_identity_sees_the_leases_of_its_address() -> None:
    """A `use` instrument by address sees `peer[/client]` leases, not the others."""
    shown = redact_status(status_document(), Identity("10.0.0.9", Role.USE, Via.ADDRESS))
    assert [lease["client"] for lease in shown["leases"]] == ["10.0.0.9/x"]
    assert [w["instance_id"] for w in shown["workers"]] == ["i-0ccc00000000"]


def test_an_admin_status_is_the_whole_document() -> None:
    """admin (or everyone with access control off) sees every key as the engine made it."""
    document = status_document()
    assert redact_status(document, identity(Role.ADMIN, "ops")) == document
    assert redact_status(document, Identity("10.0.0.9", Role.ADMIN, Via.OPEN)) == document


def test_a_status_of_an_unexpected_shape_is_redacted_without_crashing() -> None:
    """Missing or odd keys give empty lists and zero counts for non-admins."""
    shown = redact_status({"leases": "oops", "capacity": None}, identity(Role.USE))
    assert shown == {
        "view": "own",
        "workers": [],
        "leases": [],
        "capacity": {"failed_offerings_count": 0, "fallbacks_count": 0},
    }


# --- the docs quote the code -------------------------------------------------------------------


def test_docs_security_md_quotes_the_refusals_the_code_makes() -> None:
    """docs/security.md shows the start-up refusal, the token-file refusal and the replies
    exactly as the code writes them."""
    doc = (Path(__file__).resolve().parent.parent / "docs" / "security.md").read_text()
    quoted = [
        AccessPolicy.build().refuse_to_start("0.0.0.0"),
        access.mode_problem("/etc/compute-broker/tokens", 0o100644),
        AUTH_REQUIRED,
        TOKEN_NOT_ACCEPTED,
        may(identity(Role.USE), "BURST"),
        may(identity(Role.USE), "PING", own_lease=False),
    ]
    for text in quoted:
        assert text is not None
        assert text in doc
