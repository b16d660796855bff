"""``launch --warm-spare``: the next attempt's worker group, started before it is needed.

Once the running attempt has made progress, a second group is started for the next attempt; its
ranks import, build their model and join their process group, then wait in
``Checkpointer.resume()`` for a gate file. When the running attempt fails, the supervisor
*promotes* the spare by writing the gate (:class:`contract.documents.SpareGate`, naming the
verified resume step) instead of launching a group cold. A spare that exited, or that was
started for another attempt, is discarded; so is any spare on preemption and at the end.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable

from contract.documents import SpareGate, write_document
from contract.paths import RunPaths
from orchestrator.launcher import WorkerGroup
from orchestrator.runstate import EventLog


class WarmSpare:
    """At most one spare group; see the module docstring. Inactive without a ``factory``."""

    def __init__(
        self,
        *,
        factory: Callable[[], WorkerGroup] | None,
        paths: RunPaths,
        events: EventLog,
    ) -> None:
        #: Makes the group started ahead of the next attempt; None: no spares (or given up).
        self.factory = factory
        self._paths = paths
        self._events = events
        self._group: WorkerGroup | None = None
        self._attempt = -1

    def wanted(self) -> bool:
        """Whether a spare should be started now (enabled and none waiting)."""
        return self.factory is not None and self._group is None

    def start(self, attempt: int) -> None:
        """Start the group for ``attempt``; it waits, started up, until promoted.

        Only once the running attempt has made progress (the caller's rule): a spare starting
        beside a group that is itself still starting would slow both, and a crash loop needs no
        spare. A spare that cannot be started turns spares off for the run (plain relaunches).
        """
        if self.factory is None:
            return
        gate = self._paths.spare_gate(attempt)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(gate)
        os.makedirs(os.path.dirname(gate), exist_ok=True)
        spare = self.factory()
        try:
            spare.start(attempt, None, spare_gate=gate)
        except OSError as exc:
            self._events.emit("supervisor.spare_failed", attempt=attempt, error=str(exc))
            self.factory = None
            return
        self._group, self._attempt = spare, attempt
        self._events.emit("supervisor.spare_started", attempt=attempt)

    def promote(self, attempt: int, resume_step: int | None) -> WorkerGroup | None:
        """Hand ``attempt`` to the waiting spare and return its group; None when it cannot
        take it (none, started for another attempt, or exited: then it is discarded)."""
        spare = self._group
        if spare is None:
            return None
        if self._attempt != attempt or spare.poll() is not None:
            self.discard("stale" if self._attempt != attempt else "exited")
            return None
        write_document(
            self._paths.spare_gate(attempt),
            SpareGate(attempt=attempt, resume_step=resume_step),
            durable=False,
        )
        self._group = None
        self._events.emit("supervisor.spare_promoted", attempt=attempt, resume_step=resume_step)
        return spare

    def discard(self, reason: str) -> None:
        """Kill the waiting spare, if any (``supervisor.spare_discarded``)."""
        spare, self._group = self._group, None
        if spare is not None:
            spare.kill()
            self._events.emit("supervisor.spare_discarded", attempt=self._attempt, reason=reason)
