"""Declared retries: a `Retry` policy says which errors are tried again, how many times, for how
long and how long to wait in between; `Retry.run` (or the policy used as a decorator) is the
one loop that carries it out, for every adapter. `instantly()` makes tests run the same retries
without waiting.

The policy's decisions (`wait`, `should_retry`) are pure, chance and time passed in; the loop
sleeps with Trio, so a cancelled caller stops retrying at once.
"""

from __future__ import annotations

import contextlib
import functools
import random
from collections.abc import Awaitable, Callable, Iterator
from typing import ParamSpec, TypeAlias, TypeVar

import attrs
import trio

_P = ParamSpec("_P")
_T = TypeVar("_T")

RetryOn: TypeAlias = type[Exception] | tuple[type[Exception], ...] | Callable[[Exception], bool]
"""The errors to retry: an exception class, a tuple of them, or a predicate."""

_instant = False


@attrs.frozen
class Retrying:
    """What an `on_retry` hook is told: attempt `attempt` (1 = the first) failed with `error`
    and the next one starts after `wait` seconds (the policy's wait, even when `instantly()`
    skips it)."""

    error: Exception
    attempt: int
    wait: float


def _positive(instance: object, attribute: attrs.Attribute[float], value: float) -> None:
    if not value > 0:
        raise ValueError(f"{attribute.name} must be > 0, not {value}")


def _positive_or_none(
    instance: object, attribute: attrs.Attribute[float | None], value: float | None
) -> None:
    if value is not None and not value > 0:
        raise ValueError(f"{attribute.name} must be > 0 or None, not {value}")


@attrs.frozen(kw_only=True)
class Retry:
    """A retry policy: up to `attempts` calls in all (the first one included), for errors that
    match `on`; any other error is raised at once.

    Before retry n (1 = the first retry) the loop waits exponentially longer, capped:
    `min(wait_max, wait_initial * 2 ** (n - 1))`, of which the share `wait_jitter` is random
    (1: "full jitter", a wait drawn from [0, that); 0.5: from [half of it, all of it); 0: no
    chance). With a `timeout` (seconds), no retry starts later than that after the first call
    began, waits included; calls already running are not cut (a cancel scope does that).
    """

    on: RetryOn
    attempts: int = attrs.field(validator=attrs.validators.ge(1))
    timeout: float | None = attrs.field(default=None, validator=_positive_or_none)
    wait_initial: float = attrs.field(default=0.1, validator=_positive)
    wait_max: float = attrs.field(default=5.0, validator=_positive)
    wait_jitter: float = attrs.field(
        default=1.0, validator=[attrs.validators.ge(0.0), attrs.validators.le(1.0)]
    )

    def retries(self, error: Exception) -> bool:
        """True if `error` is one this policy tries again (attempts and time aside)."""
        if isinstance(self.on, type | tuple):
            return isinstance(error, self.on)
        return self.on(error)

    def wait(self, retry: int, fraction: float) -> float:
        """Seconds to wait before retry number `retry`; `fraction` is drawn from [0, 1)."""
        ceiling = min(self.wait_max, self.wait_initial * 2.0 ** (retry - 1))
        return ceiling * (1.0 - self.wait_jitter + self.wait_jitter * fraction)

    def should_retry(self, error: Exception, attempt: int, elapsed: float) -> bool:
        """After call number `attempt` failed with `error`: call again, if the next call would
        start `elapsed` seconds after the first one began?"""
        if attempt >= self.attempts or not self.retries(error):
            return False
        return self.timeout is None or elapsed <= self.timeout

    async def run(
        self, fn: Callable[[], Awaitable[_T]], *, on_retry: Callable[[Retrying], None] | None = None
    ) -> _T:
        """Call `fn()` until it returns, retrying as the policy says; the last error is raised
        as it was. `on_retry` is told about each retry before its wait (to log it)."""
        started = trio.current_time()
        attempt = 1
        while True:
            try:
                return await fn()
            except Exception as error:
                wait = self.wait(attempt, random.random())
                pause = 0.0 if _instant else wait
                elapsed = trio.current_time() - started + pause
                if not self.should_retry(error, attempt, elapsed):
                    raise
                if on_retry is not None:
                    on_retry(Retrying(error, attempt, wait))
            await trio.sleep(pause)
            attempt += 1

    def __call__(self, fn: Callable[_P, Awaitable[_T]]) -> Callable[_P, Awaitable[_T]]:
        """The policy as a decorator: every call of the async function `fn` is retried."""

        @functools.wraps(fn)
        async def retried(*args: _P.args, **kwargs: _P.kwargs) -> _T:
            return await self.run(functools.partial(fn, *args, **kwargs))

        return retried


@contextlib.contextmanager
def instantly() -> Iterator[None]:
    """Within this block every retry starts without waiting: the same attempts, the same
    errors retried, the same `on_retry` calls, no sleep (so a `timeout` counts only the time
    spent in calls). For tests: the switch is module-wide; a block restores what it found."""
    global _instant
    before = _instant
    _instant = True
    try:
        yield
    finally:
        _instant = before
