"""The mirror: committed local snapshots reach the object store in the background.

The supervisor's loop never waits for the network. It calls :meth:`Mirror.notify` with the
committed local steps on every scan (a cheap, lock-protected assignment) and reads the mirror's
progress (:meth:`Mirror.mirrored_steps`, :attr:`Mirror.newest_remote_step`, :attr:`Mirror.error`)
without blocking. One worker thread does all the network work:

1. on start it rescans: lists the remote snapshots (those already there are ``mirror.skipped``)
   and aborts stale multipart uploads a killed supervisor left behind, so a relaunch finishes
   exactly what is missing (uploads are idempotent);
2. it uploads every local snapshot that is not yet remote. **Order**: with a backlog of one
   (the steady state: one new snapshot per interval) that is plain ascending order; when it has
   fallen behind (an outage, a slow link) it uploads the *newest* pending snapshot first, so
   the remote recovery point jumps forward at once, then backfills the older ones oldest first.
   With ``--keep-remote K`` a backlog snapshot that remote retention would delete right after
   its upload (not among the K newest) is skipped as superseded instead of uploaded;
3. after each upload it applies ``--keep-remote K`` (``storage.plan_retention``: the newest
   valid remote snapshot is never deleted);
4. it mirrors the supervisor's run state (``RemoteTier.put_state``) when asked, so that
   ``status --mirror URL`` works from anywhere;
5. it aborts leftover multipart uploads (``RemoteTier.abort_incomplete_uploads``): after an
   upload that needed retries (the failed attempt's own abort may not have got through: the
   endpoint was down), and once more as the last job of a run (:meth:`Mirror.abort_leftovers`,
   called by :func:`finish_mirror`), so that a run that ends leaves none of its own behind.
   Which uploads are its own: on a single node every upload under the prefix (it is the only
   writer); with several nodes only those this process started and could not abort, plus
   those older than ``stale_upload_age_s`` (never another node's live upload).

How it shares the machine with training (:mod:`orchestrator.throttle`): with ``ORCH_MIRROR_NICE``
(default on) the worker thread and every part-upload thread it starts run at nice 19 and the
lowest best-effort I/O priority; ``ORCH_MIRROR_MAX_MBPS`` caps the bytes sent per second (one
token bucket shared by all part threads, taken in 64 KiB chunks as the HTTP layer reads the
body, interrupted at once by :meth:`Mirror.close`); ``auto`` lets :class:`~orchestrator.
throttle.AutoCap` set that cap from the step rate the supervisor passes in
(:meth:`Mirror.note_progress`), each change reported as ``mirror.throttled``.

Transient errors (timeouts, resets, 5xx) are retried with tenacity: exponential backoff with
jitter, each network call bounded by the object store's own timeouts, no overall limit while the
run lives, interrupted at once by :meth:`Mirror.close`. A permanent error (403, missing bucket)
is reported at once (``mirror.failed`` with ``permanent: true``, :attr:`Mirror.error`) and
retried only after a long pause; training goes on. Any other exception is a bug: the thread
records it and :meth:`Mirror.check`, :meth:`Mirror.flush` and :meth:`Mirror.close` re-raise it
-- the mirror never dies silently.
"""

from __future__ import annotations

import contextvars
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Protocol, TypeVar

import structlog
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception_type,
    wait_exponential_jitter,
)

from contract.faults import FaultInjector
from contract.logs import redact
from orchestrator.settings import Settings
from orchestrator.throttle import MB, AutoCap, Interrupted, TokenBucket, lower_thread_priority
from storage import LocalSnapshotStore, RetentionPolicy, plan_retention
from storage.errors import (
    CorruptSnapshot,
    PermanentStorageError,
    SnapshotConflict,
    SnapshotNotFound,
    StorageError,
    TransientStorageError,
)
from storage.tier import RemoteTier as RemoteTier  # re-exported: cli imports it from here
from storage.tier import UploadResult

log = structlog.get_logger("orchestrator.mirror")

T = TypeVar("T")
Progress = Callable[[int, int], None]


class EventSink(Protocol):
    def emit(self, event: str, **fields: Any) -> None: ...


class MirrorCrashed(RuntimeError):
    """The mirror's thread died of an unexpected exception (the cause is chained)."""


class _Closing(Exception):
    """Raised inside a retried call when the mirror is closing: stop retrying at once."""


def error_text(exc: BaseException) -> str:
    """A one-line description of ``exc`` with any URL userinfo removed."""
    text = str(exc) or type(exc).__name__
    return redact(f"{type(exc).__name__}: {text}")


def mirror_lag(newest_local: int | None, newest_remote: int | None) -> int:
    """Training steps a lost node would cost: newest local step minus newest remote step.

    0 when caught up (or nothing local yet); with nothing remote the baseline is step 0.
    """
    if newest_local is None:
        return 0
    return max(0, newest_local - (newest_remote if newest_remote is not None else 0))


def transient_retrying(
    settings: Settings,
    *,
    stop: Callable[[RetryCallState], bool],
    sleep: Callable[[float], None],
    before_sleep: Callable[[RetryCallState], None] | None = None,
) -> Retrying:
    """tenacity policy for transient object-store errors: exponential backoff plus jitter."""
    return Retrying(
        retry=retry_if_exception_type(TransientStorageError),
        wait=wait_exponential_jitter(
            multiplier=settings.mirror_retry_initial_s,
            max=settings.mirror_retry_max_s,
            jitter=settings.mirror_retry_jitter_s,
        ),
        stop=stop,
        sleep=sleep,
        before_sleep=before_sleep,
        reraise=True,
    )


def call_bounded(settings: Settings, fn: Callable[[], T], *, attempts: int | None = None) -> T:
    """``fn()`` retried on transient errors at most ``attempts`` times (preflight, restore)."""
    limit = attempts if attempts is not None else settings.mirror_preflight_attempts
    retrying = transient_retrying(
        settings, stop=lambda rs: rs.attempt_number >= limit, sleep=time.sleep
    )
    return retrying(fn)


class MirrorPacing:
    """The :class:`storage.objectstore.Pacing` the mirror hands to its uploads."""

    def __init__(self, bucket: TokenBucket, *, nice: bool, lower: Callable[[], None]) -> None:
        self.bucket = bucket
        self._nice = nice
        self._lower = lower

    def thread_started(self) -> None:
        if self._nice:
            self._lower()

    def take(self, nbytes: int, /) -> None:
        self.bucket.take(nbytes)


class Mirror:
    """Uploads committed local snapshots to a remote tier from one background thread."""

    def __init__(
        self,
        *,
        remote: RemoteTier,
        local: LocalSnapshotStore,
        events: EventSink,
        settings: Settings,
        node_rank: int = 0,
        keep_remote: int | None = None,
        monotonic: Callable[[], float] = time.monotonic,
        faults: FaultInjector | None = None,
        stale_upload_age_s: float = 0.0,
        lower_priority: Callable[[], None] = lower_thread_priority,
    ) -> None:
        self.remote = remote
        self._stale_upload_age_s = stale_upload_age_s
        self._faults = faults
        self.local_store = local
        self._events = events
        self._settings = settings
        self._node_rank = node_rank
        self._keep_remote = keep_remote
        self._monotonic = monotonic
        self._cond = threading.Condition()
        self._closing = threading.Event()
        self._thread: threading.Thread | None = None
        cap = settings.mirror_cap()
        #: The bandwidth cap (bytes/s; None: unlimited), shared by every upload thread.
        self.bucket = TokenBucket(
            cap * MB if isinstance(cap, float) else None, wait=self._closing.wait
        )
        self.pacing = MirrorPacing(self.bucket, nice=settings.mirror_nice, lower=lower_priority)
        #: ORCH_MIRROR_MAX_MBPS=auto: fed by note_progress() (the supervisor's thread only).
        self.auto: AutoCap | None = None
        if cap == "auto":
            self.auto = AutoCap(
                min_bps=settings.mirror_auto_min_mbps * MB,
                window_s=settings.mirror_auto_window_s,
            )
        # Everything below is guarded by self._cond.
        self._local: tuple[int, ...] = ()
        self._remote: set[int] = set()
        self._done: set[int] = set()  # local steps that need no upload (mirrored or settled)
        self._queued: set[int] = set()
        self._scanned = False
        self._busy: int | None = None
        self._state_doc: dict[str, Any] | None = None
        self._error: str | None = None
        self._paused_until = 0.0
        self._crash: BaseException | None = None
        self._finished = False
        # The final abort pass: its deadline while requested, then whether it ran to its end.
        self._leftovers_deadline: float | None = None
        self._leftovers_done = False
        self._leftovers_given_up = False  # the waiter reported it unfinished: say nothing more
        # Worker thread only: an upload attempt failed since the last successful abort pass,
        # so one of its multipart uploads may be left on the server.
        self._leak_suspected = False

    # -- the loop's side (cheap, never blocks on the network) ------------------------------

    def start(self) -> None:
        """Start the worker thread (rescan first, then uploads)."""
        if self._thread is not None:
            raise RuntimeError("mirror already started")
        ctx = contextvars.copy_context()  # keep run_id/node_rank bound in the thread's logs
        self._thread = threading.Thread(
            target=ctx.run, args=(self._main,), name="orchestrator-mirror", daemon=True
        )
        self._thread.start()

    def notify(self, local_steps: Iterable[int]) -> None:
        """The committed local steps now (every scan); new ones get queued for upload."""
        steps = tuple(sorted(set(local_steps)))
        with self._cond:
            if steps != self._local:
                self._local = steps
                self._cond.notify_all()

    def note_progress(self, step: int, step_time: float) -> None:
        """The training's newest heartbeat (step, its wall time), on every supervisor poll.

        With ``ORCH_MIRROR_MAX_MBPS=auto`` it drives the cap; otherwise it does nothing.
        """
        auto = self.auto
        if auto is None:
            return
        with self._cond:
            uploading = self._busy is not None
        decision = auto.observe(
            self._monotonic(), step, step_time, uploading=uploading, sent_bytes=self.bucket.granted
        )
        if decision is None or decision.action == "baseline":
            return
        self.bucket.set_rate(decision.cap_bps)
        self._events.emit(
            "mirror.throttled",
            action=decision.action,
            cap_mb_per_s=None if decision.cap_bps is None else round(decision.cap_bps / MB, 2),
            steps_per_s=round(decision.steps_per_s, 3),
            idle_steps_per_s=None
            if decision.baseline_steps_per_s is None
            else round(decision.baseline_steps_per_s, 3),
        )

    def lift_cap(self) -> None:
        """Training has stopped (end of run, preemption): upload what is left at full speed.

        Called from the supervisor's thread (the only caller of :meth:`note_progress`).
        """
        self.auto = None
        if self.bucket.rate_bps is not None:
            self.bucket.set_rate(None)
            self._events.emit("mirror.throttled", action="lift_final", cap_mb_per_s=None)

    def publish_state(self, doc: Mapping[str, Any]) -> None:
        """Mirror this run-state document (the latest one wins if several are waiting)."""
        with self._cond:
            self._state_doc = dict(doc)
            self._cond.notify_all()

    def mirrored_steps(self) -> frozenset[int]:
        """Local steps that need no upload any more (uploaded, found remote, or superseded)."""
        with self._cond:
            return frozenset(self._done)

    def pending_steps(self) -> list[int]:
        """Local steps not yet mirrored, ascending."""
        with self._cond:
            return sorted(s for s in self._local if s not in self._done)

    @property
    def newest_remote_step(self) -> int | None:
        with self._cond:
            return max(self._remote) if self._remote else None

    @property
    def lag(self) -> int:
        """:func:`mirror_lag` of the newest notified local step and the newest remote one."""
        with self._cond:
            local = self._local[-1] if self._local else None
            remote = max(self._remote) if self._remote else None
        return mirror_lag(local, remote)

    @property
    def error(self) -> str | None:
        """The last unresolved error (permanent, or the thread's crash); None when healthy."""
        with self._cond:
            if self._crash is not None:
                return f"mirror crashed: {error_text(self._crash)}"
            return self._error

    def check(self) -> None:
        """Re-raise the worker thread's unexpected exception, if it died of one."""
        with self._cond:
            crash = self._crash
        if crash is not None:
            raise MirrorCrashed(f"the mirror thread died: {error_text(crash)}") from crash

    def flush(self, timeout_s: float, *, abort: Callable[[], bool] | None = None) -> bool:
        """Wait (bounded) until every notified step and the last state are mirrored.

        Returns False on timeout, when ``abort()`` turns true (checked twice a second), or at once
        while a permanent error is unresolved. Re-raises a crash of the worker thread.
        """
        deadline = self._monotonic() + timeout_s
        with self._cond:
            while True:
                if self._crash is not None or self._finished:
                    break
                if self._error is not None:
                    return False
                if self._idle_locked():
                    return True
                remaining = deadline - self._monotonic()
                if remaining <= 0 or (abort is not None and abort()):
                    return False
                self._cond.wait(min(remaining, 0.5))
        self.check()
        return self._idle_locked()

    # Alias: the component contract is "wait()/close() re-raise what the thread captured".
    wait = flush

    def abort_leftovers(self, timeout_s: float, *, abort: Callable[[], bool] | None = None) -> bool:
        """The last job of a run: abort the run's own incomplete multipart uploads, bounded.

        Run by the worker thread (after whatever it is doing now), transient errors retried with
        the mirror's policy until ``timeout_s`` is spent; ``mirror.uploads_aborted`` or
        ``mirror.uploads_abort_failed`` (``final: true``) says how it ended. True when the pass
        finished (even with a failure), False when it timed out, ``abort()`` turned true or the
        thread is not running. Re-raises a crash of the worker thread.
        """
        deadline = self._monotonic() + timeout_s
        with self._cond:
            if self._thread is None or self._finished:
                return False
            self._leftovers_deadline = deadline
            self._leftovers_done = False
            self._cond.notify_all()
            while not self._leftovers_done and not self._finished:
                remaining = deadline - self._monotonic()
                if remaining <= 0 or (abort is not None and abort()):
                    break
                self._cond.wait(min(remaining, 0.5))
            done = self._leftovers_done
            if not done:
                # Not started yet: never start it; started: its failure is reported here.
                self._leftovers_deadline = None
                self._leftovers_given_up = True
        self.check()
        if not done:
            # The pass (maybe a network call bounded by the store's timeouts) is abandoned: the
            # next launch's rescan aborts what is left.
            self._events.emit(
                "mirror.uploads_abort_failed",
                error=f"not finished within {round(timeout_s, 3)} s",
                final=True,
                permanent=False,
                timeout_s=round(timeout_s, 3),
            )
        return done

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop now (interrupting retry waits); join the thread, bounded; re-raise its crash.

        A network call in flight is bounded by the store's own timeouts; the thread is a daemon,
        so a call hung beyond that never holds the process. What is left is finished by the
        next launch's rescan.
        """
        self._closing.set()
        with self._cond:
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                log.warning("mirror.close_timeout", timeout_s=timeout_s)
        self.check()

    # -- the worker thread -----------------------------------------------------------------

    def _idle_locked(self) -> bool:
        return (
            self._scanned
            and self._busy is None
            and self._state_doc is None
            and all(s in self._done for s in self._local)
        )

    def _main(self) -> None:
        try:
            self.pacing.thread_started()  # this thread reads and hashes every byte it uploads
            self._rescan()
            while True:
                job = self._next_job()
                if job is None:
                    return
                kind, value = job
                if kind == "state":
                    self._put_state(value)
                elif kind == "leftovers":
                    self._final_abort_pass(value)
                else:
                    self._upload(value)
        except (_Closing, Interrupted):  # Interrupted: a capped send cut short by close()
            return
        except BaseException as exc:
            log.error("mirror.crashed", error=error_text(exc))
            with self._cond:
                self._crash = exc
        finally:
            with self._cond:
                self._busy = None
                self._finished = True
                self._cond.notify_all()

    def _retrying(
        self,
        step: int | None,
        *,
        deadline: float | None = None,
        op: str | None = None,
    ) -> Retrying:
        """The transient policy, stopped by close() and (when given) before ``deadline``."""

        def before_sleep(rs: RetryCallState) -> None:
            exc = rs.outcome.exception() if rs.outcome is not None else None
            delay = rs.next_action.sleep if rs.next_action is not None else 0.0
            fields: dict[str, Any] = {"op": op} if op is not None else {}
            self._events.emit(
                "mirror.retry",
                step=step,
                attempt=rs.attempt_number,
                error=error_text(exc) if exc is not None else None,
                delay_s=round(delay, 3),
                **fields,
            )

        def stop(rs: RetryCallState) -> bool:
            if self._closing.is_set():
                return True
            # No attempt that would start after the deadline: the last error stands.
            return deadline is not None and self._monotonic() + rs.upcoming_sleep >= deadline

        return transient_retrying(
            self._settings,
            stop=stop,
            sleep=self._interruptible_sleep,
            before_sleep=before_sleep,
        )

    def _interruptible_sleep(self, seconds: float) -> None:
        self._closing.wait(seconds)

    def _call(self, step: int | None, fn: Callable[[], T]) -> T:
        def guarded() -> T:
            if self._closing.is_set():
                raise _Closing()
            return fn()

        try:
            return self._retrying(step)(guarded)
        except TransientStorageError:
            if self._closing.is_set():
                raise _Closing() from None
            raise

    def _rescan(self) -> None:
        while True:
            try:
                infos = self._call(None, self.remote.list)
                aborted = self._call(
                    None,
                    lambda: self.remote.abort_incomplete_uploads(
                        older_than_s=self._stale_upload_age_s
                    ),
                )
                break
            except PermanentStorageError as exc:
                self._permanent(None, exc)
                self._pause()
            except StorageError as exc:
                # A malformed listing or the like: report, then try again later.
                self._permanent(None, exc)
                self._pause()
        remote = {i.step for i in infos if i.valid is not False}
        with self._cond:
            self._remote = remote
            self._scanned = True
            self._error = None
            self._cond.notify_all()
        self._events.emit(
            "mirror.rescanned",
            remote_steps=sorted(remote),
            aborted_uploads=aborted,
            newest_remote_step=max(remote) if remote else None,
        )

    def _pause(self) -> None:
        """Wait out the pause after a permanent error (interrupted by close)."""
        with self._cond:
            self._paused_until = self._monotonic() + self._settings.mirror_permanent_retry_s
        if self._closing.wait(self._settings.mirror_permanent_retry_s):
            raise _Closing()

    def _next_job(self) -> tuple[str, Any] | None:
        with self._cond:
            while True:
                if self._closing.is_set():
                    return None
                wait: float | None = None
                if self._state_doc is not None:
                    doc, self._state_doc = self._state_doc, None
                    return ("state", doc)
                if self._leftovers_deadline is not None and not self._leftovers_done:
                    # Even while paused after a permanent error: it is the run's last job.
                    return ("leftovers", self._leftovers_deadline)
                if self._error is not None:
                    wait = self._paused_until - self._monotonic()
                if wait is None or wait <= 0:
                    step = self._pick_locked()
                    if step is not None:
                        self._busy = step
                        return ("upload", step)
                    wait = None
                self._cond.notify_all()  # idle: wake flush()
                self._cond.wait(wait)

    def _pick_locked(self) -> int | None:
        """The next step to upload (see the module doc for the order); settles skips."""
        skipped: list[tuple[int, str]] = []
        pending = [s for s in self._local if s not in self._done]
        for step in pending:
            if step in self._remote:
                self._done.add(step)
                skipped.append((step, "already_remote"))
        pending = [s for s in pending if s not in self._done]
        if self._keep_remote is not None and len(pending) > 1:
            keep = set(sorted(self._remote | set(pending))[-self._keep_remote :])
            for step in pending:
                if step not in keep:
                    self._done.add(step)
                    skipped.append((step, "superseded"))
            pending = [s for s in pending if s not in self._done]
        new = [s for s in pending if s not in self._queued]
        self._queued.update(new)
        # Emitting under our lock is fine: the event log's lock is a leaf.
        for step, reason in skipped:
            self._events.emit("mirror.skipped", step=step, reason=reason)
        for step in new:
            self._events.emit("mirror.queued", step=step, pending=len(pending))
        if not pending:
            return None
        newest_remote = max(self._remote) if self._remote else -1
        if pending[-1] > newest_remote:
            # Behind: the newest first, so the remote recovery point jumps forward at once.
            return pending[-1]
        return pending[0]

    def _upload(self, step: int) -> None:
        uploaded = False
        try:
            uploaded = self._upload_and_prune(step)
        finally:
            # Busy until retention ran too, so that flush() returns with the remote settled.
            with self._cond:
                self._busy = None
                self._cond.notify_all()
        if uploaded and self._leak_suspected:
            # The endpoint answers again (the upload got through): abort what the failed
            # attempts may have left, now rather than at the end of a long run. Not busy: a
            # flush waits for snapshots, not for this cleanup (the final pass redoes it).
            self._abort_pass(deadline=None)

    def _fault_hook(self, step: int) -> Callable[[str], None] | None:
        faults = self._faults
        if faults is None or not faults.rules:
            return None
        return lambda name: faults.point(name, step)

    def _upload_and_prune(self, step: int) -> bool:
        """Upload ``step``, then apply remote retention; whether the snapshot got there."""

        def attempt() -> UploadResult:
            try:
                return self.remote.upload(
                    self.local_store, step, on_phase=self._fault_hook(step), pacing=self.pacing
                )
            except StorageError:
                self._leak_suspected = True
                raise

        try:
            result = self._call(step, attempt)
        except (CorruptSnapshot, SnapshotNotFound) as exc:
            # The local copy is corrupt or gone (deleted meanwhile): nothing to upload, ever.
            self._events.emit(
                "mirror.failed", step=step, error=error_text(exc), permanent=True, local=True
            )
            with self._cond:
                self._done.add(step)
            return False
        except SnapshotConflict as exc:
            # Another snapshot (another digest) owns this step remotely: a reused prefix. This
            # step can never be mirrored; the others still can, so nothing pauses.
            self._events.emit(
                "mirror.failed", step=step, error=error_text(exc), permanent=True, conflict=True
            )
            with self._cond:
                self._done.add(step)
            return False
        except StorageError as exc:
            self._permanent(step, exc)
            return False
        seconds = float(result.seconds)
        if result.skipped:
            self._events.emit("mirror.skipped", step=step, reason="already_remote")
        else:
            mbps = result.bytes / 1e6 / seconds if seconds > 0 else None
            self._events.emit(
                "mirror.uploaded",
                step=step,
                bytes=result.bytes,
                seconds=round(seconds, 3),
                mb_per_s=None if mbps is None else round(mbps, 2),
            )
        with self._cond:
            self._remote.add(step)
            self._done.add(step)
            self._error = None
        self._apply_remote_retention(protect=step)
        return True

    def _final_abort_pass(self, deadline: float) -> None:
        try:
            self._abort_pass(deadline=deadline)
        finally:
            with self._cond:
                self._leftovers_deadline = None
                self._leftovers_done = True
                self._cond.notify_all()

    def _abort_pass(self, *, deadline: float | None) -> None:
        """Abort the run's own leftover uploads, transient errors retried (until ``deadline``,
        else while the run lives); a failure is reported, never raised: uploads go on."""
        final = deadline is not None

        def guarded() -> int:
            if self._closing.is_set():
                raise _Closing()
            return self.remote.abort_incomplete_uploads(older_than_s=self._stale_upload_age_s)

        try:
            count = self._retrying(None, deadline=deadline, op="abort_uploads")(guarded)
        except StorageError as exc:
            if self._closing.is_set():
                raise _Closing() from None
            # Left for the final pass (or the next launch's rescan); not retried after every
            # upload: a permanent refusal (no abort permission) would repeat it each time.
            self._leak_suspected = False
            with self._cond:
                reported = final and self._leftovers_given_up
            if reported:
                return
            self._events.emit(
                "mirror.uploads_abort_failed",
                error=error_text(exc),
                final=final,
                permanent=not isinstance(exc, TransientStorageError),
            )
            return
        self._leak_suspected = False
        if count or final:  # the final pass says that it ran, even when it found nothing
            self._events.emit("mirror.uploads_aborted", count=count, final=final)

    def _permanent(self, step: int | None, exc: BaseException) -> None:
        """Report a permanent error at once; uploads pause for ``mirror_permanent_retry_s``."""
        text = error_text(exc)
        self._events.emit("mirror.failed", step=step, error=text, permanent=True)
        with self._cond:
            self._error = text
            self._paused_until = self._monotonic() + self._settings.mirror_permanent_retry_s
            self._cond.notify_all()

    def _apply_remote_retention(self, *, protect: int) -> None:
        if self._keep_remote is None:
            return
        try:
            infos = self._call(None, self.remote.list)
            doomed = plan_retention(
                infos, RetentionPolicy(keep_last=self._keep_remote), protected={protect}
            )
            deleted: list[int] = []
            for step in doomed:
                self._delete_remote(step)
                deleted.append(step)
        except _Closing:
            raise
        except StorageError as exc:
            self._events.emit("retention.failed", tier="remote", error=error_text(exc))
            return
        remote = {i.step for i in infos if i.valid is not False} - set(deleted)
        with self._cond:
            self._remote = remote | {protect}
        if deleted:
            self._events.emit("retention.deleted", steps=deleted, tier="remote")

    def _delete_remote(self, step: int) -> None:
        self._call(step, lambda: self.remote.delete(step))

    def _put_state(self, doc: dict[str, Any]) -> None:
        try:
            self.remote.put_state(self._node_rank, doc)
        except TransientStorageError as exc:
            # The next periodic publish replaces it; no retry storm for a status document.
            log.info("mirror.state_put_failed", error=error_text(exc))
        except StorageError as exc:
            self._permanent(None, exc)


def finish_mirror(
    mirror: Mirror,
    *,
    timeout_s: float,
    abort: Callable[[], bool],
    events: EventSink,
    newest_local: int | None,
    publish_final: Callable[[], None],
) -> None:
    """The end of a run: wait (bounded, real time) for the mirror to catch up, then close it.

    Once caught up, the final run state is published too (one small object, a short bound).
    Then, with what is left of ``timeout_s``, the run's own incomplete multipart uploads are
    aborted (:meth:`Mirror.abort_leftovers`). ``mirror.flushed`` or ``mirror.behind`` says how
    it ended; the exit code never depends on it.
    """
    started = time.monotonic()
    mirror.lift_cap()  # training no longer runs: the cap protects nothing now
    events.emit("mirror.flushing", pending_steps=mirror.pending_steps(), timeout_s=timeout_s)
    caught_up = mirror.flush(timeout_s, abort=abort)
    if caught_up:
        publish_final()
        caught_up = mirror.flush(min(timeout_s, 10.0), abort=abort)
    pending = mirror.pending_steps()
    try:
        try:
            # A second signal (abort) skips it: the next launch's rescan aborts what is left.
            if not abort():
                left = max(0.0, timeout_s - (time.monotonic() - started))
                mirror.abort_leftovers(left, abort=abort)
        finally:
            mirror.close()
    finally:
        if caught_up:
            events.emit("mirror.flushed", newest_remote_step=mirror.newest_remote_step)
        else:
            events.emit(
                "mirror.behind",
                pending_steps=pending,
                newest_remote_step=mirror.newest_remote_step,
                lag_steps=mirror_lag(newest_local, mirror.newest_remote_step),
                error=mirror.error,
                timeout_s=timeout_s,
            )


def pending_of(local_steps: Sequence[int], mirrored: frozenset[int]) -> list[int]:
    """Local steps not in ``mirrored``, ascending (what local retention must protect)."""
    return sorted(s for s in local_steps if s not in mirrored)


class MirrorUnavailable(ValueError):
    """The mirror URL cannot be used: a configuration error (exit 2, nothing launched)."""


def safe_url(url: str) -> str:
    """``url`` fit for messages: any ``user:password@`` is masked, the bucket stays."""
    return redact(url)


def open_remote(url: str) -> RemoteTier:
    """The remote tier at ``url`` (``s3://bucket/prefix`` or any fsspec URL).

    :class:`MirrorUnavailable` for a URL that cannot work (unknown scheme, missing driver).
    """
    try:
        from storage.remote import RemoteSnapshotStore
    except ImportError as exc:
        raise MirrorUnavailable(
            f"--mirror {safe_url(url)}: the remote tier is not available ({exc.name} missing)"
        ) from None
    try:
        store: RemoteTier = RemoteSnapshotStore(url)
    except (ValueError, ImportError, StorageError) as exc:
        raise MirrorUnavailable(f"--mirror {safe_url(url)}: {error_text(exc)}") from None
    return store


def preflight(remote: RemoteTier, url: str, settings: Settings) -> None:
    """Check that the prefix is reachable and writable; :class:`MirrorUnavailable` if not.

    Transient failures are retried a bounded number of times (each call bounded by the object
    store's timeouts), so an unreachable endpoint fails the launch within seconds.
    """
    try:
        call_bounded(settings, remote.preflight)
    except TransientStorageError as exc:
        raise MirrorUnavailable(
            f"--mirror {safe_url(url)}: the object store endpoint is unreachable "
            f"(after {settings.mirror_preflight_attempts} tries): {error_text(exc)}"
        ) from None
    except StorageError as exc:
        raise MirrorUnavailable(
            f"--mirror {safe_url(url)}: the bucket/prefix is not usable "
            f"(it must exist and be readable and writable): {error_text(exc)}"
        ) from None
