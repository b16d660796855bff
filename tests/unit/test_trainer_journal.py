"""The determinism audit (trainer.journal): exact fingerprints, a bounded journal, and the
comparison of re-executed steps after a resume, run in-process with a real Checkpointer."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from contract.documents import (
    DeterminismReport,
    JournalEntry,
    JournalStart,
    parse_journal_line,
    read_document,
)
from contract.paths import RunPaths
from tests.unit.test_trainer_checkpoint import Noisy
from trainer.checkpoint import Checkpointer
from trainer.data import ResumableDistributedSampler, ResumableLoader
from trainer.errors import error_record, is_fatal
from trainer.journal import Journal, ResumeDiverged, fingerprint
from trainer.resume import ResumePolicy
from trainer.settings import WorkerSettings
from trainer.state import TrainingState

pytestmark = pytest.mark.timeout(120)

HPARAMS = {"lr": 0.05, "steps": 20}


class Job:
    """A small complete job (dropout, AdamW, resumable loader) that reports its loss every step.

    ``skip_batch``: after a resume, drop one batch first (a script that held a prefetched batch
    across the snapshot boundary): the re-executed steps see other data and must diverge.
    """

    def __init__(self, directory: Path, *, attempt: int = 0, every: int = 5,
                 on_divergence: Any = "warn", skip_batch: bool = False,
                 hparams: dict[str, Any] | None = None, run_id: str = "run-a",
                 heartbeat_s: float = 0.0, allow: bool | None = None) -> None:
        torch.manual_seed(0)
        self.model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Dropout(0.3),
                                         torch.nn.Linear(8, 1))
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=0.05)
        self.loader = ResumableLoader(Noisy(), batch_size=4, sampler=ResumableDistributedSampler(30, seed=3),
                                      with_epoch=True)
        self.state = TrainingState(model=self.model, optimizer=self.opt, loader=self.loader)
        settings = WorkerSettings(checkpoint_dir=str(directory), attempt=attempt, run_id=run_id,
                                  on_divergence=on_divergence, heartbeat_interval_s=heartbeat_s)
        self.ckpt = Checkpointer(self.state, hparams=hparams or HPARAMS, every=every, settings=settings,
                                 resume_policy=ResumePolicy(allow_config_change=allow))
        self.skip_batch = skip_batch
        self.losses: dict[int, float] = {}

    def train(self, until: int, *, finish: bool = True) -> None:
        step = self.ckpt.resume()
        batches = iter(self.loader)
        if self.skip_batch and step > 0:
            next(batches)
        while step < until:
            step += 1
            x, y = next(batches)
            loss = torch.nn.functional.mse_loss(self.model(x), y)
            self.opt.zero_grad()
            loss.backward()  # type: ignore[no-untyped-call]
            self.opt.step()
            value = float(loss.detach())
            self.losses[step] = value
            self.ckpt.step_done(step, {"loss": value, "lr": 0.05, "epoch": 1})
        if finish:
            self.ckpt.finish()
        else:
            self.ckpt.wait()  # a "crash": the journal is left as a SIGKILL leaves it


def report(directory: Path, rank: int = 0) -> DeterminismReport | None:
    return read_document(RunPaths.of(str(directory)).determinism(rank), DeterminismReport)


def journal_lines(directory: Path, rank: int = 0) -> list[Any]:
    paths = RunPaths.of(str(directory))
    out: list[Any] = []
    for path in (paths.journal_old(rank), paths.journal(rank)):
        if Path(path).exists():
            out += [parse_journal_line(line) for line in Path(path).read_bytes().splitlines()]
    return out


# -- fingerprints ---------------------------------------------------------------------------------


def test_fingerprint_is_the_exact_bits_of_the_loss() -> None:
    a = 0.1 + 0.2
    b = 0.30000000000000004  # the same double
    c = math.nextafter(a, 1.0)  # one ulp away
    assert fingerprint({"loss": a}) == fingerprint({"loss": b}) == {"loss": a.hex()}
    assert fingerprint({"loss": c}) != fingerprint({"loss": a})
    assert float.fromhex(a.hex()) == a and struct.pack("<d", float.fromhex(a.hex())) == struct.pack("<d", a)
    assert fingerprint({"loss": -0.0}) != fingerprint({"loss": 0.0})
    # loss wins; other metrics are not part of the fingerprint then
    assert fingerprint({"loss": 1.5, "acc": 0.25}) == {"loss": (1.5).hex()}
    # tensors and numpy scalars: their exact value (a float32 widened exactly)
    t = torch.tensor(0.1, dtype=torch.float32)
    assert fingerprint({"loss": t}) == {"loss": float(t.item()).hex()}
    assert fingerprint({"loss": np.float32(0.1)}) == {"loss": float(np.float32(0.1)).hex()}


def test_fingerprint_without_loss_takes_every_finite_float() -> None:
    fp = fingerprint({"acc": 0.5, "nan": float("nan"), "inf": math.inf, "n": 3, "ok": True,
                      "name": "x", "t": torch.tensor([1.0, 2.0])})
    assert fp == {"acc": (0.5).hex()}
    assert fingerprint({"n": 3}) is None and fingerprint(None) is None and fingerprint({}) is None


# -- the journal ----------------------------------------------------------------------------------


def _journal(tmp_path: Path, **kw: Any) -> Journal:
    defaults: dict[str, Any] = {"rank": 0, "run_id": "r", "attempt": 0, "config_hash": "h"}
    return Journal(RunPaths.of(str(tmp_path)), **{**defaults, **kw})


def test_journal_is_bounded_by_rotation(tmp_path: Path) -> None:
    j = _journal(tmp_path, limit=50)
    j.begin(0)
    for step in range(1, 1001):
        j.record(step, {"loss": step / 7})
    j.close()
    paths = RunPaths.of(str(tmp_path))
    current = Path(paths.journal(0)).read_bytes().splitlines()
    old = Path(paths.journal_old(0)).read_bytes().splitlines()
    assert len(current) <= 50 and len(old) <= 50
    # each generation starts with the session's start line, so it can be read on its own
    assert isinstance(parse_journal_line(current[0]), JournalStart)
    assert isinstance(parse_journal_line(old[0]), JournalStart)
    # the newest steps are all there, exactly
    again = _journal(tmp_path, attempt=1, limit=50)
    again.begin(990)
    assert again.frontier == 1000
    assert sorted(again._expected) == list(range(991, 1001))
    assert again._expected[1000].fp == {"loss": (1000 / 7).hex()}


def test_torn_and_foreign_lines_are_skipped(tmp_path: Path) -> None:
    j = _journal(tmp_path)
    j.begin(0)
    for step in (1, 2, 3):
        j.record(step, {"loss": float(step)})
    j.close()
    path = Path(RunPaths.of(str(tmp_path)).journal(0))
    with path.open("ab") as f:
        f.write(b'{"step":4,"attempt":0,"fp":{"loss":"0x1.0p+2"}}\n')
        f.write(b'{"start":true,"run_id":"other","attempt":0,"rank":0,"resumed_from":0}\n')
        f.write(b'{"step":5,"attempt":0,"fp":{"loss":"0x1.4p+2"}}\n')  # another run's: ignored
        f.write(b'{"step":6,"att')  # torn by a SIGKILL
    again = _journal(tmp_path, attempt=1)
    again.begin(1)
    assert sorted(again._expected) == [2, 3, 4] and again.frontier == 4


def test_every_step_is_on_disk_without_close(tmp_path: Path) -> None:
    # A SIGKILLed rank never closes its journal: what it recorded must already be in the file.
    j = _journal(tmp_path)
    j.begin(0)
    for step in (1, 2, 3):
        j.record(step, {"loss": float(step)})
    again = _journal(tmp_path, attempt=1)
    again.begin(0)
    assert sorted(again._expected) == [1, 2, 3]


# -- the audit with a real Checkpointer -------------------------------------------------------------


def test_no_recovery_is_unchecked(tmp_path: Path) -> None:
    job = Job(tmp_path)
    job.train(12)
    assert report(tmp_path) is None
    entries = [e for e in journal_lines(tmp_path) if isinstance(e, JournalEntry)]
    assert [e.step for e in entries] == list(range(1, 13))
    assert all(e.fp == {"loss": job.losses[e.step].hex()} for e in entries)


def test_deterministic_resume_is_verified_through_the_old_frontier(tmp_path: Path) -> None:
    Job(tmp_path).train(13, finish=False)  # snapshot at 10; every step journaled through 13
    resumed = Job(tmp_path, attempt=1)
    resumed.train(20)
    assert resumed.ckpt.resumed_from == 10
    assert resumed.ckpt.journal.frontier == 13
    assert resumed.ckpt.journal.compared == 3  # steps 11, 12 and 13, exactly
    got = report(tmp_path)
    assert got is not None and got.state == "verified"
    assert (got.checked_through_step, got.first_divergence_step, got.resumed_from) == (13, None, 10)


def test_diverging_resume_is_reported_with_the_first_step(tmp_path: Path) -> None:
    first = Job(tmp_path)
    first.train(13, finish=False)
    resumed = Job(tmp_path, attempt=1, skip_batch=True)
    resumed.train(20)  # warn: trains on
    got = report(tmp_path)
    assert got is not None and got.state == "diverged"
    assert got.first_divergence_step == 11 and got.fingerprint == "loss"
    assert got.expected == first.losses[11].hex() and got.got == resumed.losses[11].hex()
    assert got.expected != got.got
    # sticky: a later, clean recovery does not clear it
    Job(tmp_path, attempt=2).train(20)
    assert report(tmp_path) == got


def test_on_divergence_fail_raises_a_fatal_error_naming_step_and_fingerprint(tmp_path: Path) -> None:
    Job(tmp_path).train(13, finish=False)
    resumed = Job(tmp_path, attempt=1, skip_batch=True, on_divergence="fail")
    with pytest.raises(ResumeDiverged) as caught:
        resumed.train(20)
    assert is_fatal(caught.value)
    record = error_record(caught.value, rank=0, attempt=1)
    assert record.fatal and record.type == "ResumeDiverged"
    assert "step 11" in record.message and "loss" in record.message
    assert max(resumed.losses) == 11  # it stopped at the first diverged step
    got = report(tmp_path)
    assert got is not None and got.state == "diverged" and got.first_divergence_step == 11


def test_other_hyperparameters_or_run_are_not_compared(tmp_path: Path) -> None:
    Job(tmp_path).train(13, finish=False)
    # --allow-config-change: other hyperparameters, so other steps: nothing to compare with
    job = Job(tmp_path, attempt=1, skip_batch=True, hparams={**HPARAMS, "lr": 0.5}, allow=True)
    job.train(20)
    assert job.ckpt.resumed_from == 10
    assert job.ckpt.journal.frontier is None and report(tmp_path) is None
    # another run id in a reused dir: the same
    Job(tmp_path / "reused").train(13, finish=False)
    other = Job(tmp_path / "reused", attempt=1, skip_batch=True, run_id="run-b")
    other.train(20)
    assert other.ckpt.resumed_from == 10
    assert other.ckpt.journal.frontier is None and report(tmp_path / "reused") is None


def test_each_rank_compares_its_own_journal(tmp_path: Path) -> None:
    paths = RunPaths.of(str(tmp_path))
    for rank, loss in ((0, 1.0), (1, 2.0)):
        j = _journal(tmp_path, rank=rank)
        j.begin(0)
        for step in range(1, 6):
            j.record(step, {"loss": loss * step})
        j.close()
    assert Path(paths.journal(0)).exists() and Path(paths.journal(1)).exists()
    r0, r1 = _journal(tmp_path, rank=0, attempt=1), _journal(tmp_path, rank=1, attempt=1)
    r0.begin(2)
    r1.begin(2)
    for step in range(3, 6):
        r0.record(step, {"loss": 1.0 * step})
        r1.record(step, {"loss": 2.0 * step + (step == 4)})
    assert r0.report is not None and r0.report.state == "verified"
    assert r1.report is not None and r1.report.state == "diverged" and r1.report.first_divergence_step == 4
    assert report(tmp_path, 0) == r0.report and report(tmp_path, 1) == r1.report


def test_component_digests_are_journaled_and_compared(tmp_path: Path) -> None:
    j = _journal(tmp_path)
    j.begin(0)
    for step in range(1, 9):
        j.record(step, {"loss": 1.0}, {"model": "sha256:a", "optimizer": "sha256:b"} if step == 5 else None)
    j.close()
    entry = next(e for e in journal_lines(tmp_path) if isinstance(e, JournalEntry) and e.step == 5)
    assert entry.components == {"model": "sha256:a", "optimizer": "sha256:b"}
    again = _journal(tmp_path, attempt=1)
    again.begin(2)
    for step in range(3, 9):
        again.record(step, {"loss": 1.0},
                     {"model": "sha256:a", "optimizer": "sha256:X"} if step == 5 else None)
    assert again.report is not None and again.report.state == "diverged"
    assert (again.report.first_divergence_step, again.report.fingerprint) == (5, "component:optimizer")
    line = Path(RunPaths.of(str(tmp_path)).journal(0)).read_bytes().splitlines()[1]
    json.loads(line)  # plain JSON lines


def test_fast_line_format_is_plain_json() -> None:
    from trainer.journal import _fp_json

    for fp in ({"loss": (0.1).hex()}, {'a"b': "nan", "é\n": (-0.0).hex()}, {}):
        assert json.loads(_fp_json(fp)) == fp


def test_sessions_of_another_world_size_are_not_compared(tmp_path: Path) -> None:
    """A resume on another number of ranks re-partitions the data: other losses, no audit."""
    first = _journal(tmp_path, world_size=2)
    first.begin(0)
    for step in range(1, 6):
        first.record(step, {"loss": 1.0 / step})
    first.close()
    same = _journal(tmp_path, attempt=1, world_size=2)
    same.begin(2)
    assert same.frontier == 5
    same.close()
    other = _journal(tmp_path, attempt=2, world_size=1)
    other.begin(2)
    assert other.frontier is None
    other.record(3, {"loss": 7.0})  # would diverge if compared
    assert report(tmp_path) is None


def test_component_digests_of_a_format_1_session_are_not_compared(tmp_path: Path) -> None:
    """A session of the previous release (no digest_format: format 1 digests) still has its
    losses compared, but its component digests follow another definition: never compared."""
    paths = RunPaths.of(str(tmp_path))
    first = _journal(tmp_path)
    first.begin(0)
    for step in range(1, 6):
        first.record(step, {"loss": 1.0 / step}, {"model": "sha256:v1"} if step == 4 else None)
    first.close()
    # Rewrite the session's start line as the previous release wrote it.
    lines = Path(paths.journal(0)).read_bytes().splitlines()
    start = json.loads(lines[0])
    assert start["digest_format"] == "trainer-tree-v2"
    del start["digest_format"]
    Path(paths.journal(0)).write_bytes(b"\n".join([json.dumps(start).encode(), *lines[1:]]) + b"\n")

    again = _journal(tmp_path, attempt=1)
    again.begin(2)
    assert again.frontier == 5
    for step in range(3, 6):
        again.record(step, {"loss": 1.0 / step}, {"model": "sha256:v2"} if step == 4 else None)
    assert again.report is not None and again.report.state == "verified"
    again.close()
    # A real divergence of the losses is still found across releases.
    third = _journal(tmp_path, attempt=2)
    third.begin(2)
    third.record(3, {"loss": 9.0})
    assert third.report is not None and third.report.state == "diverged"
