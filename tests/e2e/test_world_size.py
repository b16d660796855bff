"""End-to-end world-size changes: DDP preempted on 2 ranks, resumed on 1, then on 2 again.

Each segment ends with a SIGTERM to the supervisor (exit 75 after the emergency snapshot, zero
steps lost), so every completed step appears exactly once in the sample log of each rank of
its segment. The digits example keeps its global batch (``--global-batch-size 60``, 1500
training samples: 25 steps per epoch on any of these world sizes), and the sample log must show
every sample exactly once per epoch across both changes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from contract.polling import wait_until
from orchestrator.launcher import find_processes, kill_and_wait
from tests.e2e import harness

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(420)]

STEPS = 60
TRAIN_SAMPLES = 1500
GLOBAL_BATCH = 60
STEPS_PER_EPOCH = TRAIN_SAMPLES // GLOBAL_BATCH


def _args(ckpt: Path, samples: Path, nproc: int, *, allow: bool) -> list[str]:
    return [
        *harness.ORCH, "launch", "--nproc-per-node", str(nproc), "--checkpoint-dir", str(ckpt),
        "--checkpoint-every", "10", "--max-restarts", "0",
        *(["--allow-world-size-change"] if allow else []),
        harness.DIGITS, "--steps", str(STEPS), "--seed", "7",
        "--global-batch-size", str(GLOBAL_BATCH), "--record-samples", str(samples),
        "--eval-every", "30", "--step-delay", "0.04",
    ]


def _preempt(ckpt: Path, samples: Path, nproc: int, past: int) -> int:
    """Run on ``nproc`` ranks, SIGTERM the supervisor once rank 0 passed ``past``; last step."""
    proc = subprocess.Popen(
        _args(ckpt, samples, nproc, allow=True), env=harness.base_env(), cwd=harness.REPO,
        text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
    )
    try:
        wait_until(
            lambda: (p := harness.progress(ckpt, 0)) and p["step"] >= past and p["attempt"] >= 0,
            timeout=180, what=f"rank 0 past step {past} on {nproc} ranks",
            stop_if=lambda: None if proc.poll() is None else f"launch ended rc={proc.returncode}",
        )
        os.kill(proc.pid, signal.SIGTERM)
        _out, err = proc.communicate(timeout=120)
    finally:
        harness.kill_group(proc)
    assert proc.returncode == 75, f"rc={proc.returncode}\n{err[-4000:]}"
    st = harness.status(ckpt)
    assert st["phase"] == "preempted", st
    return int(st["step"])


def _records(samples: Path, rank: int) -> list[dict[str, Any]]:
    path = samples / f"rank-{rank}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_ddp_two_one_two_ranks_sees_every_sample_once_per_epoch(tmp_path: Path) -> None:
    ckpt, samples = tmp_path / "ckpt", tmp_path / "samples"
    first = _preempt(ckpt, samples, 2, past=12)

    # Another world size without the flag: refused before any step, with the way out named.
    refused = subprocess.run(
        _args(ckpt, samples, 1, allow=False), env=harness.base_env(), cwd=harness.REPO,
        capture_output=True, text=True, timeout=240,
    )
    assert refused.returncode == 1, refused.stderr[-3000:]
    assert "--allow-world-size-change" in refused.stdout + refused.stderr

    second = _preempt(ckpt, samples, 1, past=first + 20)
    assert second > first
    final = subprocess.run(
        _args(ckpt, samples, 2, allow=True), env=harness.base_env(), cwd=harness.REPO,
        capture_output=True, text=True, timeout=240,
    )
    assert final.returncode == 0, final.stderr[-4000:]
    st = harness.status(ckpt)
    assert st["phase"] == "done" and st["step"] == STEPS and st["resumed_from_step"] == second

    # Which ranks ran each step: 2 up to `first`, 1 up to `second`, then 2 again.
    def world(step: int) -> int:
        return 1 if first < step <= second else 2

    by_rank = {r: _records(samples, r) for r in (0, 1)}
    per_step: dict[int, list[int]] = {}
    epochs: dict[int, int] = {}
    for rank, records in by_rank.items():
        seen_steps = Counter(rec["step"] for rec in records)
        for rec in records:
            step = rec["step"]
            assert seen_steps[step] == 1, f"rank {rank} recorded step {step} twice (a replay)"
            assert rank < world(step), f"rank {rank} ran step {step} of a 1-rank segment"
            per_step.setdefault(step, []).extend(rec["samples"])
            assert epochs.setdefault(step, rec["epoch"]) == rec["epoch"]
    assert sorted(per_step) == list(range(1, STEPS + 1))
    _check_epochs(per_step, epochs)


def _check_epochs(per_step: dict[int, list[int]], epochs: dict[int, int]) -> None:
    """Each step trained on GLOBAL_BATCH distinct samples; each epoch on each sample once."""
    for step, batch in per_step.items():
        # The global batch is kept: each step trains on GLOBAL_BATCH distinct samples.
        assert len(batch) == GLOBAL_BATCH and len(set(batch)) == GLOBAL_BATCH, step
        assert epochs[step] == (step - 1) // STEPS_PER_EPOCH, (step, epochs[step])
    by_epoch: dict[int, Counter[int]] = {}
    for step, batch in per_step.items():
        by_epoch.setdefault(epochs[step], Counter()).update(batch)
    full = STEPS // STEPS_PER_EPOCH
    for epoch in range(full):
        counts = by_epoch[epoch]
        assert counts == Counter(range(TRAIN_SAMPLES)), (
            f"epoch {epoch}: missing {sorted(set(range(TRAIN_SAMPLES)) - set(counts))[:10]}, "
            f"repeated {[s for s, c in counts.items() if c > 1][:10]}"
        )
    # The partial last epoch repeats nothing either.
    assert max(by_epoch[full].values()) == 1


def test_elastic_nodes_range_continues_on_the_surviving_node(tmp_path: Path) -> None:
    """``--nodes 1:2``: rank 0's node is lost for good (no mirror); the other node re-forms the
    group alone (one rank), resumes its own copy of the newest snapshot (node copies) on the
    smaller world size without any flag, and finishes; the data stays sample-exact."""
    port = harness.free_port()
    samples = tmp_path / "samples"
    env = harness.base_env(ORCH_RDZV_JOIN_TIMEOUT_S="90", ORCH_RDZV_LAST_CALL_S="2")
    procs: dict[int, subprocess.Popen[str]] = {}

    def ckpt(node: int) -> Path:
        return tmp_path / f"node-{node}"

    def start(node: int) -> None:
        args = [
            *harness.ORCH, "launch", "--nodes", "1:2", "--nproc-per-node", "1",
            "--node-rank", str(node), "--rdzv-endpoint", f"127.0.0.1:{port}", "--run-id", "el",
            "--checkpoint-dir", str(ckpt(node)), "--checkpoint-every", "10",
            "--max-restarts", "3", "--keep-local", "all",
            harness.DIGITS, "--steps", str(STEPS), "--seed", "7",
            "--global-batch-size", str(GLOBAL_BATCH), "--record-samples", str(samples),
            "--eval-every", "30", "--step-delay", "0.05",
        ]
        log = (tmp_path / f"node-{node}.stderr").open("w")
        procs[node] = subprocess.Popen(
            args, env=env, cwd=harness.REPO, text=True, stdout=subprocess.DEVNULL, stderr=log,
            start_new_session=True,
        )

    def logs() -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in tmp_path.glob("*.stderr"))

    try:
        start(0)
        start(1)

        def rank0_past(step: int) -> tuple[int] | None:
            """(node of rank 0,) once rank 0 completed ``step`` (a tuple: node 0 is falsy)."""
            for node in (0, 1):
                p = harness.progress(ckpt(node), 0)
                if p is not None and p["step"] >= step:
                    return (node,)
            return None

        (victim,) = wait_until(lambda: rank0_past(25), timeout=240, what="rank 0 past step 25")
        survivor = 1 - victim
        os.killpg(procs[victim].pid, signal.SIGKILL)
        procs[victim].wait(timeout=30)
        kill_and_wait(find_processes({"ORCH_CHECKPOINT_DIR": str(ckpt(victim))}), 10)
        assert procs[survivor].wait(timeout=300) == 0, logs()
        st = harness.status(ckpt(survivor))
        assert st["phase"] == "done" and st["step"] == STEPS, st
        resumed = st["resumed_from_step"]
        assert resumed is not None and resumed >= 20, st
        final = [s for s in harness.snapshots(ckpt(survivor)) if s["step"] == STEPS]
        assert final and final[0]["valid"]
        manifest = json.loads(
            (Path(final[0]["path"]) / "manifest.json").read_text()
        )
        assert manifest["world_size"] == 1
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)
        for node in (0, 1):
            kill_and_wait(find_processes({"ORCH_CHECKPOINT_DIR": str(ckpt(node))}), 10)

    # Up to the resume point both ranks' first records; after it only the survivor's, which
    # is rank 0 of the 1-rank group (its last record of each replayed step counts).
    per_step: dict[int, list[int]] = {}
    epochs: dict[int, int] = {}
    for rank in (0, 1):
        for rec in _records(samples, rank):
            step = rec["step"]
            if step <= resumed:
                per_step.setdefault(step, []).extend(rec["samples"])
            elif rank == 0:
                per_step[step] = list(rec["samples"])  # a later record replaces a lost one
            epochs[step] = rec["epoch"]
    assert sorted(per_step) == list(range(1, STEPS + 1))
    _check_epochs(per_step, epochs)
