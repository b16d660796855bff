"""The supervisor's files under ``<checkpoint-dir>/run``: state, events, lock, heartbeats.

``run/state.json`` is the one document operators and ``orchestrator status`` read; it is
replaced atomically (temp file, fsync, rename, fsync of the directory) so a reader never sees a
torn write. ``run/events.jsonl`` is an append-only log of structured supervisor events whose
names are API. The checkpoint dir itself is held with ``fcntl.flock`` for the supervisor's life
(:class:`RunLock`) so that two supervisors never drive the same checkpoint dir, even when ``run/``
is removed under them. Worker heartbeats
(``run/progress/rank-<R>.json``) are read here too. Layout: docs/INTERNALS.md.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import threading
import uuid
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import structlog

from contract.atomic import atomic_write_bytes, atomic_write_json
from contract.documents import (
    DamagedDocument,
    DeterminismReport,
    Heartbeat,
    parse_document,
    read_document,
    read_json,
    summarize_determinism,
)
from contract.paths import RunPaths
from orchestrator.clock import Clock
from orchestrator.config import RUN_ID_PATTERN, LaunchConfig
from storage.errors import StorageError, os_error

log = structlog.get_logger("orchestrator.runstate")

# At most 9 digits: a larger attempt number is junk (it would name files too long to create).
_ATTEMPT_LOG = re.compile(r"^attempt-(\d{1,9})\.log$")
#: Attempts a run dir may count to; a state.json claiming more is damaged.
MAX_ATTEMPT = 10**9 - 1
_RANK_FILE = re.compile(r"^rank-(\d+)\.json$")


@dataclass(frozen=True, kw_only=True)
class NodeState:
    """One node's entry in ``state.json``'s ``nodes`` list."""

    node_rank: int
    heartbeat_age_s: float | None
    phase: str


@dataclass(kw_only=True)
class RunState:
    """The content of ``run/state.json`` (field names are the ``status --json`` contract)."""

    run_id: str
    phase: str
    attempt: int
    restarts: int = 0
    preemptions: int = 0
    step: int | None = None
    resumed_from_step: int | None = None
    last_failure: str | None = None
    newest_local_step: int | None = None
    newest_remote_step: int | None = None
    mirror_lag_steps: int | None = None
    #: The mirror's last unresolved error (a permanent one: 403, missing bucket); None if healthy.
    mirror_error: str | None = None
    #: Local snapshots not yet in the object store (null without a mirror).
    mirror_pending_steps: list[int] | None = None
    started_at: float
    updated_at: float
    pid: int
    nodes: list[NodeState] = field(default_factory=list)
    #: What was launched (:func:`launch_identity`): a relaunch of a ``done`` run with the same
    #: identity has nothing left to do (``launch`` says "already done" and starts nothing).
    launch: dict[str, Any] | None = None
    #: The last snapshot's training stall and write seconds, as rank 0 reported them.
    snapshot_stall_s: float | None = None
    snapshot_write_s: float | None = None
    #: The ranks' resume audit (:func:`read_determinism`), copied here so that ``status
    #: --mirror`` shows it too.
    determinism: dict[str, Any] = field(
        default_factory=lambda: summarize_determinism([])
    )

    def to_json(self) -> dict[str, Any]:
        """The JSON document; ``nodes`` as a list of objects."""
        return asdict(self)


def launch_identity(config: LaunchConfig) -> dict[str, Any]:
    """What makes a launch the same run: script (absolute path), its arguments, the layout and
    the mirror (``state.json``'s ``launch``)."""
    return {
        "script": os.path.abspath(config.script),
        "script_args": list(config.script_args),
        "nodes": config.nodes,
        "nproc_per_node": config.nproc_per_node,
        "mirror": config.mirror,
    }


def write_json_atomic(path: str, doc: Mapping[str, Any]) -> None:
    """Replace ``path`` with ``doc`` so that readers see the old or the new content, never a mix."""
    atomic_write_json(path, doc, durable=True)


class StateFile:
    """``run/state.json``, rewritten atomically; also published through ``publish`` (the mirror's
    ``<prefix>/run/node-<R>/state.json``, for ``status --mirror``) on every phase change and at
    most every ``publish_interval_s`` otherwise.

    Best effort: the run's outcome lives in its snapshots and exit code, not in this file, so a
    write that fails (a disk filled by another process, a read-only remount, a removed ``run/``
    that cannot be recreated) never stops the supervisor while its workers train. It is logged
    once per kind (``supervisor.state_write_failed``, mapped like snapshot writes: DiskFull,
    NotWritable), kept in :attr:`write_error` for the final message, and cleared by the next
    write that succeeds (``supervisor.state_write_recovered``).
    """

    def __init__(
        self,
        path: str,
        *,
        clock: Clock,
        publish: Callable[[Mapping[str, Any]], None] | None,
        publish_interval_s: float,
    ) -> None:
        self._path = path
        self._clock = clock
        self._publish = publish
        self._interval = publish_interval_s
        self._published_phase: str | None = None
        self._next_publish = 0.0
        #: Why the last write failed (None: it succeeded).
        self.write_error: StorageError | None = None

    def write(self, doc: Mapping[str, Any], *, phase: str | None, force: bool = False) -> None:
        """Replace the file with ``doc``; publish it too if due (``phase`` None: never)."""
        try:
            write_json_atomic(self._path, doc)
        except OSError as exc:
            error = os_error(exc, f"writing {self._path}")
            if self.write_error is None or type(error) is not type(self.write_error):
                log.warning("supervisor.state_write_failed", path=self._path, error=str(error),
                            kind=type(error).__name__)
            self.write_error = error
        else:
            if self.write_error is not None:
                log.info("supervisor.state_write_recovered", path=self._path)
                self.write_error = None
        if self._publish is None or phase is None:
            return
        now = self._clock.monotonic()
        if force or phase != self._published_phase or now >= self._next_publish:
            self._published_phase = phase
            self._next_publish = now + self._interval
            self._publish(doc)


def read_state(paths: RunPaths) -> dict[str, Any] | None:
    """The last written ``state.json``, or None when there is none."""
    return read_json(paths.state)


def stable_run_id(paths: RunPaths) -> str:
    """The run id recorded in the dir's ``state.json``, else a fresh one.

    Relaunching on the same dir (after a preemption, a failure, a supervisor crash) therefore
    keeps the run id the snapshots were written under.
    """
    state = read_state(paths)
    recorded = None if state is None else state.get("run_id")
    if isinstance(recorded, str) and RUN_ID_PATTERN.match(recorded):
        return recorded
    if recorded is not None:
        log.warning("runstate.damaged_field", path=paths.state, field="run_id",
                    value=repr(recorded)[:40])
    return "run-" + uuid.uuid4().hex[:12]


def next_attempt(paths: RunPaths) -> int:
    """The first attempt number of a new supervisor on this dir.

    Attempts keep counting across supervisor launches so that stale error files and logs of an
    earlier launch are never taken for this one's, and so that ``ORCH_FAULTS`` rules aimed at
    attempt 0 fire only once per run.
    """
    candidates = [0]
    state = read_state(paths)
    attempt = None if state is None else state.get("attempt")
    if isinstance(attempt, int) and not isinstance(attempt, bool) and 0 <= attempt < MAX_ATTEMPT:
        candidates.append(attempt + 1)
    elif attempt is not None:
        log.warning("runstate.damaged_field", path=paths.state, field="attempt",
                    value=repr(attempt)[:40])
    with contextlib.suppress(FileNotFoundError):
        for name in os.listdir(paths.logs_dir):
            m = _ATTEMPT_LOG.match(name)
            if m:
                candidates.append(int(m.group(1)) + 1)
    return max(candidates)


class EventLog:
    """Appends one JSON object per line to ``run/events.jsonl`` and mirrors it to the log.

    Each line is flushed immediately: the file is for humans and tools following a live run.
    Thread-safe: the mirror's background thread emits into the same log as the supervisor loop.
    """

    def __init__(self, path: str, *, clock: Clock, run_id: str) -> None:
        self._path = path
        self._clock = clock
        self._run_id = run_id
        os.makedirs(os.path.dirname(path), exist_ok=True)
        self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 - lives as long as the log
        self._lock = threading.Lock()
        self._failing = False
        self._subscribers: list[Callable[[dict[str, Any]], None]] = []

    def subscribe(self, callback: Callable[[dict[str, Any]], None]) -> None:
        """Also hand every event (the document written to the file) to ``callback``: alerts,
        metrics and goodput follow the run this way. Called on the emitting thread, after the
        line is written, so a callback must only queue or count (never block), and an error in
        it is logged (``events.subscriber_failed``), never raised into the supervisor."""
        self._subscribers.append(callback)

    def detached(self) -> bool:
        """Whether the file written to is no longer the one at the path (``run/`` removed, or
        the file itself): lines written now would reach no reader."""
        with self._lock:
            if self._file.closed:
                return False
            try:
                return os.stat(self._path).st_ino != os.fstat(self._file.fileno()).st_ino
            except FileNotFoundError:
                return True
            except OSError:
                return False

    def reopen(self) -> None:
        """Continue in a new file at the same path (``run/`` was removed and recreated: the
        old descriptor writes to a file no one can see). Best effort, like :meth:`emit`."""
        with self._lock:
            if self._file.closed:
                return
            try:
                os.makedirs(os.path.dirname(self._path), exist_ok=True)
                new = open(self._path, "a", encoding="utf-8")  # noqa: SIM115
            except OSError as exc:
                log.warning("supervisor.events_write_failed", path=self._path, error=str(exc))
                return
            with contextlib.suppress(OSError):
                self._file.close()
            self._file = new

    def emit(self, event: str, **fields: Any) -> None:
        """Record ``event`` (an API name such as ``supervisor.attempt_started``) with fields.

        The structured log gets it whatever happens to the file: a write that fails (disk full,
        read-only) loses the line, is reported once (``supervisor.events_write_failed``), and
        never stops the supervisor.
        """
        doc = {"time": self._clock.time(), "event": event, "run_id": self._run_id, **fields}
        line = json.dumps(doc, default=str) + "\n"
        with self._lock:
            if self._file.closed:
                return
            try:
                self._file.write(line)
                self._file.flush()
            except OSError as exc:
                if not self._failing:
                    log.warning("supervisor.events_write_failed", path=self._path,
                                error=str(os_error(exc, f"writing {self._path}")))
                self._failing = True
            else:
                self._failing = False
        level = "warning" if event.endswith(("failed", "gave_up", "invalid", "diverged")) else "info"
        getattr(log, level)(event, **fields)
        for callback in self._subscribers:
            try:
                callback(doc)
            except Exception as exc:  # a broken alert or metric never stops the supervisor
                log.error("events.subscriber_failed", event=event, error=repr(exc))

    def close(self) -> None:
        with self._lock, contextlib.suppress(OSError):  # a full disk loses the buffered tail
            self._file.close()


def restore_run_dir(paths: RunPaths) -> None:
    """Recreate the directories of ``run/`` the workers write into, after ``run/`` vanished
    under a live run (an operator's cleanup, a script). Best effort: an error (a full or
    read-only disk) is logged and left to the next check."""
    for directory in (paths.progress_dir, paths.control_dir, paths.logs_dir):
        try:
            os.makedirs(directory, exist_ok=True)
        except OSError as exc:
            log.warning("supervisor.run_dir_unrecoverable", path=directory, error=str(exc))
            return


def read_events(paths: RunPaths) -> list[dict[str, Any]]:
    """Every parseable event of the dir, in order (a torn last line is skipped)."""
    return read_json_lines(paths.events)


def read_json_lines(path: str) -> list[dict[str, Any]]:
    """The JSON objects of a JSON-lines file, in order; unparseable lines skipped, [] if absent."""
    out: list[dict[str, Any]] = []
    try:
        with open(path, "rb") as f:
            for line in f:
                # Each line with the run-dir limits (size, depth): a damaged one is skipped.
                with contextlib.suppress(DamagedDocument):
                    doc = parse_document(line)
                    if isinstance(doc, dict):
                        out.append(doc)
    except FileNotFoundError:
        return []
    return out


class LockHeld(Exception):
    """Another live supervisor holds the checkpoint dir."""

    def __init__(self, path: str, holder: str) -> None:
        self.path = path
        self.holder = holder
        super().__init__(f"{path} is held by a live supervisor ({holder})")


class RunLock:
    """The checkpoint dir itself, held exclusively with ``flock`` while the supervisor lives.

    The lock is on the directory, not on a file inside ``run/``: a ``run/`` removed during a run
    (by an operator's cleanup, a script) takes a lock file with it, and a second ``launch`` would
    then find nothing held and run beside the first. The directory cannot be replaced while it
    is open without the new one being a different inode, which ``lock_is_held`` tells apart.
    ``run/supervisor.lock`` still gets the holder's pid, for the "held by" message only. The
    kernel drops a flock when its holder dies, even by SIGKILL, so nothing stale ever blocks a
    relaunch. The descriptor is not inheritable: torchrun and the workers never hold it.
    """

    def __init__(self, directory: str, *, holder_file: str | None = None) -> None:
        self.directory = os.path.abspath(directory)
        self.holder_file = holder_file
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock without waiting; :class:`LockHeld` when another process has it."""
        os.makedirs(self.directory, exist_ok=True)
        fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EACCES):
                raise LockHeld(self.directory, _lock_holder_text(self.holder_file)) from None
            raise
        self._fd = fd
        if self.holder_file is not None:
            # Informational only (the message a second launch prints): best effort.
            with contextlib.suppress(OSError):
                os.makedirs(os.path.dirname(self.holder_file), exist_ok=True)
                atomic_write_bytes(self.holder_file, f"{os.getpid()}\n".encode(), durable=False)

    def release(self) -> None:
        """Drop the lock."""
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def _lock_holder_text(path: str | None) -> str:
    if path is None:
        return "pid unknown"
    try:
        with open(path, encoding="ascii") as f:
            pid = f.read(32).strip()
    except (OSError, UnicodeDecodeError):
        return "pid unknown"
    return f"pid {pid}" if pid.isdigit() else "pid unknown"


def lock_is_held(directory: str) -> bool:
    """Whether some process holds the checkpoint dir's flock, without ever taking it.

    Taking the lock to test it would make a concurrently starting supervisor fail, so this
    reads ``/proc/locks`` (Linux) and compares inode numbers.
    """
    try:
        st = os.stat(directory)
    except OSError:
        return False
    try:
        with open("/proc/locks", encoding="ascii") as f:
            lines = f.read().splitlines()
    except OSError:
        return False
    for line in lines:
        parts = line.split()
        # "1: FLOCK  ADVISORY  WRITE 1234 00:2f:5678 0 EOF"; blocked waiters carry "->".
        if "->" in parts or len(parts) < 6 or parts[1] != "FLOCK":
            continue
        # The inode alone: overlay filesystems report another device number here than stat().
        dev_ino = parts[5].split(":")
        if len(dev_ino) == 3 and dev_ino[2].isdigit() and int(dev_ino[2]) == st.st_ino:
            return True
    return False


def read_heartbeats(paths: RunPaths) -> list[Heartbeat]:
    """All parseable heartbeats, any attempt; malformed files are skipped."""
    out: list[Heartbeat] = []
    try:
        names = os.listdir(paths.progress_dir)
    except FileNotFoundError:
        return out
    for name in names:
        m = _RANK_FILE.match(name)
        if not m:
            continue
        doc = read_json(os.path.join(paths.progress_dir, name))
        beat = None if doc is None else Heartbeat.from_json(doc, rank=int(m.group(1)))
        if beat is not None:
            out.append(beat)
    return out


def read_determinism(paths: RunPaths, run_id: Any = None) -> dict[str, Any]:
    """``status --json`` ``determinism``: the ranks' resume audits (``run/determinism/``) merged
    (see :func:`contract.documents.summarize_determinism`); ``unchecked`` when there are none.
    Reports of another run id than ``run_id`` (a reused dir) are ignored."""
    try:
        names = sorted(os.listdir(paths.determinism_dir))
    except OSError:
        names = []
    reports: list[DeterminismReport] = []
    for name in names:
        if _RANK_FILE.match(name) is None:
            continue
        report = read_document(os.path.join(paths.determinism_dir, name), DeterminismReport)
        if report is not None and (not isinstance(run_id, str) or report.run_id in (None, run_id)):
            reports.append(report)
    return summarize_determinism(reports)
