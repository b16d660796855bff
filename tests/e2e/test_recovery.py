"""End-to-end recovery: kill workers at chosen points, finish bit-identical to the golden run."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from contract.polling import wait_until
from tests.e2e import harness
from tests.e2e.harness import EVERY, STEPS

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]


def test_golden_run_is_reproducible(golden: dict[int, str], ckpt: Path) -> None:
    """Two uninterrupted runs agree: otherwise no comparison below would mean anything."""
    result = harness.launch(ckpt)
    harness.assert_matches_golden(result, golden)
    assert sorted(golden) == list(range(EVERY, STEPS + 1, EVERY))
    st = result.status()
    assert st["phase"] == "done" and st["restarts"] == 0 and st["resumed_from_step"] is None


def test_sigkill_rank1_mid_epoch_external(golden: dict[int, str], ckpt: Path) -> None:
    """SIGKILL of rank 1 from outside at an arbitrary mid-epoch step (not a snapshot step)."""
    proc = harness.start(ckpt, script_args=("--step-delay", "0.05"))
    try:
        beat = wait_until(
            lambda: (p := harness.progress(ckpt, 1)) and p["step"] >= 50 and p, timeout=180,
            what="rank 1 to pass step 50",
        )
        os.kill(int(beat["pid"]), signal.SIGKILL)
        out, err = proc.communicate(timeout=300)
    finally:
        harness.kill_group(proc)
    result = harness.Result(proc.returncode, out, err, ckpt)
    harness.assert_matches_golden(result, golden)
    st = result.status()
    assert st["restarts"] == 1
    assert st["resumed_from_step"] is not None and st["resumed_from_step"] % EVERY == 0
    assert 40 <= st["resumed_from_step"] <= beat["step"]


# One phase is enough end to end: a hard crash at every commit phase leaving only garbage that
# selection ignores and the supervisor removes is proven by test_storage_local.py
# (test_hard_crash_at_phase_leaves_only_garbage, test_exception_at_phase_leaves_no_snapshot) and
# test_orchestrator_supervisor.py (test_abandoned_temp_dirs_are_cleaned_before_each_attempt);
# before_rename (a complete manifest, never renamed into place) is the closest call.
@pytest.mark.parametrize("point", ["before_rename"])
def test_sigkill_rank0_during_save(golden: dict[int, str], ckpt: Path, point: str) -> None:
    """Rank 0 killed inside the save of step 60: that snapshot never counts, resume from 40."""
    result = harness.launch(ckpt, faults=f"{point}@60:rank=0")
    harness.assert_matches_golden(result, golden)
    assert result.status()["resumed_from_step"] == 40
    leftovers = [n for n in os.listdir(ckpt / "snapshots") if n.startswith(".tmp")]
    assert leftovers == [], f"abandoned temp dirs survived: {leftovers}"


def test_sigkill_after_commit_resumes_from_that_snapshot(golden: dict[int, str], ckpt: Path) -> None:
    result = harness.launch(ckpt, faults="after_commit@60:rank=0")
    harness.assert_matches_golden(result, golden)
    assert result.status()["resumed_from_step"] == 60


def test_dataloader_workers(golden_workers: dict[int, str], ckpt: Path) -> None:
    """Mid-epoch resume with DataLoader worker processes: no batch repeated or skipped."""
    result = harness.launch(ckpt, faults="step_end@57:rank=1", script_args=("--workers", "2"))
    harness.assert_matches_golden(result, golden_workers)
    assert result.status()["resumed_from_step"] == 40


def test_keep_local_retention_during_recovery(golden: dict[int, str], ckpt: Path) -> None:
    result = harness.launch(ckpt, faults="step_end@73:rank=0", extra_launch=("--keep-local", "2"))
    got = harness.assert_matches_golden(result, golden)
    assert sorted(got) == [STEPS - EVERY, STEPS]


def test_warm_spare_takes_over_and_leaves_nothing_behind(golden: dict[int, str], ckpt: Path) -> None:
    """--warm-spare: the waiting group is promoted after a crash, bit-identical, none left."""
    from orchestrator.launcher import find_processes

    result = harness.launch(ckpt, faults="step_end@53:rank=1", extra_launch=("--warm-spare",),
                            script_args=("--step-delay", "0.02"))
    harness.assert_matches_golden(result, golden)
    st = result.status()
    assert st["restarts"] == 1 and st["resumed_from_step"] == 40
    events = [json.loads(line) for line in (ckpt / "run/events.jsonl").read_text().splitlines()]
    names = [e["event"] for e in events]
    assert "supervisor.spare_promoted" in names, names
    promoted = next(e for e in events if e["event"] == "supervisor.spare_promoted")
    assert (promoted["attempt"], promoted["resume_step"]) == (1, 40)
    # The spare started for attempt 2 never ran: discarded when the run ended, and killed.
    discarded = [e for e in events if e["event"] == "supervisor.spare_discarded"]
    assert [(e["attempt"], e["reason"]) for e in discarded] == [(2, "run_done")]
    assert find_processes({"ORCH_CHECKPOINT_DIR": str(ckpt)}) == []
