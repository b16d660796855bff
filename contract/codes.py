"""Exit codes and supervisor phases: the numbers and names both sides of the process boundary share.

A worker's exit status is how it tells the supervisor whether a relaunch can help, and the
supervisor's own exit status is how ``orchestrator launch`` tells its caller (a shell, SLURM,
Kubernetes) what happened; the phase names appear in ``state.json`` and ``status --json``. They
are defined here once so that the two processes, ``status`` and the tests cannot disagree.
"""

from __future__ import annotations

from enum import Enum
from typing import Final

#: ``launch`` finished, or a worker finished its script.
EXIT_OK: Final = 0
#: ``launch`` failed (restart budget spent or unrecoverable); a worker failed in a way a
#: relaunch may fix.
EXIT_FAILED: Final = 1
#: ``launch``: usage or configuration error, nothing launched.
EXIT_USAGE: Final = 2
#: Preempted after a committed emergency snapshot: relaunch to resume (sysexits EX_TEMPFAIL).
#: The same number for a worker and for ``launch``.
EXIT_PREEMPTED: Final = 75
#: A worker failed in a way a relaunch cannot fix: a changed configuration, bad arguments, a
#: different world size (sysexits EX_CONFIG).
EXIT_FATAL: Final = 78


class Phase(str, Enum):
    """Supervisor phases; the values appear in ``state.json`` and ``status``.

    Allowed transitions (:meth:`can_enter`, enforced by :meth:`check_transition`):

    - ``starting`` -> ``running`` (the group started), ``checkpointing`` (preempted before the
      group started), ``failed`` (the group cannot be started, interrupted).
    - ``running`` -> ``done`` (exit 0), ``starting`` (the ranks stopped for a preemption signalled
      to them directly: relaunch at once), ``recovering`` (a failure with budget left),
      ``checkpointing`` (preemption), ``failed`` (fatal, budget spent, crash loop, interrupted).
    - ``recovering`` -> ``starting`` (backoff over), ``checkpointing``, ``failed`` (interrupted).
    - ``checkpointing`` -> ``done`` (the run finished first), ``preempted`` (emergency snapshot
      committed, or no group was running), ``failed`` (no snapshot within ``--grace``).
    - ``done``, ``preempted``, ``failed`` are terminal: nothing leaves them.

    Re-entering the current phase is allowed (it only rewrites ``state.json``). The supervisor's
    own error handler is the one exception: an error while recording a terminal phase (its
    ``state.json`` write) still ends in ``failed``.
    """

    STARTING = "starting"
    RUNNING = "running"
    RECOVERING = "recovering"
    CHECKPOINTING = "checkpointing"
    DONE = "done"
    PREEMPTED = "preempted"
    FAILED = "failed"

    @property
    def terminal(self) -> bool:
        """Whether the supervisor has ended in this phase."""
        return self in TERMINAL_PHASES

    def can_enter(self, target: Phase) -> bool:
        """Whether the supervisor may go from this phase to ``target``."""
        if target is self:
            return not self.terminal
        return target in _TRANSITIONS[self]

    def check_transition(self, target: Phase) -> None:
        """Raise :class:`IllegalTransition` unless ``self -> target`` is allowed."""
        if not self.can_enter(target):
            raise IllegalTransition(self, target)


class IllegalTransition(RuntimeError):
    """The supervisor tried a phase change its state machine does not allow (a bug)."""

    def __init__(self, source: Phase, target: Phase) -> None:
        super().__init__(f"illegal phase transition {source.value} -> {target.value}")
        self.source = source
        self.target = target


TERMINAL_PHASES: Final = frozenset({Phase.DONE, Phase.PREEMPTED, Phase.FAILED})
#: The terminal phases' names, as ``state.json`` spells them.
TERMINAL_PHASE_NAMES: Final = frozenset(p.value for p in TERMINAL_PHASES)

_TRANSITIONS: Final[dict[Phase, frozenset[Phase]]] = {
    Phase.STARTING: frozenset({Phase.RUNNING, Phase.CHECKPOINTING, Phase.FAILED}),
    Phase.RUNNING: frozenset(
        {Phase.DONE, Phase.STARTING, Phase.RECOVERING, Phase.CHECKPOINTING, Phase.FAILED}
    ),
    Phase.RECOVERING: frozenset({Phase.STARTING, Phase.CHECKPOINTING, Phase.FAILED}),
    Phase.CHECKPOINTING: frozenset({Phase.DONE, Phase.PREEMPTED, Phase.FAILED}),
    Phase.DONE: frozenset(),
    Phase.PREEMPTED: frozenset(),
    Phase.FAILED: frozenset(),
}
