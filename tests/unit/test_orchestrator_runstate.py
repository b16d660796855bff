"""Run files: atomic state, event log, the supervisor lock, heartbeats, attempt numbering."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from contract.paths import RunPaths
from orchestrator.clock import RealClock
from orchestrator.runstate import (
    EventLog,
    LockHeld,
    RunLock,
    lock_is_held,
    next_attempt,
    read_events,
    read_heartbeats,
    stable_run_id,
    write_json_atomic,
)

pytestmark = pytest.mark.timeout(20)


def test_atomic_write_replaces_and_leaves_no_temp(tmp_path: Path) -> None:
    p = tmp_path / "state.json"
    write_json_atomic(str(p), {"a": 1})
    write_json_atomic(str(p), {"a": 2})
    assert json.loads(p.read_text()) == {"a": 2}
    assert os.listdir(tmp_path) == ["state.json"]


def test_events_are_json_lines(tmp_path: Path) -> None:
    paths = RunPaths.of(str(tmp_path))
    log = EventLog(paths.events, clock=RealClock(), run_id="r")
    log.emit("supervisor.attempt_started", attempt=0)
    log.emit("supervisor.finished", attempt=0, step=3)
    log.close()
    with open(paths.events, "a") as f:
        f.write('{"torn')
    events = read_events(paths)
    assert [e["event"] for e in events] == ["supervisor.attempt_started", "supervisor.finished"]
    assert all(e["run_id"] == "r" and isinstance(e["time"], float) for e in events)


def test_lock_is_exclusive_and_released(tmp_path: Path) -> None:
    holder = str(tmp_path / "run" / "supervisor.lock")
    first = RunLock(str(tmp_path), holder_file=holder)
    first.acquire()
    assert lock_is_held(str(tmp_path))
    with pytest.raises(LockHeld, match=f"pid {os.getpid()}"):
        RunLock(str(tmp_path), holder_file=holder).acquire()
    first.release()
    assert not lock_is_held(str(tmp_path))
    second = RunLock(str(tmp_path))
    second.acquire()
    second.release()


def test_a_removed_run_dir_never_lets_a_second_supervisor_in(tmp_path: Path) -> None:
    # The lock lived in run/ before: removing run/ took it along and a second launch ran
    # beside the first. It is on the checkpoint dir itself now.
    first = RunLock(str(tmp_path), holder_file=str(tmp_path / "run" / "supervisor.lock"))
    first.acquire()
    shutil.rmtree(tmp_path / "run")
    assert lock_is_held(str(tmp_path))
    with pytest.raises(LockHeld, match="pid unknown"):  # the holder file went with run/
        RunLock(str(tmp_path), holder_file=str(tmp_path / "run" / "supervisor.lock")).acquire()
    first.release()


def test_lock_of_a_dead_process_is_free(tmp_path: Path) -> None:
    path = str(tmp_path)
    code = (
        "import fcntl, os, sys\n"
        f"fd = os.open({path!r}, os.O_RDONLY | os.O_DIRECTORY)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\n"
        "os.kill(os.getpid(), 9)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=False, timeout=10)
    assert not lock_is_held(path)
    lock = RunLock(path)
    lock.acquire()
    lock.release()


def test_stable_run_id_and_next_attempt(tmp_path: Path) -> None:
    paths = RunPaths.of(str(tmp_path))
    os.makedirs(paths.logs_dir)
    first = stable_run_id(paths)
    assert first.startswith("run-") and stable_run_id(paths) != first  # nothing recorded yet
    assert next_attempt(paths) == 0
    write_json_atomic(paths.state, {"run_id": "keep-me", "attempt": 3})
    assert stable_run_id(paths) == "keep-me"
    assert next_attempt(paths) == 4
    Path(paths.attempt_log(9)).write_text("")
    assert next_attempt(paths) == 10


def test_heartbeats_skip_junk(tmp_path: Path) -> None:
    paths = RunPaths.of(str(tmp_path))
    os.makedirs(paths.progress_dir)
    d = Path(paths.progress_dir)
    (d / "rank-0.json").write_text(json.dumps({"step": 4, "attempt": 1, "time": 5.0}))
    (d / "rank-1.json").write_text("{")
    (d / "rank-2.json").write_text(json.dumps({"step": "x", "attempt": 1, "time": 5.0}))
    (d / "other.json").write_text(json.dumps({"step": 1, "attempt": 1, "time": 5.0}))
    beats = read_heartbeats(paths)
    assert [(b.rank, b.step, b.attempt) for b in beats] == [(0, 4, 1)]
