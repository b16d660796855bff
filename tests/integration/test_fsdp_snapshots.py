"""Sharded (FSDP2) snapshots under real torchrun, 2 gloo ranks on CPU (tests/support/fsdp_job.py).

The golden run snapshots every 4 steps; ``live_digest()`` on 2 ranks equals each manifest's
digest; a snapshot written by 2 ranks resumes on 1 rank (a world-size change: DCP reshards) and
on 2 ranks with the digest at the resume step equal to the saved one (and, on 2 ranks, the run
continues bit-identically); a corrupted or missing shard makes the snapshot invalid for
``orchestrator snapshots --verify`` and the resume falls back to the previous one.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from storage.sharded import shard_file_name
from tests.e2e import harness

pytestmark = pytest.mark.timeout(300)

JOB = str(harness.REPO / "tests" / "support" / "fsdp_job.py")
STEPS, EVERY = 12, 4


def run_job(ckpt: Path, nproc: int, **env: str) -> dict[str, Any]:
    out = ckpt / f"out-{nproc}.json"
    p = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
         str(nproc), JOB, "--steps", str(STEPS), "--every", str(EVERY), "--out", str(out)],
        env=harness.base_env(ORCH_CHECKPOINT_DIR=str(ckpt), **env), cwd=harness.REPO,
        capture_output=True, text=True, timeout=180,
    )
    assert p.returncode == 0, p.stderr[-4000:]
    doc: dict[str, Any] = json.loads(out.read_text())
    return doc


@pytest.fixture(scope="module")
def golden(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any], dict[int, str]]:
    ckpt = tmp_path_factory.mktemp("fsdp-golden")
    report = run_job(ckpt, 2)
    return ckpt, report, harness.digests(harness.snapshots(ckpt))


def _copy_without(src: Path, dst: Path, *steps: int) -> Path:
    shutil.copytree(src, dst)
    for step in steps:
        shutil.rmtree(dst / "snapshots" / f"step-{step:012d}")
    return dst


def test_live_digest_on_two_ranks_equals_the_manifest_digest(golden: Any) -> None:
    ckpt, report, digests = golden
    assert sorted(digests) == [4, 8, 12]
    assert {int(s): d for s, d in report["snapshots"].items()} == digests
    snaps = harness.snapshots(ckpt)
    assert all(s["valid"] for s in snaps)
    manifest = json.loads((ckpt / "snapshots" / "step-000000000012" / "manifest.json").read_text())
    assert {shard_file_name(0), shard_file_name(1), "shards.json"} <= manifest["files"].keys()
    assert {"model", "optimizer", "scheduler", "loader/rank1"} <= manifest["components"].keys()


def test_resume_on_one_rank_keeps_the_digest(golden: Any, tmp_path: Path) -> None:
    ckpt, _report, digests = golden
    copy = _copy_without(ckpt, tmp_path / "ck", 12)
    report = run_job(copy, 1, ORCH_ALLOW_WORLD_SIZE_CHANGE="1")
    assert report["resumed_from"] == 8
    assert report["resume_digest"] == digests[8]


def test_resume_on_one_rank_is_refused_without_the_flag(golden: Any, tmp_path: Path) -> None:
    ckpt, _report, _digests = golden
    copy = _copy_without(ckpt, tmp_path / "ck", 12)
    p = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
         JOB, "--steps", str(STEPS), "--every", str(EVERY)],
        env=harness.base_env(ORCH_CHECKPOINT_DIR=str(copy)), cwd=harness.REPO,
        capture_output=True, text=True, timeout=180,
    )
    assert p.returncode != 0
    assert "WorldSizeMismatch" in p.stderr or "world size" in p.stderr


def test_resume_on_two_ranks_is_bit_identical(golden: Any, tmp_path: Path) -> None:
    ckpt, report, digests = golden
    copy = _copy_without(ckpt, tmp_path / "ck", 12)
    resumed = run_job(copy, 2)
    assert resumed["resumed_from"] == 8
    assert resumed["resume_digest"] == digests[8]
    assert resumed["final_digest"] == report["final_digest"] == digests[12]
    assert harness.digests(harness.snapshots(copy))[12] == digests[12]


@pytest.mark.parametrize("damage", ["bit_flip", "missing"])
def test_a_damaged_shard_falls_back_to_the_previous_snapshot(
    golden: Any, tmp_path: Path, damage: str
) -> None:
    ckpt, _report, digests = golden
    copy = _copy_without(ckpt, tmp_path / "ck")
    shard = copy / "snapshots" / "step-000000000012" / shard_file_name(1)
    if damage == "missing":
        os.unlink(shard)
    else:
        data = bytearray(shard.read_bytes())
        data[len(data) // 3] ^= 0x04
        shard.write_bytes(bytes(data))
    verdict = {s["step"]: s["valid"] for s in harness.snapshots(copy)}
    assert verdict == {4: True, 8: True, 12: False}
    resumed = run_job(copy, 2)
    assert resumed["resumed_from"] == 8
    assert resumed["resume_digest"] == digests[8]
    assert resumed["final_digest"] == digests[12]


def test_damage_found_while_loading_is_corrupt_snapshot(golden: Any, tmp_path: Path) -> None:
    """The supervisor named the step (a relaunch checks sizes only): the rank that reads the
    damaged shard fails with CorruptSnapshot before anything is applied, its peer with
    PeerFailure, none hangs in the DCP load (the supervisor then falls back)."""
    ckpt, _report, _digests = golden
    copy = _copy_without(ckpt, tmp_path / "ck")
    shard = copy / "snapshots" / "step-000000000012" / shard_file_name(1)
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    p = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         JOB, "--steps", str(STEPS), "--every", str(EVERY)],
        env=harness.base_env(ORCH_CHECKPOINT_DIR=str(copy), ORCH_RESUME_STEP="12"),
        cwd=harness.REPO, capture_output=True, text=True, timeout=180,
    )
    assert p.returncode != 0
    errors = [json.loads(f.read_text()) for f in (copy / "run" / "errors").rglob("rank-*.json")]
    kinds = {e["type"] for e in errors}
    assert kinds <= {"CorruptSnapshot", "PeerFailure"} and "CorruptSnapshot" in kinds, errors


def test_the_weights_export_holds_the_full_tensors(golden: Any, tmp_path: Path) -> None:
    """exports/last.pt of a sharded run holds every weight whole (gathered), as the model
    computes with it, not rank 0's shard; the same weights on 1 rank give the same file."""
    import torch

    ckpt, _report, _digests = golden
    weights = torch.load(ckpt / "exports" / "last.pt", weights_only=True)
    shapes = {k: tuple(v.shape) for k, v in weights.items()}
    assert shapes == {"0.weight": (37, 13), "0.bias": (37,), "2.weight": (5, 37), "2.bias": (5,)}
    # Resumed at the final step on one rank (nothing left to train), finish() exports again,
    # from a 1-rank mesh where every tensor is local and whole: the same weights.
    one = shutil.copytree(ckpt, tmp_path / "one")
    (one / "exports" / "last.pt").unlink()
    run_job(one, 1, ORCH_ALLOW_WORLD_SIZE_CHANGE="1")
    again = torch.load(one / "exports" / "last.pt", weights_only=True)
    assert again.keys() == weights.keys()
    for key, value in weights.items():
        assert torch.equal(again[key], value), key
