"""The supervisor's own directory under attack: ``run/`` removed during a real run, a second
launch afterwards, and absurd or deeply nested ``run/`` documents read by ``status`` and
``launch``. Invariants: one supervisor per directory, bit-identical when allowed to finish, a
clear message and an exit code instead of a traceback."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from contract.polling import wait_until
from tests.e2e import harness
from tests.faults.conftest import supervisor_traceback

pytestmark = pytest.mark.timeout(300)


def _step(ckpt: Path) -> int:
    beat = harness.progress(ckpt, 0)
    return int(beat["step"]) if beat else 0


def test_run_dir_removed_mid_run_recovers_and_keeps_the_lock(
    tmp_path: Path, golden: dict[int, str]
) -> None:
    ckpt = tmp_path / "ckpt"
    first = harness.start(ckpt, script_args=("--step-delay", "0.05"))
    try:
        wait_until(lambda: _step(ckpt) >= 30, timeout=120, what="the run to reach step 30",
                   stop_if=lambda: None if first.poll() is None else "the run ended early")
        shutil.rmtree(ckpt / "run")
        # Before the fix: the lock file went with run/, this second launch was not refused and
        # killed the first one's workers.
        second = subprocess.run(harness.launch_args(ckpt), env=harness.base_env(),
                                capture_output=True, text=True, timeout=120)
        assert second.returncode == 2, second.stderr[-3000:]
        assert "held by a live supervisor" in second.stderr
        out, err = first.communicate(timeout=240)
    finally:
        harness.kill_group(first)
    result = harness.Result(first.returncode, out, err, ckpt)
    assert not supervisor_traceback(err), err[-3000:]
    harness.assert_matches_golden(result, golden)
    events = [json.loads(x) for x in (ckpt / "run" / "events.jsonl").read_text().splitlines()]
    assert "supervisor.run_dir_recreated" in [e["event"] for e in events]
    assert result.status()["phase"] == "done"


@pytest.mark.parametrize(
    "damage",
    [
        '{"run_id": "r", "attempt": ' + "[" * 200_000 + "]" * 200_000 + "}",
        '{"run_id": "r", "phase": "running", "attempt": ' + str(10**300) + "}",
        '{"run_id": "' + "x" * 300 + '", "phase": "failed", "attempt": 2, "nodes": [[[[]]]]}',
    ],
    ids=["deep", "attempt-10**300", "junk-types"],
)
def test_damaged_state_and_heartbeats_are_absent_not_fatal(
    tmp_path: Path, golden: dict[int, str], damage: str
) -> None:
    ckpt = tmp_path / "ckpt"
    (ckpt / "run" / "progress").mkdir(parents=True)
    (ckpt / "run" / "state.json").write_text(damage)
    (ckpt / "run" / "progress" / "rank-0.json").write_text(
        json.dumps({"rank": 0, "step": 5, "attempt": 10**300, "time": 1e308, "pid": 1}))
    (ckpt / "run" / "progress" / "rank-1.json").write_text("{" * 100_000)
    status = subprocess.run([*harness.ORCH, "status", "--checkpoint-dir", str(ckpt), "--json"],
                            env=harness.base_env(), capture_output=True, text=True, timeout=60)
    assert not supervisor_traceback(status.stderr), status.stderr[-3000:]
    if status.returncode == 0:  # a parseable document whose fields are junk: shown as is
        json.loads(status.stdout)
    else:
        assert "damaged" in status.stderr or "no run" in status.stderr, status.stderr
    result = harness.launch(ckpt)
    assert not supervisor_traceback(result.stderr), result.stderr[-3000:]
    harness.assert_matches_golden(result, golden)
