"""Checkpointer in one process: bit-exact save/resume, hparam checks, corruption, writer errors,
exports, heartbeats, and the top-level error handler."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import Dataset

from contract.codes import EXIT_FATAL
from storage.errors import CorruptSnapshot, DiskFull
from trainer import codec
from trainer.checkpoint import Checkpointer
from trainer.data import ResumableDistributedSampler, ResumableLoader, SampleKey, sample_generator
from trainer.errors import EXIT_FAILURE, ConfigMismatch, WorldSizeMismatch
from trainer.exports import BestPolicy
from trainer.resume import ResumePolicy
from trainer.settings import WorkerSettings
from trainer.state import TrainingState

HPARAMS = {"lr": 0.05, "steps": 20, "layers": [8, 4]}


class Noisy(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    def __len__(self) -> int:
        return 30

    def __getitem__(self, key: SampleKey) -> tuple[torch.Tensor, torch.Tensor]:
        g = sample_generator(0, key.epoch, key.sample)
        x = torch.randn(4, generator=g)
        return x, x.sum(dim=0, keepdim=True)


class Patience:
    def __init__(self) -> None:
        self.bad = 0

    def state_dict(self) -> dict[str, Any]:
        return {"bad": self.bad}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.bad = int(sd["bad"])


class Job:
    """A tiny but complete training job: dropout, AdamW, warmup+cosine, EMA, loader, extras."""

    def __init__(self, directory: Path, *, every: int = 5, hparams: dict[str, Any] | None = None,
                 resume: str | None = None, allow: bool | None = None, noise: bool = False,
                 verify: bool = False) -> None:
        torch.manual_seed(0)
        self.model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Dropout(0.3),
                                         torch.nn.Linear(8, 1))
        self.ema = AveragedModel(self.model, multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=True)  # type: ignore[no-untyped-call]
        # With noise the global RNGs start anywhere: a resume must overwrite all of them.
        seed = int.from_bytes(os.urandom(4), "little") if noise else 1234
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=0.05)
        self.sched = torch.optim.lr_scheduler.SequentialLR(
            self.opt,
            [torch.optim.lr_scheduler.LinearLR(self.opt, start_factor=0.2, total_iters=4),
             torch.optim.lr_scheduler.CosineAnnealingLR(self.opt, T_max=16)],
            milestones=[4],
        )
        sampler = ResumableDistributedSampler(30, seed=3)
        self.loader = ResumableLoader(Noisy(), batch_size=4, sampler=sampler, with_epoch=True)
        self.patience = Patience()
        self.state = TrainingState(model=self.model, optimizer=self.opt, scheduler=self.sched,
                                   ema=self.ema, loader=self.loader, extras={"patience": self.patience},
                                   metadata={"dataset_version": "noisy-v1"})
        mode: Any = "auto" if resume is None else ("fresh" if resume == "none" else "step")
        settings = WorkerSettings(checkpoint_dir=str(directory), resume_mode=mode,
                                  resume_step=int(resume) if resume is not None and mode == "step" else None)
        self.ckpt = Checkpointer(self.state, hparams=hparams or HPARAMS, every=every, settings=settings,
                                 best=BestPolicy(metric="score", mode="max"),
                                 resume_policy=ResumePolicy(allow_config_change=allow, verify_digest=verify))

    def train(self, until: int, *, finish: bool = True) -> None:
        step = self.ckpt.resume()
        batches = iter(self.loader)
        while step < until:
            step += 1
            x, y = next(batches)
            loss = torch.nn.functional.mse_loss(self.model(x), y)
            self.opt.zero_grad()
            loss.backward()  # type: ignore[no-untyped-call]
            self.opt.step()
            self.sched.step()
            self.ema.update_parameters(self.model)
            self.patience.bad += step % 3 == 0
            value = float(loss.detach())
            metrics = {"loss": value, "score": -value} if step % 4 == 0 else {"loss": value}
            self.ckpt.step_done(step, metrics)
        if finish:
            self.ckpt.finish()
        else:
            self.ckpt.wait()

    def digest(self) -> str:
        digest = self.ckpt.live_digest()
        assert digest == codec.state_digest(self.state.snapshot_object([self.state.rank_state_dict()]))
        return digest


def manifest(directory: Path, step: int) -> dict[str, Any]:
    path = directory / "snapshots" / f"step-{step:012d}" / "manifest.json"
    doc: dict[str, Any] = json.loads(path.read_text())
    return doc


@pytest.mark.timeout(120)
@pytest.mark.parametrize("crash_at", [7, 10, 13])
def test_resume_reproduces_the_uninterrupted_run_bitwise(tmp_path: Path, crash_at: int) -> None:
    golden = Job(tmp_path / "golden")
    golden.train(20)
    killed = Job(tmp_path / "run")
    killed.train(crash_at, finish=False)
    resumed = Job(tmp_path / "run", noise=True, verify=crash_at == 13)
    resumed.train(20)
    assert resumed.ckpt.resumed_from == crash_at // 5 * 5
    assert resumed.digest() == golden.digest()
    assert manifest(tmp_path / "run", 20)["digest"] == manifest(tmp_path / "golden", 20)["digest"]
    assert (tmp_path / "run/exports/last.pt").read_bytes() == (tmp_path / "golden/exports/last.pt").read_bytes()


@pytest.mark.timeout(60)
def test_manifest_metadata_and_exports(tmp_path: Path) -> None:
    job = Job(tmp_path)
    job.train(20)
    doc = manifest(tmp_path, 20)
    meta = doc["metadata"]
    assert meta["hparams"] == HPARAMS and meta["config_hash"].startswith("sha256:")
    assert meta["dataset_version"] == "noisy-v1" and meta["torch_version"] == torch.__version__
    assert meta["lr"] == job.opt.param_groups[0]["lr"] and "loss" in meta["metrics"]
    assert doc["digest"] == job.digest() == job.ckpt.last_digest
    weights = torch.load(tmp_path / "exports/last.pt", weights_only=True)
    assert weights.keys() == job.model.state_dict().keys()
    assert all(torch.equal(weights[k], v) for k, v in job.model.state_dict().items())
    side = json.loads((tmp_path / "exports/last.json").read_text())
    import hashlib
    assert side["step"] == 20
    assert side["sha256"] == hashlib.sha256((tmp_path / "exports/last.pt").read_bytes()).hexdigest()
    best = json.loads((tmp_path / "exports/best.json").read_text())
    assert best["source"] == "ema" and best["value"] == job.state.best_metric
    best_weights = torch.load(tmp_path / "exports/best.pt", weights_only=True)
    assert best_weights.keys() == job.model.state_dict().keys()
    beat = json.loads((tmp_path / "run/progress/rank-0.json").read_text())
    assert beat["step"] == 20 and beat["rank"] == 0 and beat["pid"] == os.getpid()


@pytest.mark.timeout(60)
def test_changed_hparams_are_refused_unless_allowed(tmp_path: Path) -> None:
    Job(tmp_path).train(10, finish=False)
    changed = {**HPARAMS, "lr": 0.1, "extra": True}
    with pytest.raises(ConfigMismatch) as info:
        Job(tmp_path, hparams=changed).ckpt.resume()
    assert set(info.value.differences) == {"lr", "extra"} and info.value.fatal
    assert "lr" in str(info.value) and "extra" in str(info.value)
    assert Job(tmp_path, hparams=changed, allow=True).ckpt.resume() == 10
    # tuples and lists are the same JSON value: no spurious mismatch
    assert Job(tmp_path, hparams={**HPARAMS, "layers": (8, 4)}).ckpt.resume() == 10


@pytest.mark.timeout(60)
def test_world_size_change_is_refused(tmp_path: Path) -> None:
    Job(tmp_path).train(5, finish=False)
    job = Job(tmp_path)
    job.ckpt.world_size = 2
    with pytest.raises(WorldSizeMismatch):
        job.ckpt.resume()


@pytest.mark.timeout(60)
def test_corrupt_snapshot_is_never_loaded(tmp_path: Path) -> None:
    Job(tmp_path).train(10, finish=False)
    tensors = tmp_path / "snapshots" / f"step-{10:012d}" / "tensors.bin"
    data = bytearray(tensors.read_bytes())
    data[100] ^= 0xFF
    tensors.write_bytes(bytes(data))
    with pytest.raises(CorruptSnapshot):
        Job(tmp_path, resume="10").ckpt.resume()
    assert Job(tmp_path).ckpt.resume() == 5  # auto mode skips it
    assert Job(tmp_path, resume="none").ckpt.resume() == 0


@pytest.mark.timeout(60)
def test_background_write_error_is_reraised(tmp_path: Path) -> None:
    job = Job(tmp_path)
    job.ckpt.resume()

    def no_space(step: int, **_: Any) -> Any:
        raise DiskFull(f"no space left while writing step {step}")

    job.ckpt.store.begin = no_space  # type: ignore[method-assign]
    job.state.step = 5
    job.ckpt.snapshot()  # staging succeeds; the write fails in the background
    with pytest.raises(DiskFull):
        job.ckpt.wait()
    with pytest.raises(DiskFull):
        job.ckpt.step_done(6)
    with pytest.raises(DiskFull):
        job.ckpt.finish()


WORKER = textwrap.dedent("""
    import sys
    import trainer
    from trainer.errors import ConfigMismatch

    def main() -> None:
        kind = sys.argv[1]
        if kind == "config":
            raise ConfigMismatch(5, {"lr": (0.1, 0.2)})
        if kind == "crash":
            raise RuntimeError("boom")
        if kind == "usage":
            raise SystemExit(2)
        if kind == "exit3":
            raise SystemExit(3)

    trainer.run(main)
""")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind,code,fatal", [("config", EXIT_FATAL, True), ("crash", EXIT_FAILURE, False),
                                              ("usage", EXIT_FATAL, True), ("exit3", EXIT_FAILURE, False),
                                              ("ok", 0, None)])
def test_run_writes_error_files_and_exit_codes(tmp_path: Path, kind: str, code: int, fatal: bool | None) -> None:
    env = {**os.environ, "ORCH_CHECKPOINT_DIR": str(tmp_path), "ORCH_ATTEMPT": "2", "RANK": "0",
           "ORCH_LOG_FORMAT": "json"}
    proc = subprocess.run([sys.executable, "-c", WORKER, kind], env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == code, proc.stderr
    path = tmp_path / "run/errors/attempt-2/rank-0.json"
    if fatal is None:
        assert not path.exists()
        return
    doc = json.loads(path.read_text())
    assert doc["fatal"] is fatal and doc["rank"] == 0 and doc["attempt"] == 2
    assert {"time", "type", "message", "traceback"} <= doc.keys()
