"""End-to-end FSDP2: ``orchestrator launch ... examples/synthetic_lm.py --fsdp`` with sharded
snapshots, every rank writing its own shards (2 gloo ranks on CPU, the ``tiny`` model).

A rank killed mid-run (and one killed between staging and commit, so that the barrier-then-commit
over shards never sees its report) is relaunched, resumes from the newest complete snapshot and
finishes with every snapshot bit-identical to an uninterrupted golden run of the same command. A
2-rank snapshot resumes on 2 nodes x 1 rank (two supervisors on loopback, one of them with an
empty disk: the holder broadcasts the verified files) and, the world and sharding being the
golden run's, the snapshots written from there (gathered to rank 0 on several nodes) carry the
golden digests too.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest

from contract.polling import wait_until
from orchestrator.launcher import find_processes, kill_and_wait
from tests.e2e import harness

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

LM = str(harness.REPO / "examples" / "synthetic_lm.py")
STEPS, EVERY = 20, 5
SCRIPT = (LM, "--fsdp", "--size", "tiny", "--steps", str(STEPS), "--warmup", "4",
          "--batch-size", "4", "--log-every", "5")


def _args(ckpt: Path, *extra: str) -> list[str]:
    return [*harness.ORCH, "launch", "--nproc-per-node", "2", "--checkpoint-dir", str(ckpt),
            "--checkpoint-every", str(EVERY), "--max-restarts", "3", "--keep-local", "all",
            *SCRIPT, *extra]


def _launch(ckpt: Path, *, faults: str | None = None, timeout: float = 200) -> harness.Result:
    env = harness.base_env(**({"ORCH_FAULTS": faults} if faults else {}))
    p = subprocess.run(_args(ckpt), env=env, cwd=harness.REPO, capture_output=True, text=True,
                       timeout=timeout)
    return harness.Result(p.returncode, p.stdout, p.stderr, ckpt)


@pytest.fixture(scope="module")
def golden(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[int, str]]:
    ckpt = tmp_path_factory.mktemp("fsdp-golden") / "ck"
    result = _launch(ckpt)
    assert result.rc == 0, result.stderr[-4000:]
    digests = harness.digests(result.snapshots())
    assert sorted(digests) == [5, 10, 15, 20]
    return ckpt, digests


@pytest.mark.parametrize(
    "fault, resumed_from",
    [("step_end@12:rank=1", 10), ("after_staging@10:rank=1", 5)],
    ids=["killed_mid_run", "killed_before_its_shards_were_reported"],
)
def test_killed_rank_resumes_bit_identical(
    golden: Any, tmp_path: Path, fault: str, resumed_from: int
) -> None:
    _ckpt, digests = golden
    result = _launch(tmp_path / "ck", faults=fault)
    harness.assert_matches_golden(result, digests)
    status = result.status()
    assert status["restarts"] >= 1
    assert status["resumed_from_step"] == resumed_from


def test_sigterm_takes_a_sharded_emergency_snapshot_and_resumes(golden: Any, tmp_path: Path) -> None:
    _ckpt, digests = golden
    ckpt = tmp_path / "ck"
    proc = subprocess.Popen(
        _args(ckpt, "--step-delay", "0.1"), env=harness.base_env(), cwd=harness.REPO, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
    )
    try:
        wait_until(lambda: (p := harness.progress(ckpt, 0)) and p["step"] >= 7 and p,
                   timeout=180, what="rank 0 to pass step 7")
        os.kill(proc.pid, signal.SIGTERM)
        _out, err = proc.communicate(timeout=120)
    finally:
        harness.kill_group(proc)
    assert proc.returncode == 75, err[-4000:]
    last = max(int(b["step"]) for b in (harness.progress(ckpt, r) for r in (0, 1)) if b is not None)
    snaps = harness.digests(harness.snapshots(ckpt))
    assert max(snaps) == last  # zero completed steps lost
    again = _launch(ckpt)
    harness.assert_matches_golden(again, digests, off_schedule=(last,))
    assert again.status()["resumed_from_step"] == last


def test_two_rank_snapshot_resumes_on_two_nodes(golden: Any, tmp_path: Path) -> None:
    ckpt, digests = golden
    nodes = [tmp_path / "node-0", tmp_path / "node-1"]
    # Node 0's disk holds the golden run up to step 10 (its supervisor state left behind);
    # node 1's disk is empty.
    shutil.copytree(ckpt / "snapshots", nodes[0] / "snapshots")
    for step in (15, 20):
        shutil.rmtree(nodes[0] / "snapshots" / f"step-{step:012d}")
    nodes[1].mkdir()
    port = harness.free_port()
    procs = []
    try:
        for rank, node in enumerate(nodes):
            args = [*harness.ORCH, "launch", "--nodes", "2", "--nproc-per-node", "1",
                    "--node-rank", str(rank), "--rdzv-endpoint", f"127.0.0.1:{port}",
                    "--run-id", "fsdp-mn", "--checkpoint-dir", str(node),
                    "--checkpoint-every", str(EVERY), "--max-restarts", "1",
                    "--keep-local", "all", *SCRIPT]
            procs.append(subprocess.Popen(
                args, env=harness.base_env(ORCH_RDZV_JOIN_TIMEOUT_S="90"), cwd=harness.REPO,
                text=True, stdout=subprocess.DEVNULL, stderr=(tmp_path / f"node-{rank}.err").open("w"),
                start_new_session=True,
            ))
        codes = [p.wait(timeout=240) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for node in nodes:
            kill_and_wait(find_processes({"ORCH_CHECKPOINT_DIR": str(node)}), 10)
    logs = "\n".join((tmp_path / f"node-{r}.err").read_text()[-3000:] for r in range(2))
    assert codes == [0, 0], logs
    got: dict[int, str] = {}
    for node in nodes:
        got.update({s: d for s, d in harness.digests(harness.snapshots(node)).items() if s > 10})
    # Resumed at 10 (the resume verified the loaded state's digest against step 10's manifest),
    # then the same world and sharding as the golden run: the same states, gathered to rank 0.
    assert got == {15: digests[15], 20: digests[20]}, logs
    # It resumed (a fresh start would reach the same digests): from step 10, whose files only
    # node 0 held, broadcast to the other node and verified there.
    assert {harness.status(node)["resumed_from_step"] for node in nodes} == {10}
    worker_logs = "\n".join(p.read_text() for p in tmp_path.rglob("attempt-*.log"))
    assert '"resume.cross_node"' in worker_logs and '"resume.sharded_loaded"' in worker_logs
    assert '"snapshot.gathered_multinode"' in worker_logs
