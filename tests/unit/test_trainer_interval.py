"""Checkpointer's snapshot interval: which one is in force (flag > script every= > auto), time
-based decisions in step_done under an injected clock, and two real gloo ranks agreeing on the
snapshot step when only one rank's clock says due."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from contract.interval import AUTO, AUTO_MIN_INTERVAL_S, FINAL_ONLY, Interval
from trainer import checkpoint as checkpoint_module
from trainer.checkpoint import Checkpointer, resolve_interval
from trainer.errors import UsageError
from trainer.settings import WorkerSettings
from trainer.state import TrainingState

pytestmark = pytest.mark.timeout(120)
ROOT = Path(__file__).resolve().parents[2]


class FakeClock:
    """``trainer.checkpoint``'s view of ``time``: monotonic() is set by the test."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.perf_counter = time.perf_counter
        self.time = time.time

    def monotonic(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(checkpoint_module, "time", fake)
    return fake


def make(tmp_path: Path, every: Any = None, **settings: Any) -> Checkpointer:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 4)
    state = TrainingState(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    ws = WorkerSettings(checkpoint_dir=str(tmp_path), heartbeat_interval_s=3600, **settings)
    ckpt = Checkpointer(state, hparams={}, every=every, settings=ws)
    ckpt.resume()
    return ckpt


def snapshot_steps(ckpt: Checkpointer) -> list[int]:
    """Record the step of every snapshot() call (periodic ones: finish() is not called)."""
    taken: list[int] = []
    inner = ckpt.snapshot

    def snapshot() -> None:
        taken.append(ckpt.state.step)
        inner()

    ckpt.snapshot = snapshot  # type: ignore[method-assign]
    return taken


def committed(tmp_path: Path) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in (tmp_path / "snapshots").glob("step-*"))


# -- which interval -----------------------------------------------------------------------------


def test_flag_wins_then_the_scripts_every_then_auto() -> None:
    flag = Interval("seconds", 90)
    assert resolve_interval(flag, 25) == flag
    assert resolve_interval(flag, None) == flag
    assert resolve_interval(FINAL_ONLY, 25) == FINAL_ONLY  # an explicit --checkpoint-every 0
    assert resolve_interval(None, 25) == Interval("steps", 25)
    assert resolve_interval(None, 0) == FINAL_ONLY  # final-only only when asked
    assert resolve_interval(None, "10m") == Interval("seconds", 600)
    assert resolve_interval(None, AUTO) == AUTO
    assert resolve_interval(None, None) == AUTO  # a script without every=: auto, not final-only
    with pytest.raises(UsageError, match=r"Checkpointer\(every=...\) must be"):
        resolve_interval(None, -1)
    with pytest.raises(UsageError, match="often"):
        resolve_interval(None, "often")


def test_checkpointer_takes_the_flag_from_the_worker_env(tmp_path: Path) -> None:
    ckpt = make(tmp_path / "a", every=3, checkpoint_every=Interval("steps", 4))
    assert (ckpt.interval, ckpt.every) == (Interval("steps", 4), 4)
    ckpt.close()
    ckpt = make(tmp_path / "b")
    assert ckpt.interval == AUTO and ckpt.every == 0
    ckpt.close()
    ckpt = make(tmp_path / "c", every="90s")
    assert ckpt.interval == Interval("seconds", 90) and ckpt.every == 0
    ckpt.close()


def test_step_intervals_are_unchanged(tmp_path: Path, clock: FakeClock) -> None:
    ckpt = make(tmp_path, every=4)
    taken = snapshot_steps(ckpt)
    for step in range(1, 13):
        clock.now += 1000  # the clock means nothing to a step interval
        ckpt.step_done(step)
    assert taken == [4, 8, 12]
    ckpt.close()


# -- time-based decisions, single process (no collective) ---------------------------------------


def test_duration_snapshots_at_the_first_step_past_each_interval(tmp_path: Path, clock: FakeClock) -> None:
    ckpt = make(tmp_path, every="10s")
    taken = snapshot_steps(ckpt)
    for step in range(1, 21):
        clock.now += 3.0  # 3 s per step
        ckpt.step_done(step)
    # Origin: step 1 (t=3). Due at >= 10 s since: step 5 (t=15), 9 (t=27), 13, 17.
    assert taken == [5, 9, 13, 17]
    ckpt.wait()
    assert committed(tmp_path) == [5, 9, 13, 17]
    ckpt.close()


def test_a_long_pause_gives_one_snapshot_not_a_backlog(tmp_path: Path, clock: FakeClock) -> None:
    ckpt = make(tmp_path, every="1m")
    taken = snapshot_steps(ckpt)
    ckpt.step_done(1)
    clock.now += 3600
    ckpt.step_done(2)
    clock.now += 1
    ckpt.step_done(3)
    assert taken == [2]
    ckpt.close()


def test_auto_first_snapshot_after_the_minimum_then_100x_the_stall(
    tmp_path: Path, clock: FakeClock
) -> None:
    ckpt = make(tmp_path)  # no flag, no every=: auto
    taken = snapshot_steps(ckpt)
    step = 0

    def run_for(seconds: float, per_step: float = 10.0) -> None:
        nonlocal step
        end = clock.now + seconds
        while clock.now < end:
            clock.now += per_step
            step += 1
            ckpt.step_done(step)

    ckpt.step_done(step := 1)  # origin
    run_for(AUTO_MIN_INTERVAL_S - 10)
    assert taken == []
    run_for(10)
    assert taken == [7]  # 60 s after the first step
    ckpt.wait()
    ckpt.last_stall_s = 2.0  # as measured: the next interval is 100 x 2 s
    run_for(190)
    assert taken == [7]
    run_for(20)
    assert taken == [7, 27]  # 200 s later (step 28 is 10 s past it)
    ckpt.wait()
    ckpt.last_stall_s = 60.0  # 100 x 60 s = 6000 s: capped at ORCH_MAX_SNAPSHOT_INTERVAL_S
    run_for(1780)
    assert taken == [7, 27]
    run_for(10)
    assert taken == [7, 27, 207]
    ckpt.close()


def test_auto_cap_comes_from_the_setting(tmp_path: Path, clock: FakeClock) -> None:
    ckpt = make(tmp_path, every="auto", max_snapshot_interval_s=25.0)
    taken = snapshot_steps(ckpt)
    for step in range(1, 12):
        ckpt.step_done(step)
        clock.now += 10.0
    # Origin at step 1; 25 s (the cap, below the 60 s floor) later: step 4, then 7, 10.
    assert taken == [4, 7, 10]
    ckpt.close()


def test_final_only_takes_no_periodic_snapshot(tmp_path: Path, clock: FakeClock) -> None:
    ckpt = make(tmp_path, every=0)
    taken = snapshot_steps(ckpt)
    for step in range(1, 6):
        clock.now += 10_000
        ckpt.step_done(step)
    assert taken == []
    ckpt.finish()
    assert committed(tmp_path) == [5]


def test_time_check_follows_the_preempt_check_period(tmp_path: Path, clock: FakeClock) -> None:
    ckpt = make(tmp_path, every="10s", preempt_check_every=4)
    taken = snapshot_steps(ckpt)
    for step in range(1, 13):
        clock.now += 3.0
        ckpt.step_done(step)
    # Due from step 4 (t=12, 10 s after step 1), decided at the next check step: 8 (t=24); then
    # 10 s after that: step 12 (t=36), itself a check step.
    assert taken == [8, 12]
    ckpt.close()


# -- two real gloo ranks ------------------------------------------------------------------------

RANK = """
import datetime, json, os, sys, time
import torch, torch.distributed as dist
from contract.interval import parse_interval
from trainer import checkpoint as cm
from trainer.checkpoint import Checkpointer
from trainer.settings import WorkerSettings
from trainer.state import TrainingState

rank, tmp, cases = int(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3])
dist.init_process_group("gloo", init_method=f"file://{tmp}/pg", rank=rank, world_size=2,
                        timeout=datetime.timedelta(seconds=30))

class Clock:
    now = 0.0
    perf_counter = staticmethod(time.perf_counter)
    time = staticmethod(time.time)
    def monotonic(self):
        return self.now

for name, every, jumper in cases:
    clock = Clock()
    cm.time = clock
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    state = TrainingState(model=model, optimizer=opt)
    settings = WorkerSettings(checkpoint_dir=f"{tmp}/{name}", rank=rank, world_size=2,
                              checkpoint_every=parse_interval(every), heartbeat_interval_s=3600)
    ckpt = Checkpointer(state, hparams={}, settings=settings)
    taken = []
    inner = ckpt.snapshot
    def snapshot(ckpt=ckpt, taken=taken, inner=inner):
        taken.append(ckpt.state.step)
        inner()
    ckpt.snapshot = snapshot
    ckpt.resume()
    for step in range(1, 7):
        loss = model(torch.ones(4)).sum()
        opt.zero_grad(); loss.backward(); opt.step()
        if rank == jumper and step == 3:
            clock.now += 100_000.0  # only this rank's clock says due, and only from step 3
        ckpt.step_done(step)
    periodic = list(taken)
    ckpt.finish()
    ckpt.close()
    with open(f"{tmp}/{name}-rank-{rank}.json", "w") as f:
        json.dump({"periodic": periodic, "all": taken}, f)
dist.destroy_process_group()
"""

#: (name, interval, the rank whose clock jumps): a duration lets any rank's clock decide; auto
#: takes rank 0's vote only (it measures the stall).
CASES = [("rank1-30s", "30s", 1), ("rank0-30s", "30s", 0), ("rank0-auto", "auto", 0)]


def test_two_gloo_ranks_snapshot_at_the_same_step(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ORCH_", "RANK", "WORLD_SIZE",
                                                                    "MASTER_", "LOCAL_"))}
    env["PYTHONPATH"] = str(ROOT)
    env["OMP_NUM_THREADS"] = "1"
    procs = [
        subprocess.Popen([sys.executable, "-c", RANK, str(rank), str(tmp_path), json.dumps(CASES)],
                         cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for rank in (0, 1)
    ]
    outputs = []
    for p in procs:
        try:
            out, _ = p.communicate(timeout=100)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        outputs.append(out)
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    for name, _, _ in CASES:
        results = [json.loads((tmp_path / f"{name}-rank-{r}.json").read_text()) for r in (0, 1)]
        # Only one rank's clock said due at step 3; both snapshotted there, and only there.
        assert results[0]["periodic"] == results[1]["periodic"] == [3], name
        assert results[0]["all"] == results[1]["all"] == [3, 6], name
        assert committed(tmp_path / name) == [3, 6], name
