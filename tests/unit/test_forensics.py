"""Hang forensics: py-spy dumps of real processes, bounded, and clear notes when impossible."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator import forensics
from orchestrator.forensics import capture_stacks, find_py_spy

pytestmark = pytest.mark.timeout(60)

STUCK = "import time\ndef stuck_in_a_collective():\n    time.sleep(600)\nstuck_in_a_collective()\n"


@pytest.fixture
def stuck() -> subprocess.Popen[bytes]:
    proc = subprocess.Popen([sys.executable, "-c", STUCK])
    yield proc
    proc.kill()
    proc.wait()


def test_every_ranks_stack_is_written(tmp_path: Path, stuck: subprocess.Popen[bytes]) -> None:
    if find_py_spy() is None:
        pytest.skip("py-spy is not installed")
    # Rank 1's pid is gone: its file says why, rank 0's holds the stack.
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    capture = capture_stacks({0: stuck.pid, 1: gone.pid}, str(tmp_path / "hang"), timeout_s=30)
    if capture.captured != (0,):
        pytest.skip(f"py-spy cannot read processes here: {capture.summary()}")
    text = (tmp_path / "hang" / "rank-0.txt").read_text()
    assert "stuck_in_a_collective" in text
    assert set(capture.missing) == {1}
    assert "no stack" in (tmp_path / "hang" / "rank-1.txt").read_text()
    assert "rank 1" in capture.summary() and str(tmp_path / "hang") in capture.summary()


def test_the_capture_is_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                stuck: subprocess.Popen[bytes]) -> None:
    slow = tmp_path / "py-spy"
    slow.write_text("#!/bin/sh\nsleep 600\n")
    slow.chmod(0o755)
    monkeypatch.setattr(forensics, "find_py_spy", lambda: str(slow))
    capture = capture_stacks({0: stuck.pid}, str(tmp_path / "hang"), timeout_s=0.5)
    assert capture.captured == () and "longer than 0.5s" in capture.missing[0]


def test_without_py_spy_or_pids_there_is_a_clear_note(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    assert "no rank has reported" in capture_stacks({}, str(tmp_path), timeout_s=1).summary()
    monkeypatch.setattr(forensics, "find_py_spy", lambda: None)
    capture = capture_stacks({0: 1}, str(tmp_path / "hang"), timeout_s=1)
    assert capture.directory is None and "py-spy is not installed" in capture.summary()
