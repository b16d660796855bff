"""The lost leg's leash on a run: ``--pace FILE`` holds each step until the harness allows it."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.workloads import common
from bench.workloads import harness as h


@pytest.mark.timeout(30)
def test_unpaced_run_is_never_held() -> None:
    common.Pace(None, release_if=lambda: pytest.fail("an unpaced run polled")).wait(10**9)


@pytest.mark.timeout(30)
def test_set_pace_allows_up_to_that_step(tmp_path: Path) -> None:
    files = h.RunFiles.fresh(str(tmp_path / "run"))
    assert common.read_pace(files.pace) == 0  # no file: nothing allowed
    h.set_pace(files, 6)
    assert common.read_pace(files.pace) == 6
    pace = common.Pace(files.pace, release_if=lambda: pytest.fail("held below the pace"))
    for step in range(1, 7):
        pace.wait(step)


@pytest.mark.timeout(30)
def test_held_until_the_pace_is_raised(tmp_path: Path) -> None:
    files = h.RunFiles.fresh(str(tmp_path / "run"))
    h.set_pace(files, 6)
    polls = []

    def harness_turn() -> bool:
        # Called once per poll while held: the harness raises the pace on the third.
        polls.append(common.read_pace(files.pace))
        if len(polls) == 3:
            h.set_pace(files, 7)
        return False

    common.Pace(files.pace, release_if=harness_turn, interval=0.001).wait(7)
    assert polls == [6, 6, 6]  # held through three polls, let go by the raised pace alone


@pytest.mark.timeout(30)
def test_release_if_ends_the_hold(tmp_path: Path) -> None:
    files = h.RunFiles.fresh(str(tmp_path / "run"))
    (tmp_path / "run" / "pace.txt").write_text("not a number\n")
    calls = []

    def signalled() -> bool:
        calls.append(1)
        return len(calls) == 2

    common.Pace(files.pace, release_if=signalled, interval=0.001).wait(1)
    assert len(calls) == 2


@pytest.mark.timeout(30)
def test_paced_jobs_pass_the_file_and_start_held(tmp_path: Path) -> None:
    workload = h.Workload(size=2_000_000, steps=28)
    ours = h.RunFiles.fresh(str(tmp_path / "ours"))
    job = h.ours_job(ours, workload, paced=True)
    assert job.argv[-2:] == ["--pace", ours.pace]
    assert common.read_pace(ours.pace) == 0
    plain = h.RunFiles.fresh(str(tmp_path / "plain"))
    loop = h.plain_loop_job(plain, workload, paced=True)
    assert loop.argv[-2:] == ["--pace", plain.pace]
    assert "--pace" not in h.ours_job(ours, workload).argv
