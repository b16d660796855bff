"""Bounded polling: wait until an observable condition of another process holds, or give up.

Tests and the benchmark watch other processes through files, ports and ``/proc``; they poll.
:func:`wait_until` is the one such loop: it evaluates the predicate at least once, sleeps at most
``interval`` between evaluations, evaluates it once more at the deadline, and then raises
:class:`PollTimeout` naming what it waited for and the last (falsy) value it saw. ``stop_if``
lets a caller give up early (the process it waits on has exited): the predicate gets one last
chance, then :class:`PollAborted` is raised. Standard library only, no torch.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

_REPR_MAX = 300


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= _REPR_MAX else text[: _REPR_MAX - 3] + "..."


class PollTimeout(TimeoutError):
    """The deadline passed before the predicate held."""

    def __init__(self, what: str, timeout: float, last: object) -> None:
        super().__init__(f"timed out after {timeout:g}s waiting for {what} (last value: {_short(last)})")
        self.what = what
        self.timeout = timeout
        self.last = last


class PollAborted(RuntimeError):
    """``stop_if`` gave a reason to stop waiting before the predicate held."""

    def __init__(self, what: str, reason: str, last: object) -> None:
        super().__init__(f"{reason} while waiting for {what} (last value: {_short(last)})")
        self.what = what
        self.reason = reason
        self.last = last


def wait_until(
    predicate: Callable[[], T | None],
    *,
    timeout: float,
    what: str,
    interval: float = 0.05,
    stop_if: Callable[[], str | None] | None = None,
    monotonic: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """Poll ``predicate`` until it returns a truthy value, and return that value.

    ``timeout``: seconds from now after which :class:`PollTimeout` is raised (the predicate is
    evaluated once more at the deadline, never later). ``interval``: seconds between evaluations.
    ``stop_if``: called after each falsy evaluation; a non-empty string is a reason to stop
    (after one more evaluation of the predicate): :class:`PollAborted`. ``monotonic`` and
    ``sleep`` are injectable for tests of code built on this (a fake clock).
    """
    deadline = monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if stop_if is not None:
            reason = stop_if()
            if reason:
                value = predicate()
                if value:
                    return value
                raise PollAborted(what, reason, value)
        remaining = deadline - monotonic()
        if remaining <= 0:
            raise PollTimeout(what, timeout, value)
        sleep(min(interval, remaining))


__all__ = ["PollAborted", "PollTimeout", "wait_until"]
