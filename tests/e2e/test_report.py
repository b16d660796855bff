"""A real run with two incidents (a rank SIGKILLed, then a SIGTERM preemption and a relaunch):
``status --json`` accounts for both, and ``orchestrator report`` draws them."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest

from contract.polling import wait_until
from tests.e2e import harness
from tests.integration.test_report import assert_self_contained, run_report

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(420)]

PARTS = ("detect_s", "restart_s", "startup_load_s", "steps_replayed", "replay_s", "lost_s")


def test_two_incidents_goodput_and_report(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    paced = ("--step-delay", "0.05")
    proc = harness.start(ckpt, env={"ORCH_FAULTS": "step_end@50:rank=1"}, steps=200,
                         script_args=paced)
    try:
        wait_until(
            lambda: (p := harness.progress(ckpt, 0)) and p["attempt"] >= 1 and p["step"] >= 90,
            timeout=240, what="the second attempt to pass step 90",
        )
        os.kill(proc.pid, signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        harness.kill_group(proc)
    assert proc.returncode == 75, err[-3000:]
    again = harness.launch(ckpt, steps=200, script_args=paced)
    assert again.rc == 0, again.stderr[-3000:]

    st = again.status()
    assert 0 < st["goodput"] <= 1, st["goodput"]
    crash, preemption = st["incidents"]
    assert crash["kind"] == "crash" and crash["attempt"] == 0 and crash["recovered"]
    assert preemption["kind"] == "preemption" and preemption["recovered"]
    for inc in (crash, preemption):
        for key in PARTS:
            assert isinstance(inc[key], (int, float)) and inc[key] >= 0, (key, inc)
    assert crash["steps_replayed"] > 0  # resumed from the snapshot before the kill
    assert preemption["steps_replayed"] == 0  # the emergency snapshot is at the last step
    assert preemption["downtime_between_launches_s"] >= 0
    assert st["goodput_detail"]["launches"] == 2

    table = subprocess.run([*harness.ORCH, "status", "--checkpoint-dir", str(ckpt)],
                           env=harness.base_env(), capture_output=True, text=True, timeout=60)
    assert "goodput" in table.stdout and "2 incidents" in table.stdout, table.stdout

    out = tmp_path / "report.html"
    p = run_report(ckpt, out)
    assert p.returncode == 0, p.stderr
    parsed = assert_self_contained(out.read_text())
    assert parsed.svgs >= 1 and parsed.rows["incidents"] == 2
