"""Disks that refuse writes, on real tmpfs mounts (skipped where mounting is not permitted): a
read-only ``snapshots/`` found before launch (exit 2), a disk filled by another process mid-run
(a one-line DiskFull, exit 1, every older snapshot intact, then a bit-identical finish once
space is back) and a read-only remount mid-run (fatal at once: no retry can fix it)."""

from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path

import pytest

from contract.polling import wait_until
from tests.e2e import harness
from tests.faults.conftest import supervisor_traceback
from tests.support.mounts import tmpfs

pytestmark = pytest.mark.timeout(300)


def _fill(where: Path) -> Path:
    """Take every free byte of ``where``'s filesystem, as another process would."""
    filler = where / "filler.bin"
    with open(filler, "wb") as f:
        chunk = b"\0" * (1 << 20)
        try:
            while True:
                f.write(chunk)
                f.flush()
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
    return filler


def _snapshot_steps(ckpt: Path) -> list[int]:
    snaps = ckpt / "snapshots"
    return sorted(int(n.split("-")[1]) for n in os.listdir(snaps) if n.startswith("step-"))


def _wait_first_snapshot(proc: subprocess.Popen[str], ckpt: Path) -> None:
    wait_until(lambda: _snapshot_steps(ckpt) if os.path.isdir(ckpt / "snapshots") else None,
               timeout=120, what="the first snapshot",
               stop_if=lambda: None if proc.poll() is None else "the run ended early")


def test_read_only_snapshots_dir_is_refused_before_launch(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    with tmpfs(ckpt / "snapshots", "4m", options="ro"):
        result = harness.launch(ckpt, timeout=60)
    assert result.rc == 2, result.stderr[-3000:]
    assert "snapshots is not writable" in result.stderr and "Read-only" in result.stderr
    assert not (ckpt / "run" / "logs").exists() or not os.listdir(ckpt / "run" / "logs")


def test_disk_filled_by_another_process_mid_run(tmp_path: Path, golden: dict[int, str]) -> None:
    ckpt = tmp_path / "small"
    with tmpfs(ckpt, "64m"):
        proc = harness.start(ckpt, max_restarts=1, script_args=("--step-delay", "0.05"))
        try:
            _wait_first_snapshot(proc, ckpt)
            filler = _fill(ckpt)
            _out, err = proc.communicate(timeout=240)
        finally:
            harness.kill_group(proc)
        assert proc.returncode == 1, err[-3000:]
        assert not supervisor_traceback(err), err[-3000:]
        failed = [line for line in err.splitlines() if "run failed:" in line]
        assert len(failed) == 1 and "space" in failed[0].lower(), err[-3000:]
        kept = _snapshot_steps(ckpt)
        assert kept, "the snapshots taken before the disk filled are kept"
        snaps = harness.snapshots(ckpt)
        assert all(s["valid"] for s in snaps), snaps
        assert not [n for n in os.listdir(ckpt / "snapshots") if n.startswith(".tmp")]
        # Space back: the same launch resumes and finishes as if nothing happened.
        filler.unlink()
        result = harness.launch(ckpt)
        harness.assert_matches_golden(result, golden)
        assert result.status()["resumed_from_step"] == max(kept)


def test_snapshots_dir_turning_read_only_mid_run_is_fatal_at_once(tmp_path: Path) -> None:
    """``snapshots/`` becomes read-only under a running job (here: a read-only tmpfs mounted
    over it; a remount of the whole dir is refused while the run holds files open): the next
    save fails with EROFS, which no retry can fix, so the run stops at once."""
    ckpt = tmp_path / "ckpt"
    proc = harness.start(ckpt, max_restarts=3, script_args=("--step-delay", "0.05"))
    try:
        _wait_first_snapshot(proc, ckpt)
        with tmpfs(ckpt / "snapshots", "4m", options="ro"):
            _out, err = proc.communicate(timeout=240)
    finally:
        harness.kill_group(proc)
    assert proc.returncode == 1, err[-3000:]
    assert not supervisor_traceback(err), err[-3000:]
    failed = [line for line in err.splitlines() if "run failed:" in line]
    assert len(failed) == 1 and "Read-only file system" in failed[0], err[-3000:]
    state = harness.status(ckpt)
    assert state["restarts"] == 0, state  # fatal: never retried
    snaps = harness.snapshots(ckpt)
    assert snaps and all(s["valid"] for s in snaps), snaps
