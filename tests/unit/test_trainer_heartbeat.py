"""Heartbeats are rate-limited but never late where the supervisor needs them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from trainer.checkpoint import Checkpointer
from trainer.settings import WorkerSettings
from trainer.state import TrainingState


def checkpointer(tmp_path: Path, interval: float, every: int = 5) -> Checkpointer:
    model = torch.nn.Linear(2, 2)
    state = TrainingState(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    settings = WorkerSettings(checkpoint_dir=str(tmp_path), heartbeat_interval_s=interval)
    ckpt = Checkpointer(state, hparams={}, every=every, settings=settings)
    ckpt.resume()
    return ckpt


def beat_step(tmp_path: Path) -> int:
    return int(json.loads((tmp_path / "run/progress/rank-0.json").read_text())["step"])


def test_long_interval_writes_first_step_snapshot_steps_and_the_end(tmp_path: Path) -> None:
    ckpt = checkpointer(tmp_path, interval=3600)
    assert beat_step(tmp_path) == 0
    ckpt.step_done(1)
    assert beat_step(tmp_path) == 1  # first completed step: the supervisor's progress signal
    for step in range(2, 5):
        ckpt.step_done(step)
    assert beat_step(tmp_path) == 1  # rate-limited
    ckpt.step_done(5)
    assert beat_step(tmp_path) == 5  # snapshot step
    ckpt.step_done(6)
    ckpt.finish()
    assert beat_step(tmp_path) == 6


def test_zero_interval_writes_every_step(tmp_path: Path) -> None:
    ckpt = checkpointer(tmp_path, interval=0)
    for step in range(1, 4):
        ckpt.step_done(step)
        assert beat_step(tmp_path) == step
    ckpt.close()


def test_interval_is_validated() -> None:
    with pytest.raises(ValueError, match="ORCH_HEARTBEAT_INTERVAL_S"):
        WorkerSettings.from_env({"ORCH_HEARTBEAT_INTERVAL_S": "-1"})
    assert WorkerSettings.from_env({"ORCH_HEARTBEAT_INTERVAL_S": "0.25"}).heartbeat_interval_s == 0.25
