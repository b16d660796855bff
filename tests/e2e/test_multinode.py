"""End-to-end multi-node: two supervisors on loopback joined by torchrun's c10d rendezvous.

Each "node" is one `orchestrator launch --nodes 2 --node-rank R` with its own checkpoint dir
(its own NVMe) and one rank, so the world (2 ranks) is the golden run's: every snapshot must
carry the golden digest whichever node wrote it. Which node hosts global rank 0 is decided by
the rendezvous, not by --node-rank, so the tests find out from the heartbeats and kill the node
they mean to.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from contract.polling import wait_until
from orchestrator.launcher import find_processes, kill_and_wait
from tests.e2e import harness
from tests.support.conftest_plugin import S3Bucket

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(420)]

NODE_ENV = {
    "ORCH_RDZV_JOIN_TIMEOUT_S": "90",
    "ORCH_MIRROR_FLUSH_TIMEOUT_S": "60",
    "ORCH_MIRROR_RETRY_INITIAL_S": "0.2",
    "ORCH_MIRROR_RETRY_MAX_S": "1",
    "ORCH_STATE_MIRROR_INTERVAL_S": "1",
}


@dataclass
class Cluster:
    root: Path
    port: int
    env: dict[str, str]
    mirror: str | None = None
    procs: dict[int, subprocess.Popen[str]] = field(default_factory=dict)
    generation: int = 0

    def ckpt(self, node: int) -> Path:
        return self.root / f"node-{node}"

    def start(self, node: int, *, steps: int = harness.STEPS) -> subprocess.Popen[str]:
        self.generation += 1
        args = [
            *harness.ORCH, "launch", "--nodes", "2", "--nproc-per-node", "1",
            "--node-rank", str(node), "--rdzv-endpoint", f"127.0.0.1:{self.port}",
            "--run-id", "mn", "--checkpoint-dir", str(self.ckpt(node)),
            "--checkpoint-every", str(harness.EVERY), "--max-restarts", "3",
            # Every snapshot stays (the tests compare emergency snapshots across nodes).
            "--keep-local", "all",
            *(["--mirror", self.mirror] if self.mirror else []),
            harness.DIGITS, "--steps", str(steps), "--seed", "7", "--step-delay", "0.05",
        ]
        log = self.root / f"node-{node}.gen{self.generation}.stderr"
        proc = subprocess.Popen(
            args, env=harness.base_env(**self.env), cwd=harness.REPO, text=True,
            stdout=subprocess.DEVNULL, stderr=log.open("w"), start_new_session=True,
        )
        self.procs[node] = proc
        return proc

    def step(self) -> int:
        """The highest step any rank reported, on any node."""
        best = -1
        for node in (0, 1):
            for rank in (0, 1):
                p = harness.progress(self.ckpt(node), rank)
                if p is not None:
                    best = max(best, int(p["step"]))
        return best

    def node_of_rank0(self) -> int:
        found = [n for n in (0, 1) if harness.progress(self.ckpt(n), 0) is not None]
        assert len(found) == 1, found
        return found[0]

    def lose(self, node: int) -> None:
        """The node is gone: its supervisor, torchrun and ranks die at once, its disk with them."""
        proc = self.procs[node]
        # All at once, ranks first: killed one after the other from the supervisor down, the
        # supervisor's death reached torchrun as its parent-death signal, torchrun forwarded
        # SIGTERM to the ranks, and they took an emergency snapshot with the other node's ranks
        # (seen in CI: a snapshot at step 51 that no golden run has). A frozen supervisor cannot
        # die or relaunch meanwhile. torchrun and the ranks run in sessions of their own: found
        # by their environment.
        os.killpg(proc.pid, signal.SIGSTOP)
        mine = {"ORCH_CHECKPOINT_DIR": str(self.ckpt(node))}
        assert not kill_and_wait(find_processes(mine, present=("LOCAL_RANK",)), 10)
        assert not kill_and_wait(find_processes(mine), 10)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        shutil.rmtree(self.ckpt(node))

    def wait(self, node: int, timeout: float = 300) -> int:
        return self.procs[node].wait(timeout=timeout)

    def stderr(self) -> str:
        return "\n".join(
            f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(self.root.glob("*.stderr"))
        )

    def close(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)
        for node in (0, 1):
            kill_and_wait(find_processes({"ORCH_CHECKPOINT_DIR": str(self.ckpt(node))}), 10)


def _all_digests(cluster: Cluster) -> dict[int, str]:
    """Every valid snapshot on either node's disk (and the mirror); one digest per step."""
    seen: dict[int, str] = {}
    sources = [harness.snapshots(cluster.ckpt(n)) for n in (0, 1) if cluster.ckpt(n).exists()]
    if cluster.mirror:
        sources.append(harness.snapshots(mirror=cluster.mirror, env=cluster.env))
    for snaps in sources:
        for step, digest in harness.digests(snaps).items():
            assert seen.setdefault(step, digest) == digest, f"two different snapshots at {step}"
    return seen


def _replace_node_and_finish(cluster: Cluster, victim: int, golden: dict[int, str]) -> None:
    """Lose ``victim``, start a new supervisor on its empty disk; both finish, golden digests."""
    cluster.lose(victim)
    cluster.start(victim)
    codes = {n: cluster.wait(n) for n in (0, 1)}
    assert codes == {0: 0, 1: 0}, cluster.stderr()
    got = _all_digests(cluster)
    assert max(got) == harness.STEPS
    for step, digest in got.items():
        assert digest == golden[step], f"snapshot {step} differs from the golden run"


def _events(ckpt: Path) -> list[dict[str, Any]]:
    lines = (ckpt / "run" / "events.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def _no_orphans(cluster: Cluster) -> None:
    for node in (0, 1):
        left = find_processes({"ORCH_CHECKPOINT_DIR": str(cluster.ckpt(node))})
        assert left == [], f"processes of node {node} outlived the run: {left}"


@pytest.fixture
def cluster(tmp_path: Path) -> Any:
    c = Cluster(tmp_path, harness.free_port(), dict(NODE_ENV))
    try:
        yield c
    finally:
        c.close()


def test_node_without_rank0_replaced_with_empty_disk(
    golden: dict[int, str], cluster: Cluster
) -> None:
    """No mirror: the replacement gets the newest snapshot from rank 0's node by broadcast."""
    cluster.start(0)
    cluster.start(1)
    wait_until(lambda: cluster.step() >= 50, timeout=180, what="step 50")
    victim = 1 - cluster.node_of_rank0()
    _replace_node_and_finish(cluster, victim, golden)
    # The survivor restarted (a peer vanished mid-collective) and resumed from its own disk;
    # the replacement joined with nothing and resumed from the same step, received by broadcast.
    survivor = _events(cluster.ckpt(1 - victim))
    assert any(e["event"] == "supervisor.attempt_failed" for e in survivor)
    fresh = harness.status(cluster.ckpt(victim))
    assert fresh["phase"] == "done" and fresh["resumed_from_step"] is not None
    assert fresh["resumed_from_step"] >= 40
    assert any(e["event"] == "supervisor.resumed_elsewhere" for e in _events(cluster.ckpt(victim)))
    _no_orphans(cluster)


def test_rank0_node_replaced_resumes_from_the_mirror(
    golden: dict[int, str], s3_bucket: S3Bucket, tmp_path: Path
) -> None:
    """The node holding every snapshot is lost: the run continues from the object store."""
    cluster = Cluster(
        tmp_path, harness.free_port(), {**NODE_ENV, **s3_bucket.server.env()}, mirror=s3_bucket.url
    )
    try:
        cluster.start(0)
        cluster.start(1)
        mirrored = lambda: harness.digests(  # noqa: E731
            harness.snapshots(mirror=s3_bucket.url, env=cluster.env, verify=False)
        )
        wait_until(lambda: len(mirrored()) >= 2, timeout=180, what="two mirrored snapshots")
        victim = cluster.node_of_rank0()
        _replace_node_and_finish(cluster, victim, golden)
        # Aggregated over nodes from the mirror: both supervisors published their state.
        p = subprocess.run(
            [*harness.ORCH, "status", "--mirror", s3_bucket.url, "--json"],
            env=harness.base_env(**cluster.env), capture_output=True, text=True, timeout=60,
        )
        assert p.returncode == 0, p.stderr
        st = json.loads(p.stdout)
        assert sorted(n["node_rank"] for n in st["nodes"]) == [0, 1], st
        assert all(n["phase"] == "done" for n in st["nodes"]), st
        assert st["step"] == harness.STEPS and st["newest_remote_step"] == harness.STEPS
        restored = [e for e in _events(cluster.ckpt(victim))
                    if e["event"].startswith("restore.")]
        assert restored, "the replacement did not restore from the mirror"
        _no_orphans(cluster)
    finally:
        cluster.close()


def test_one_node_preempted_the_other_waits_then_both_finish(
    golden: dict[int, str], cluster: Cluster
) -> None:
    """SIGTERM to one node's supervisor: every rank stops at one step and rank 0 commits it.

    The signalled node exits 75; the other relaunches at once (a peer's preemption spends no
    restart) and waits in the rendezvous until the node comes back.
    """
    cluster.start(0)
    cluster.start(1)
    wait_until(lambda: cluster.step() >= 45, timeout=180, what="step 45")
    victim = 1 - cluster.node_of_rank0()  # the node without the snapshots
    os.kill(cluster.procs[victim].pid, signal.SIGTERM)
    assert cluster.wait(victim, timeout=120) == 75, cluster.stderr()
    st = harness.status(cluster.ckpt(victim))
    assert st["phase"] == "preempted" and st["preemptions"] == 1 and st["restarts"] == 0
    stop_step = st["step"]
    other = wait_until(
        lambda: (o := harness.status(cluster.ckpt(1 - victim)))["preemptions"] == 1 and o,
        timeout=60,
        what="the other node to see the preemption",
    )
    assert other["restarts"] == 0 and other["phase"] in ("starting", "running"), other
    cluster.start(victim)
    codes = {n: cluster.wait(n) for n in (0, 1)}
    assert codes == {0: 0, 1: 0}, cluster.stderr()
    got = _all_digests(cluster)
    assert stop_step in got, (stop_step, sorted(got))  # the emergency snapshot, no lost step
    # Node copies: the node without rank 0 holds the emergency snapshot on its own disk too.
    assert stop_step in harness.digests(harness.snapshots(cluster.ckpt(victim)))
    for step, digest in got.items():
        if step in golden:
            assert digest == golden[step], f"snapshot {step} differs from the golden run"
    assert got[harness.STEPS] == golden[harness.STEPS]
    assert harness.status(cluster.ckpt(victim))["resumed_from_step"] == stop_step
    _no_orphans(cluster)


def test_rank0_node_lost_without_mirror_resumes_from_the_other_nodes_copy(
    golden: dict[int, str], cluster: Cluster
) -> None:
    """No mirror: every node wrote its own copy, so losing rank 0's node loses no snapshot."""
    cluster.start(0)
    cluster.start(1)
    wait_until(lambda: cluster.step() >= 50, timeout=180, what="step 50")
    victim = cluster.node_of_rank0()
    survivor = 1 - victim
    copies = harness.digests(harness.snapshots(cluster.ckpt(survivor)))
    originals = harness.digests(harness.snapshots(cluster.ckpt(victim)))
    assert {20, 40} <= set(copies), sorted(copies)
    for step, digest in copies.items():
        assert originals.get(step, digest) == digest == golden[step], step
    # Byte-identical copies (same files, sizes and checksums): either node's upload of a step
    # is the other's, so two mirrors never disagree about a step's objects.
    name = "snapshots/step-000000000020/manifest.json"
    files = [json.loads((cluster.ckpt(n) / name).read_text())["files"] for n in (0, 1)]
    assert files[0] == files[1]
    _replace_node_and_finish(cluster, victim, golden)
    fresh = harness.status(cluster.ckpt(victim))
    assert fresh["phase"] == "done" and fresh["resumed_from_step"] is not None
    assert fresh["resumed_from_step"] >= 40
    _no_orphans(cluster)
