"""``python -m bench --legs lost`` at a tiny size: real torchrun, ours and the baseline loop.

Steps of a tiny model take a few tens of ms, far less than our supervisor's 0.2 s poll, so an
unheld run ran several steps past each SIGTERM and the leg's schedule outgrew the run ("launcher
exited 0 while waiting for save N"). The leg paces both runs: every interruption must land
exactly on its step (SIGTERM 2 steps, SIGKILL 3 steps after a snapshot), ours must stop one step
after the SIGTERM, and both runs must end bit-identical to an uninterrupted one. No timing is
asserted.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.bench_run import run_bench

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(420)]


def test_lost_leg_interrupts_on_schedule(tmp_path: Path) -> None:
    doc = run_bench(tmp_path, "lost", "2M", repeats=2, timeout=400)
    (leg,) = doc["legs"]
    assert leg["correctness"]["ok"] is True and leg["correctness"]["checked"] == 3, leg["correctness"]
    s = leg["scalars"]
    assert s["steps_total"] == 28 and s["snapshot_every"] == 4
    # Paced: each pair of interruptions takes exactly two snapshot intervals.
    assert [(x["saved_step"], x["last_step"]) for x in s["ours_sigterm"]] == [(4, 6), (12, 14)]
    assert [(x["saved_step"], x["last_step"]) for x in s["ours_sigkill"]] == [(8, 11), (16, 19)]
    assert s["baseline_sigterm"] == [
        {"last_step": 6, "saved_step": 4, "resumed_from": 4, "lost": 2, "exit_code": None},
        {"last_step": 14, "saved_step": 12, "resumed_from": 12, "lost": 2, "exit_code": None},
    ]
    assert [(x["saved_step"], x["last_step"], x["resumed_from"]) for x in s["baseline_sigkill"]] == [
        (8, 11, 8), (16, 19, 16)]
    # Ours: the emergency snapshot one step after the SIGTERM (exit 75); a kill resumes from the save.
    assert [(x["resumed_from"], x["lost"], x["exit_code"]) for x in s["ours_sigterm"]] == [
        (7, 0, 75), (15, 0, 75)]
    assert [(x["resumed_from"], x["lost"]) for x in s["ours_sigkill"]] == [(8, 3), (16, 3)]
    assert {t["name"]: t["met"] for t in leg["targets"]} == {
        "sigterm_lost": True, "sigkill_lost_beyond_snapshot": True}
    assert not any(p.name.startswith("run-") for p in (tmp_path / "w").iterdir())
