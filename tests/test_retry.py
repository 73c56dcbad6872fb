"""`broker.retry`: the policy's decisions with plain numbers, the loop on Trio's MockClock
(virtual time, no I/O, no real waiting)."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from broker import retry
from broker.retry import Retry, Retrying


class Transient(Exception):
    """An error the policies below retry."""


class Fatal(Exception):
    """An error they do not."""


def fixed(attempts: int, *, wait: float = 1.0, timeout: float | None = None) -> Retry:
    """A policy without chance: every wait is `wait`."""
    return Retry(
        on=Transient,
        attempts=attempts,
        timeout=timeout,
        wait_initial=wait,
        wait_max=wait,
        wait_jitter=0.0,
    )


class Flaky:
    """An async callable that raises the given errors in turn, then returns "done"."""

    def __init__(self, *errors: Exception) -> None:
        self.errors = list(errors)
        self.calls: list[float] = []  # trio.current_time() of each call

    async def __call__(self) -> str:
        self.calls.append(trio.current_time())
        await trio.lowlevel.checkpoint()
        if self.errors:
            raise self.errors.pop(0)
        return "done"


# --- the policy, pure -------------------------------------------------------------------------


def test_waits_double_from_wait_initial_up_to_wait_max() -> None:
    """Without jitter, retry n waits min(wait_max, wait_initial * 2 ** (n - 1))."""
    policy = Retry(on=Transient, attempts=6, wait_initial=0.5, wait_max=3.0, wait_jitter=0.0)
    assert [policy.wait(n, 0.7) for n in range(1, 6)] == [0.5, 1.0, 2.0, 3.0, 3.0]


def test_full_jitter_draws_a_wait_below_the_ceiling() -> None:
    """With wait_jitter 1 (the default) the wait is fraction * ceiling: anywhere in [0, it)."""
    policy = Retry(on=Transient, attempts=5, wait_initial=0.5, wait_max=10.0)
    assert [policy.wait(n, 1.0) for n in range(1, 5)] == [0.5, 1.0, 2.0, 4.0]
    assert policy.wait(3, 0.25) == 0.5
    assert policy.wait(1, 0.0) == 0.0


def test_partial_jitter_keeps_the_fixed_share_of_each_wait() -> None:
    """wait_jitter 0.5 draws each wait from [half the ceiling, the ceiling)."""
    policy = Retry(on=Transient, attempts=5, wait_initial=0.02, wait_jitter=0.5)
    assert policy.wait(2, 0.0) == pytest.approx(0.02)
    assert policy.wait(2, 0.5) == pytest.approx(0.03)
    assert policy.wait(4, 1.0) == pytest.approx(0.16)


def test_no_retry_after_the_last_attempt() -> None:
    """`attempts` counts every call: after call number `attempts`, the error is final."""
    policy = fixed(3)
    assert [policy.should_retry(Transient(), attempt, 0.0) for attempt in (1, 2, 3, 4)] == [
        True,
        True,
        False,
        False,
    ]
    assert not fixed(1).should_retry(Transient(), 1, 0.0)


def test_only_errors_matching_on_are_retried() -> None:
    """`on` is an exception class, a tuple of them, or a predicate; other errors are final."""
    by_class = Retry(on=Transient, attempts=2)
    by_tuple = Retry(on=(Transient, KeyError), attempts=2)
    by_predicate = Retry(on=lambda error: "again" in str(error), attempts=2)

    assert by_class.should_retry(Transient(), 1, 0.0)
    assert not by_class.should_retry(Fatal(), 1, 0.0)
    assert by_tuple.should_retry(KeyError("k"), 1, 0.0)
    assert not by_tuple.should_retry(Fatal(), 1, 0.0)
    assert by_predicate.should_retry(Fatal("try again"), 1, 0.0)
    assert not by_predicate.should_retry(Transient("no"), 1, 0.0)


def test_no_retry_would_start_after_the_timeout() -> None:
    """With a timeout, a retry is refused once it would start later than that after the
    first call began; without one, only the attempts count."""
    policy = fixed(10, timeout=5.0)
    assert policy.should_retry(Transient(), 2, 5.0)
    assert not policy.should_retry(Transient(), 2, 5.01)
    assert fixed(10).should_retry(Transient(), 2, 1e9)


@pytest.mark.parametrize(
    "settings",
    [
        {"attempts": 0},
        {"attempts": 2, "timeout": 0},
        {"attempts": 2, "wait_initial": 0},
        {"attempts": 2, "wait_max": -1},
        {"attempts": 2, "wait_jitter": 1.5},
        {"attempts": 2, "wait_jitter": -0.1},
    ],
)
def test_a_policy_refuses_settings_that_cannot_work(settings: dict[str, float]) -> None:
    """No attempt at all, a non-positive time or a jitter outside [0, 1] is refused."""
    with pytest.raises(ValueError):
        Retry(on=Transient, **settings)  # type: ignore[arg-type]


# --- the loop, on virtual time ----------------------------------------------------------------


async def test_run_retries_until_a_call_succeeds(autojump_clock: trio.testing.MockClock) -> None:
    """Two transient failures, then success: three calls, waits 1 and 2 s, the value returned,
    the hook told of each retry before its wait."""
    flaky = Flaky(Transient("one"), Transient("two"))
    policy = Retry(on=Transient, attempts=5, wait_initial=1.0, wait_jitter=0.0)
    told: list[Retrying] = []

    assert await policy.run(flaky, on_retry=told.append) == "done"

    assert flaky.calls == [0.0, 1.0, 3.0]
    assert [(r.attempt, r.wait, str(r.error)) for r in told] == [(1, 1.0, "one"), (2, 2.0, "two")]


async def test_run_raises_the_last_error_once_the_attempts_are_spent(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Failing every time: exactly `attempts` calls, then the last error as it was."""
    last = Transient("third")
    flaky = Flaky(Transient("first"), Transient("second"), last, Transient("never raised"))

    with pytest.raises(Transient) as caught:
        await fixed(3).run(flaky)

    assert caught.value is last
    assert len(flaky.calls) == 3


async def test_run_raises_an_error_not_retried_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """An error `on` does not match is raised after one call, without waiting."""
    flaky = Flaky(Fatal("no"))
    told: list[Retrying] = []

    with pytest.raises(Fatal):
        await fixed(5).run(flaky, on_retry=told.append)

    assert flaky.calls == [0.0]
    assert told == []


async def test_the_timeout_bounds_the_time_spent_retrying(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Waits of 1 s, timeout 3.5 s, attempts plenty: calls at 0, 1, 2 and 3 s; the next would
    start at 4 s, past the timeout, so the fourth error is raised at 3 s."""
    flaky = Flaky(*(Transient(str(n)) for n in range(100)))

    with pytest.raises(Transient, match=r"^3$"):
        await fixed(100, timeout=3.5).run(flaky)

    assert flaky.calls == [0.0, 1.0, 2.0, 3.0]
    assert trio.current_time() == 3.0


async def test_instantly_keeps_the_retries_and_drops_the_waits(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Under `instantly()`: the same calls and the same waits told to the hook, but no virtual
    time passes; after the block, waits are slept again."""
    told: list[Retrying] = []
    flaky = Flaky(Transient(), Transient())
    with retry.instantly():
        assert await fixed(5, wait=2.0).run(flaky, on_retry=told.append) == "done"
    assert flaky.calls == [0.0, 0.0, 0.0]
    assert [r.wait for r in told] == [2.0, 2.0]

    again = Flaky(Transient())
    assert await fixed(5, wait=2.0).run(again) == "done"
    assert [t - again.calls[0] for t in again.calls] == [0.0, 2.0]


async def test_instantly_blocks_restore_the_setting_they_found(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A nested block leaves the outer one instant; leaving the outer one restores waiting."""
    with retry.instantly():
        with retry.instantly():
            pass
        inner = Flaky(Transient())
        await fixed(2).run(inner)
        assert inner.calls == [0.0, 0.0]
    outer = Flaky(Transient())
    await fixed(2).run(outer)
    assert outer.calls[1] - outer.calls[0] == 1.0


async def test_the_policy_as_a_decorator_retries_every_call_with_its_arguments(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """`@policy` on an async function: each call is retried, arguments passed each time."""
    seen: list[tuple[int, str]] = []

    @fixed(3)
    async def add(x: int, *, label: str) -> str:
        seen.append((x, label))
        await trio.lowlevel.checkpoint()
        if len(seen) % 2:
            raise Transient
        return f"{label}={x + 1}"

    assert await add(1, label="a") == "a=2"
    assert await add(2, label="b") == "b=3"
    assert seen == [(1, "a"), (1, "a"), (2, "b"), (2, "b")]
    assert add.__name__ == "add"


async def test_cancelling_the_caller_stops_the_retries(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A cancel scope around the loop ends it during a wait: no call after the deadline."""
    flaky = Flaky(*(Transient() for _ in range(10)))

    with trio.move_on_after(2.5) as scope:
        await fixed(10).run(flaky)

    assert scope.cancelled_caught
    assert flaky.calls == [0.0, 1.0, 2.0]
