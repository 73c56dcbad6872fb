"""Pacing AWS requests: a token bucket, pure (time passed in). Retries are `broker.retry`.

EC2 throttles each API per account and Region with a token bucket; pacing our requests with a
bucket of the same size and refill rate keeps the broker alone from emptying EC2's (and being
answered `RequestLimitExceeded`).
"""

from __future__ import annotations

import attrs


def _positive(instance: object, attribute: attrs.Attribute[float], value: float) -> None:
    if not value > 0:
        raise ValueError(f"{attribute.name} must be > 0, not {value}")


@attrs.define
class TokenBucket:
    """Holds up to `capacity` tokens, refilled at `rate` tokens a second; starts full.

    Every request takes one token. When none is left the request still gets one, reserved
    ahead of time: the bucket goes into debt and `reserve` says how long to wait, so callers
    that reserve one after another are spaced `1 / rate` seconds apart, first come first served.
    """

    capacity: float = attrs.field(validator=_positive)
    rate: float = attrs.field(validator=_positive)
    _tokens: float = attrs.field(init=False)
    _updated: float | None = attrs.field(init=False, default=None)

    def __attrs_post_init__(self) -> None:
        self._tokens = self.capacity

    def reserve(self, now: float) -> float:
        """Take a token at time `now` (seconds, any monotonic origin); return how many seconds
        the caller must wait before sending its request (0 when a token was there)."""
        self._tokens = self.available(now) - 1
        self._updated = now if self._updated is None else max(now, self._updated)
        return max(0.0, -self._tokens / self.rate)

    def available(self, now: float) -> float:
        """Tokens in the bucket at `now` (negative while requests are waiting); takes none."""
        if self._updated is None:
            return self._tokens
        elapsed = max(0.0, now - self._updated)
        return min(self.capacity, self._tokens + elapsed * self.rate)
