"""Snapshots whose file checksums agree but whose content does not, and snapshot files that
leave their directory, under the real ``orchestrator launch`` (digits example, 2 ranks).

Invariants: a snapshot is applied only when the decoded state's content digest is the
manifest's; a file of a snapshot is read only when it is a regular file inside it (a symlink to
anything outside, here a fifo that would hang any reader, makes the snapshot invalid); the run
falls back to the previous valid snapshot and finishes bit-identical to the uninterrupted run.
``snapshots --verify`` checks file checksums (the retyped snapshot passes it), ``--verify=deep``
also the content digest.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from contract.polling import wait_until
from tests.e2e import harness
from tests.faults.conftest import supervisor_traceback
from tests.support.tamper import retype_tensor

pytestmark = pytest.mark.timeout(240)


def _snap(ckpt: Path, step: int) -> Path:
    return ckpt / "snapshots" / f"step-{step:012d}"


def _events(ckpt: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in (ckpt / "run" / "events.jsonl").read_text().splitlines()]


def _listing(ckpt: Path, verify: str) -> dict[int, dict[str, Any]]:
    p = subprocess.run(
        [*harness.ORCH, "snapshots", "--checkpoint-dir", str(ckpt), "--json", f"--verify={verify}"],
        env=harness.base_env(), capture_output=True, text=True, timeout=120,
    )
    assert p.returncode == 0, p.stderr
    return {r["step"]: r for r in json.loads(p.stdout)}


def test_retyped_snapshot_found_by_the_ranks_falls_back_within_the_launch(
    tmp_path: Path, golden: dict[int, str]
) -> None:
    """The tester's case: the snapshot is retyped (checksums fixed) between its commit and the
    relaunch after a crash, when the supervisor only checks sizes: the ranks' verified load must
    refuse it (content digest), the supervisor verify everything and resume from the one
    before, and the run end bit-identical."""
    ckpt = tmp_path / "ckpt"
    run = harness.start(ckpt, env={"ORCH_FAULTS": "step_end@73:rank=0"})
    try:
        manifest = _snap(ckpt, 60) / "manifest.json"
        wait_until(manifest.exists, timeout=180, what="snapshot 60",
                   stop_if=lambda: None if run.poll() is None else "the run ended early")
        retype_tensor(_snap(ckpt, 60))
        out, err = run.communicate(timeout=200)
    finally:
        harness.kill_group(run)
    result = harness.Result(run.returncode, out, err, ckpt)
    assert not supervisor_traceback(err), err[-3000:]
    harness.assert_matches_golden(result, golden)
    assert result.status()["resumed_from_step"] == 40
    events = _events(ckpt)
    corrupt = [e for e in events if e["event"] == "supervisor.resume_corrupt"]
    assert corrupt and corrupt[0]["step"] == 60, [e["event"] for e in events]
    assert "content digest" in corrupt[0]["root_cause"], corrupt[0]
    invalid = [e for e in events if e["event"] == "supervisor.snapshot_invalid"]
    assert [e["step"] for e in invalid] == [60], invalid
    assert "content digest" in invalid[0]["reason"], invalid[0]


def test_retyped_and_symlinked_snapshots_are_invalid_and_skipped(
    tmp_path: Path, golden: dict[int, str]
) -> None:
    ckpt = tmp_path / "ckpt"
    # Slow steps: snapshot 60 is written in the background and must commit before the kill.
    first = harness.launch(ckpt, faults="step_end@73:rank=0", max_restarts=0,
                           script_args=("--step-delay", "0.05"))
    assert first.rc == 1, first.stderr[-3000:]
    assert sorted(harness.digests(first.snapshots())) == [20, 40, 60]
    retype_tensor(_snap(ckpt, 60))
    # Snapshot 40's tensors.bin: a link to a fifo outside, which would block any reader.
    outside = tmp_path / "outside.fifo"
    os.mkfifo(outside)
    tensors = _snap(ckpt, 40) / "tensors.bin"
    tensors.unlink()
    tensors.symlink_to(outside)

    files = _listing(ckpt, "files")
    assert files[60]["valid"] is True, files[60]  # file checksums cannot see it
    assert files[40]["valid"] is False
    assert files[40]["reason"] == "tensors.bin: a symlink, not a file of the snapshot"
    deep = _listing(ckpt, "deep")
    assert deep[20]["valid"] is True and deep[20]["verified_content"] is True
    assert deep[60]["valid"] is False and "content digest" in deep[60]["reason"], deep[60]
    assert deep[40]["valid"] is False and "symlink" in deep[40]["reason"]

    result = harness.launch(ckpt)
    assert not supervisor_traceback(result.stderr), result.stderr[-3000:]
    harness.assert_matches_golden(result, golden)
    assert result.status()["resumed_from_step"] == 20
    reasons = {e["step"]: e["reason"] for e in _events(ckpt) if e["event"] == "supervisor.snapshot_invalid"}
    assert "content digest" in reasons[60] and "symlink" in reasons[40], reasons
    assert outside.exists()  # never opened, never removed: it was not the snapshot's
