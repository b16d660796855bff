"""The running attempt's progress, read from the ranks' heartbeats (and the watchdog's input).

Heartbeats (:class:`contract.documents.Heartbeat`) tell the supervisor the run's last completed
step, whether the attempt has made progress past its resume point (an attempt that did is never
part of a crash loop) and which snapshot the ranks actually resumed from (multi-node: another
node's may win). Activity is timed on the supervisor's own monotonic clock when *it* sees a
heartbeat change, immune to wall-clock jumps and to skew between the workers' clocks and its
own; ``--hang-timeout`` compares against that. :class:`AuditWatch` follows the ranks' resume
audit the same way.
"""

from __future__ import annotations

from typing import Any

from contract.documents import Heartbeat
from contract.paths import RunPaths
from orchestrator.clock import Clock
from orchestrator.runstate import EventLog, read_determinism, read_heartbeats


class AttemptProgress:
    """Step, progress and silence of the current attempt; see the module docstring."""

    def __init__(self, *, paths: RunPaths, clock: Clock, events: EventLog) -> None:
        self._paths = paths
        self._clock = clock
        self._events = events
        self._attempt = -1
        #: The run's last completed step (``status``'s ``step``); kept across attempts.
        self.step: int | None = None
        #: The snapshot the current (or last) attempt resumed from; None: fresh.
        self.resume_step: int | None = None
        #: A step past the resume point completed in this attempt.
        self.progressed = False
        self.last_beat: Heartbeat | None = None
        self._last_activity = 0.0
        #: Rank 0's report of the last snapshot: (training stall s, write s); kept across
        #: attempts until a newer one arrives.
        self.snapshot_timing: tuple[float | None, float | None] = (None, None)

    def begin(self, attempt: int, resume_step: int | None) -> None:
        """A new attempt starts from ``resume_step``."""
        self._attempt = attempt
        self.resume_step = resume_step
        if resume_step is not None:
            self.step = resume_step
        self.progressed = False
        self.last_beat = None
        self.touch()

    def touch(self) -> None:
        """Count now as activity (the attempt just started)."""
        self._last_activity = self._clock.monotonic()

    def silent_s(self) -> float:
        """Seconds since a heartbeat last changed (or the attempt started)."""
        return self._clock.monotonic() - self._last_activity

    def _baseline(self) -> int:
        # A fresh start heartbeats step 0 before training: only a completed step is progress.
        return 0 if self.resume_step is None else self.resume_step

    def note_snapshot(self, newest_local: int | None) -> None:
        """A snapshot newer than the resume point is progress too."""
        if newest_local is not None and newest_local > self._baseline():
            self.progressed = True

    def read(self) -> None:
        """Take in this attempt's heartbeats."""
        beats = [b for b in read_heartbeats(self._paths) if b.attempt == self._attempt]
        if not beats:
            return
        newest = max(beats, key=lambda b: (b.step, b.time))
        timed = [b for b in beats if b.snapshot_write_s is not None]
        if timed:
            self.snapshot_timing = (timed[0].snapshot_stall_s, timed[0].snapshot_write_s)
        resumed = {b.resumed_from for b in beats if b.resumed_from is not None}
        if resumed and max(resumed) != self.resume_step:
            # Multi-node: the ranks agreed on a newer snapshot than this node's own (another
            # node's disk, or the mirror through another node). Status reports what they did.
            self.resume_step = max(resumed)
            self._events.emit(
                "supervisor.resumed_elsewhere", attempt=self._attempt, step=self.resume_step
            )
        self.step = newest.step if self.step is None else max(self.step, newest.step)
        if newest.step > self._baseline() and not self.progressed:
            self.progressed = True
            # The first completed step of the attempt: where start-up, load and the wait for
            # the group end (goodput accounting measures an incident's cost up to here).
            self._events.emit("supervisor.progress_resumed", attempt=self._attempt,
                              step=newest.step, resume_step=self.resume_step,
                              step_time=newest.time)
        last = self.last_beat
        if last is None or (newest.step, newest.time) != (last.step, last.time):
            self.touch()
        self.last_beat = newest

    def heartbeat_age_s(self) -> float | None:
        """Wall-clock age of the newest heartbeat (``status``'s ``heartbeat_age_s``)."""
        if self.last_beat is None:
            return None
        return max(0.0, round(self._clock.time() - self.last_beat.time, 3))


class AuditWatch:
    """The ranks' resume audit (``run/determinism/``) as the supervisor last saw it.

    ``refresh()`` re-reads the reports (a listdir and a few small files, at scan time) and, when
    the merged verdict changes, records it in ``events.jsonl``: ``resume.verified`` or
    ``resume.diverged``, the names the ranks log, so that a run's event history says whether
    its recoveries reproduced the failed attempts. ``document`` goes into ``state.json``.
    """

    def __init__(self, *, paths: RunPaths, events: EventLog, run_id: str) -> None:
        self._paths = paths
        self._events = events
        self._run_id = run_id
        self.document: dict[str, Any] = read_determinism(paths, run_id)

    def refresh(self, attempt: int) -> None:
        before, self.document = self.document, read_determinism(self._paths, self._run_id)
        doc = self.document
        if doc == before or doc["state"] == "unchecked":
            return
        if doc["state"] == "diverged":
            fields = {k: v for k, v in doc.items() if k != "state"}
            self._events.emit("resume.diverged", attempt=attempt, **fields)
        else:
            self._events.emit("resume.verified", attempt=attempt,
                              checked_through_step=doc["checked_through_step"])
