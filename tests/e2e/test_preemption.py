"""End-to-end preemption: SIGTERM to the supervisor loses no completed step (exit 75, resume)."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import pytest

from contract.polling import wait_until
from tests.e2e import harness
from tests.support.fake_metadata import running_fake_metadata

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]


def _preempt_at(ckpt: Path, min_step: int, *, delay: str = "0.05") -> tuple[harness.Result, int]:
    """Run paced, SIGTERM the supervisor once rank 0 completed ``min_step``; (result, last step)."""
    proc = harness.start(ckpt, script_args=("--step-delay", delay))
    try:
        wait_until(
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


def test_spot_notice_takes_the_same_path(golden: dict[int, str], ckpt: Path) -> None:
    """An EC2 spot instance-action notice (fake IMDSv2 on loopback) instead of a signal."""
    with running_fake_metadata() as imds:
        env = {
            "ORCH_NOTICE_SOURCES": "aws",
            "ORCH_AWS_METADATA_URL": imds.url,
            "ORCH_NOTICE_INTERVAL_S": "0.2",
        }
        proc = harness.start(ckpt, env=env, script_args=("--step-delay", "0.05"))
        try:
            wait_until(
                lambda: (p := harness.progress(ckpt, 0)) and p["step"] >= 30,
                timeout=180,
                what="rank 0 to pass step 30",
            )
            assert proc.poll() is None
            # Polled with a token, answered 404 (no notice) so far: nothing happened yet.
            assert imds.count("PUT", "/latest/api/token") >= 1
            with imds.lock:
                imds.aws_action = {"action": "terminate", "time": "2026-11-23T12:00:00Z"}
            out, err = proc.communicate(timeout=120)
        finally:
            harness.kill_group(proc)
    beats = [harness.progress(ckpt, r) for r in (0, 1)]
    last = max(int(b["step"]) for b in beats if b is not None)
    result = harness.Result(proc.returncode, out, err, ckpt)
    _check_preempted(result, last, golden)
    assert last < harness.STEPS
    events = [json.loads(line) for line in (ckpt / "run" / "events.jsonl").read_text().splitlines()]
    requested = [e for e in events if e["event"] == "supervisor.preempt_requested"]
    assert len(requested) == 1 and "instance-action" in requested[0]["source"], requested
    again = harness.launch(ckpt)
    harness.assert_matches_golden(again, golden, off_schedule=(last,))
    assert again.status()["resumed_from_step"] == last
