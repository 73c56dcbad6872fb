"""The gate every connection and request passes before the engine sees it: the allowlist,
tokens and roles (broker.access), and the per-identity limits (broker.limits). Pure code
over the pool's read-only view: no sockets, time passed in. See docs/security.md.
"""

from __future__ import annotations

from typing import Final

import attrs
import structlog

from broker.access import (
    AccessPolicy,
    Identity,
    Role,
    Session,
    lease_owner,
    may,
    owner_key,
    peer_address,
)
from broker.limits import Limiter, Limits
from broker.pool import Pool
from broker.protocol import (
    Alive,
    Auth,
    Burst,
    Command,
    Deregister,
    GetWorker,
    Heartbeat,
    Help,
    Ping,
    Quit,
    Register,
    Release,
    Reply,
    Request,
    Status,
    WithToken,
)

_log = structlog.get_logger("broker.gate")

NO_LIMITS: Final = Limits(None, None, 1, None, None)

WIRE_NAMES: Final[dict[type, str]] = {
    GetWorker: "GET_WORKER",
    Ping: "PING",
    Release: "RELEASE",
    Status: "STATUS",
    Burst: "BURST",
    Help: "HELP",
    Quit: "QUIT",
    Alive: "ALIVE",
    Auth: "AUTH",
    Register: "REGISTER",
    Heartbeat: "HEARTBEAT",
    Deregister: "DEREGISTER",
}


@attrs.frozen
class Admitted:
    """What a request may do: its command, who sends it, and the owner its leases get."""

    command: Command
    identity: Identity
    owner: str


@attrs.define
class Gate:
    """The access policy and the limits, for one server."""

    policy: AccessPolicy = attrs.field(factory=AccessPolicy)
    limiter: Limiter = attrs.field(factory=lambda: Limiter(NO_LIMITS))

    def open(self, peer: str, pool: Pool) -> Session | str:
        """A new connection from `peer`: its session, or the line to close it with ("" to
        close it without a word: a peer outside the allowlist learns nothing)."""
        worker_only = False
        if not self.policy.admits(peer):
            address = peer_address(peer)
            if address is None or pool.by_ip(str(address)) is None:
                _log.warning("access.refused", peer=peer, reason="not in allow_cidrs")
                return ""
            worker_only = True  # a worker's watchdog from an EC2 address: ALIVE only
        refusal = self.limiter.connection_opened(peer)
        if refusal is not None:
            _log.warning("limit.reached", peer=peer, limit="max_connections_per_peer")
            return refusal
        return Session(self.policy, peer, worker_only=worker_only)

    def close(self, peer: str) -> None:
        """A connection `open` admitted has closed."""
        self.limiter.connection_closed(peer)

    def check(self, session: Session, request: Request, now: float, pool: Pool) -> Admitted | Reply:
        """The request admitted, or the one-line reply that refuses it (AUTH is answered
        here: `OK` or its refusal)."""
        command, token = (
            (request.command, request.token) if isinstance(request, WithToken) else (request, None)
        )
        if isinstance(command, Auth):
            refusal = self.limiter.request(session.peer, now)  # guessing tokens is throttled
            if refusal is not None:
                return Reply(refusal)
            denied = session.auth(command.token)
            if denied is not None:
                _log.warning("auth.failed", peer=session.peer, reason=denied.reason)
                return Reply(denied.text)
            _log.info("auth.ok", who=session.identity.describe())
            return Reply.ok()
        who = session.who(token)
        if not isinstance(who, Identity):
            refusal = self.limiter.request(session.peer, now)
            _log.warning("auth.failed", peer=session.peer, reason=who.reason)
            return Reply(refusal or who.text)
        refusal = self.limiter.request(who.key, now)
        if refusal is not None:
            _log.warning("limit.reached", who=who.key, limit="max_requests_per_second")
            return Reply(refusal)
        name = WIRE_NAMES[type(command)]
        client = getattr(command, "client", None)
        owner = lease_owner(who, client)
        own = True
        if isinstance(command, Ping | Release):
            own = _holds(pool, command.ip, owner)
        refusal = may(who, name, own_lease=own)
        if refusal is not None:
            _log.warning("access.denied", who=who.describe(), command=name)
            return Reply(refusal)
        if isinstance(command, Status) and command.all and who.role is not Role.ADMIN:
            return Reply("ERROR: not allowed: STATUS all needs the admin role")
        if isinstance(command, Burst):
            refusal = self.limiter.launch(who.key, now, command.count)
            if refusal is not None:
                _log.warning("limit.reached", who=who.key, limit="max_launches_per_minute")
                return Reply(refusal)
        if isinstance(command, GetWorker):
            held = pool.leases_held(owner_key(owner))
            refusal = self.limiter.open_lease(who.key, held)
            if refusal is not None and not pool.holds_any(owner):
                _log.warning("limit.reached", who=who.key, limit="max_leases_per_identity")
                return Reply(refusal)
        return Admitted(command, who, owner)

    def launched(self, identity: Identity, now: float) -> str | None:
        """A GET_WORKER of `identity` is about to start a launch: the refusal if that would
        pass its launches per minute."""
        return self.limiter.launch(identity.key, now, 1)


def _holds(pool: Pool, ip: str, owner: str) -> bool:
    """The owner holds a lease on the live worker at `ip`, or there is no live worker there
    (nothing to protect; a retried RELEASE stays idempotent)."""
    worker = pool.by_ip(ip)
    if worker is None:
        return True
    return pool.lease_of(owner, worker.instance_id) is not None
