"""The one bounded-polling helper (contract.polling.wait_until), driven by the fake clock."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from contract.polling import PollAborted, PollTimeout, wait_until
from tests.support.clock import FakeClock

pytestmark = pytest.mark.timeout(10)


def _poll(clock: FakeClock, predicate: Callable[[], Any], **kw: Any) -> Any:
    return wait_until(predicate, monotonic=clock.monotonic, sleep=clock.sleep, **kw)


def test_returns_the_first_truthy_value() -> None:
    clock = FakeClock()
    values = iter([None, 0, [], {"step": 7}])
    assert _poll(clock, lambda: next(values), timeout=10, what="x", interval=0.5) == {"step": 7}
    assert clock.sleeps == [0.5, 0.5, 0.5]


def test_true_at_once_never_sleeps() -> None:
    clock = FakeClock()
    assert _poll(clock, lambda: "yes", timeout=0, what="x") == "yes"
    assert clock.sleeps == []


def test_timeout_names_what_and_the_last_value_and_checks_at_the_deadline() -> None:
    clock = FakeClock()
    seen: list[float] = []

    def never() -> int:
        seen.append(clock.now)
        return 0

    with pytest.raises(PollTimeout) as info:
        _poll(clock, never, timeout=1.0, what="rank 1 to pass step 50", interval=0.3)
    err = info.value
    assert isinstance(err, TimeoutError)
    assert "rank 1 to pass step 50" in str(err) and "after 1s" in str(err) and "0" in str(err)
    assert (err.what, err.timeout, err.last) == ("rank 1 to pass step 50", 1.0, 0)
    # Sleeps never overshoot the deadline, and the last look is at the deadline itself.
    assert seen == pytest.approx([0.0, 0.3, 0.6, 0.9, 1.0])
    assert clock.now == pytest.approx(1.0)


class _LongFalsy:
    def __bool__(self) -> bool:
        return False

    def __repr__(self) -> str:
        return "y" * 10_000


def test_a_long_last_value_is_clipped_in_the_message() -> None:
    clock = FakeClock()
    last = _LongFalsy()
    with pytest.raises(PollTimeout) as info:
        _poll(clock, lambda: last, timeout=0.1, what="x")
    assert info.value.last is last
    assert len(str(info.value)) < 400 and str(info.value).endswith("...)")


def test_stop_if_gives_the_predicate_one_last_chance() -> None:
    clock = FakeClock()
    state = {"exited": False, "done": False}

    def stop() -> str | None:
        return "launcher exited 1" if state["exited"] else None

    def exit_after_finishing() -> None:
        if clock.now >= 1.0:
            state["exited"] = state["done"] = True

    clock.on_sleep = exit_after_finishing
    assert _poll(clock, lambda: state["done"], timeout=10, what="x", stop_if=stop, interval=0.5)


def test_stop_if_aborts_with_its_reason() -> None:
    clock = FakeClock()
    with pytest.raises(PollAborted) as info:
        _poll(clock, lambda: None, timeout=10, what="the warm spare",
              stop_if=lambda: "launcher exited 3" if clock.now >= 0.2 else None)
    assert str(info.value).startswith("launcher exited 3 while waiting for the warm spare")
    assert clock.now < 10


def test_real_clock_default_is_bounded() -> None:
    with pytest.raises(PollTimeout):
        wait_until(lambda: False, timeout=0.05, what="nothing", interval=0.01)
