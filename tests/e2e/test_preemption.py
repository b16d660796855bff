"""End-to-end preemption: SIGTERM to the supervisor loses no completed step (exit 75, resume)."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import pytest

from tests.e2e import harness

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]


def _preempt_at(ckpt: Path, min_step: int, *, delay: str = "0.05") -> tuple[harness.Result, int]:
    """Run paced, SIGTERM the supervisor once rank 0 completed ``min_step``; (result, last step)."""
    proc = harness.start(ckpt, script_args=("--step-delay", delay))
    try:
        harness.wait_for(
            lambda: (p := harness.progress(ckpt, 0)) and p["step"] >= min_step and p,
            timeout=180,
            what=f"rank 0 to pass step {min_step}",
        )
        os.kill(proc.pid, signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        harness.kill_group(proc)
    beats = [harness.progress(ckpt, r) for r in (0, 1)]
    last = max(int(b["step"]) for b in beats if b is not None)
    return harness.Result(proc.returncode, out, err, ckpt), last


def _check_preempted(result: harness.Result, last: int, golden: dict[int, str]) -> dict[str, Any]:
    assert result.rc == 75, f"rc={result.rc}\n{result.stderr[-4000:]}"
    snaps = result.snapshots()
    steps = [s["step"] for s in snaps if s["valid"]]
    # Zero lost steps: the emergency snapshot is at the last completed step of every rank.
    assert max(steps) == last, (steps, last)
    st = result.status()
    assert st["phase"] == "preempted" and st["preemptions"] == 1 and st["restarts"] == 0, st
    assert st["step"] == last
    for step, digest in harness.digests(snaps).items():
        if step in golden:
            assert digest == golden[step], f"snapshot {step} differs from the golden run"
    return st


def test_sigterm_mid_epoch_saves_last_step_and_resumes(golden: dict[int, str], ckpt: Path) -> None:
    result, last = _preempt_at(ckpt, 47)
    _check_preempted(result, last, golden)
    again = harness.launch(ckpt)
    harness.assert_matches_golden(again, golden, off_schedule=(last,))
    st = again.status()
    assert st["resumed_from_step"] == last and st["restarts"] == 0 and st["preemptions"] == 1


def test_sigterm_during_periodic_save(golden: dict[int, str], ckpt: Path) -> None:
    """The signal lands right at step 40's periodic snapshot (its write may still be in flight).

    The ranks stop at the first boundary after the request (40 if they see it before their
    check, else 41): the periodic snapshot must be committed first, no step is saved twice.
    """
    result, last = _preempt_at(ckpt, 40, delay="0.1")
    _check_preempted(result, last, golden)
    again = harness.launch(ckpt)
    harness.assert_matches_golden(again, golden, off_schedule=(last,))
    assert again.status()["resumed_from_step"] == last
