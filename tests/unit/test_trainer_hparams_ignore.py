"""``ResumePolicy(ignore_hparams=...)``: settings that do not change the trajectory (logging and
eval intervals) are recorded in every manifest but never refuse a resume."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from trainer.checkpoint import Checkpointer
from trainer.errors import ConfigMismatch, UsageError
from trainer.resume import ResumePolicy, diff_hparams
from trainer.settings import WorkerSettings
from trainer.state import TrainingState

HPARAMS = {"lr": 0.1, "log_interval": 10, "eval_interval": 100}
IGNORE = ("log_interval", "eval_interval")


def _checkpointer(directory: Path, hparams: dict[str, Any], ignore: Any = ()) -> Checkpointer:
    torch.manual_seed(0)
    model = torch.nn.Linear(2, 1)
    state = TrainingState(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    return Checkpointer(state, hparams=hparams, every=2,
                        settings=WorkerSettings(checkpoint_dir=str(directory)),
                        resume_policy=ResumePolicy(ignore_hparams=ignore))


def _save(directory: Path) -> None:
    ckpt = _checkpointer(directory, HPARAMS, IGNORE)
    assert ckpt.resume() == 0
    ckpt.step_done(1)
    ckpt.step_done(2)
    ckpt.close()


@pytest.mark.timeout(60)
def test_ignored_keys_do_not_refuse_a_resume_but_others_still_do(tmp_path: Path) -> None:
    _save(tmp_path)
    manifest = json.loads((tmp_path / "snapshots" / f"step-{2:012d}" / "manifest.json").read_text())
    assert manifest["metadata"]["hparams"] == HPARAMS  # recorded, just not compared
    relaxed = {**HPARAMS, "log_interval": 1, "eval_interval": 5}
    assert _checkpointer(tmp_path, relaxed, IGNORE).resume() == 2
    # an ignored key may also appear or disappear
    dropped = {"lr": 0.1, "eval_interval": 5}
    assert _checkpointer(tmp_path, dropped, ["log_interval", "eval_interval"]).resume() == 2
    with pytest.raises(ConfigMismatch) as info:
        _checkpointer(tmp_path, relaxed).resume()
    assert set(info.value.differences) == {"log_interval", "eval_interval"}
    with pytest.raises(ConfigMismatch) as info:
        _checkpointer(tmp_path, {**relaxed, "lr": 0.2}, IGNORE).resume()
    assert set(info.value.differences) == {"lr"}


def test_diff_hparams_skips_ignored_keys() -> None:
    saved, current = {"a": 1, "b": 2, "c": 3}, {"a": 1, "b": 5, "d": 4}
    assert set(diff_hparams(saved, current)) == {"b", "c", "d"}
    assert diff_hparams(saved, current, ignore={"b", "c"}) == {"d": ("<absent>", 4)}


@pytest.mark.parametrize("bad", ["log_interval", b"x", 3, ["ok", 1]])
def test_ignore_hparams_must_be_key_names(bad: Any) -> None:
    with pytest.raises(UsageError, match="ignore_hparams"):
        ResumePolicy(ignore_hparams=bad)


def test_ignore_hparams_is_normalised_to_a_tuple() -> None:
    assert ResumePolicy(ignore_hparams=["a", "b"]).ignore_hparams == ("a", "b")  # type: ignore[arg-type]
    keys: list[str] = []
    assert ResumePolicy(ignore_hparams=(k for k in keys)).ignore_hparams == ()  # type: ignore[arg-type]
