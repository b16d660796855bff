"""One fake clock for the whole test tree: time that only moves when someone sleeps or advances it.

:class:`FakeClock` implements :class:`orchestrator.clock.Clock` (``monotonic``, ``time``,
``sleep``) for the supervisor's state machine, and its bound ``monotonic`` serves code that takes
a plain ``Callable[[], float]`` (the cloud notices' token clock). ``sleep`` returns at once,
records what was asked and advances the clock; ``on_sleep`` runs after each sleep, which is how a
test makes something happen "while the supervisor waits" (a signal, a snapshot, an observation).
"""

from __future__ import annotations

from collections.abc import Callable

#: Wall-clock time at ``now == 0``: a plausible Unix time (2027) so that timestamps look real.
EPOCH = 1_800_000_000.0


class FakeClock:
    """Time that only moves when someone sleeps (or the test calls :meth:`advance`)."""

    def __init__(self, start: float = 0.0, *, epoch: float = EPOCH) -> None:
        #: Seconds on the monotonic clock; tests may read it and move it forward.
        self.now = float(start)
        self.epoch = epoch
        #: Every ``sleep`` argument, in order.
        self.sleeps: list[float] = []
        #: Called after every ``sleep`` (the clock has advanced already).
        self.on_sleep: Callable[[], None] | None = None

    def monotonic(self) -> float:
        return self.now

    def time(self) -> float:
        return self.epoch + self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.advance(seconds)
        if self.on_sleep is not None:
            self.on_sleep()

    def advance(self, seconds: float) -> None:
        """Move time forward (never back: a negative amount moves nothing, as a real sleep)."""
        self.now += max(0.0, seconds)


__all__ = ["EPOCH", "FakeClock"]
