"""`broker.limits.Limiter` with plain numbers: no clock, no sockets."""

from __future__ import annotations

from pathlib import Path

import pytest

from broker.limits import LIMIT_PREFIX, MIN_SWEEP, Limiter, Limits

# --- connections per peer ----------------------------------------------------------------------


def test_a_peer_may_hold_up_to_its_connections_and_no_more() -> None:
    """The connection past max_connections_per_peer gets one ERROR line naming the limit."""
    limiter = Limiter(Limits(max_connections_per_peer=2))
    assert limiter.connection_opened("10.0.0.5") is None
    assert limiter.connection_opened("10.0.0.5") is None
    assert limiter.connection_opened("10.0.0.5") == (
        "ERROR: limit: max_connections_per_peer (2) connections from your address are open"
    )


def test_one_peer_at_its_limit_does_not_lock_out_another() -> None:
    """Counts are per address: a second peer still connects."""
    limiter = Limiter(Limits(max_connections_per_peer=1))
    assert limiter.connection_opened("10.0.0.5") is None
    assert limiter.connection_opened("10.0.0.5") is not None
    assert limiter.connection_opened("10.0.0.6") is None


def test_a_closed_connection_frees_its_place_and_its_memory() -> None:
    """After every connection of a peer has closed, it may connect again and is forgotten."""
    limiter = Limiter(Limits(max_connections_per_peer=1))
    assert limiter.connection_opened("10.0.0.5") is None
    limiter.connection_closed("10.0.0.5")
    assert limiter.tracked == 0
    assert limiter.connection_opened("10.0.0.5") is None
    limiter.connection_closed("10.0.0.5")
    limiter.connection_closed("10.0.0.5")  # one too many: no negative count
    assert limiter.connection_opened("10.0.0.5") is None
    assert limiter.connection_opened("10.0.0.5") is not None


# --- requests a second ---------------------------------------------------------------------------


def test_requests_beyond_the_burst_are_refused_until_the_rate_refills() -> None:
    """request_burst requests at once pass; the next is refused naming the limit; 1/rate
    seconds later one more passes."""
    limiter = Limiter(Limits(max_requests_per_second=4, request_burst=3))
    assert [limiter.request("token:alice", 100.0) for _ in range(3)] == [None, None, None]
    assert limiter.request("token:alice", 100.0) == (
        "ERROR: limit: max_requests_per_second (4) exceeded; slow down"
    )
    assert limiter.request("token:alice", 100.25) is None
    assert limiter.request("token:alice", 100.25) is not None


def test_a_refused_request_costs_nothing() -> None:
    """Hammering while refused does not push the next allowed request further out."""
    limiter = Limiter(Limits(max_requests_per_second=1, request_burst=1))
    assert limiter.request("10.0.0.5", 0.0) is None
    for _ in range(100):
        assert limiter.request("10.0.0.5", 0.5) is not None
    assert limiter.request("10.0.0.5", 1.0) is None


def test_request_limits_are_per_identity() -> None:
    """Another identity, or another token behind the same address, has its own bucket."""
    limiter = Limiter(Limits(max_requests_per_second=1, request_burst=1))
    assert limiter.request("token:alice", 0.0) is None
    assert limiter.request("token:alice", 0.0) is not None
    assert limiter.request("token:bob", 0.0) is None
    assert limiter.request("198.51.100.4", 0.0) is None


# --- open leases -------------------------------------------------------------------------------


def test_an_identity_at_its_lease_limit_may_open_no_more() -> None:
    """With max_leases_per_identity held (as the pool counts them), a new lease is refused."""
    limiter = Limiter(Limits(max_leases_per_identity=3))
    assert limiter.open_lease("token:alice", 2) is None
    assert limiter.open_lease("token:alice", 3) == (
        "ERROR: limit: max_leases_per_identity (3) leases held; RELEASE one first"
    )


# --- launches a minute -------------------------------------------------------------------------


def test_launches_a_minute_count_burst_sizes() -> None:
    """A BURST of n uses n launches; past the limit the refusal says when to retry."""
    limiter = Limiter(Limits(max_launches_per_minute=10))
    assert limiter.launch("token:ops", 0.0, 6) is None
    assert limiter.launch("token:ops", 0.0, 4) is None
    assert limiter.launch("token:ops", 0.0, 1) == (
        "ERROR: limit: max_launches_per_minute (10) reached; retry in 6s"
    )
    assert limiter.launch("token:ops", 6.0, 1) is None  # 10 a minute: one every 6 s


def test_a_refused_launch_counts_nothing() -> None:
    """A BURST refused for its size leaves the identity's launches as they were."""
    limiter = Limiter(Limits(max_launches_per_minute=10))
    assert limiter.launch("token:ops", 0.0, 8) is None
    assert limiter.launch("token:ops", 0.0, 3) is not None
    assert limiter.launch("token:ops", 0.0, 2) is None


def test_a_burst_larger_than_the_limit_is_refused_outright() -> None:
    """n above max_launches_per_minute could never pass: the refusal says so."""
    limiter = Limiter(Limits(max_launches_per_minute=10))
    assert limiter.launch("token:ops", 0.0, 11) == (
        "ERROR: limit: max_launches_per_minute (10) is less than 11"
    )
    assert limiter.launch("token:ops", 0.0, 10) is None


def test_launch_limits_are_per_identity() -> None:
    """One identity's launches do not use another's."""
    limiter = Limiter(Limits(max_launches_per_minute=1))
    assert limiter.launch("token:ops", 0.0, 1) is None
    assert limiter.launch("token:ops", 0.0, 1) is not None
    assert limiter.launch("token:alice", 0.0, 1) is None


# --- off, and the values ---------------------------------------------------------------------


def test_a_limit_set_to_none_is_off() -> None:
    """None turns each limit off."""
    limiter = Limiter(
        Limits(
            max_connections_per_peer=None,
            max_requests_per_second=None,
            max_leases_per_identity=None,
            max_launches_per_minute=None,
        )
    )
    assert all(limiter.connection_opened("10.0.0.5") is None for _ in range(5000))
    assert all(limiter.request("10.0.0.5", 0.0) is None for _ in range(5000))
    assert limiter.open_lease("10.0.0.5", 10**6) is None
    assert limiter.launch("10.0.0.5", 0.0, 100) is None


@pytest.mark.parametrize(
    "field",
    ["max_connections_per_peer", "max_requests_per_second", "max_leases_per_identity"],
)
def test_a_limit_must_be_positive(field: str) -> None:
    """Zero or a negative number is refused when the limits are made (None is off)."""
    with pytest.raises(ValueError, match=field):
        Limits(**{field: 0})


def test_every_refusal_is_one_error_line_starting_with_the_prefix() -> None:
    """Each over-limit answer begins `ERROR: limit:` and is one line."""
    limiter = Limiter(
        Limits(
            max_connections_per_peer=1,
            max_requests_per_second=1,
            request_burst=1,
            max_leases_per_identity=1,
            max_launches_per_minute=1,
        )
    )
    limiter.connection_opened("p")
    limiter.request("p", 0.0)
    limiter.launch("p", 0.0, 1)
    refusals = [
        limiter.connection_opened("p"),
        limiter.request("p", 0.0),
        limiter.open_lease("p", 1),
        limiter.launch("p", 0.0, 1),
        limiter.launch("p", 0.0, 2),
    ]
    for refusal in refusals:
        assert refusal is not None
        assert refusal.startswith(LIMIT_PREFIX)
        assert "\n" not in refusal


# --- bounded memory ----------------------------------------------------------------------------


def test_idle_identities_are_forgotten_as_new_ones_come() -> None:
    """Identities seen once, a second apart, never pile up: buckets that have refilled are
    swept as the table grows, so it stays near the sweep size, not the identities seen."""
    limiter = Limiter(Limits(max_requests_per_second=20, request_burst=40))
    most = 0
    for n in range(20 * MIN_SWEEP):
        assert limiter.request(f"10.{n >> 16}.{(n >> 8) & 255}.{n & 255}", float(n)) is None
        assert limiter.launch(f"token:t{n}", float(n), 1) is None
        most = max(most, limiter.tracked)
    assert most <= 2 * (MIN_SWEEP + 1)


def test_forget_idle_drops_every_refilled_identity() -> None:
    """After a quiet spell every bucket has refilled and `forget_idle` leaves nothing."""
    limiter = Limiter()
    for n in range(5000):
        limiter.request(f"token:t{n}", 0.0)
        limiter.launch(f"token:t{n}", 0.0, 1)
    assert limiter.tracked == 10_000
    limiter.forget_idle(0.1)  # one request refills in 1/20 s; one launch in 60/100 s
    assert limiter.tracked == 5000
    limiter.forget_idle(1.0)
    assert limiter.tracked == 0


def test_many_busy_identities_at_once_are_capped_at_max_tracked() -> None:
    """Even when every identity is busy (nothing to sweep), at most max_tracked buckets are
    kept; the least recently seen are forgiven first."""
    limiter = Limiter(Limits(max_requests_per_second=1, request_burst=1, max_tracked=1000))
    for n in range(50_000):
        limiter.request(f"token:t{n}", 0.0)
    assert limiter.tracked <= 1000
    assert limiter.request("token:t49999", 0.0) is not None  # the latest are remembered
    assert limiter.request("token:t0", 0.0) is None  # the oldest were forgiven


def test_docs_security_md_quotes_each_refusal_with_the_default_values() -> None:
    """docs/security.md shows every limit's refusal as the defaults make it."""
    doc = (Path(__file__).resolve().parent.parent / "docs" / "security.md").read_text()
    limiter = Limiter()
    for _ in range(128):
        limiter.connection_opened("p")
    for _ in range(200):
        limiter.request("p", 0.0)
    limiter.launch("p", 0.0, 100)
    quoted = [
        limiter.connection_opened("p"),
        limiter.request("p", 0.0),
        limiter.open_lease("p", 256),
        limiter.launch("p", 0.0, 1),
    ]
    for text in quoted:
        assert text is not None
        assert f"`{text}`" in doc
