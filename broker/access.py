"""Who may ask what: the allowlist, tokens, address roles and roles, as pure code.

Nothing here touches a socket or a clock. The server asks `AccessPolicy.admits(peer)` when a
connection opens, keeps a `Session` per connection (its `AUTH`), and before serving a request
asks the session who is asking (`who`, for a `token=` on that request) and `may` whether that
identity may run the command; STATUS goes through `redact_status`, ERROR replies that quote AWS
through `public_error` (see docs/security.md).

Tokens never leave this module: the policy keeps only their SHA-256 digests (not in any repr),
compares a presented token with every digest in constant time, and no message it makes quotes
a token or any word of a token file.
"""

from __future__ import annotations

import enum
import functools
import hashlib
import hmac
import ipaddress
import os
import re
import stat
from collections.abc import Iterable, Mapping
from typing import Any, Final

import attrs

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address

TOKEN_ENV: Final = "COMPUTE_BROKER_ACCESS_TOKEN"  # one token, as a token-file line
MIN_TOKEN_CHARS: Final = 16
MAX_TOKEN_CHARS: Final = 256
_TOKEN: Final = re.compile(rf"[!-~]{{{MIN_TOKEN_CHARS},{MAX_TOKEN_CHARS}}}")  # printable ASCII
_NAME: Final = re.compile(r"[A-Za-z][A-Za-z0-9_.-]{0,63}")
TOKEN_RULE: Final = f"{MIN_TOKEN_CHARS}-{MAX_TOKEN_CHARS} printable ASCII characters without spaces"
NAME_RULE: Final = "a letter, then up to 63 of A-Z a-z 0-9 _ . -"

AUTH_REQUIRED: Final = "ERROR: auth required"
TOKEN_NOT_ACCEPTED: Final = "ERROR: auth required (token not accepted)"
WORKER_ADDRESS_ONLY: Final = "ERROR: not allowed: this address may only send ALIVE"


class Role(enum.StrEnum):
    """What an identity may do (see `may`)."""

    USE = "use"  # GET_WORKER, PING and RELEASE of its own leases, its own STATUS
    ADMIN = "admin"  # everything: BURST, RELEASE of any worker, the full STATUS, agent commands
    AGENT = "agent"  # register a local worker and heartbeat


class Via(enum.StrEnum):
    """How an identity was established, for the log."""

    TOKEN = "token"  # a token from the tokens file or the environment
    ADDRESS = "address"  # the peer's address is in `address_roles`
    OPEN = "open"  # no tokens or address roles configured: every admitted peer is admin
    NONE = "none"  # access control is on and the peer showed nothing: anonymous


# --- commands and roles ------------------------------------------------------------------------

OPEN_COMMANDS: Final = frozenset({"HELP", "QUIT", "AUTH", "ALIVE"})  # anyone admitted
OWN_LEASE_COMMANDS: Final = frozenset({"PING", "RELEASE"})  # `use`: only on a lease it holds
AGENT_COMMANDS: Final = frozenset({"REGISTER", "HEARTBEAT", "DEREGISTER"})  # local workers
_ALLOWED: Final[Mapping[Role, frozenset[str]]] = {
    Role.USE: frozenset({"GET_WORKER", "PING", "RELEASE", "STATUS"}),
    Role.ADMIN: frozenset({"GET_WORKER", "PING", "RELEASE", "STATUS", "BURST"}) | AGENT_COMMANDS,
    Role.AGENT: AGENT_COMMANDS,
}
_NEEDS: Final = {"BURST": "the admin role", **dict.fromkeys(AGENT_COMMANDS, "the agent role")}


# --- values --------------------------------------------------------------------------------------


@attrs.frozen
class Identity:
    """Who is asking: the peer's address, and a role (None: anonymous) with how it was got.

    `name` is the token's name for a token identity, else None. An identity never holds a token.
    """

    peer: str
    role: Role | None
    via: Via
    name: str | None = None

    @property
    def key(self) -> str:
        """The identity the limits and leases count under: `token:<name>`, else the peer's
        address (every program on that address, or behind that NAT, shares it)."""
        return f"token:{self.name}" if self.via is Via.TOKEN else self.peer

    def describe(self) -> str:
        """For the log: `token alice (use)`, `10.1.2.7 by address (use)`, `10.1.2.7 (none)`."""
        role = self.role or "none"
        if self.via is Via.TOKEN:
            return f"token {self.name} ({role})"
        if self.via is Via.ADDRESS:
            return f"{self.peer} by address ({role})"
        return f"{self.peer} ({role})"


@attrs.frozen
class Denied:
    """A refusal: `text` is the reply line, `reason` a short word for the log."""

    text: str
    reason: str


@attrs.frozen
class TokenEntry:
    """One token: its name, its role, and the SHA-256 digest of its secret (never shown)."""

    name: str
    role: Role
    digest: bytes = attrs.field(repr=False)

    @classmethod
    def from_secret(cls, name: str, role: str, secret: str) -> TokenEntry:
        """Check the name, role and secret; keep only the secret's digest.

        `ValueError` says which part is wrong without quoting any of them (a token pasted in
        the wrong column must not end up in a log)."""
        if not _NAME.fullmatch(name):
            raise ValueError(f"the name must be {NAME_RULE}")
        try:
            checked = Role(role)
        except ValueError:
            raise ValueError("the role must be use, admin or agent") from None
        if not _TOKEN.fullmatch(secret):
            raise ValueError(f"the token must be {TOKEN_RULE}")
        return cls(name, checked, _digest(secret))


def _digest(secret: str) -> bytes:
    # Fixed-length digests: compare_digest on them takes the same time whatever the lengths.
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).digest()


class AccessConfigError(Exception):
    """A bad access setting or token file; `str()` is one line for the operator, quoting no
    token."""


# --- token files -------------------------------------------------------------------------------


def parse_tokens(text: str, source: str) -> tuple[TokenEntry, ...]:
    """Tokens from lines of `name role token` (blank lines and `#` comments skipped).

    Names and tokens must be unique; errors name `source` and the line, never its words."""
    entries: list[TokenEntry] = []
    lines: dict[tuple[str, str], int] = {}  # ("name", name) or ("token", digest) -> line
    for number, line in enumerate(text.splitlines(), 1):
        words = line.split()
        if not words or words[0].startswith("#"):
            continue
        where = f"{source} line {number}"
        if len(words) != 3:
            raise AccessConfigError(f"{where}: expected three words: name role token")
        try:
            entry = TokenEntry.from_secret(*words)
        except ValueError as exc:
            raise AccessConfigError(f"{where}: {exc}") from None
        for seen in (("name", entry.name), ("token", entry.digest.hex())):
            if seen in lines:
                raise AccessConfigError(f"{where}: the same {seen[0]} as line {lines[seen]}")
            lines[seen] = number
        entries.append(entry)
    return tuple(entries)


def parse_token_env(value: str, variable: str = TOKEN_ENV) -> TokenEntry:
    """The one token of an environment variable, written as a token-file line."""
    entries = parse_tokens(value, variable)
    if len(entries) != 1:
        raise AccessConfigError(f"{variable}: expected one line: name role token")
    return entries[0]


def mode_problem(path: str, mode: int) -> str | None:
    """The refusal for a token file whose permission bits let its group or others in."""
    bits = stat.S_IMODE(mode)
    if not bits & 0o077:
        return None
    return f"tokens_file {path} is open to group or others (mode {bits:04o}); run: chmod 600 {path}"


def read_token_file(path: str) -> tuple[TokenEntry, ...]:
    """Read a tokens file, refusing it (`AccessConfigError`) when group or others may read or
    write it. The mode is checked on the opened file, so a swap between check and read cannot
    slip another file in; a symlink is followed (as secrets mounted by Kubernetes are)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise AccessConfigError(f"tokens_file {path}: not found") from None
    except OSError as exc:
        raise AccessConfigError(f"tokens_file {path}: {exc.strerror or exc}") from None
    try:
        status = os.fstat(fd)
        if not stat.S_ISREG(status.st_mode):
            raise AccessConfigError(f"tokens_file {path}: not a regular file")
        problem = mode_problem(path, status.st_mode)
        if problem is not None:
            raise AccessConfigError(problem)
        with os.fdopen(os.dup(fd), "rb") as file:
            data = file.read()
    finally:
        os.close(fd)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise AccessConfigError(f"tokens_file {path}: not valid UTF-8") from None
    return parse_tokens(text, f"tokens_file {path}")


# --- addresses ---------------------------------------------------------------------------------


def parse_network(text: str, key: str) -> Network:
    """A CIDR (`10.1.2.0/24`) or a single address (`10.1.2.7`, as a /32 or /128). Host bits
    set (`10.1.2.7/24`) are refused with both readings, since either might be meant."""
    try:
        return ipaddress.ip_network(text, strict=True)
    except ValueError:
        pass
    try:
        loose = ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise AccessConfigError(f"{key}: not an address or CIDR: {text!r}") from None
    one = f"{text.partition('/')[0]}/{loose.max_prefixlen}"
    raise AccessConfigError(
        f"{key}: {text} has host bits set: write {loose} (the network) or {one} (one address)"
    )


@functools.lru_cache(maxsize=4096)  # the same lab machines connect again and again
def peer_address(peer: str) -> Address | None:
    """A peer's address as the server reports it; IPv4-mapped IPv6 (`::ffff:10.1.2.7`, from a
    dual-stack listener) counts as IPv4, an IPv6 zone (`%eth0`) is dropped; None if it is no
    address (the server says `unknown` when it could not tell)."""
    try:
        address = ipaddress.ip_address(peer.partition("%")[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _within(address: Address, network: Network) -> bool:
    return address.version == network.version and address in network


def _subnet(inner: Network, outer: Network) -> bool:
    return inner.version == outer.version and inner.subnet_of(outer)  # type: ignore[arg-type]


# --- the policy ----------------------------------------------------------------------------------


@attrs.frozen
class AccessPolicy:
    """The access settings, checked. Build it with `AccessPolicy.build`.

    `address_roles` is ordered most specific first, so the first match is the longest prefix.
    """

    allow: tuple[Network, ...] = ()
    address_roles: tuple[tuple[Network, Role], ...] = ()
    tokens: tuple[TokenEntry, ...] = ()
    insecure: bool = False

    @classmethod
    def build(
        cls,
        *,
        allow_cidrs: Iterable[str] = (),
        address_roles: Mapping[str, str] | None = None,
        tokens: Iterable[TokenEntry] = (),
        insecure: bool = False,
    ) -> AccessPolicy:
        """The policy from config values; `AccessConfigError` names the first bad one."""
        allow = tuple(parse_network(text, "allow_cidrs") for text in allow_cidrs)
        roles: dict[Network, Role] = {}
        for text, role in (address_roles or {}).items():
            network = parse_network(text, "address_roles")
            if network in roles:
                raise AccessConfigError(f"address_roles: {network} is given twice")
            try:
                roles[network] = Role(role)
            except ValueError:
                raise AccessConfigError(
                    f"address_roles: {text}: the role must be use, admin or agent"
                ) from None
            if allow and not any(_subnet(network, outer) for outer in allow):
                raise AccessConfigError(
                    f"address_roles: {text} is not inside allow_cidrs, so no peer could "
                    "use that role; add it to allow_cidrs or remove it"
                )
        ordered = tuple(sorted(roles.items(), key=lambda item: -item[0].prefixlen))
        entries = tuple(tokens)
        for kind, values in (
            ("name", [e.name for e in entries]),
            ("token", [e.digest for e in entries]),
        ):
            if len(set(values)) != len(values):
                raise AccessConfigError(f"tokens: two tokens have the same {kind}")
        return cls(allow, ordered, entries, insecure)

    @property
    def enforcing(self) -> bool:
        """Whether a role must be earned (a token or an address role); without either, every
        admitted peer is admin, as before access control."""
        return bool(self.tokens or self.address_roles)

    def admits(self, peer: str) -> bool:
        """Whether a connection from `peer` may send anything at all (`allow_cidrs`; empty:
        any). A peer the server could not name is admitted only without an allowlist."""
        if not self.allow:
            return True
        address = peer_address(peer)
        return address is not None and any(_within(address, n) for n in self.allow)

    def identify(self, peer: str, token: str | None) -> Identity | Denied:
        """Who `peer` is, with `token` (from AUTH or a `token=`) or without one.

        A token is compared with every configured token in constant time; a wrong one is
        `Denied`, never a fall-back to the address. Without configured tokens a token is
        ignored (a client may be given one before the broker requires it)."""
        if token is not None and self.tokens:
            entry = self._match(token)
            if entry is None:
                return Denied(TOKEN_NOT_ACCEPTED, "token not accepted")
            return Identity(peer, entry.role, Via.TOKEN, entry.name)
        address = peer_address(peer)
        if address is not None:
            for network, role in self.address_roles:
                if _within(address, network):
                    return Identity(peer, role, Via.ADDRESS)
        if not self.enforcing:
            return Identity(peer, Role.ADMIN, Via.OPEN)
        return Identity(peer, None, Via.NONE)

    def _match(self, token: str) -> TokenEntry | None:
        presented = _digest(token)
        found: TokenEntry | None = None
        for entry in self.tokens:  # every entry, whichever matches: the time says nothing
            if hmac.compare_digest(presented, entry.digest) and found is None:
                found = entry
        return found

    def refuse_to_start(self, listen_host: str) -> str | None:
        """Why the broker must not listen on `listen_host`, or None.

        It refuses a non-loopback address when anyone who reaches the port could use the
        broker without a token (no allowlist, or one with a /0, and a role for everyone),
        unless `insecure` says the operator means it."""
        if self.insecure or _loopback(listen_host):
            return None
        anyone_connects = not self.allow or any(n.prefixlen == 0 for n in self.allow)
        anyone_has_a_role = not self.enforcing or any(
            n.prefixlen == 0 for n, _ in self.address_roles
        )
        if not (anyone_connects and anyone_has_a_role):
            return None
        shown = listen_host or "every interface"
        return (
            f"refusing to listen on {shown} without access control: set allow_cidrs to your "
            "lab's network (e.g. [10.1.2.0/24]) or give tokens (tokens_file), or set "
            "listen_host: 127.0.0.1; insecure: true serves anyone who reaches the port"
        )


def _loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    address = peer_address(host)
    return address is not None and address.is_loopback


# --- sessions and permissions --------------------------------------------------------------------


@attrs.define
class Session:
    """One connection's identity: its address's, until an `AUTH` replaces it.

    A `token=` on one request identifies that request only and leaves the connection as it
    was; a refused AUTH changes nothing.

    `worker_only`: the allowlist turned the peer away, but it is the address of a worker the
    pool runs, admitted so that its watchdog's ALIVE is answered (workers have no token and
    their public addresses are EC2's, not the lab's). Such a connection is anonymous whatever
    its address or tokens: HELP, QUIT and ALIVE only."""

    policy: AccessPolicy
    peer: str
    worker_only: bool = False
    identity: Identity = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        identity = self.policy.identify(self.peer, None)
        assert isinstance(identity, Identity)  # without a token there is always one
        self.identity = Identity(self.peer, None, Via.NONE) if self.worker_only else identity

    def auth(self, token: str) -> Denied | None:
        """`AUTH <token>`: None (reply `OK`) and the connection is that token's from now on."""
        identity = self.who(token)
        if isinstance(identity, Denied):
            return identity
        self.identity = identity
        return None

    def who(self, token: str | None) -> Identity | Denied:
        """Who is asking in a request with (`token=`) or without a token."""
        if token is None:
            return self.identity
        if self.worker_only:
            return Denied(WORKER_ADDRESS_ONLY, "token from a worker address")
        return self.policy.identify(self.peer, token)


def may(identity: Identity, command: str, *, own_lease: bool = False) -> str | None:
    """None when `identity` may run `command` (its name as on the wire, upper case), else the
    reply line. `own_lease`: for PING and RELEASE, the caller holds a lease on that worker
    (the server also passes True for a worker that no longer exists, so that a retried
    RELEASE stays idempotent: there is nothing left to protect)."""
    if command in OPEN_COMMANDS:
        return None
    if identity.role is None:
        return AUTH_REQUIRED
    if command not in _ALLOWED[identity.role]:
        needs = _NEEDS.get(command, "the use or admin role")
        return f"ERROR: not allowed: {command} needs {needs}"
    if identity.role is Role.USE and command in OWN_LEASE_COMMANDS and not own_lease:
        return f"ERROR: not allowed: {command} of a worker you hold no lease on"
    return None


def lease_owner(identity: Identity, client_id: str | None) -> str:
    """Whom a lease belongs to: `token:<name>` with a token, else the peer's address, then
    `/<client>` when the request gave `client=` (so NAT'd users with tokens are distinct)."""
    return f"{identity.key}/{client_id}" if client_id else identity.key


def owner_key(lease_client: str) -> str:
    """The identity a lease's owner counts under (`Identity.key`): the owner without its
    `/<client>`. Neither a token's key nor an address contains a `/`."""
    return lease_client.partition("/")[0]


def owns(identity: Identity, lease_client: object) -> bool:
    """Whether a lease's `client` (as STATUS and the pool write it) is this identity's."""
    if not isinstance(lease_client, str):
        return False
    key = identity.key
    return lease_client == key or lease_client.startswith(key + "/")


# --- what replies reveal -------------------------------------------------------------------------

_SUMMARY_KEYS: Final = ("totals", "budget")


def redact_status(document: Mapping[str, Any], identity: Identity) -> dict[str, Any]:
    """The STATUS an identity may see. `admin`: everything. Anyone else: `view: own`, the
    pool's `totals` and `budget`, the counts of `capacity`, and only the leases it holds and
    the workers they are on. Keys not listed here are left out (a new STATUS key is shown to
    admins only until it is added here)."""
    if identity.role is Role.ADMIN:
        return dict(document)
    leases = [
        lease for lease in _dicts(document.get("leases")) if owns(identity, lease.get("client"))
    ]
    held = {lease.get("instance_id") for lease in leases}
    workers = [w for w in _dicts(document.get("workers")) if w.get("instance_id") in held]
    capacity = document.get("capacity")
    capacity = capacity if isinstance(capacity, Mapping) else {}
    shown: dict[str, Any] = {"view": "own", "workers": workers, "leases": leases}
    shown.update({key: document[key] for key in _SUMMARY_KEYS if key in document})
    shown["capacity"] = {
        "failed_offerings_count": len(_dicts(capacity.get("failed_offerings"))),
        "fallbacks_count": len(_dicts(capacity.get("fallbacks"))),
    }
    return shown


def _dicts(value: object) -> list[Mapping[str, Any]]:
    if not isinstance(value, list):
        return []
    return [item for item in value if isinstance(item, Mapping)]
