"""greenmail.shaping: the message rate limit and the 421 connection throttle, on a fake clock."""

from __future__ import annotations

import logging

import gevent
import pytest

from greenmail import shaping
from greenmail.shaping import THROTTLE_SECONDS, RateLimiter, Throttle


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    """A fake clock; gevent.sleep (as the limiter calls it) advances it instead of sleeping."""
    c = Clock()
    slept: list[float] = []

    def sleep(seconds: float = 0) -> None:
        assert seconds > 0
        slept.append(seconds)
        c.now += seconds

    monkeypatch.setattr(shaping.gevent, "sleep", sleep)
    c.slept = slept  # type: ignore[attr-defined]
    return c


def times(limiter: RateLimiter, clock: Clock, n: int) -> list[float]:
    """When each of ``n`` back-to-back waits returns, relative to the start."""
    start = clock.now
    out = []
    for _ in range(n):
        limiter.wait()
        out.append(round(clock.now - start, 9))
    return out


@pytest.mark.parametrize("rate, gap", [(4, 0.25), (1, 1.0), (0.5, 2.0), (100, 0.01)])
def test_messages_are_spaced_one_over_rate_apart(clock: Clock, rate: float, gap: float) -> None:
    limiter = RateLimiter(rate, clock)
    assert times(limiter, clock, 5) == pytest.approx([i * gap for i in range(5)])
    assert clock.slept == pytest.approx([gap] * 4)


def test_rate_zero_never_waits(clock: Clock) -> None:
    limiter = RateLimiter(0, clock)
    assert times(limiter, clock, 100) == [0.0] * 100
    assert clock.slept == []


def test_idle_time_is_not_saved_up_for_a_burst(clock: Clock) -> None:
    limiter = RateLimiter(2, clock)
    limiter.wait()
    clock.now += 60  # a minute without mail
    assert times(limiter, clock, 3) == pytest.approx([0.0, 0.5, 1.0])


def test_a_wait_after_part_of_the_gap_sleeps_only_the_rest(clock: Clock) -> None:
    limiter = RateLimiter(1, clock)
    limiter.wait()
    clock.now += 0.75
    limiter.wait()
    assert clock.slept == pytest.approx([0.25])


def test_the_limit_is_shared_by_concurrent_sessions() -> None:
    """Several greenlets on one limiter (real clock and sleep): the slots do not overlap."""
    limiter = RateLimiter(50)  # one every 20 ms
    done: list[float] = []

    def session() -> None:
        limiter.wait()
        done.append(limiter.clock())

    gevent.joinall([gevent.spawn(session) for _ in range(5)], timeout=5, raise_error=True)
    done.sort()
    assert len(done) == 5
    assert done[-1] - done[0] >= 4 * 0.02 - 0.005


def test_throttle_halves_down_to_one(clock: Clock, caplog: pytest.LogCaptureFixture) -> None:
    t = Throttle(10, clock)
    assert t.current == 10
    seen = []
    with caplog.at_level(logging.WARNING, logger="greenmail.shaping"):
        for _ in range(5):
            t.on_421()
            seen.append(t.current)
    assert seen == [5, 2, 1, 1, 1]
    assert "421" in caplog.text
    assert t.limit == 10


def test_throttle_of_one_stays_one(clock: Clock) -> None:
    t = Throttle(1, clock)
    t.on_421()
    assert t.current == 1


def test_throttle_restores_after_throttle_seconds(clock: Clock) -> None:
    t = Throttle(8, clock)
    t.on_421()
    clock.now += THROTTLE_SECONDS - 0.001
    assert t.current == 4
    clock.now += 0.001
    assert t.current == 8
    clock.now += 1000
    assert t.current == 8


def test_each_421_extends_the_throttle(clock: Clock) -> None:
    t = Throttle(8, clock)
    t.on_421()
    clock.now += THROTTLE_SECONDS / 2
    t.on_421()
    assert t.current == 2
    clock.now += THROTTLE_SECONDS / 2 + 1  # past the first 421's end, not the second's
    assert t.current == 2
    clock.now += THROTTLE_SECONDS / 2
    assert t.current == 8


def test_a_421_after_the_restore_halves_the_full_limit(clock: Clock) -> None:
    t = Throttle(8, clock)
    t.on_421()
    t.on_421()
    assert t.current == 2
    clock.now += THROTTLE_SECONDS + 1
    t.on_421()  # the old cut is over: half of 8, not half of 2
    assert t.current == 4
