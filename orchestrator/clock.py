"""Time as a dependency: the supervisor reads and waits on time only through a :class:`Clock`.

Injecting the clock lets unit tests drive the whole state machine (backoffs, hang timeouts,
heartbeat ages) with a fake clock that advances instantly, without a single real sleep.
"""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    """Monotonic time for intervals, wall time for timestamps, and waiting."""

    def monotonic(self) -> float:
        """Seconds on a clock that never goes backwards (intervals, deadlines)."""
        ...

    def time(self) -> float:
        """Unix time (timestamps that other processes compare against)."""
        ...

    def sleep(self, seconds: float) -> None:
        """Wait ``seconds``; a signal handler may run meanwhile."""
        ...


class RealClock:
    """The system clocks."""

    def monotonic(self) -> float:
        return time.monotonic()

    def time(self) -> float:
        return time.time()

    def sleep(self, seconds: float) -> None:
        # The supervisor's loop pacing: this is the injected wait, not ad-hoc synchronisation.
        time.sleep(max(0.0, seconds))
