"""`TokenBucket` with plain numbers: no clock, no I/O."""

from __future__ import annotations

import pytest

from broker.ratelimit import TokenBucket


def test_a_full_bucket_lets_a_burst_through_without_waiting() -> None:
    """Up to `capacity` requests at one instant wait for nothing."""
    bucket = TokenBucket(capacity=3, rate=1)
    assert [bucket.reserve(100.0) for _ in range(3)] == [0.0, 0.0, 0.0]


def test_requests_beyond_the_burst_are_spaced_one_refill_apart() -> None:
    """Past the burst each request waits one more 1/rate than the one before it."""
    bucket = TokenBucket(capacity=2, rate=4)
    delays = [bucket.reserve(10.0) for _ in range(5)]
    assert delays == [0.0, 0.0, 0.25, 0.5, 0.75]


def test_the_bucket_refills_at_rate_up_to_capacity() -> None:
    """An idle bucket refills at `rate` a second and never holds more than `capacity`."""
    bucket = TokenBucket(capacity=2, rate=10)
    bucket.reserve(0.0)
    bucket.reserve(0.0)
    assert bucket.available(0.05) == pytest.approx(0.5)
    assert bucket.reserve(0.05) == pytest.approx(0.05)
    assert bucket.available(60.0) == 2


def test_waiting_requests_put_the_bucket_in_debt() -> None:
    """Reserved tokens are owed: a later request queues behind the earlier ones."""
    bucket = TokenBucket(capacity=1, rate=2)
    assert bucket.reserve(0.0) == 0.0
    assert bucket.reserve(0.0) == 0.5
    assert bucket.reserve(0.0) == 1.0
    assert bucket.available(0.0) == -2
    # Half a second on, one of the owed tokens has come in; the next still waits for two.
    assert bucket.reserve(0.5) == 1.0


def test_time_going_backwards_refills_nothing() -> None:
    """A `now` earlier than the last one neither adds nor removes tokens."""
    bucket = TokenBucket(capacity=1, rate=1)
    bucket.reserve(5.0)
    assert bucket.reserve(4.0) == 1.0


def test_a_bucket_needs_positive_capacity_and_rate() -> None:
    """Zero or negative figures are refused when the bucket is made."""
    with pytest.raises(ValueError, match="capacity"):
        TokenBucket(capacity=0, rate=1)
    with pytest.raises(ValueError, match="rate"):
        TokenBucket(capacity=1, rate=-1)
