"""The trainer's public surface and the one-place rule for the best metric.

``trainer`` exports what a training script uses and nothing else; the Checkpointer's grouped
options validate themselves; the best metric is named once, by the script
(``Checkpointer(best=BestPolicy(...))``), recorded in every manifest, and the supervisor's
``--keep-best`` retention ranks by that record (``--best-metric`` is refused with the reason).
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import pytest
import torch

import trainer
from orchestrator.config import build_config
from storage import (
    FileEntry,
    LocalSnapshotStore,
    Manifest,
    RetentionPolicy,
    SnapshotInfo,
    plan_retention,
)
from trainer.checkpoint import Checkpointer
from trainer.errors import UsageError
from trainer.exports import BestPolicy
from trainer.resume import ResumePolicy
from trainer.settings import WorkerSettings
from trainer.state import TrainingState

SCRIPT_NAMES = {
    "BestPolicy", "Checkpointer", "DistContext", "Preempted", "ResumableDistributedSampler",
    "ResumableLoader", "SampleKey", "Stateful", "TrainerError", "TrainingState", "UsageError",
    "entrypoint", "init_distributed", "run", "run_script", "sample_generator", "seed_everything",
}


def test_package_exports_only_what_a_script_uses() -> None:
    assert set(trainer.__all__) == SCRIPT_NAMES
    assert len(trainer.__all__) == len(set(trainer.__all__))
    public = {n for n in vars(trainer) if not n.startswith("_")}
    # Submodules appear as attributes once imported; anything else public must be in __all__.
    modules = {n for n in public if type(getattr(trainer, n)).__name__ == "module"}
    assert public - modules == SCRIPT_NAMES


@pytest.mark.parametrize(
    ("module", "name"),
    [
        ("trainer.codec", "encode"), ("trainer.codec", "state_digest"), ("trainer.codec", "StagingArena"),
        ("trainer.codec", "TENSORS_FILE"), ("trainer.errors", "ConfigMismatch"),
        ("trainer.errors", "PeerFailure"), ("trainer.errors", "EXIT_FAILURE"),
        ("trainer.exports", "write_weights_export"), ("trainer.provenance", "config_hash"),
        ("trainer.settings", "WorkerSettings"), ("trainer.data", "sample_seed"),
        ("trainer.state", "capture_rng"), ("trainer.writer", "BackgroundWriter"),
        ("trainer.runtime", "configure_worker_logging"), ("trainer.distributed", "shutdown"),
        ("contract.codes", "EXIT_PREEMPTED"),
    ],
)
def test_everything_else_stays_importable_from_its_module(module: str, name: str) -> None:
    assert hasattr(importlib.import_module(module), name)


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"metric": ""}, "metric"),
        ({"metric": "acc", "mode": "highest"}, "mode"),
        ({"metric": "acc", "source": "ema2"}, "source"),
    ],
)
def test_best_policy_says_what_is_wrong(kwargs: dict[str, Any], needle: str) -> None:
    with pytest.raises(UsageError, match=needle):
        BestPolicy(**kwargs)


def test_best_policy_compares_by_mode() -> None:
    assert BestPolicy(metric="acc").better(0.5, None)
    assert BestPolicy(metric="acc", mode="max").better(0.6, 0.5)
    assert not BestPolicy(metric="loss", mode="min").better(0.6, 0.5)
    assert BestPolicy(metric="loss", mode="min").manifest_record() == {"metric": "loss", "mode": "min"}


def test_resume_policy_and_checkpointer_validate(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="allow_config_change"):
        ResumePolicy(allow_config_change="yes")  # type: ignore[arg-type]
    model = torch.nn.Linear(2, 1)
    state = TrainingState(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(UsageError, match="BestPolicy"):
        Checkpointer(state, hparams={}, best="loss",  # type: ignore[arg-type]
                     settings=WorkerSettings(checkpoint_dir=str(tmp_path)))


def _run(directory: Path, best: BestPolicy | None, scores: dict[int, float]) -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ckpt = Checkpointer(TrainingState(model=model, optimizer=opt), hparams={}, every=1, best=best,
                        settings=WorkerSettings(checkpoint_dir=str(directory)))
    ckpt.resume()
    for step in range(1, max(scores) + 1):
        model(torch.randn(4, 2)).square().mean().backward()  # type: ignore[no-untyped-call]
        opt.step()
        ckpt.step_done(step, {"score": scores[step], "loss": 1.0 / step})
    ckpt.finish()
    ckpt.close()


def test_declared_metric_reaches_the_manifests_and_drives_keep_best(tmp_path: Path) -> None:
    scores = {1: 0.3, 2: 0.1, 3: 0.7, 4: 0.2, 5: 0.4}
    _run(tmp_path, BestPolicy(metric="score", mode="min", source="model"), scores)
    store = LocalSnapshotStore(str(tmp_path))
    infos = store.list()
    assert all(i.manifest is not None and i.manifest.metadata["best"] == {"metric": "score", "mode": "min"}
               for i in infos)
    # What the supervisor builds from `--keep-best 1` (no metric of its own): newest + best.
    doomed = plan_retention(infos, RetentionPolicy(keep_best=1, best_metric=None, best_mode=None))
    assert sorted({i.step for i in infos} - set(doomed)) == [2, 5]
    assert (tmp_path / "exports/best.json").exists()


def test_without_a_declaration_keep_best_keeps_nothing_extra(tmp_path: Path) -> None:
    _run(tmp_path, None, {1: 0.3, 2: 0.1, 3: 0.2})
    infos = LocalSnapshotStore(str(tmp_path)).list()
    assert all(i.manifest is not None and i.manifest.metadata["best"] is None for i in infos)
    assert plan_retention(infos, RetentionPolicy(keep_best=1)) == [1, 2]
    assert not (tmp_path / "exports/best.json").exists()


def _info(step: int, best: dict[str, str] | None, **metrics: float) -> SnapshotInfo:
    manifest = Manifest(
        run_id="r", step=step, epoch=0, world_size=1,
        files={"tensors.bin": FileEntry(size=1, checksum="0" * 64)},
        digest="sha256:" + "0" * 64, created_at=1.0,
        metadata={"metrics": metrics, "best": best},
    )
    return SnapshotInfo(step=step, path=f"/x/{step}", tier="local", manifest=manifest, valid=True)


def test_retention_ranks_by_the_newest_declaration_only() -> None:
    acc = {"metric": "acc", "mode": "max"}
    snaps = [
        _info(10, {"metric": "loss", "mode": "min"}, loss=0.01, acc=0.99),  # another metric
        _info(20, acc, acc=0.8),
        _info(30, acc, acc=0.9),
        _info(40, acc, acc=0.5),
        _info(50, acc),  # no value at this step
    ]
    assert plan_retention(snaps, RetentionPolicy(keep_best=1)) == [10, 20, 40]
    # An explicit metric (API callers) overrides the declaration and ranks every snapshot.
    assert plan_retention(snaps, RetentionPolicy(keep_best=1, best_metric="acc")) == [20, 30, 40]


@pytest.mark.parametrize("key", ["best_metric", "best_mode"])
def test_launch_refuses_a_second_best_metric_and_says_where_it_lives(key: str) -> None:
    flag = "--" + key.replace("_", "-")
    value = "val_acc" if key == "best_metric" else "max"
    with pytest.raises(ValueError, match=flag) as info:
        build_config({"checkpoint_dir": "/ck", "script": "train.py", "keep_best": 2, key: value})
    assert "Checkpointer(best=trainer.BestPolicy(" in str(info.value)
    # --keep-best alone is the supported form now.
    assert build_config({"checkpoint_dir": "/ck", "script": "train.py", "keep_best": 2}).keep_best == 2
