"""End-to-end FSDP2: ``orchestrator launch ... examples/synthetic_lm.py --fsdp`` with sharded
snapshots, every rank writing its own shards (2 gloo ranks on CPU, the ``tiny`` model).

A rank killed mid-run (and one killed between staging and commit, so that the barrier-then-commit
over shards never sees its report) is relaunched, resumes from the newest complete snapshot and
finishes with every snapshot bit-identical to an uninterrupted golden run of the same command. A
2-rank snapshot resumes on 2 nodes x 1 rank (two supervisors on loopback, one of them with an
empty disk: the holder broadcasts the verified files) and, the world and sharding being the
golden run's, the snapshots written from there carry the golden digests too, with a complete copy
on each node. On two nodes under ``--nodes 1:2``, losing rank 0's node for good (no mirror) costs
nothing: the other node re-forms alone on one rank, resumes its own copy (resharded) and finishes.
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


class _Nodes:
    """Two supervisors on loopback, one rank each, each with its own checkpoint dir."""

    def __init__(self, tmp_path: Path, run_id: str, *, nodes: str = "2", restarts: int = 1,
                 **env: str) -> None:
        self.tmp, self.run_id, self.nodes, self.restarts = tmp_path, run_id, nodes, restarts
        self.port = harness.free_port()
        self.env = harness.base_env(ORCH_RDZV_JOIN_TIMEOUT_S="90", **env)
        self.procs: dict[int, subprocess.Popen[str]] = {}

    def ckpt(self, node: int) -> Path:
        return self.tmp / f"node-{node}"

    def start(self, node: int, *flags: str, script: tuple[str, ...] = ()) -> subprocess.Popen[str]:
        """Launch node ``node`` with orchestrator ``flags`` and extra ``script`` arguments."""
        args = [*harness.ORCH, "launch", "--nodes", self.nodes, "--nproc-per-node", "1",
                "--node-rank", str(node), "--rdzv-endpoint", f"127.0.0.1:{self.port}",
                "--run-id", self.run_id, "--checkpoint-dir", str(self.ckpt(node)),
                "--checkpoint-every", str(EVERY), "--max-restarts", str(self.restarts),
                "--keep-local", "all", *flags, *SCRIPT, *script]
        err = (self.tmp / f"node-{node}.err").open("a")
        self.procs[node] = subprocess.Popen(
            args, env=self.env, cwd=harness.REPO, text=True, stdout=subprocess.DEVNULL,
            stderr=err, start_new_session=True,
        )
        return self.procs[node]

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in self.tmp.glob("*.err"))

    def kill(self, node: int) -> None:
        proc = self.procs[node]
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        kill_and_wait(find_processes({"ORCH_CHECKPOINT_DIR": str(self.ckpt(node))}), 10)

    def close(self) -> None:
        for node in self.procs:
            self.kill(node)

    def rank0_past(self, step: int) -> tuple[int] | None:
        """(node of global rank 0,) once it completed ``step`` (a tuple: node 0 is falsy)."""
        for node in self.procs:
            p = harness.progress(self.ckpt(node), 0)
            if p is not None and p["step"] >= step:
                return (node,)
        return None

    def committed(self, step: int) -> bool:
        return all((self.ckpt(n) / "snapshots" / f"step-{step:012d}" / "manifest.json").exists()
                   for n in self.procs)


@pytest.fixture
def two_nodes(tmp_path: Path, request: pytest.FixtureRequest) -> Any:
    kwargs = getattr(request, "param", {})
    nodes = _Nodes(tmp_path, "fsdp-mn", **kwargs)
    try:
        yield nodes
    finally:
        nodes.close()


def _same_copies(nodes: _Nodes, step: int) -> None:
    """Both nodes hold a complete copy of ``step``: every shard file, one manifest."""
    copies = [nodes.ckpt(n) / "snapshots" / f"step-{step:012d}" for n in (0, 1)]
    for copy in copies:
        assert {p.name for p in copy.iterdir()} >= {"shard-00000.bin", "shard-00001.bin"}
    assert (copies[0] / "manifest.json").read_bytes() == (copies[1] / "manifest.json").read_bytes()


def test_two_rank_snapshot_resumes_on_two_nodes(golden: Any, two_nodes: _Nodes) -> None:
    ckpt, digests = golden
    # Node 0's disk holds the golden run up to step 10 (its supervisor state left behind);
    # node 1's disk is empty.
    shutil.copytree(ckpt / "snapshots", two_nodes.ckpt(0) / "snapshots")
    for step in (15, 20):
        shutil.rmtree(two_nodes.ckpt(0) / "snapshots" / f"step-{step:012d}")
    two_nodes.ckpt(1).mkdir()
    procs = [two_nodes.start(0), two_nodes.start(1)]
    codes = [p.wait(timeout=240) for p in procs]
    assert codes == [0, 0], two_nodes.logs()
    # Resumed at 10 (the resume verified the loaded state's digest against step 10's manifest),
    # then the same world and sharding as the golden run: the same states, and every node
    # holds a complete copy of each (its own shard and the other node's, carried to it).
    for node in (0, 1):
        got = {s: d for s, d in harness.digests(harness.snapshots(two_nodes.ckpt(node))).items()
               if s > 10}
        assert got == {15: digests[15], 20: digests[20]}, two_nodes.logs()
    for step in (15, 20):
        _same_copies(two_nodes, step)
    # It resumed (a fresh start would reach the same digests): from step 10, whose files only
    # node 0 held, broadcast to the other node and verified there.
    assert {harness.status(two_nodes.ckpt(n))["resumed_from_step"] for n in (0, 1)} == {10}
    worker_logs = "\n".join(p.read_text() for p in two_nodes.tmp.rglob("attempt-*.log"))
    assert '"resume.cross_node"' in worker_logs and '"resume.sharded_loaded"' in worker_logs
    assert '"snapshot.sharded_copies"' in worker_logs


@pytest.mark.parametrize("two_nodes", [{"nodes": "1:2", "restarts": 3, "ORCH_RDZV_LAST_CALL_S": "2"}],
                         indirect=True)
def test_rank0_node_lost_for_good_resumes_its_own_copy_on_the_other_node(
    golden: Any, two_nodes: _Nodes
) -> None:
    """FSDP on 2 nodes x 1 rank under ``--nodes 1:2``, no mirror: every node holds a complete
    copy of each sharded snapshot (its own shard written, the other carried to it). Rank 0's
    node is killed for good; the other node re-forms the group alone, resumes its own copy on
    one rank (DCP reshards 2 -> 1) with the digest the 2-rank group saved, and finishes."""
    _ckpt, digests = golden
    for node in (0, 1):
        # The example records its world size in hparams (its batch is per rank).
        two_nodes.start(node, "--allow-config-change", script=("--step-delay", "0.2"))
    (victim,) = wait_until(lambda: two_nodes.rank0_past(12) if two_nodes.committed(10) else None,
                           timeout=240, what="step 10 committed on both nodes")
    survivor = 1 - victim
    two_nodes.kill(victim)
    assert two_nodes.procs[survivor].wait(timeout=300) == 0, two_nodes.logs()
    st = harness.status(two_nodes.ckpt(survivor))
    assert st["phase"] == "done" and st["step"] == STEPS, st
    resumed = st["resumed_from_step"]
    assert resumed is not None and resumed >= 10, st
    snaps = {s["step"]: s for s in harness.snapshots(two_nodes.ckpt(survivor))}
    # The copy it resumed was written by the 2-rank group, on this node, with the golden digest
    # (same world and sharding up to there); the resume verified the loaded state against it.
    assert snaps[resumed]["valid"] and snaps[resumed]["world_size"] == 2
    assert snaps[resumed]["digest"] == digests[resumed]
    assert snaps[STEPS]["valid"] and snaps[STEPS]["world_size"] == 1
    worker_logs = "\n".join(p.read_text() for p in two_nodes.ckpt(survivor).rglob("attempt-*.log"))
    assert '"resume.sharded_loaded"' in worker_logs and '"saved_world_size": 2' in worker_logs


def test_one_node_preempted_both_nodes_commit_the_emergency_snapshot(
    golden: Any, two_nodes: _Nodes
) -> None:
    """SIGTERM to the supervisor of the node *without* global rank 0: all ranks stop at one
    step, each node commits its complete copy before any rank exits (zero steps lost on either
    disk), the signalled node exits 75; relaunched, both finish on the golden digests."""
    _ckpt, digests = golden
    for node in (0, 1):
        two_nodes.start(node, script=("--step-delay", "0.1"))
    (holder,) = wait_until(lambda: two_nodes.rank0_past(7), timeout=240, what="rank 0 past step 7")
    victim = 1 - holder
    os.kill(two_nodes.procs[victim].pid, signal.SIGTERM)
    assert two_nodes.procs[victim].wait(timeout=120) == 75, two_nodes.logs()
    stop = harness.status(two_nodes.ckpt(victim))["step"]
    assert stop not in digests  # off the interval: the emergency snapshot
    for node in (0, 1):
        assert max(harness.digests(harness.snapshots(two_nodes.ckpt(node)))) == stop
    _same_copies(two_nodes, stop)
    two_nodes.start(victim)
    assert [two_nodes.procs[n].wait(timeout=240) for n in (0, 1)] == [0, 0], two_nodes.logs()
    for node in (0, 1):
        got = harness.digests(harness.snapshots(two_nodes.ckpt(node)))
        assert {s: d for s, d in got.items() if s != stop and s > stop} == {
            s: d for s, d in digests.items() if s > stop}, two_nodes.logs()


@pytest.mark.parametrize("two_nodes", [{"restarts": 0}], indirect=True)
def test_without_node_copies_rank0s_node_holds_every_shard(golden: Any, two_nodes: _Nodes) -> None:
    """``--no-node-copies`` on 2 nodes x 1 rank: the other node's shards are carried to rank
    0's node, which holds complete snapshots with the golden digests; the other node none."""
    _ckpt, digests = golden
    procs = [two_nodes.start(n, "--no-node-copies") for n in (0, 1)]
    assert [p.wait(timeout=240) for p in procs] == [0, 0], two_nodes.logs()
    held = {n: harness.digests(harness.snapshots(two_nodes.ckpt(n))) for n in (0, 1)}
    holder = 0 if held[0] else 1  # torchrun, not --node-rank, places global rank 0
    assert held[holder] == digests and held[1 - holder] == {}, two_nodes.logs()
    final = two_nodes.ckpt(holder) / "snapshots" / f"step-{STEPS:012d}"
    assert {p.name for p in final.iterdir()} >= {"shard-00000.bin", "shard-00001.bin"}
