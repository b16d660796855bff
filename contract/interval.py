"""The snapshot interval (``--checkpoint-every`` / ``ORCH_CHECKPOINT_EVERY``): one parser, one rule.

An interval is one of

* ``steps``: ``25`` snapshots every 25 steps; ``0`` means the final snapshot only;
* ``seconds``: ``90s``, ``10m``, ``1h`` (decimals allowed: ``1.5h``) snapshots at the first step
  boundary after that much time has passed since the previous snapshot (or since the start of
  the attempt); every rank agrees on the step (see :mod:`trainer.preemption`);
* ``auto`` (the default): a time interval chosen from the measured cost of the latest snapshot,
  see :func:`auto_interval_s`.

:func:`parse_interval` is the only parser: the supervisor validates the flag (and the TOML key)
with it, the worker contract reads the variable with it, ``Checkpointer(every=...)`` takes the
same forms. ``str(interval)`` is its canonical text, so ``parse_interval(str(i)) == i``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Final, Literal

IntervalKind = Literal["steps", "seconds", "auto"]

#: ``auto`` keeps the training thread's snapshot stall under this share of wall time.
AUTO_OVERHEAD: Final = 0.01
#: ``auto`` never snapshots more often than this (and takes its first snapshot this long after
#: the attempt started training, when the arena is reserved and the cost can be measured).
AUTO_MIN_INTERVAL_S: Final = 60.0

_UNITS: Final[dict[str, float]] = {"s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION: Final = re.compile(r"^(?P<number>\d+(?:\.\d+)?)(?P<unit>[smh])$")
_STEPS: Final = re.compile(r"^\d+$")
#: What a bad value is told it should look like.
FORMS: Final = "a number of steps (25; 0 = final snapshot only), a duration (90s, 10m, 1h) or auto"


@dataclass(frozen=True)
class Interval:
    """``kind`` and ``value``: steps (an integer >= 0), seconds (> 0) or auto (value 0)."""

    kind: IntervalKind
    value: float = 0

    def __post_init__(self) -> None:
        if self.kind == "steps":
            if not (float(self.value).is_integer() and self.value >= 0):
                raise ValueError(f"a step interval is an integer >= 0, got {self.value!r}")
        elif self.kind == "seconds":
            if not (math.isfinite(self.value) and self.value > 0):
                raise ValueError(f"a time interval is a finite number of seconds > 0, got {self.value!r}")
        elif self.kind == "auto":
            if self.value != 0:
                raise ValueError(f"the auto interval has no value, got {self.value!r}")
        else:
            raise ValueError(f"interval kind must be steps, seconds or auto, got {self.kind!r}")

    @property
    def steps(self) -> int:
        """The step interval (0 for time-based intervals and for final-only)."""
        return int(self.value) if self.kind == "steps" else 0

    @property
    def time_based(self) -> bool:
        """Whether snapshot steps depend on the clock (so the ranks must agree on them)."""
        return self.kind != "steps"

    def __str__(self) -> str:
        if self.kind == "auto":
            return "auto"
        if self.kind == "steps":
            return str(int(self.value))
        number = float(self.value)
        return f"{int(number)}s" if number.is_integer() else f"{number!r}s"


AUTO: Final = Interval("auto")
FINAL_ONLY: Final = Interval("steps", 0)


def parse_interval(text: str | int, *, name: str = "--checkpoint-every") -> Interval:
    """``25``, ``0``, ``90s``, ``10m``, ``1h``, ``auto`` (an int is a step count).

    ValueError names ``name`` (the flag, variable or argument the value came from).
    """
    if isinstance(text, bool) or not isinstance(text, (int, str)):
        raise ValueError(f"{name} must be {FORMS}, got {text!r}")
    if isinstance(text, int):
        if text < 0:
            raise ValueError(f"{name} must be {FORMS}, got {text!r}")
        return Interval("steps", text)
    raw = text.strip().lower()
    if raw == "auto":
        return AUTO
    if _STEPS.match(raw):
        return Interval("steps", int(raw))
    m = _DURATION.match(raw)
    if m is not None:
        seconds = float(m.group("number")) * _UNITS[m.group("unit")]
        if seconds > 0 and math.isfinite(seconds):
            return Interval("seconds", seconds)
    raise ValueError(f"{name} must be {FORMS}, got {text!r}")


def auto_interval_s(last_stall_s: float | None, max_interval_s: float) -> float:
    """The ``auto`` interval in seconds after a snapshot that stalled training ``last_stall_s``.

    ``1 / AUTO_OVERHEAD`` (100) times the stall, so the stall stays under 1% of wall time; at
    least :data:`AUTO_MIN_INTERVAL_S` (a cheap snapshot is still not worth taking every few
    steps: every one is a directory on disk and two hash passes on the writer's threads); at
    most ``max_interval_s`` (``ORCH_MAX_SNAPSHOT_INTERVAL_S``), which also wins over the minimum.
    ``None`` (nothing measured yet in this attempt): the minimum, i.e. the first snapshot.
    """
    if not max_interval_s > 0:
        raise ValueError(f"max_interval_s must be > 0, got {max_interval_s}")
    wanted = AUTO_MIN_INTERVAL_S
    if last_stall_s is not None and last_stall_s > 0:
        wanted = max(wanted, last_stall_s / AUTO_OVERHEAD)
    return min(wanted, max_interval_s)
