"""How the mirror shares the machine with training: thread priority and a bandwidth cap.

Three parts, each small and testable without sleeping:

* :func:`lower_thread_priority`: the calling thread (Linux: nice and ionice are per thread)
  gets nice 19 and the lowest best-effort I/O priority (``ioprio_set``, class best-effort,
  level 7: it still progresses under sustained I/O, which the idle class would not promise).
  Refusals (EPERM in a locked-down container, another OS) are logged once and ignored.
* :class:`TokenBucket`: a byte-rate limit shared by every thread of one mirror, in the GCRA
  form (a reservation of ``n`` bytes moves a "theoretical arrival time" forward by
  ``n / rate``; a reservation that would land more than ``burst_s`` ahead waits the
  difference). The wait goes through an injected ``wait(seconds) -> interrupted`` (the mirror
  passes its closing event's ``wait``, so ``Mirror.close()`` interrupts it at once) and the
  clock is injected too: the unit tests drive it with a fake clock.
* :class:`AutoCap`: ``ORCH_MIRROR_MAX_MBPS=auto``. The supervisor feeds it the ranks'
  heartbeats (step, the step's wall time); it splits time into windows of ``window_s`` and
  measures the training step rate in each from the heartbeats' own timestamps. Windows in which
  the mirror was idle set the baseline (the median of the last five). At the end of each window
  in which the mirror uploaded throughout:

  - steps/s more than ``slowdown`` (5 %) below the baseline: **halve** the cap (halve the
    bytes/s the mirror actually sent in the window, when that is lower than the cap or no cap
    is set yet), never below ``min_bps`` (the mirror always progresses);
  - otherwise **raise it by 25 %**; a cap that the mirror did not reach by half in that window
    (it does not bind) is lifted (unlimited again).

  Windows without two heartbeats that advanced, windows that mix idle and uploading time, a
  step counter that went backwards (a restart) and uploads before any idle baseline exist make
  no decision (the cap is held), and so do windows in which the mirror sent nothing.
"""

from __future__ import annotations

import collections
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from contract.priority import PrioritySetter as _PrioritySetter
from contract.priority import lower_thread_priority as _lower

log = structlog.get_logger("orchestrator.throttle")

MB = 1_000_000

# -- thread priority ------------------------------------------------------------------------

# The primitive is shared with the ranks' snapshot writer (contract.priority).
PrioritySetter = _PrioritySetter


def lower_thread_priority(setter: PrioritySetter | None = None) -> None:
    """Nice 19 and best-effort I/O level 7 for the calling mirror thread (Linux); failures are
    logged once (``mirror.priority_unavailable``)."""
    _lower(setter, event="mirror.priority_unavailable")


# -- the byte-rate limit --------------------------------------------------------------------


class Interrupted(Exception):
    """A wait of the bucket was interrupted (the mirror is closing)."""


class TokenBucket:
    """Bytes per second shared by all threads; ``rate_bps`` None: unlimited.

    ``take(n)`` returns when ``n`` more bytes may go: over any span of time ``T`` the grants
    add up to at most ``rate * T + burst`` (``burst = rate * burst_s``) while the rate holds.
    Thread-safe; waits are made through ``wait`` outside the lock.
    """

    def __init__(
        self,
        rate_bps: float | None,
        *,
        burst_s: float = 0.05,
        clock: Callable[[], float] = time.monotonic,
        wait: Callable[[float], bool] | None = None,
    ) -> None:
        self._lock = threading.Lock()
        self._clock = clock
        self._wait = wait if wait is not None else _never_interrupted
        self._burst_s = burst_s
        self._rate: float | None = None
        self._tat = 0.0  # when the bytes granted so far have "drained" at the rate
        self.granted = 0  # bytes granted, all threads (the controller's send rate)
        self.set_rate(rate_bps)

    @property
    def rate_bps(self) -> float | None:
        with self._lock:
            return self._rate

    def set_rate(self, rate_bps: float | None) -> None:
        """A new rate (None: unlimited); the backlog already reserved is rescaled to it."""
        if rate_bps is not None and not rate_bps > 0:
            raise ValueError(f"rate must be > 0 bytes/s, got {rate_bps}")
        with self._lock:
            now = self._clock()
            old = self._rate
            if old is not None and rate_bps is not None and self._tat > now:
                self._tat = now + (self._tat - now) * old / rate_bps
            elif rate_bps is None or old is None:
                self._tat = now
            self._rate = rate_bps

    def take(self, nbytes: int) -> None:
        """Block until ``nbytes`` may be sent; :class:`Interrupted` when the wait is cut."""
        with self._lock:
            self.granted += nbytes
            rate = self._rate
            if rate is None:
                return
            now = self._clock()
            self._tat = max(self._tat, now) + nbytes / rate
            due = self._tat - self._burst_s
        while True:
            left = due - self._clock()
            if left <= 0 or self._rate is None:  # None: the cap was lifted meanwhile
                return
            if self._wait(left):
                raise Interrupted()


def _never_interrupted(seconds: float) -> bool:
    threading.Event().wait(seconds)
    return False


# -- the automatic cap ----------------------------------------------------------------------


@dataclass(frozen=True)
class Decision:
    """What :meth:`AutoCap.observe` decided at the end of a window."""

    action: str  # "backoff", "raise", "lift", "baseline"
    cap_bps: float | None
    steps_per_s: float
    baseline_steps_per_s: float | None


class AutoCap:
    """The rule of the module docstring; pure (no clock of its own, no threads)."""

    def __init__(
        self,
        *,
        min_bps: float,
        window_s: float = 5.0,
        slowdown: float = 0.05,
        backoff: float = 0.5,
        increase: float = 1.25,
    ) -> None:
        if not min_bps > 0 or not window_s > 0:
            raise ValueError("min_bps and window_s must be > 0")
        self.min_bps = min_bps
        self.window_s = window_s
        self.slowdown = slowdown
        self.backoff = backoff
        self.increase = increase
        self.cap_bps: float | None = None
        self._idle_rates: collections.deque[float] = collections.deque(maxlen=5)
        self._start: float | None = None  # window start (the observer's monotonic clock)
        self._first: tuple[int, float] | None = None  # (step, step time) at the window start
        self._last: tuple[int, float] | None = None
        self._sent0 = 0
        self._states: set[bool] = set()

    @property
    def baseline(self) -> float | None:
        return statistics.median(self._idle_rates) if self._idle_rates else None

    def observe(
        self, now: float, step: int, step_time: float, *, uploading: bool, sent_bytes: int
    ) -> Decision | None:
        """One heartbeat seen at ``now``; the decision when it closes a window, else None.

        ``sent_bytes``: the mirror's bytes granted so far (monotonic counter).
        """
        last = self._last
        if last is not None and step < last[0]:
            self._reset(now, step, step_time, uploading, sent_bytes)  # a restart: start over
            return None
        if self._start is None or self._first is None:
            self._reset(now, step, step_time, uploading, sent_bytes)
            return None
        self._states.add(uploading)
        self._last = (step, step_time)
        if now - self._start < self.window_s - 1e-9:  # float ticks: 25 x 0.2 s is a window
            return None
        first, states, sent = self._first, self._states, sent_bytes - self._sent0
        elapsed = now - self._start
        self._reset(now, step, step_time, uploading, sent_bytes)
        steps, dt = step - first[0], step_time - first[1]
        if steps <= 0 or dt <= 0 or len(states) != 1:
            return None
        rate = steps / dt
        if states == {False}:
            self._idle_rates.append(rate)
            return Decision("baseline", self.cap_bps, rate, self.baseline)
        base = self.baseline
        if base is None or sent <= 0:
            return None  # no idle baseline yet, or nothing sent: the slowdown is not ours
        sent_bps = sent / elapsed
        if rate < base * (1.0 - self.slowdown):
            current = sent_bps if self.cap_bps is None else min(self.cap_bps, sent_bps)
            self.cap_bps = max(self.min_bps, current * self.backoff)
            return Decision("backoff", self.cap_bps, rate, base)
        if self.cap_bps is None:
            return None
        if sent_bps < 0.5 * self.cap_bps:
            self.cap_bps = None
            return Decision("lift", None, rate, base)
        self.cap_bps *= self.increase
        return Decision("raise", self.cap_bps, rate, base)

    def _reset(self, now: float, step: int, step_time: float, uploading: bool, sent: int) -> None:
        self._start = now
        self._first = self._last = (step, step_time)
        self._sent0 = sent
        self._states = {uploading}
