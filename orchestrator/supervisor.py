"""The supervisor: one explicit state machine that runs attempts until the job is done or lost.

Phases: ``starting`` (pick the newest verified snapshot, launch a worker group), ``running``
(watch exit status, heartbeats and new snapshots), ``recovering`` (back off before the next
attempt), ``checkpointing`` (preempted: the workers take an emergency snapshot at the next step
boundary, then the mirror is flushed within what is left of ``--grace``), and the terminal
``done``, ``preempted`` (exit 75, relaunch to resume) and ``failed``. One loop drives every
transition; it reads and waits on time only through an injected
:class:`~orchestrator.clock.Clock` and talks to the workers only through a
:class:`~orchestrator.launcher.WorkerGroup`, files in the checkpoint dir and exit codes, so tests
run the whole policy with a fake clock and a scripted group.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import structlog
from tenacity import RetryCallState, Retrying, wait_exponential_jitter

from contract.codes import EXIT_FAILED, EXIT_OK, EXIT_PREEMPTED, Phase
from contract.documents import (
    Heartbeat,
    PreemptAck,
    PreemptRequest,
    SpareGate,
    read_document,
    write_document,
)
from contract.paths import RunPaths
from orchestrator.clock import Clock
from orchestrator.config import LaunchConfig
from orchestrator.failures import Failure, diagnose, reported_corrupt_snapshot
from orchestrator.launcher import WorkerGroup
from orchestrator.mirror import Mirror, mirror_lag, pending_of
from orchestrator.notices import NoticePoller
from orchestrator.restore import ProgressFactory, restore_newer
from orchestrator.runstate import (
    EventLog,
    NodeState,
    RunState,
    read_heartbeats,
    write_json_atomic,
)
from orchestrator.settings import Settings
from storage import LocalTier, RetentionPolicy, SnapshotInfo, plan_retention
from storage.errors import StorageError

log = structlog.get_logger("orchestrator.supervisor")


class StopRequest:
    """Set from a signal handler; the loop notices it on its next turn."""

    def __init__(self) -> None:
        self.signum: int | None = None
        #: Every stop signal received; a second one cuts the end-of-run mirror flush short.
        self.count = 0

    def request(self, signum: int) -> None:
        """Record the first stop signal (later ones only count)."""
        self.count += 1
        if self.signum is None:
            self.signum = signum


class Backoff:
    """Restart delays: exponential from ``initial_s`` to ``max_s`` plus uniform jitter (tenacity)."""

    def __init__(self, *, initial_s: float, max_s: float, jitter_s: float) -> None:
        self._wait = wait_exponential_jitter(multiplier=initial_s, max=max_s, jitter=jitter_s)
        self._retrying = Retrying()

    def delay(self, failures: int) -> float:
        """Delay before the relaunch following the ``failures``-th consecutive failure (>= 1)."""
        state = RetryCallState(retry_object=self._retrying, fn=None, args=(), kwargs={})
        state.attempt_number = max(1, failures)
        return float(self._wait(state))


@dataclass(frozen=True, kw_only=True)
class Outcome:
    """How the supervisor ended: the process exit code and the root cause of a failure."""

    exit_code: int
    phase: Phase
    failure: str | None


class Supervisor:
    """Runs worker-group attempts under the restart policy until done or failed."""

    def __init__(
        self,
        *,
        config: LaunchConfig,
        settings: Settings,
        run_id: str,
        paths: RunPaths,
        clock: Clock,
        group: WorkerGroup,
        store: LocalTier,
        events: EventLog,
        stop: StopRequest,
        first_attempt: int = 0,
        pid: int = 0,
        mirror: Mirror | None = None,
        progress: ProgressFactory | None = None,
        preempt_signals: Sequence[int] = (signal.SIGTERM, signal.SIGUSR1),
        preemptions: int = 0,
        notices: NoticePoller | None = None,
        spare_factory: Callable[[], WorkerGroup] | None = None,
    ) -> None:
        self._config = config
        #: --warm-spare: makes the group started ahead of the next attempt.
        self._spare_factory = spare_factory
        self._spare: WorkerGroup | None = None
        self._spare_attempt = -1
        self._notices = notices
        self._settings = settings
        self._run_id = run_id
        self._paths = paths
        self._clock = clock
        self._group = group
        self._store = store
        self._events = events
        self._stop = stop
        self._pid = pid
        self._mirror = mirror
        self._progress = progress
        self._local_steps: tuple[int, ...] = ()
        self._known_mirrored: frozenset[int] = frozenset()
        self._published_phase: Phase | None = None
        self._next_publish = 0.0
        self._backoff = Backoff(
            initial_s=settings.backoff_initial_s,
            max_s=settings.backoff_max_s,
            jitter_s=settings.backoff_jitter_s,
        )
        self._retention = RetentionPolicy(
            keep_last=config.keep_local,
            keep_every=config.keep_every,
            keep_best=config.keep_best,
            best_metric=config.best_metric,
            best_mode=config.best_mode,
        )
        self._phase = Phase.STARTING
        self._attempt = first_attempt
        self._restarts = 0
        self._group_running = False
        self._resume_step: int | None = None
        self._step: int | None = None
        self._last_failure: str | None = None
        self._exit_code = EXIT_FAILED
        self._newest_local: int | None = None
        self._known_steps: tuple[int, ...] | None = None
        self._started_at = clock.time()
        self._attempt_progressed = False
        self._no_progress_streak = 0
        self._failure_streak = 0
        self._recover_at = 0.0
        self._next_scan = 0.0
        self._last_beat: Heartbeat | None = None
        self._last_activity = 0.0
        self._hang_failure: Failure | None = None
        self._verified: set[int] = set()
        #: Whether the next selection checksums the local snapshots (see _select_resume).
        self._verify_next = True
        #: Whether the running attempt's resume point was checksum-verified before launch.
        self._resume_verified = False
        self._preempt_signals = frozenset(int(s) for s in preempt_signals)
        #: Preemptions of this run so far (carried over from earlier launches on the dir).
        self._preemptions = preemptions
        self._preempt_deadline = 0.0
        self._preempt_signal = ""
        self._preempt_seen = 0
        self._flush_timeout: float | None = None
        self._rdzv_closed_streak = 0
        #: Whether the relaunch after the current backoff spends a restart.
        self._recover_counts = True

    # -- the loop ------------------------------------------------------------------------

    def run(self) -> Outcome:
        """Drive the state machine to ``done`` or ``failed``; never leaves workers behind."""
        structlog.contextvars.bind_contextvars(attempt=self._attempt)
        if self._mirror is not None:
            self._mirror.start()
        self._write_state()
        try:
            while not self._phase.terminal:
                if self._phase is Phase.CHECKPOINTING:
                    self._watch_preemption()
                elif self._stop.signum is not None:
                    if self._stop.signum in self._preempt_signals:
                        name = signal.Signals(self._stop.signum).name
                        self._begin_preemption(name, signal_name=name)
                    else:
                        self._interrupted(self._stop.signum)
                elif (notice := self._poll_notices()) is not None:
                    self._begin_preemption(f"notice ({notice})", signal_name=None)
                elif self._phase is Phase.STARTING:
                    self._start_attempt()
                elif self._phase is Phase.RUNNING:
                    self._watch()
                elif self._phase is Phase.RECOVERING:
                    self._wait_backoff()
                else:
                    raise RuntimeError(f"phase {self._phase.value} is not handled yet")
        except BaseException as exc:
            # Whatever went wrong in the supervisor itself, the workers must not outlive it.
            if self._group_running:
                self._group.kill()
                self._group_running = False
            self._discard_spare("supervisor_error")
            self._last_failure = f"supervisor error: {type(exc).__name__}: {exc}"
            self._enter(Phase.FAILED)
            if self._mirror is not None:
                try:
                    self._mirror.close()
                except Exception as mirror_exc:  # the first error is the one to report
                    log.warning("mirror.close_failed", error=str(mirror_exc))
            raise
        self._discard_spare(f"run_{self._phase.value}")
        if self._mirror is not None:
            self._finish_mirror(self._mirror)
        failure = self._last_failure if self._exit_code not in (EXIT_OK, EXIT_PREEMPTED) else None
        return Outcome(exit_code=self._exit_code, phase=self._phase, failure=failure)

    def _enter(self, phase: Phase) -> None:
        """The one place phases change; the enum lists what is allowed (IllegalTransition)."""
        self._phase.check_transition(phase)
        if phase is not self._phase:
            log.info("supervisor.phase", phase=phase.value, previous=self._phase.value)
        self._phase = phase
        self._write_state()

    # -- starting ------------------------------------------------------------------------

    def _start_attempt(self) -> None:
        structlog.contextvars.bind_contextvars(attempt=self._attempt)
        # A request left by an earlier attempt or launch must not stop this one.
        for stale in (self._paths.preempt_request, self._paths.preempt_ack):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(stale)
        removed = list(self._store.cleanup_abandoned())
        if removed:
            self._events.emit("supervisor.abandoned_removed", attempt=self._attempt, paths=removed)
        self._resume_step = self._select_resume()
        self._events.emit(
            "supervisor.resume_selected", attempt=self._attempt, step=self._resume_step
        )
        if self._resume_step is not None:
            self._step = self._resume_step
        self._attempt_progressed = False
        self._hang_failure = None
        self._last_beat = None
        try:
            if not self._promote_spare():
                self._group.start(self._attempt, self._resume_step)
        except OSError as exc:
            self._give_up(f"cannot start the worker group: {exc}", reason="start_failed")
            return
        self._group_running = True
        now = self._clock.monotonic()
        self._last_activity = now
        self._next_scan = now + self._settings.scan_interval_s
        self._events.emit(
            "supervisor.attempt_started",
            attempt=self._attempt,
            restarts=self._restarts,
            resume_step=self._resume_step,
            nproc_per_node=self._config.nproc_per_node,
        )
        self._enter(Phase.RUNNING)

    # -- warm spare ----------------------------------------------------------------------

    def _start_spare(self) -> None:
        """Start the next attempt's group now; it waits, started up, until promoted.

        Only once the running attempt has made progress: a spare starting beside a group that
        is itself still starting would slow both, and a crash loop needs no spare.
        """
        if self._spare_factory is None:
            return
        attempt = self._attempt + 1
        gate = self._paths.spare_gate(attempt)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(gate)
        os.makedirs(os.path.dirname(gate), exist_ok=True)
        spare = self._spare_factory()
        try:
            spare.start(attempt, None, spare_gate=gate)
        except OSError as exc:
            self._events.emit("supervisor.spare_failed", attempt=attempt, error=str(exc))
            self._spare_factory = None  # not retried: fall back to plain relaunches
            return
        self._spare, self._spare_attempt = spare, attempt
        self._events.emit("supervisor.spare_started", attempt=attempt)

    def _promote_spare(self) -> bool:
        """Hand the attempt to the waiting spare; False (discarded) when it cannot take it."""
        spare = self._spare
        if spare is None:
            return False
        if self._spare_attempt != self._attempt or spare.poll() is not None:
            self._discard_spare("stale" if self._spare_attempt != self._attempt else "exited")
            return False
        write_document(
            self._paths.spare_gate(self._attempt),
            SpareGate(attempt=self._attempt, resume_step=self._resume_step),
            durable=False,
        )
        self._group, self._spare = spare, None
        self._events.emit(
            "supervisor.spare_promoted", attempt=self._attempt, resume_step=self._resume_step
        )
        return True

    def _discard_spare(self, reason: str) -> None:
        spare, self._spare = self._spare, None
        if spare is not None:
            spare.kill()
            self._events.emit("supervisor.spare_discarded", attempt=self._spare_attempt, reason=reason)

    def _select_resume(self) -> int | None:
        """The newest valid snapshot; invalid ones are removed.

        Equivalent to ``store.newest_valid(verify_checksums=..., cleanup=True)``, spelled out
        so that every rejected snapshot becomes a ``supervisor.snapshot_invalid`` event.

        The first attempt of a launch (and the one after ranks reported a snapshot that failed
        its checksum) checksums every candidate. A relaunch within the launch checks manifests
        and sizes only: the snapshots it chooses from were written under this supervisor's
        watch, and the ranks verify every byte while they load anyway, so a second full pass
        here would only delay the resume (about 1.4 s per GB). Should the ranks find damage,
        they fail with ``CorruptSnapshot`` and the next selection verifies everything (see
        :meth:`_attempt_ended`).
        """
        verify, self._verify_next = self._verify_next, False
        self._resume_verified = verify
        local = self._newest_valid_local(verify)
        if self._mirror is None:
            return local
        # Across tiers: a newer remote snapshot (or any, when no valid local one exists) is
        # downloaded, verified and committed locally; a corrupt one falls back to the next.
        remote = restore_newer(
            remote=self._mirror.remote,
            local=self._mirror.local_store,
            newer_than=local,
            events=self._events,
            settings=self._settings,
            attempt=self._attempt,
            progress=self._progress,
        )
        if remote is None:
            return local
        self._verified = {remote}
        return remote

    def _newest_valid_local(self, verify: bool) -> int | None:
        for info in reversed(self._store.list()):
            checked = self._store.validate(info.step, verify_checksums=verify)
            if checked.valid:
                if verify:
                    self._verified = {checked.step}
                return checked.step
            self._events.emit(
                "supervisor.snapshot_invalid",
                attempt=self._attempt,
                step=info.step,
                reason=checked.reason,
                path=info.path,
            )
            self._store.delete(info.step)
        return None

    # -- running -------------------------------------------------------------------------

    def _watch(self) -> None:
        code = self._group.poll()
        if code is not None:
            self._group_running = False
            self._attempt_ended(code)
            return
        self._read_progress()
        if self._attempt_progressed and self._spare is None and self._spare_factory is not None:
            self._start_spare()
        now = self._clock.monotonic()
        if now >= self._next_scan:
            self._next_scan = now + self._settings.scan_interval_s
            self._scan_snapshots()
            self._write_state()
        if self._hung(now):
            return
        self._clock.sleep(self._settings.poll_interval_s)

    def _hung(self, now: float) -> bool:
        timeout = self._config.hang_timeout
        if timeout is None or now - self._last_activity <= timeout:
            return False
        silent = now - self._last_activity
        last = "none yet" if self._step is None else str(self._step)
        self._hang_failure = Failure(
            summary=f"no heartbeat progress for {silent:.0f}s (--hang-timeout {timeout:g}s); "
            f"last step {last}",
            fatal=False,
            source="hang",
        )
        self._events.emit("supervisor.hang_detected", attempt=self._attempt, silent_s=silent)
        code = self._group.terminate(self._config.grace)
        self._group_running = False
        self._attempt_ended(code)
        return True

    def _read_progress(self) -> None:
        beats = [b for b in read_heartbeats(self._paths) if b.attempt == self._attempt]
        if not beats:
            return
        newest = max(beats, key=lambda b: (b.step, b.time))
        resumed = {b.resumed_from for b in beats if b.resumed_from is not None}
        if resumed and max(resumed) != self._resume_step:
            # Multi-node: the ranks agreed on a newer snapshot than this node's own (another
            # node's disk, or the mirror through another node). Status reports what they did.
            self._resume_step = max(resumed)
            self._events.emit(
                "supervisor.resumed_elsewhere", attempt=self._attempt, step=self._resume_step
            )
        self._step = newest.step if self._step is None else max(self._step, newest.step)
        # A fresh start heartbeats step 0 before training: only a completed step is progress.
        baseline = 0 if self._resume_step is None else self._resume_step
        if newest.step > baseline:
            self._attempt_progressed = True
        if self._last_beat is None or (newest.step, newest.time) != (
            self._last_beat.step,
            self._last_beat.time,
        ):
            # Measured on our monotonic clock when *we* saw it change: immune to wall-clock
            # jumps and to skew between the workers' clocks and ours.
            self._last_activity = self._clock.monotonic()
        self._last_beat = newest

    def _scan_snapshots(self) -> None:
        infos = self._store.list()
        usable = [i.step for i in infos if i.valid is not False]
        self._newest_local = max(usable) if usable else None
        self._local_steps = tuple(usable)
        mirrored_changed = False
        if self._mirror is not None:
            self._mirror.check()  # a crashed mirror thread never goes unnoticed
            self._mirror.notify(usable)
            mirrored = self._mirror.mirrored_steps() & frozenset(usable)
            mirrored_changed = mirrored != self._known_mirrored
            self._known_mirrored = mirrored
        baseline = 0 if self._resume_step is None else self._resume_step
        if self._newest_local is not None and self._newest_local > baseline:
            self._attempt_progressed = True
        steps = tuple(i.step for i in infos)
        if steps != self._known_steps or mirrored_changed:
            self._known_steps = steps
            self._apply_retention(infos)

    def _verify_newest(self) -> None:
        """Checksum-verify the newest valid snapshot once the ranks are gone.

        Retention then knows a *verified* newest snapshot and never deletes the last verified
        fallback in favour of newer ones that might turn out corrupt.
        """
        if not self._config.retention_active:
            return
        for info in reversed(self._store.list()):
            if info.step in self._verified:
                return
            if info.valid is not False and self._store.validate(info.step).valid:
                self._verified.add(info.step)
                return
            # Damage seen here: the next selection checksums (and removes) it too.
            self._verify_next = True

    def _apply_retention(self, infos: list[SnapshotInfo]) -> None:
        if not self._config.retention_active or not infos:
            return
        infos = [
            replace(i, valid=True) if i.valid is None and i.step in self._verified else i
            for i in infos
        ]
        # The snapshot the running ranks resumed from may still be being read by them.
        protected: set[int] = set()
        if self._group_running and self._resume_step is not None:
            protected.add(self._resume_step)
        if self._mirror is not None:
            # Never delete a local snapshot that has not reached the object store yet.
            protected.update(pending_of(self._local_steps, self._mirror.mirrored_steps()))
        doomed = plan_retention(infos, self._retention, protected=protected)
        deleted: list[int] = []
        for step in doomed:
            try:
                self._store.delete(step)
            except (StorageError, OSError) as exc:
                self._events.emit("retention.failed", step=step, error=str(exc))
                continue
            deleted.append(step)
        if deleted:
            self._events.emit("retention.deleted", steps=deleted, tier="local")
            self._known_steps = tuple(i.step for i in self._store.list())

    # -- after an attempt ----------------------------------------------------------------

    def _attempt_ended(self, code: int) -> None:
        self._read_progress()
        self._verify_newest()
        # Re-plan retention even if no snapshot appeared: the resume point is unprotected now.
        self._known_steps = None
        self._scan_snapshots()
        if code == 0:
            self._events.emit("supervisor.finished", attempt=self._attempt, step=self._step)
            # last_failure stays: it is the run's most recent failure, recovered from or not.
            self._exit_code = EXIT_OK
            self._enter(Phase.DONE)
            return
        # The watchdog's own kill reaches the ranks as torchrun's SIGTERM, which they turn into
        # an emergency snapshot and ack: that is still a hang, a failure that spends a restart.
        acked = self._acked_step() if self._hang_failure is None else None
        if acked is not None:
            # The ranks were signalled directly (not this supervisor) and stopped after an
            # emergency snapshot: relaunch at once. A preemption never counts as a restart.
            self._preemptions += 1
            self._events.emit(
                "supervisor.workers_preempted", attempt=self._attempt, step=acked, exit_code=code
            )
            self._attempt += 1
            self._enter(Phase.STARTING)
            return
        failure = diagnose(self._paths, self._attempt, code)
        if self._hang_failure is not None:
            failure = self._hang_failure
        if failure.source == "rendezvous_closed" and (
            self._rdzv_closed_streak < self._settings.rdzv_closed_retries
        ):
            # Multi-node: no worker ran; another node is tearing down the previous attempt.
            # Rejoin after a short backoff, spending neither a restart nor crash-loop credit.
            self._rdzv_closed_streak += 1
            delay = self._backoff.delay(self._rdzv_closed_streak)
            self._events.emit(
                "supervisor.rendezvous_closed",
                attempt=self._attempt,
                retry=self._rdzv_closed_streak,
                delay_s=round(delay, 3),
            )
            self._recover_at = self._clock.monotonic() + delay
            self._recover_counts = False
            self._enter(Phase.RECOVERING)
            return
        if failure.source != "rendezvous_closed":
            self._rdzv_closed_streak = 0
        if not self._attempt_progressed and reported_corrupt_snapshot(self._paths, self._attempt):
            # The ranks' verified load found the resume point damaged: verify every candidate
            # next time (the damaged one is removed then). Chosen unverified, that is a
            # selection's cost, not the job's: relaunch at once without spending a restart.
            self._verify_next = True
            self._events.emit(
                "supervisor.resume_corrupt",
                attempt=self._attempt,
                step=self._resume_step,
                root_cause=failure.summary,
            )
            if not self._resume_verified:
                self._recover_at = self._clock.monotonic()
                self._recover_counts = False
                self._enter(Phase.RECOVERING)
                return
        self._last_failure = failure.summary
        progressed = self._attempt_progressed
        self._no_progress_streak = 0 if progressed else self._no_progress_streak + 1
        self._failure_streak = 1 if progressed else self._failure_streak + 1
        self._events.emit(
            "supervisor.attempt_failed",
            attempt=self._attempt,
            exit_code=code,
            root_cause=failure.summary,
            source=failure.source,
            failed_rank=failure.rank,
            fatal=failure.fatal,
            progressed=progressed,
        )
        if failure.fatal:
            self._give_up(failure.summary, reason="fatal")
        elif self._restarts >= self._config.max_restarts:
            self._give_up(failure.summary, reason="restart_budget_spent")
        elif self._no_progress_streak >= self._settings.crash_loop_attempts:
            self._give_up(failure.summary, reason="crash_loop")
        else:
            # An attempt that made progress is no crash loop: relaunch at once (a second on the
            # clock of every preempted or crashed run otherwise). Repeated failures without
            # progress back off exponentially, with jitter.
            delay = 0.0 if progressed else self._backoff.delay(self._failure_streak)
            self._events.emit(
                "supervisor.backoff",
                attempt=self._attempt,
                delay_s=round(delay, 3),
                restarts=self._restarts + 1,
                max_restarts=self._config.max_restarts,
            )
            self._recover_at = self._clock.monotonic() + delay
            self._recover_counts = True
            self._enter(Phase.RECOVERING)

    def _give_up(self, root_cause: str, *, reason: str) -> None:
        self._last_failure = root_cause
        self._exit_code = EXIT_FAILED
        self._events.emit(
            "supervisor.gave_up",
            attempt=self._attempt,
            reason=reason,
            root_cause=root_cause,
            restarts=self._restarts,
            no_progress_attempts=self._no_progress_streak,
        )
        self._enter(Phase.FAILED)

    def _wait_backoff(self) -> None:
        remaining = self._recover_at - self._clock.monotonic()
        if remaining > 0:
            # Short naps so that a stop signal is honoured promptly during a long backoff.
            self._clock.sleep(min(remaining, self._settings.poll_interval_s))
            return
        if self._recover_counts:
            self._restarts += 1
        self._attempt += 1
        structlog.contextvars.bind_contextvars(attempt=self._attempt)
        self._enter(Phase.STARTING)

    # -- preemption ----------------------------------------------------------------------

    def _poll_notices(self) -> str | None:
        """A cloud preemption notice seen this turn (bounded HTTP checks, rate-limited)."""
        if self._notices is None or not self._notices.enabled:
            return None
        return self._notices.poll(self._clock.monotonic())

    def _begin_preemption(self, source: str, *, signal_name: str | None) -> None:
        """Ask the ranks for an emergency snapshot at their next step boundary.

        ``source`` is the signal's name or the cloud notice that started it: both take the same
        path. torchrun is not signalled: it runs in its own session, and a SIGTERM to it would
        have it SIGKILL the ranks 30 s later whatever they are doing. The request is a file the
        ranks check at every step; the whole preemption (save + mirror flush) gets ``--grace``.
        """
        name = source
        grace = self._config.grace
        self._discard_spare("preempting")  # its CPU belongs to the emergency snapshot now
        self._preempt_signal = name
        self._preempt_seen = self._stop.count
        self._preempt_deadline = self._clock.monotonic() + grace
        self._events.emit(
            "supervisor.preempt_requested",
            attempt=self._attempt,
            signal=signal_name,
            source=source,
            grace_s=grace,
            step=self._step,
            workers_running=self._group_running,
        )
        if self._group_running:
            now = self._clock.time()
            os.makedirs(self._paths.control_dir, exist_ok=True)
            request = PreemptRequest(
                requested_at=now,
                deadline=now + grace,
                attempt=self._attempt,
                signal=signal_name,
                source=source,
            )
            write_document(self._paths.preempt_request, request, durable=True)
        self._enter(Phase.CHECKPOINTING)

    def _watch_preemption(self) -> None:
        if self._stop.count != self._preempt_seen:
            # A second signal changes nothing: the save in progress is the fastest way out, and
            # the atomic commit keeps older snapshots valid if a SIGKILL follows.
            self._preempt_seen = self._stop.count
            self._events.emit("supervisor.preempt_signal_repeated", attempt=self._attempt)
        if not self._group_running:
            self._preempt_ended(None, timed_out=False)
            return
        code = self._group.poll()
        if code is not None:
            self._group_running = False
            self._preempt_ended(code, timed_out=False)
            return
        self._read_progress()
        now = self._clock.monotonic()
        if now >= self._preempt_deadline:
            self._events.emit(
                "supervisor.preempt_deadline_passed", attempt=self._attempt, step=self._step
            )
            code = self._group.terminate(0.0)
            self._group_running = False
            self._preempt_ended(code, timed_out=True)
            return
        self._clock.sleep(min(self._settings.poll_interval_s, self._preempt_deadline - now))

    def _acked_step(self) -> int | None:
        """The step rank 0 acknowledged an emergency snapshot at, for this attempt."""
        ack = read_document(self._paths.preempt_ack, PreemptAck)
        return ack.step if ack is not None and ack.attempt == self._attempt else None

    def _preempt_ended(self, code: int | None, *, timed_out: bool) -> None:
        self._read_progress()
        self._verify_newest()
        self._known_steps = None
        self._scan_snapshots()
        acked = self._acked_step() if code is not None else None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._paths.preempt_request)
        remaining = max(0.0, self._preempt_deadline - self._clock.monotonic())
        if code == 0:
            # The run finished before the request took effect.
            self._events.emit("supervisor.finished", attempt=self._attempt, step=self._step)
            self._exit_code = EXIT_OK
            self._flush_timeout = remaining
            self._enter(Phase.DONE)
            return
        if code is None or acked is not None:
            if acked is not None:
                self._step = max(self._step or 0, acked)
            self._preemptions += 1
            self._exit_code = EXIT_PREEMPTED
            self._flush_timeout = remaining
            self._events.emit(
                "supervisor.preempted",
                attempt=self._attempt,
                signal=self._preempt_signal,
                snapshot_step=acked,
                newest_local_step=self._newest_local,
                exit_code=code,
                grace_left_s=round(remaining, 3),
            )
            self._enter(Phase.PREEMPTED)
            return
        why = (
            f"the workers did not commit an emergency snapshot within --grace "
            f"{self._config.grace:g}s"
            if timed_out
            else f"the workers exited {code} without committing an emergency snapshot"
        )
        self._last_failure = (
            f"preempted by {self._preempt_signal}: {why}; newest local snapshot: "
            f"{self._newest_local}"
        )
        self._exit_code = EXIT_FAILED
        self._flush_timeout = remaining
        self._events.emit(
            "supervisor.preempt_failed",
            attempt=self._attempt,
            root_cause=self._last_failure,
            exit_code=code,
            timed_out=timed_out,
        )
        self._enter(Phase.FAILED)

    def _interrupted(self, signum: int) -> None:
        name = signal.Signals(signum).name
        self._events.emit("supervisor.interrupted", attempt=self._attempt, signal=name)
        if self._group_running:
            code = self._group.terminate(self._config.grace)
            self._group_running = False
            self._events.emit("supervisor.workers_terminated", attempt=self._attempt, exit_code=code)
        self._scan_snapshots()
        self._last_failure = f"supervisor stopped by {name}; workers terminated"
        # 128 + signal number, the shell's convention for "ended by this signal".
        self._exit_code = 128 + signum
        self._enter(Phase.FAILED)

    # -- run state -----------------------------------------------------------------------

    def state(self) -> RunState:
        """The current ``state.json`` content."""
        now = self._clock.time()
        age = None if self._last_beat is None else max(0.0, round(now - self._last_beat.time, 3))
        m = self._mirror
        newest_remote = None if m is None else m.newest_remote_step
        lag = None if m is None else mirror_lag(self._newest_local, newest_remote)
        pending = None if m is None else pending_of(self._local_steps, m.mirrored_steps())
        return RunState(
            run_id=self._run_id,
            phase=self._phase.value,
            attempt=self._attempt,
            restarts=self._restarts,
            preemptions=self._preemptions,
            step=self._step,
            resumed_from_step=self._resume_step,
            last_failure=self._last_failure,
            newest_local_step=self._newest_local,
            newest_remote_step=newest_remote,
            mirror_lag_steps=lag,
            mirror_error=None if m is None else m.error,
            mirror_pending_steps=pending,
            started_at=self._started_at,
            updated_at=now,
            pid=self._pid,
            nodes=[
                NodeState(
                    node_rank=self._config.node_rank,
                    heartbeat_age_s=age,
                    phase=self._phase.value,
                )
            ],
        )

    def _write_state(self) -> None:
        doc = self.state().to_json()
        write_json_atomic(self._paths.state, doc)
        if self._mirror is None:
            return
        now = self._clock.monotonic()
        if self._phase is not self._published_phase or now >= self._next_publish:
            # To <prefix>/run/node-<R>/state.json, in the background: status --mirror URL.
            self._published_phase = self._phase
            self._next_publish = now + self._settings.state_mirror_interval_s
            self._mirror.publish_state(doc)

    # -- mirror at the end -----------------------------------------------------------------

    def _finish_mirror(self, mirror: Mirror) -> None:
        """Bounded flush of what is not yet remote; the exit code never depends on it."""
        timeout = self._settings.mirror_flush_timeout_s
        if self._flush_timeout is not None:
            # Preempted: only what is left of --grace (the committed local snapshot stands).
            timeout = min(timeout, self._flush_timeout)
        signals = self._stop.count
        self._scan_snapshots()
        self._events.emit(
            "mirror.flushing", pending_steps=mirror.pending_steps(), timeout_s=timeout
        )
        # A real-time wait on the mirror's thread (bounded); a second signal cuts it short.
        caught_up = mirror.flush(timeout, abort=lambda: self._stop.count != signals)
        if caught_up:
            # Publish the final (caught-up) state too; a short bound, it is one small object.
            self._next_publish = 0.0
            self._published_phase = None
            self._write_state()
            caught_up = mirror.flush(min(timeout, 10.0), abort=lambda: self._stop.count != signals)
        pending = mirror.pending_steps()
        try:
            mirror.close()
        finally:
            if caught_up:
                self._events.emit(
                    "mirror.flushed", newest_remote_step=mirror.newest_remote_step
                )
            else:
                self._events.emit(
                    "mirror.behind",
                    pending_steps=pending,
                    newest_remote_step=mirror.newest_remote_step,
                    lag_steps=mirror_lag(self._newest_local, mirror.newest_remote_step),
                    error=mirror.error,
                    timeout_s=timeout,
                )
            write_json_atomic(self._paths.state, self.state().to_json())
