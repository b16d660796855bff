"""The shared fake clock (tests/support/clock.py) keeps the orchestrator.clock.Clock protocol."""

from __future__ import annotations

import pytest

from orchestrator.clock import Clock, RealClock
from tests.support.clock import EPOCH, FakeClock

pytestmark = pytest.mark.timeout(10)


def test_is_a_clock() -> None:
    clocks: list[Clock] = [FakeClock(), RealClock()]  # mypy checks the protocol here
    for clock in clocks:
        assert clock.time() > 1e9 and clock.monotonic() >= 0


def test_time_moves_only_when_someone_sleeps_or_advances() -> None:
    clock = FakeClock(start=1000.0)
    assert (clock.monotonic(), clock.time()) == (1000.0, EPOCH + 1000.0)
    assert clock.monotonic() == 1000.0
    clock.sleep(2.5)
    clock.advance(0.5)
    assert clock.monotonic() == 1003.0 and clock.time() == EPOCH + 1003.0
    assert clock.sleeps == [2.5]


def test_never_goes_back_and_calls_the_hook_after_each_sleep() -> None:
    clock = FakeClock()
    seen: list[float] = []
    clock.on_sleep = lambda: seen.append(clock.now)
    clock.sleep(1.0)
    clock.sleep(-5.0)
    clock.advance(-1.0)
    assert seen == [1.0, 1.0] and clock.now == 1.0
    assert clock.sleeps == [1.0, -5.0]
