"""The supervisor's own files, damaged or gone: bounded parsing of run-dir documents, state and
event writes that fail without stopping the supervisor, a removed ``run/`` recreated."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from contract.documents import (
    MAX_DEPTH,
    MAX_DOCUMENT_BYTES,
    DamagedDocument,
    Heartbeat,
    parse_document,
    read_json,
)
from contract.paths import RunPaths
from orchestrator import runstate
from orchestrator.runstate import (
    EventLog,
    StateFile,
    next_attempt,
    read_events,
    read_heartbeats,
    restore_run_dir,
    stable_run_id,
)
from storage.errors import DiskFull, NotWritable
from tests.support.clock import FakeClock

pytestmark = pytest.mark.timeout(30)


# -- bounded parsing ---------------------------------------------------------------------------


def test_deep_nesting_is_damage_not_a_recursion_error(tmp_path: Path) -> None:
    for depth in (MAX_DEPTH + 1, 10_000, 200_000):
        path = tmp_path / f"deep-{depth}.json"
        path.write_text('{"a":' + "[" * depth + "]" * depth + "}")
        assert read_json(str(path)) is None
    ok = tmp_path / "ok.json"
    ok.write_text('{"a":' + "[" * (MAX_DEPTH - 1) + "]" * (MAX_DEPTH - 1) + "}")
    assert read_json(str(ok)) is not None


def test_brackets_inside_strings_do_not_count_as_depth() -> None:
    doc = {"message": "[" * 10_000 + "{" * 10_000, "n": 1}
    assert parse_document(json.dumps(doc).encode()) == doc


def test_oversized_and_non_json_documents_are_absent(tmp_path: Path) -> None:
    big = tmp_path / "big.json"
    big.write_text('{"pad": "' + "x" * MAX_DOCUMENT_BYTES + '"}')
    assert read_json(str(big)) is None
    huge_int = tmp_path / "int.json"
    huge_int.write_text('{"attempt": ' + "9" * 5000 + "}")  # beyond Python's int-parsing limit
    assert read_json(str(huge_int)) is None
    with pytest.raises(DamagedDocument):
        parse_document(b"\xff\xfe")


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=400))
def test_junk_never_raises_anything_but_damaged_document(data: bytes) -> None:
    with contextlib.suppress(DamagedDocument):
        parse_document(data)


def test_absurd_numbers_are_junk(tmp_path: Path) -> None:
    paths = RunPaths.of(str(tmp_path))
    os.makedirs(paths.progress_dir)
    beat = {"rank": 0, "step": 5, "attempt": 10**300, "time": 1.0, "pid": 1}
    Path(paths.heartbeat(0)).write_text(json.dumps(beat))
    assert read_heartbeats(paths) == []
    assert Heartbeat.from_json({**beat, "attempt": 2}) is not None


def test_next_attempt_ignores_an_absurd_attempt_number(tmp_path: Path) -> None:
    # An attempt of 10**300 named a log file too long to create ("File name too long").
    paths = RunPaths.of(str(tmp_path))
    os.makedirs(paths.logs_dir)
    Path(paths.state).write_text(json.dumps({"run_id": "r", "attempt": 10**300}))
    assert next_attempt(paths) == 0
    Path(paths.logs_dir, "attempt-" + "9" * 40 + ".log").write_text("")
    Path(paths.attempt_log(4)).write_text("")
    assert next_attempt(paths) == 5
    os.open(paths.attempt_log(next_attempt(paths)), os.O_CREAT | os.O_WRONLY)  # a usable name


@pytest.mark.parametrize("doc", [
    '{"run_id": ' + "[" * 100_000 + "]" * 100_000 + "}",
    '{"run_id": "' + "x" * 5000 + '"}',
    '{"run_id": "../../etc"}',
    '{"run_id": 7}',
])
def test_a_damaged_run_id_is_replaced_by_a_fresh_one(tmp_path: Path, doc: str) -> None:
    paths = RunPaths.of(str(tmp_path))
    os.makedirs(paths.run_dir)
    Path(paths.state).write_text(doc)
    run_id = stable_run_id(paths)
    assert run_id.startswith("run-") and len(run_id) < 40


def test_damaged_event_lines_are_skipped(tmp_path: Path) -> None:
    paths = RunPaths.of(str(tmp_path))
    os.makedirs(paths.run_dir)
    with open(paths.events, "w") as f:
        f.write('{"event": "a"}\n')
        f.write("[" * 100_000 + "\n")
        f.write('{"event": "b", "n": ' + "9" * 5000 + "}\n")
        f.write('{"event": "c"}\n')
    assert [e["event"] for e in read_events(paths)] == ["a", "c"]


# -- writes that fail --------------------------------------------------------------------------


def _failing(errnum: int) -> Any:
    def write(*_a: Any, **_k: Any) -> None:
        raise OSError(errnum, os.strerror(errnum), "state.json")
    return write


@pytest.mark.parametrize(("errnum", "kind"), [(errno.ENOSPC, DiskFull), (errno.EROFS, NotWritable),
                                                (errno.EACCES, NotWritable)])
def test_a_state_write_that_fails_never_stops_the_supervisor(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, errnum: int, kind: type[Exception],
) -> None:
    published: list[Any] = []
    state = StateFile(str(tmp_path / "state.json"), clock=FakeClock(), publish=published.append,
                      publish_interval_s=0.0)
    monkeypatch.setattr(runstate, "write_json_atomic", _failing(errnum))
    state.write({"phase": "running"}, phase="running")
    assert isinstance(state.write_error, kind)
    assert published == [{"phase": "running"}]  # the mirror still hears of it
    monkeypatch.undo()
    state.write({"phase": "done"}, phase="done")
    assert state.write_error is None
    assert json.loads((tmp_path / "state.json").read_text()) == {"phase": "done"}


def test_an_event_write_that_fails_loses_the_line_only(tmp_path: Path) -> None:
    events = EventLog(str(tmp_path / "events.jsonl"), clock=FakeClock(), run_id="r")

    class Full:
        closed = False

        def write(self, _line: str) -> None:
            raise OSError(errno.ENOSPC, "No space left on device")

        def flush(self) -> None:
            pass

        def close(self) -> None:
            raise OSError(errno.ENOSPC, "No space left on device")

    real = events._file
    events._file = Full()  # type: ignore[assignment]
    events.emit("supervisor.attempt_started", attempt=0)
    events.emit("supervisor.finished", attempt=0)
    events._file = real
    events.emit("supervisor.after", attempt=0)
    events.close()
    lines = (tmp_path / "events.jsonl").read_text().splitlines()
    assert [json.loads(x)["event"] for x in lines] == ["supervisor.after"]


# -- run/ removed ------------------------------------------------------------------------------


def test_restore_run_dir_recreates_what_the_workers_write_into(tmp_path: Path) -> None:
    paths = RunPaths.of(str(tmp_path))
    os.makedirs(paths.progress_dir)
    shutil.rmtree(paths.run_dir)
    restore_run_dir(paths)
    for d in (paths.progress_dir, paths.control_dir, paths.logs_dir):
        assert os.path.isdir(d)


def test_events_continue_in_a_new_file_after_run_is_removed(tmp_path: Path) -> None:
    paths = RunPaths.of(str(tmp_path))
    events = EventLog(paths.events, clock=FakeClock(), run_id="r")
    events.emit("before")
    assert not events.detached()
    shutil.rmtree(paths.run_dir)
    assert events.detached()
    restore_run_dir(paths)
    events.reopen()
    assert not events.detached()
    events.emit("after")
    events.close()
    assert [e["event"] for e in read_events(paths)] == ["after"]
