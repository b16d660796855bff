"""The supervisor: one explicit state machine that runs attempts until the job is done or lost.

Phases: ``starting`` (pick the newest verified snapshot, launch a worker group), ``running``
(watch exit status, heartbeats and new snapshots), ``recovering`` (back off before the next
attempt), ``checkpointing`` (preempted: the workers take an emergency snapshot at the next step
boundary, then the mirror is flushed within what is left of ``--grace``), and the terminal
``done``, ``preempted`` (exit 75, relaunch to resume) and ``failed``. One loop drives every
transition and :meth:`Supervisor._enter` is the one place a phase changes (the allowed
transitions are listed on :class:`~contract.codes.Phase` and enforced there). What to do after
an attempt is the pure :func:`orchestrator.policy.decide`; snapshot bookkeeping, heartbeat
progress, the warm spare and a preemption in progress are collaborators
(:mod:`~orchestrator.bookkeeping`, :mod:`~orchestrator.progress`, :mod:`~orchestrator.spare`,
:mod:`~orchestrator.preempting`). The loop reads and waits on time only through an injected
:class:`~orchestrator.clock.Clock` and talks to the workers only through a
:class:`~orchestrator.launcher.WorkerGroup`, files in the checkpoint dir and exit codes, so tests
run the whole policy with a fake clock and a scripted group.
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import structlog

from contract.codes import EXIT_FAILED, EXIT_OK, EXIT_PREEMPTED, Phase
from contract.paths import RunPaths
from orchestrator.bookkeeping import SnapshotBook
from orchestrator.clock import Clock
from orchestrator.config import LaunchConfig
from orchestrator.failures import Failure, diagnose, reported_corrupt_snapshot
from orchestrator.forensics import Capture, capture_stacks
from orchestrator.launcher import WorkerGroup
from orchestrator.mirror import Mirror, finish_mirror, mirror_lag, pending_of
from orchestrator.notices import NoticePoller
from orchestrator.policy import (
    Action,
    AttemptResult,
    Backoff,
    Counters,
    Decision,
    Limits,
    announce,
    decide,
)
from orchestrator.preempting import PreemptionRequest
from orchestrator.progress import AttemptProgress, AuditWatch
from orchestrator.restore import ProgressFactory
from orchestrator.runstate import (
    EventLog,
    NodeState,
    RunState,
    StateFile,
    launch_identity,
    read_heartbeats,
    restore_run_dir,
)
from orchestrator.settings import Settings
from orchestrator.spare import WarmSpare
from storage import LocalTier

log = structlog.get_logger("orchestrator.supervisor")

#: How often a running supervisor hands its state to an observer (at most).
OBSERVE_INTERVAL_S = 1.0


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


@dataclass(frozen=True, kw_only=True)
class Outcome:
    """How the supervisor ended: the process exit code and the root cause of a failure."""

    exit_code: int
    phase: Phase
    failure: str | None
    #: Why ``run/state.json`` could not be written at the end (None: it was).
    state_error: str | None = None


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
        observer: Callable[[RunState], None] | None = None,
    ) -> None:
        self._config = config
        #: Sees the run state at most every OBSERVE_INTERVAL_S while running and on every
        #: write of state.json (the terminal's progress line, launcher.ProgressLine).
        self._observer = observer
        self._next_observe = 0.0
        self._settings = settings
        self._run_id = run_id
        self._paths = paths
        self._clock = clock
        self._group = group
        self._events = events
        self._stop = stop
        self._pid = pid
        self._mirror = mirror
        self._notices = notices
        self._preempt_signals = frozenset(int(s) for s in preempt_signals)
        self._snapshots = SnapshotBook(
            config=config,
            settings=settings,
            store=store,
            events=events,
            mirror=mirror,
            progress=progress,
        )
        self._progress = AttemptProgress(paths=paths, clock=clock, events=events)
        self._audit = AuditWatch(paths=paths, events=events, run_id=run_id)
        self._spare = WarmSpare(factory=spare_factory, paths=paths, events=events)
        self._preemption = PreemptionRequest(
            paths=paths, clock=clock, events=events, grace=config.grace
        )
        self._backoff = Backoff(
            initial_s=settings.backoff_initial_s,
            max_s=settings.backoff_max_s,
            jitter_s=settings.backoff_jitter_s,
        )
        self._limits = Limits(
            max_restarts=config.max_restarts,
            crash_loop_attempts=settings.crash_loop_attempts,
            rdzv_closed_retries=settings.rdzv_closed_retries,
        )
        self._counters = Counters()
        self._phase = Phase.STARTING
        self._attempt = first_attempt
        self._group_running = False
        self._last_failure: str | None = None
        self._exit_code = EXIT_FAILED
        self._started_at = clock.time()
        #: Preemptions of this run so far (carried over from earlier launches on the dir).
        self._preemptions = preemptions
        self._hang_failure: Failure | None = None
        self._recover_at = 0.0
        #: Whether the relaunch after the current backoff spends a restart.
        self._recover_counts = True
        self._next_scan = 0.0
        self._state_file = StateFile(
            paths.state,
            clock=clock,
            publish=None if mirror is None else mirror.publish_state,
            publish_interval_s=settings.state_mirror_interval_s,
        )
        #: Preempted or finished during a preemption: the mirror flush gets what is left of
        #: --grace (None: the ordinary end-of-run bound).
        self._flush_timeout: float | None = None

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
            self._spare.discard("supervisor_error")
            self._last_failure = f"supervisor error: {type(exc).__name__}: {exc}"
            if self._phase.terminal:
                # It broke while recording its end (state.json on a full disk): the only
                # transition out of a terminal phase, and the one place it is not checked.
                self._phase = Phase.FAILED
                self._write_state()
            else:
                self._enter(Phase.FAILED)
            if self._mirror is not None:
                try:
                    self._mirror.close()
                except Exception as mirror_exc:  # the first error is the one to report
                    log.warning("mirror.close_failed", error=str(mirror_exc))
            raise
        self._spare.discard(f"run_{self._phase.value}")
        if self._mirror is not None:
            self._finish_mirror(self._mirror)
        failure = self._last_failure if self._exit_code not in (EXIT_OK, EXIT_PREEMPTED) else None
        error = self._state_file.write_error
        return Outcome(exit_code=self._exit_code, phase=self._phase, failure=failure,
                       state_error=None if error is None else str(error))

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
        self._preemption.clear_stale()
        self._snapshots.cleanup_abandoned(self._attempt)
        resume_step = self._snapshots.select_resume(self._attempt)
        self._events.emit("supervisor.resume_selected", attempt=self._attempt, step=resume_step)
        self._progress.begin(self._attempt, resume_step)
        self._hang_failure = None
        try:
            spare = self._spare.promote(self._attempt, resume_step)
            if spare is not None:
                self._group = spare
            else:
                self._group.start(self._attempt, resume_step)
        except OSError as exc:
            self._give_up(f"cannot start the worker group: {exc}", reason="start_failed")
            return
        self._group_running = True
        self._progress.touch()
        self._next_scan = self._clock.monotonic() + self._settings.scan_interval_s
        self._events.emit(
            "supervisor.attempt_started",
            attempt=self._attempt,
            restarts=self._counters.restarts,
            resume_step=resume_step,
            nproc_per_node=self._config.nproc_per_node,
        )
        self._enter(Phase.RUNNING)

    # -- running -------------------------------------------------------------------------

    def _watch(self) -> None:
        code = self._group.poll()
        if code is not None:
            self._group_running = False
            self._attempt_ended(code)
            return
        self._progress.read()
        beat = self._progress.last_beat
        if self._mirror is not None and beat is not None:
            # ORCH_MIRROR_MAX_MBPS=auto: the step rate steers the mirror's bandwidth cap.
            self._mirror.note_progress(beat.step, beat.time)
        self._observe()
        if self._progress.progressed and self._spare.wanted():
            self._spare.start(self._attempt + 1)
        now = self._clock.monotonic()
        if now >= self._next_scan:
            self._next_scan = now + self._settings.scan_interval_s
            if self._events.detached():  # run/ was removed: the events file went with it
                restore_run_dir(self._paths)
                self._events.reopen()
                self._events.emit("supervisor.run_dir_recreated", attempt=self._attempt,
                                  path=self._paths.run_dir)
            self._scan_snapshots()
            self._write_state()
        if self._hung():
            return
        self._clock.sleep(self._settings.poll_interval_s)

    def _hung(self) -> bool:
        timeout = self._config.hang_timeout
        silent = self._progress.silent_s()
        if timeout is None or silent <= timeout:
            return False
        step = self._progress.step
        last = "none yet" if step is None else str(step)
        self._hang_failure = Failure(
            summary=f"no heartbeat progress for {silent:.0f}s (--hang-timeout {timeout:g}s); "
            f"last step {last}",
            fatal=False,
            source="hang",
        )
        stacks = self._capture_stacks()
        self._events.emit("supervisor.hang_detected", attempt=self._attempt, silent_s=silent,
                          stacks_dir=stacks.directory, stacks=stacks.summary())
        code = self._group.terminate(self._config.grace)
        self._group_running = False
        self._attempt_ended(code)
        return True

    def _capture_stacks(self) -> Capture:
        """Where each hung rank is stuck (py-spy), before the group is killed."""
        if self._settings.hang_dump_timeout_s <= 0:
            return Capture(directory=None, note="no stacks: ORCH_HANG_DUMP_TIMEOUT_S is 0")
        pids = {b.rank: b.pid for b in read_heartbeats(self._paths)
                if b.attempt == self._attempt and b.pid is not None}
        return capture_stacks(pids, self._paths.hang_dir(self._attempt),
                              timeout_s=self._settings.hang_dump_timeout_s)

    def _scan_snapshots(self) -> None:
        protect = self._progress.resume_step if self._group_running else None
        self._snapshots.scan(protect=protect)
        self._progress.note_snapshot(self._snapshots.newest_local)
        self._audit.refresh(self._attempt)

    def _settle(self, *, finished: bool) -> None:
        """The ranks are gone: take in their last heartbeats and snapshots."""
        self._progress.read()
        if self._progress.progressed and self._progress.resume_step is not None:
            self._snapshots.note_loaded(self._progress.resume_step)
        if finished:
            self._snapshots.verify_final()
        # Re-plan retention even if no snapshot appeared: the resume point is unprotected now.
        self._snapshots.replan()
        self._scan_snapshots()

    # -- after an attempt ----------------------------------------------------------------

    def _attempt_ended(self, code: int) -> None:
        self._settle(finished=code == 0)
        beat = self._progress.last_beat
        # What goodput accounting needs of every attempt's end: the last completed step and
        # when a rank last reported progress (the failure happened after that).
        self._events.emit("supervisor.attempt_ended", attempt=self._attempt, exit_code=code,
                          step=self._progress.step, resume_step=self._progress.resume_step,
                          last_heartbeat_at=None if beat is None else beat.time)
        result = self._attempt_result(code)
        decision = decide(result, self._counters, self._limits)
        self._counters = decision.counters
        if decision.verify_next:
            self._snapshots.verify_next = True
        self._carry_out(decision, result)

    def _attempt_result(self, code: int) -> AttemptResult:
        """What the policy needs to know, read from the attempt's files."""
        progressed = self._progress.progressed
        if code == 0:
            return AttemptResult(exit_code=0, progressed=progressed)
        # The watchdog's own kill reaches the ranks as torchrun's SIGTERM, which they turn into
        # an emergency snapshot and ack: that is still a hang, a failure that spends a restart.
        hang = self._hang_failure
        acked = self._preemption.acked_step(self._attempt) if hang is None else None
        if acked is not None:
            return AttemptResult(exit_code=code, progressed=progressed, acked_step=acked)
        paths = self._paths
        return AttemptResult(
            exit_code=code,
            progressed=progressed,
            failure=hang if hang is not None
            else diagnose(paths, self._attempt, code, output=self._group.output_tail()),
            reported_corrupt=not progressed and reported_corrupt_snapshot(paths, self._attempt),
            resume_verified=self._snapshots.resume_verified,
        )

    def _carry_out(self, decision: Decision, result: AttemptResult) -> None:
        """The events and the phase change of a policy decision."""
        failures = decision.backoff_failures
        delay = 0.0 if failures == 0 else self._backoff.delay(failures)
        for name, fields in announce(
            decision,
            result,
            attempt=self._attempt,
            step=self._progress.step,
            resume_step=self._progress.resume_step,
            delay_s=delay,
            max_restarts=self._config.max_restarts,
        ):
            self._events.emit(name, **fields)
        if decision.is_failure and result.failure is not None:
            self._last_failure = result.failure.summary
        if decision.action is Action.FINISH:
            # last_failure stays: it is the run's most recent failure, recovered from or not.
            self._exit_code = EXIT_OK
            self._enter(Phase.DONE)
        elif decision.action is Action.RELAUNCH_NOW:
            # The ranks were signalled directly (not this supervisor) and stopped after an
            # emergency snapshot: relaunch at once. A preemption never counts as a restart.
            self._preemptions += 1
            self._attempt += 1
            self._enter(Phase.STARTING)
        elif decision.action is Action.GIVE_UP:
            self._give_up(self._last_failure or decision.reason, reason=decision.reason)
        else:
            self._recover(delay, counts=decision.counts_restart)

    def _recover(self, delay: float, *, counts: bool) -> None:
        self._recover_at = self._clock.monotonic() + delay
        self._recover_counts = counts
        self._enter(Phase.RECOVERING)

    def _give_up(self, root_cause: str, *, reason: str) -> None:
        self._last_failure = root_cause
        self._exit_code = EXIT_FAILED
        self._events.emit(
            "supervisor.gave_up",
            attempt=self._attempt,
            reason=reason,
            root_cause=root_cause,
            restarts=self._counters.restarts,
            no_progress_attempts=self._counters.no_progress_streak,
        )
        self._enter(Phase.FAILED)

    def _wait_backoff(self) -> None:
        remaining = self._recover_at - self._clock.monotonic()
        if remaining > 0:
            # Short naps so that a stop signal is honoured promptly during a long backoff.
            self._clock.sleep(min(remaining, self._settings.poll_interval_s))
            return
        if self._recover_counts:
            self._counters = replace(self._counters, restarts=self._counters.restarts + 1)
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
        """Ask the ranks for an emergency snapshot at their next step boundary (see
        :mod:`orchestrator.preempting`); a signal and a cloud notice take the same path."""
        self._spare.discard("preempting")  # its CPU belongs to the emergency snapshot now
        self._preemption.begin(
            source=source,
            signal_name=signal_name,
            attempt=self._attempt,
            step=self._progress.step,
            workers_running=self._group_running,
            signals_seen=self._stop.count,
        )
        self._enter(Phase.CHECKPOINTING)

    def _watch_preemption(self) -> None:
        ended = self._preemption.watch(
            self._group if self._group_running else None,
            signals=self._stop.count,
            attempt=self._attempt,
            progress=self._progress,
            poll_interval_s=self._settings.poll_interval_s,
        )
        if ended is None:
            return
        code, timed_out = ended
        self._group_running = False
        self._settle(finished=False)  # preempted: within --grace, no checksum pass
        ending, acked = self._preemption.conclude(
            code, timed_out=timed_out, attempt=self._attempt,
            newest_local=self._snapshots.newest_local,
        )
        self._flush_timeout = self._preemption.remaining_s()
        self._exit_code = ending.exit_code
        if ending.phase is Phase.DONE:
            # The run finished before the request took effect.
            self._events.emit("supervisor.finished", attempt=self._attempt, step=self._progress.step)
        if ending.preempted:
            self._preemptions += 1
            if acked is not None:
                self._progress.step = max(self._progress.step or 0, acked)
        if ending.failure is not None:
            self._last_failure = ending.failure
        self._enter(ending.phase)

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
        m = self._mirror
        newest_local = self._snapshots.newest_local
        newest_remote = None if m is None else m.newest_remote_step
        lag = None if m is None else mirror_lag(newest_local, newest_remote)
        pending = None if m is None else pending_of(self._snapshots.local_steps, m.mirrored_steps())
        return RunState(
            run_id=self._run_id,
            phase=self._phase.value,
            attempt=self._attempt,
            restarts=self._counters.restarts,
            preemptions=self._preemptions,
            step=self._progress.step,
            resumed_from_step=self._progress.resume_step,
            last_failure=self._last_failure,
            newest_local_step=newest_local,
            newest_remote_step=newest_remote,
            mirror_lag_steps=lag,
            mirror_error=None if m is None else m.error,
            mirror_pending_steps=pending,
            started_at=self._started_at,
            updated_at=self._clock.time(),
            pid=self._pid,
            launch=launch_identity(self._config),
            determinism=self._audit.document,
            snapshot_stall_s=self._progress.snapshot_timing[0],
            snapshot_write_s=self._progress.snapshot_timing[1],
            nodes=[
                NodeState(
                    node_rank=self._config.node_rank,
                    heartbeat_age_s=self._progress.heartbeat_age_s(),
                    phase=self._phase.value,
                )
            ],
        )

    def _write_state(self) -> None:
        state = self.state()
        self._state_file.write(state.to_json(), phase=self._phase.value)
        if self._observer is not None:
            self._observer(state)

    def _observe(self) -> None:
        if self._observer is None:
            return
        now = self._clock.monotonic()
        if now >= self._next_observe:
            self._next_observe = now + OBSERVE_INTERVAL_S
            self._observer(self.state())

    # -- mirror at the end -----------------------------------------------------------------

    def _finish_mirror(self, mirror: Mirror) -> None:
        """Bounded flush of what is not yet remote; the exit code never depends on it."""
        timeout = self._settings.mirror_flush_timeout_s
        if self._flush_timeout is not None:
            # Preempted: only what is left of --grace (the committed local snapshot stands).
            timeout = min(timeout, self._flush_timeout)
        signals = self._stop.count
        self._scan_snapshots()

        def publish_final() -> None:
            self._state_file.write(self.state().to_json(), phase=self._phase.value, force=True)

        try:
            finish_mirror(
                mirror,
                timeout_s=timeout,
                abort=lambda: self._stop.count != signals,  # a second signal cuts it short
                events=self._events,
                newest_local=self._snapshots.newest_local,
                publish_final=publish_final,
            )
        finally:
            state = self.state()
            self._state_file.write(state.to_json(), phase=None)
            if self._observer is not None:  # the metrics' last look: the mirror after its flush
                self._observer(state)
