"""Deferred staging: what is deferred, the optimizer guard, the version-counter safety net."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from trainer import codec
from trainer.checkpoint import Checkpointer
from trainer.errors import SnapshotError, UsageError
from trainer.settings import WorkerSettings
from trainer.staging import deferrable_slots
from trainer.state import TrainingState


def make(tmp_path: Path, staging: str | None = None) -> tuple[torch.nn.Module, torch.optim.Optimizer, Checkpointer]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.BatchNorm1d(32), torch.nn.Linear(32, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    state = TrainingState(model=model, optimizer=opt)
    ckpt = Checkpointer(state, hparams={}, every=0, staging=staging,  # type: ignore[arg-type]
                        settings=WorkerSettings(checkpoint_dir=str(tmp_path)))
    step(model, opt)
    return model, opt, ckpt


def step(model: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
    loss = model(torch.randn(8, 16)).square().mean()
    opt.zero_grad()
    loss.backward()  # type: ignore[no-untyped-call]
    opt.step()


class GatedCopies:
    """Holds the deferred copies until released: the test decides when staging progresses."""

    def __init__(self, ckpt: Checkpointer, monkeypatch: pytest.MonkeyPatch) -> None:
        self.gate = threading.Event()
        original = ckpt.arena.copy_slot

        def copy_slot(encoded: codec.EncodedState, index: int) -> bool:
            if threading.current_thread().name == "trainer-staging":
                self.gate.wait()
            return original(encoded, index)

        monkeypatch.setattr(ckpt.arena, "copy_slot", copy_slot)


def test_only_parameters_and_optimizer_state_are_deferred(tmp_path: Path) -> None:
    model, opt, ckpt = make(tmp_path)
    encoded = codec.encode(ckpt.state.snapshot_object([ckpt.state.rank_state_dict()]))
    deferred = deferrable_slots(encoded, [opt])
    deferred_storages = {encoded.sources[i].untyped_storage().data_ptr() for i in deferred}  # type: ignore[union-attr]
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    moments = {v.untyped_storage().data_ptr() for s in opt.state.values() for v in s.values()
               if isinstance(v, torch.Tensor)}
    assert deferred_storages == params | moments
    bn = model[1]
    assert bn.running_mean.untyped_storage().data_ptr() not in deferred_storages  # forward mutates it
    ckpt.close()


def test_optimizer_step_waits_for_the_copy_and_the_snapshot_holds_its_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, opt, ckpt = make(tmp_path)
    gated = GatedCopies(ckpt, monkeypatch)
    ckpt.state.step = 1
    expected = ckpt.live_digest()
    ckpt.snapshot()
    stepper = threading.Thread(target=step, args=(model, opt))
    stepper.start()
    stepper.join(timeout=0.5)
    # Deterministic, not a timing guess: the copies cannot finish before the gate opens.
    assert stepper.is_alive(), "optimizer.step() ran while the parameters were being staged"
    gated.gate.set()
    stepper.join(timeout=30)
    assert not stepper.is_alive()
    ckpt.wait()
    assert ckpt.store.read_manifest(1).digest == expected
    assert ckpt.live_digest() != expected  # the step did run afterwards
    assert ckpt.last_stall_s > 0
    ckpt.close()


def test_in_place_change_outside_the_optimizer_fails_the_snapshot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, _opt, ckpt = make(tmp_path)
    gated = GatedCopies(ckpt, monkeypatch)
    ckpt.state.step = 1
    ckpt.snapshot()
    with torch.no_grad():
        model[0].weight.add_(1.0)  # bypasses optimizer.step(): the guard cannot see it
    gated.gate.set()
    with pytest.raises(SnapshotError, match="modified in place while it was being staged"):
        ckpt.wait()
    assert ckpt.store.list() == []  # nothing inconsistent was committed


def test_sync_staging_copies_everything_inside_snapshot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, opt, ckpt = make(tmp_path, staging="sync")
    ckpt.state.step = 1
    expected = ckpt.live_digest()
    ckpt.snapshot()
    with torch.no_grad():
        model[0].weight.add_(1.0)  # harmless: everything was copied already
    step(model, opt)
    ckpt.wait()
    assert ckpt.store.read_manifest(1).digest == expected
    ckpt.close()


def test_staging_mode_is_validated(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="staging"):
        make(tmp_path, staging="lazy")
    with pytest.raises(ValueError, match="ORCH_SNAPSHOT_STAGING"):
        WorkerSettings.from_env({"ORCH_SNAPSHOT_STAGING": "lazy"})
    assert WorkerSettings.from_env({"ORCH_SNAPSHOT_STAGING": "sync"}).snapshot_staging == "sync"
    assert WorkerSettings.from_env({}).snapshot_staging == "deferred"
