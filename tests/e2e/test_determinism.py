"""End-to-end determinism audit: a SIGKILL mid-interval, a relaunch, and the re-executed steps
compared with what the killed attempt journaled (``status --json`` ``determinism``)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.e2e import harness
from tests.e2e.harness import EVERY

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

PREFETCH = str(Path(__file__).resolve().parent / "prefetch_job.py")


def _launch_prefetch(ckpt: Path, *script_args: str, on_divergence: str = "warn") -> harness.Result:
    args = [*harness.ORCH, "launch", "--nproc-per-node", "2", "--checkpoint-dir", str(ckpt),
            "--max-restarts", "2", "--on-divergence", on_divergence, PREFETCH, *script_args]
    # Default heartbeat and journal settings: the whole run takes about a second, so the audit
    # works only because every step's fingerprint is written before the next step begins.
    env = harness.base_env(ORCH_FAULTS="step_end@25:rank=1")
    p = subprocess.run(args, env=env, cwd=harness.REPO, capture_output=True, text=True, timeout=240)
    return harness.Result(p.returncode, p.stdout, p.stderr, ckpt)


def _audit(result: harness.Result) -> dict[str, Any]:
    audit: dict[str, Any] = result.status()["determinism"]
    return audit


def test_digits_recovery_is_verified(golden: dict[int, str], ckpt: Path) -> None:
    """The example resumes bit-identically: every re-executed step's loss bits match."""
    result = harness.launch(ckpt, faults="step_end@50:rank=1")
    harness.assert_matches_golden(result, golden)
    st = result.status()
    assert st["resumed_from_step"] == 40 and st["restarts"] == 1
    audit = st["determinism"]
    assert audit["state"] == "verified", audit
    assert audit["first_divergence_step"] is None
    # rank 1 journaled through 49 (step 50's fingerprint was pending when it was killed)
    assert 49 <= audit["checked_through_step"] < 40 + EVERY, audit
    reports = [json.loads(p.read_text()) for p in sorted((ckpt / "run" / "determinism").glob("rank-*.json"))]
    assert [r["state"] for r in reports] == ["verified", "verified"]


def test_prefetched_batch_across_the_boundary_diverges(ckpt: Path) -> None:
    """warn: the run finishes, status names the first re-executed step (21) as diverged."""
    result = _launch_prefetch(ckpt)
    assert result.rc == 0, result.stderr[-4000:]
    audit = _audit(result)
    assert audit["state"] == "diverged", audit
    assert audit["first_divergence_step"] == 21 and audit["fingerprint"] == "loss"
    assert audit["expected"] != audit["got"]
    log = (ckpt / "run" / "logs" / "attempt-1.log").read_text()
    assert "resume.diverged" in log
    # The supervisor recorded it too: in the event history and in state.json (status --mirror).
    events = [json.loads(line) for line in (ckpt / "run" / "events.jsonl").read_text().splitlines()]
    diverged = [e for e in events if e["event"] == "resume.diverged"]
    assert len(diverged) == 1 and diverged[0]["first_divergence_step"] == 21, diverged
    state = json.loads((ckpt / "run" / "state.json").read_text())
    assert state["determinism"]["state"] == "diverged"
    # ...and launch's last words say it: exit 0 under warn, never silently.
    last = result.stderr.strip().splitlines()[-1]
    assert "not bit-identical" in last and "DIVERGED at step 21" in last, last


def test_prefetch_with_on_divergence_fail_gives_up_at_once(ckpt: Path) -> None:
    result = _launch_prefetch(ckpt, on_divergence="fail")
    assert result.rc == 1, result.stderr[-4000:]
    st = result.status()
    assert st["phase"] == "failed" and st["restarts"] == 1  # no restart spent on the fatal error
    assert "ResumeDiverged" in (st["last_failure"] or "") and "step 21" in st["last_failure"]
    assert st["determinism"]["state"] == "diverged"


def test_correct_prefetch_free_script_is_verified(ckpt: Path) -> None:
    result = _launch_prefetch(ckpt, "--no-prefetch")
    assert result.rc == 0, result.stderr[-4000:]
    audit = _audit(result)
    assert audit["state"] == "verified" and audit["checked_through_step"] >= 24, audit
