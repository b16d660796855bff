"""The supervisor's side of a preemption: ask for an emergency snapshot, wait, judge the outcome.

A preemption signal to the supervisor or a cloud notice starts it: the request file
(:class:`contract.documents.PreemptRequest`) asks every rank to stop at its next step boundary
after an emergency snapshot; the whole preemption (save and mirror flush) gets ``--grace``.
torchrun is not signalled: it runs in its own session, and a SIGTERM to it would have it SIGKILL
the ranks 30 s later whatever they are doing. :func:`judge` is the pure rule that turns how the
group ended into the run's ending: done, preempted (exit 75) or failed.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import structlog

from contract.codes import EXIT_FAILED, EXIT_OK, EXIT_PREEMPTED, Phase
from contract.documents import PreemptAck, PreemptRequest, read_document, write_document
from contract.paths import RunPaths
from orchestrator.clock import Clock
from orchestrator.launcher import WorkerGroup
from orchestrator.progress import AttemptProgress
from orchestrator.runstate import EventLog

log = structlog.get_logger("orchestrator.preempting")

@dataclass(frozen=True, kw_only=True)
class Ending:
    """How a preemption ends the run."""

    phase: Phase
    exit_code: int
    #: Counted as a preemption (``status``'s ``preemptions``).
    preempted: bool
    #: Failed: the root cause for ``last_failure``.
    failure: str | None = None


def judge(
    *, code: int | None, acked: int | None, timed_out: bool, source: str, grace: float,
    newest_local: int | None,
) -> Ending:
    """The ending of a preemption whose group exited ``code`` (None: no group was running).

    Exit 0 means the run finished before the request took effect. No group, or an acknowledged
    emergency snapshot, is a preemption. Anything else failed: the relaunch would resume from
    an older snapshot, which the operator must hear about.
    """
    if code == 0:
        return Ending(phase=Phase.DONE, exit_code=EXIT_OK, preempted=False)
    if code is None or acked is not None:
        return Ending(phase=Phase.PREEMPTED, exit_code=EXIT_PREEMPTED, preempted=True)
    why = (
        f"the workers did not commit an emergency snapshot within --grace {grace:g}s"
        if timed_out
        else f"the workers exited {code} without committing an emergency snapshot"
    )
    failure = f"preempted by {source}: {why}; newest local snapshot: {newest_local}"
    return Ending(phase=Phase.FAILED, exit_code=EXIT_FAILED, preempted=False, failure=failure)


class PreemptionRequest:
    """One preemption in progress: its source, deadline and the signals seen since it began."""

    def __init__(self, *, paths: RunPaths, clock: Clock, events: EventLog, grace: float) -> None:
        self._paths = paths
        self._clock = clock
        self._events = events
        self.grace = grace
        #: The signal's name or ``notice (...)``.
        self.source = ""
        self.deadline = 0.0
        #: The stop-signal count when it began (a later signal is only reported).
        self.signals_seen = 0

    def clear_stale(self) -> None:
        """Remove a request or acknowledgement left by an earlier attempt or launch."""
        for stale in (self._paths.preempt_request, self._paths.preempt_ack):
            try:
                os.unlink(stale)
            except FileNotFoundError:
                pass
            except OSError as exc:
                # A read-only run dir: harmless, since ranks obey only their own attempt's
                # request (PreemptRequest.attempt); the supervisor must not die of it.
                log.warning("supervisor.stale_request_kept", path=stale, error=str(exc))

    def begin(
        self, *, source: str, signal_name: str | None, attempt: int, step: int | None,
        workers_running: bool, signals_seen: int,
    ) -> None:
        """Record the deadline and, when ranks are running, write the request they obey."""
        self.source = source
        self.signals_seen = signals_seen
        self.deadline = self._clock.monotonic() + self.grace
        self._events.emit(
            "supervisor.preempt_requested",
            attempt=attempt,
            signal=signal_name,
            source=source,
            grace_s=self.grace,
            step=step,
            workers_running=workers_running,
        )
        if workers_running:
            now = self._clock.time()
            request = PreemptRequest(
                attempt=attempt,
                requested_at=now,
                deadline=now + self.grace,
                signal=signal_name,
                source=source,
            )
            try:
                os.makedirs(self._paths.control_dir, exist_ok=True)
                write_document(self._paths.preempt_request, request, durable=True)
            except OSError as exc:
                # A full or read-only disk: the ranks do not see the request, so the grace
                # runs out and they get torchrun's SIGTERM, which they also take as a
                # preemption. Slower, not wrong; the supervisor must not die of it.
                self._events.emit("supervisor.preempt_request_failed", attempt=attempt,
                                  error=str(exc))

    def watch(
        self, group: WorkerGroup | None, *, signals: int, attempt: int, progress: AttemptProgress,
        poll_interval_s: float,
    ) -> tuple[int | None, bool] | None:
        """One turn of waiting for the ranks' emergency snapshot.

        ``group``: the running group (None: none was running). Returns ``(exit code, timed
        out)`` once the group is gone (None code: there was none), after terminating it at the
        deadline; None while it is still saving (after a short sleep).
        """
        if signals != self.signals_seen:
            # A second signal changes nothing: the save in progress is the fastest way out, and
            # the atomic commit keeps older snapshots valid if a SIGKILL follows.
            self.signals_seen = signals
            self._events.emit("supervisor.preempt_signal_repeated", attempt=attempt)
        if group is None:
            return None, False
        code = group.poll()
        if code is not None:
            return code, False
        progress.read()
        left = self.remaining_s()
        if left <= 0:
            self._events.emit(
                "supervisor.preempt_deadline_passed", attempt=attempt, step=progress.step
            )
            return group.terminate(0.0), True
        self._clock.sleep(min(poll_interval_s, left))
        return None

    def conclude(
        self, code: int | None, *, timed_out: bool, attempt: int, newest_local: int | None
    ) -> tuple[Ending, int | None]:
        """Judge how the preemption ended (events included); the acknowledged step, if any.

        Consumes the request; :meth:`remaining_s` then bounds the mirror flush.
        """
        acked = self.acked_step(attempt) if code is not None else None
        self.consume()
        remaining = self.remaining_s()
        ending = judge(
            code=code, acked=acked, timed_out=timed_out, source=self.source, grace=self.grace,
            newest_local=newest_local,
        )
        if ending.preempted:
            self._events.emit(
                "supervisor.preempted",
                attempt=attempt,
                signal=self.source,
                snapshot_step=acked,
                newest_local_step=newest_local,
                exit_code=code,
                grace_left_s=round(remaining, 3),
            )
        elif ending.failure is not None:
            self._events.emit(
                "supervisor.preempt_failed",
                attempt=attempt,
                root_cause=ending.failure,
                exit_code=code,
                timed_out=timed_out,
            )
        return ending, acked

    def remaining_s(self) -> float:
        """What is left of ``--grace`` (for the mirror flush)."""
        return max(0.0, self.deadline - self._clock.monotonic())

    def acked_step(self, attempt: int) -> int | None:
        """The step rank 0 acknowledged an emergency snapshot at, for ``attempt``."""
        ack = read_document(self._paths.preempt_ack, PreemptAck)
        return ack.step if ack is not None and ack.attempt == attempt else None

    def consume(self) -> None:
        """The request has been answered (or given up on): remove it."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._paths.preempt_request)
