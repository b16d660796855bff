"""Fault injection for tests: ``ORCH_FAULTS`` rules that SIGKILL a process at chosen points.

A rule is ``POINT@STEP[:rank=R][:attempt=A]``; rules are comma-separated. The default attempt is
0 so that a fault fires in the first launch only and the relaunch runs clean. Without ``rank``
a rule matches every rank that reaches the point (the snapshot phases are reached by rank 0
only). Worker points are reached by the trainer; ``mirror_*`` points by the supervisor's mirror
(which has no rank: only rules without ``rank`` match there). The action is always ``SIGKILL``
of the current process, the hardest failure there is. It lives in ``storage`` because both the
workers and the torch-free supervisor use it.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass

#: Points at which the trainer calls :meth:`FaultInjector.point`.
WORKER_POINTS = ("step_end", "after_staging", "after_files", "before_rename", "after_commit")
#: Points at which the supervisor's mirror calls it: after the first data part of a snapshot
#: reached the object store, and with every data object uploaded but no manifest yet.
MIRROR_POINTS = ("mirror_after_part", "mirror_before_manifest")
POINTS = WORKER_POINTS + MIRROR_POINTS


@dataclass(frozen=True, kw_only=True)
class FaultRule:
    """One parsed rule: kill at ``point`` of ``step`` on ``rank`` (any when None) in ``attempt``."""

    point: str
    step: int
    rank: int | None = None
    attempt: int = 0

    def __post_init__(self) -> None:
        if self.point not in POINTS:
            raise ValueError(f"unknown fault point {self.point!r}; expected one of {POINTS}")
        if self.step < 0:
            raise ValueError(f"fault step must be >= 0, got {self.step}")
        if self.rank is not None and self.rank < 0:
            raise ValueError(f"fault rank must be >= 0, got {self.rank}")
        if self.attempt < 0:
            raise ValueError(f"fault attempt must be >= 0, got {self.attempt}")

    def matches(self, point: str, step: int, *, rank: int | None, attempt: int) -> bool:
        """Tell whether this rule fires at ``point`` of ``step`` for ``rank`` and ``attempt``."""
        return (
            self.point == point
            and self.step == step
            and self.attempt == attempt
            and (self.rank is None or self.rank == rank)
        )


def parse_faults(spec: str) -> tuple[FaultRule, ...]:
    """Parse an ``ORCH_FAULTS`` value; raise ValueError naming the bad rule."""
    rules: list[FaultRule] = []
    for raw in spec.split(","):
        text = raw.strip()
        if not text:
            continue
        head, *options = text.split(":")
        point, sep, step_text = head.partition("@")
        if not sep:
            raise ValueError(f"fault rule {text!r} lacks '@STEP'")
        try:
            step = int(step_text)
        except ValueError:
            raise ValueError(f"fault rule {text!r}: step {step_text!r} is not an integer") from None
        fields: dict[str, int] = {}
        for option in options:
            key, eq, value = option.partition("=")
            key = key.strip()
            if not eq or key not in ("rank", "attempt"):
                raise ValueError(f"fault rule {text!r}: bad option {option!r} (rank=R or attempt=A)")
            if key in fields:
                raise ValueError(f"fault rule {text!r}: option {key!r} given twice")
            try:
                fields[key] = int(value)
            except ValueError:
                raise ValueError(f"fault rule {text!r}: {key} {value!r} is not an integer") from None
        try:
            rules.append(
                FaultRule(
                    point=point.strip(),
                    step=step,
                    rank=fields.get("rank"),
                    attempt=fields.get("attempt", 0),
                )
            )
        except ValueError as exc:
            raise ValueError(f"fault rule {text!r}: {exc}") from None
    return tuple(rules)


class FaultInjector:
    """Kills the current process when a rule matches; a no-op without rules."""

    def __init__(self, rules: tuple[FaultRule, ...], *, rank: int | None, attempt: int) -> None:
        self.rules = rules
        self.rank = rank
        self.attempt = attempt

    @classmethod
    def from_spec(cls, spec: str, *, rank: int | None, attempt: int) -> FaultInjector:
        """Build an injector from an ``ORCH_FAULTS`` value."""
        return cls(parse_faults(spec), rank=rank, attempt=attempt)

    def should_fire(self, name: str, step: int) -> bool:
        """Tell whether :meth:`point` would kill the process at ``name`` of ``step``."""
        return any(r.matches(name, step, rank=self.rank, attempt=self.attempt) for r in self.rules)

    def point(self, name: str, step: int) -> None:
        """Reach fault point ``name`` at ``step``: SIGKILL this process if a rule says so."""
        if name not in POINTS:
            raise ValueError(f"unknown fault point {name!r}")
        if self.rules and self.should_fire(name, step):
            os.kill(os.getpid(), signal.SIGKILL)
