"""The supervisor's files under ``<checkpoint-dir>/run``: state, events, lock, heartbeats.

``run/state.json`` is the one document operators and ``orchestrator status`` read; it is
replaced atomically (temp file, fsync, rename, fsync of the directory) so a reader never sees a
torn write. ``run/events.jsonl`` is an append-only log of structured supervisor events whose
names are API. ``run/supervisor.lock`` is held with ``fcntl.flock`` for the supervisor's life so
that two supervisors never drive the same checkpoint dir. Worker heartbeats
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

from contract.atomic import atomic_write_json
from contract.documents import (
    DeterminismReport,
    Heartbeat,
    read_document,
    read_json,
    summarize_determinism,
)
from contract.paths import RunPaths
from orchestrator.clock import Clock
from orchestrator.config import LaunchConfig

log = structlog.get_logger("orchestrator.runstate")

_ATTEMPT_LOG = re.compile(r"^attempt-(\d+)\.log$")
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
    most every ``publish_interval_s`` otherwise."""

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

    def write(self, doc: Mapping[str, Any], *, phase: str | None, force: bool = False) -> None:
        """Replace the file with ``doc``; publish it too if due (``phase`` None: never)."""
        write_json_atomic(self._path, doc)
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
    if state is not None and isinstance(state.get("run_id"), str) and state["run_id"]:
        return str(state["run_id"])
    return "run-" + uuid.uuid4().hex[:12]


def next_attempt(paths: RunPaths) -> int:
    """The first attempt number of a new supervisor on this dir.

    Attempts keep counting across supervisor launches so that stale error files and logs of an
    earlier launch are never taken for this one's, and so that ``ORCH_FAULTS`` rules aimed at
    attempt 0 fire only once per run.
    """
    candidates = [0]
    state = read_state(paths)
    if state is not None and isinstance(state.get("attempt"), int):
        candidates.append(int(state["attempt"]) + 1)
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

    def emit(self, event: str, **fields: Any) -> None:
        """Record ``event`` (an API name such as ``supervisor.attempt_started``) with fields."""
        doc = {"time": self._clock.time(), "event": event, "run_id": self._run_id, **fields}
        line = json.dumps(doc, default=str) + "\n"
        with self._lock:
            if self._file.closed:
                return
            self._file.write(line)
            self._file.flush()
        level = "warning" if event.endswith(("failed", "gave_up", "invalid", "diverged")) else "info"
        getattr(log, level)(event, **fields)

    def close(self) -> None:
        with self._lock:
            self._file.close()


def read_events(paths: RunPaths) -> list[dict[str, Any]]:
    """Every parseable event of the dir, in order (a torn last line is skipped)."""
    return read_json_lines(paths.events)


def read_json_lines(path: str) -> list[dict[str, Any]]:
    """The JSON objects of a JSON-lines file, in order; unparseable lines skipped, [] if absent."""
    out: list[dict[str, Any]] = []
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                with contextlib.suppress(ValueError):
                    doc = json.loads(line)
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
    """``run/supervisor.lock``, held exclusively with ``flock`` while the supervisor lives.

    The kernel drops a flock when its holder dies, even by SIGKILL, so a stale lock file never
    blocks a relaunch. The file descriptor is not inheritable: torchrun and the workers never
    hold it.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock without waiting; :class:`LockHeld` when another process has it."""
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EACCES):
                raise LockHeld(self.path, _lock_holder_text(self.path)) from None
            raise
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        """Drop the lock (the file stays: removing it would race with a new acquirer)."""
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def _lock_holder_text(path: str) -> str:
    try:
        with open(path, encoding="ascii") as f:
            pid = f.read().strip()
    except (OSError, UnicodeDecodeError):
        return "pid unknown"
    return f"pid {pid}" if pid.isdigit() else "pid unknown"


def lock_is_held(path: str) -> bool:
    """Whether some process holds ``path``'s flock, without ever taking it.

    Taking the lock to test it would make a concurrently starting supervisor fail, so this
    reads ``/proc/locks`` (Linux) and compares inode numbers.
    """
    try:
        inode = os.stat(path).st_ino
    except FileNotFoundError:
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
        dev_ino = parts[5].split(":")
        if len(dev_ino) == 3 and dev_ino[2].isdigit() and int(dev_ino[2]) == inode:
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
