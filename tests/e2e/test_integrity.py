"""End-to-end integrity: corrupt snapshots, junk, disk full, spent budgets, changed config."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from tests.e2e import harness
from tests.support.mounts import tmpfs

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]


def _interrupted_run(ckpt: Path) -> harness.Result:
    """A run that dies at step 73 with no restart budget: snapshots 20, 40, 60 remain."""
    result = harness.launch(ckpt, faults="step_end@73:rank=0", max_restarts=0)
    assert result.rc == 1, result.stderr[-3000:]
    assert "rank 0" in result.stderr and "SIGKILL" in result.stderr, result.stderr[-3000:]
    return result


def _bitflip(snapshot_dir: Path) -> None:
    data = snapshot_dir / "tensors.bin"
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    data.write_bytes(bytes(raw))


# The budget spent (exit 1, root cause, phase failed) is test_cli_launch.py's
# test_budget_spent_exits_1_with_root_cause; _interrupted_run checks the real SIGKILL's cause.
# A truncated file or a missing manifest is caught and skipped the same way as this bit flip
# (which only a checksum finds): test_storage_local.py::test_newest_valid_falls_back,
# test_truncated_file_invalid, test_missing_manifest_invalid.
def test_corrupt_newest_falls_back(golden: dict[int, str], ckpt: Path) -> None:
    _interrupted_run(ckpt)
    _bitflip(ckpt / "snapshots" / "step-000000000060")
    listed = {s["step"]: s for s in harness.snapshots(ckpt, verify=True)}
    assert sorted(listed) == [20, 40, 60], sorted(listed)
    assert listed[60]["valid"] is False and listed[60]["reason"]
    assert listed[40]["valid"] is True
    result = harness.launch(ckpt)
    harness.assert_matches_golden(result, golden)
    assert result.status()["resumed_from_step"] == 40


def test_junk_in_checkpoint_dir_is_ignored(golden: dict[int, str], ckpt: Path) -> None:
    snaps = ckpt / "snapshots"
    snaps.mkdir(parents=True)
    junk = [snaps / "notes.txt", snaps / "step-abc", snaps / "step-", snaps / ".DS_Store"]
    for j in junk:
        j.write_text("junk")
    (snaps / "random-dir").mkdir()
    (ckpt / "README.txt").write_text("mine")
    result = harness.launch(ckpt)
    harness.assert_matches_golden(result, golden)
    for j in [*junk, snaps / "random-dir", ckpt / "README.txt"]:
        assert j.exists(), f"{j} was removed"


def test_changed_hyperparameters_refused(ckpt: Path) -> None:
    _interrupted_run(ckpt)
    result = harness.launch(ckpt, script_args=("--lr", "0.5"))
    assert result.rc == 1
    assert "lr" in result.stderr and "allow-config-change" in result.stderr, result.stderr[-3000:]
    assert result.status()["restarts"] == 0, "a fatal config mismatch must not be retried"
    allowed = harness.launch(ckpt, script_args=("--lr", "0.5"), extra_launch=("--allow-config-change",))
    assert allowed.rc == 0, allowed.stderr[-3000:]
    assert allowed.status()["resumed_from_step"] == 60


def test_disk_full_fails_loudly_and_keeps_older_snapshots(tmp_path: Path) -> None:
    ckpt = tmp_path / "small"
    with tmpfs(ckpt, "3m"):
        # Every snapshot kept: the default keep-last-3 would fit this run in 3 MB.
        result = harness.launch(ckpt, max_restarts=2, extra_launch=("--keep-local", "all"))
        assert result.rc == 1
        assert "space" in result.stderr.lower(), result.stderr[-3000:]
        snaps = result.snapshots()
        assert snaps, "at least one snapshot fitted before the disk filled"
        assert all(s["valid"] for s in snaps), snaps
        assert not [n for n in os.listdir(ckpt / "snapshots") if n.startswith(".tmp")]
        saved = tmp_path / "copy"
        shutil.copytree(ckpt / "snapshots", saved)
    assert json.loads((saved / sorted(os.listdir(saved))[-1] / "manifest.json").read_text())
