"""The per-user rate limit: a sliding minute, per user, with a table that does not grow forever."""

from __future__ import annotations

from core.ratelimit import RateLimiter


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_user_gets_n_turns_a_minute_and_others_are_unaffected() -> None:
    clock = Clock()
    limiter = RateLimiter(3, clock)

    assert [limiter.allow("a") for _ in range(4)] == [True, True, True, False]
    assert limiter.allow("b")
    clock.now = 60.0
    assert limiter.allow("a")


def test_zero_turns_the_limit_off() -> None:
    limiter = RateLimiter(0)

    assert all(limiter.allow("a") for _ in range(1000))


def test_users_gone_quiet_are_forgotten() -> None:
    clock = Clock()
    limiter = RateLimiter(5, clock)
    for user in range(1000):
        clock.now = user * 1.0
        limiter.allow(str(user))

    assert len(limiter) <= 2 * 64 + 60


def test_refused_messages_do_not_extend_the_window() -> None:
    """A flooder is refused, not punished forever: only admitted messages count against the minute."""
    clock = Clock()
    limiter = RateLimiter(2, clock)
    assert [limiter.allow("a") for _ in range(2)] == [True, True]

    for second in range(1, 60):
        clock.now = float(second)
        assert not limiter.allow("a")

    clock.now = 60.0
    assert [limiter.allow("a") for _ in range(3)] == [True, True, False]
