"""Worker side of preemption: control request -> emergency snapshot at that step -> Preempted."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from contract.codes import EXIT_PREEMPTED
from contract.paths import RunPaths
from tests.unit.test_trainer_checkpoint import Job
from trainer import preemption
from trainer.errors import Preempted
from trainer.settings import WorkerSettings

pytestmark = pytest.mark.timeout(120)


def _request(directory: Path, attempt: int = 0) -> None:
    path = Path(RunPaths.of(str(directory)).preempt_request)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"requested_at": 0.0, "deadline": 30.0, "attempt": attempt}))


class _RequestAt(Job):
    """Writes the supervisor's request file right after step ``at`` (as if it arrived then)."""

    def __init__(self, directory: Path, at: int, **kw: Any) -> None:
        super().__init__(directory, **kw)
        inner = self.ckpt.step_done

        def step_done(step: int, metrics: Any = None) -> None:
            if step == at:
                _request(directory)
            inner(step, metrics)

        self.ckpt.step_done = step_done  # type: ignore[method-assign]


@pytest.mark.parametrize("at", [7, 10])
def test_request_stops_at_that_step_with_a_committed_snapshot(tmp_path: Path, at: int) -> None:
    golden = Job(tmp_path / "golden")
    golden.train(20)
    run = _RequestAt(tmp_path / "run", at)
    with pytest.raises(Preempted) as info:
        run.train(20)
    assert info.value.step == at
    snaps = sorted(p.name for p in (tmp_path / "run" / "snapshots").iterdir())
    assert snaps[-1] == f"step-{at:012d}" and snaps.count(snaps[-1]) == 1
    ack = json.loads(Path(RunPaths.of(str(tmp_path / "run")).preempt_ack).read_text())
    assert ack["step"] == at and ack["attempt"] == 0 and ack["digest"]
    os.unlink(RunPaths.of(str(tmp_path / "run")).preempt_request)  # the supervisor consumes it
    resumed = Job(tmp_path / "run", noise=True)
    resumed.train(20)
    assert resumed.ckpt.resumed_from == at
    assert resumed.digest() == golden.digest()


def test_request_for_another_attempt_is_ignored(tmp_path: Path) -> None:
    _request(tmp_path / "run", attempt=3)
    job = Job(tmp_path / "run")
    job.train(6)  # attempt 0: runs to the end


def test_in_process_flag_stops_at_the_next_step(tmp_path: Path) -> None:
    job = Job(tmp_path / "run")
    preemption.request()
    try:
        with pytest.raises(Preempted) as info:
            job.train(20)
    finally:
        preemption.clear()
    assert info.value.step == 1


WORKER = textwrap.dedent(
    """
    import os, signal, sys, time
    import trainer
    from trainer import preemption
    from trainer.errors import Preempted

    def main():
        os.kill(os.getpid(), signal.SIGTERM)  # the first SIGTERM only sets the flag
        time.sleep(0.05)
        assert preemption.signalled()
        raise Preempted(5)

    trainer.run(main)
    """
)


def test_run_turns_sigterm_into_a_request_and_preempted_into_exit_75(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ORCH_")}
    env["ORCH_CHECKPOINT_DIR"] = str(tmp_path)
    proc = subprocess.run([sys.executable, "-c", WORKER], env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == EXIT_PREEMPTED, proc.stderr[-3000:]
    assert proc.returncode != -signal.SIGTERM
    assert not (tmp_path / "run" / "errors").exists()  # a preemption is not an error


def test_check_every_k_steps_stops_at_the_next_multiple(tmp_path: Path) -> None:
    job = Job(tmp_path / "run")
    job.ckpt.settings = dataclasses.replace(job.ckpt.settings, preempt_check_every=4)
    preemption.request()
    try:
        with pytest.raises(Preempted) as info:
            job.train(20)
    finally:
        preemption.clear()
    assert info.value.step == 4


def test_check_every_setting_is_validated() -> None:
    assert WorkerSettings.from_env({"ORCH_PREEMPT_CHECK_EVERY": "3"}).preempt_check_every == 3
    with pytest.raises(ValueError, match="ORCH_PREEMPT_CHECK_EVERY"):
        WorkerSettings.from_env({"ORCH_PREEMPT_CHECK_EVERY": "0"})


def _fake_proc(root: Path, ppid: int, tasks: dict[int, str]) -> str:
    for tid, children in tasks.items():
        d = root / str(ppid) / "task" / str(tid)
        d.mkdir(parents=True)
        (d / "children").write_text(children)
    return str(root)


def test_local_peer_gone_counts_torchruns_live_children(tmp_path: Path) -> None:
    env = {"LOCAL_WORLD_SIZE": "2", "TORCHELASTIC_RUN_ID": "r", "WORLD_SIZE": "2"}
    s = WorkerSettings.from_env(env)
    torchrun = (s.local_world_size, s.under_torchelastic)
    assert torchrun == (2, True)
    full = _fake_proc(tmp_path / "a", 10, {10: "11 12 ", 13: ""})
    one_left = _fake_proc(tmp_path / "b", 10, {10: "11 ", 13: ""})
    spread = _fake_proc(tmp_path / "c", 10, {10: "11 ", 13: "12 "})  # forked from two threads
    assert not preemption.local_peer_gone(*torchrun, 10, full)
    assert preemption.local_peer_gone(*torchrun, 10, one_left)
    assert not preemption.local_peer_gone(*torchrun, 10, spread)
    # Not under torchrun, one rank per node, or nothing to read: never a teardown.
    plain = WorkerSettings.from_env({"LOCAL_WORLD_SIZE": "2"})
    assert not preemption.local_peer_gone(plain.local_world_size, plain.under_torchelastic, 10,
                                          one_left)
    assert not preemption.local_peer_gone(1, True, 10, one_left)
    assert not preemption.local_peer_gone(*torchrun, 99, one_left)
    with pytest.raises(ValueError, match="LOCAL_WORLD_SIZE must be an integer"):
        WorkerSettings.from_env({**env, "LOCAL_WORLD_SIZE": "x"})


# A parent standing in for torchrun: two "ranks" under trainer.run; the parent SIGKILLs and reaps
# one (as torchrun does) if asked, then SIGTERMs the other and reports how that one ended.
TORCHRUN_STANDIN = textwrap.dedent(
    """
    import os, signal, subprocess, sys, time
    rank = '''
    import time, trainer
    def main():
        print("ready", flush=True)
        while True:
            time.sleep(0.01)
    trainer.run(main)
    '''
    env = dict(os.environ, LOCAL_WORLD_SIZE="2", WORLD_SIZE="2", TORCHELASTIC_RUN_ID="standin")
    ranks = [subprocess.Popen([sys.executable, "-c", rank], stdout=subprocess.PIPE, text=True,
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}) for r in (0, 1)]
    if not all(p.stdout.readline().strip() == "ready" for p in ranks):
        for p in ranks:
            p.kill()
        sys.exit("a rank did not start")
    if sys.argv[1] == "lost":
        ranks[1].kill()
        ranks[1].wait()
    ranks[0].send_signal(signal.SIGTERM)
    try:
        print(ranks[0].wait(timeout=3))
    except subprocess.TimeoutExpired:
        print("still running")
    for p in ranks:
        p.kill()
    """
)


@pytest.mark.parametrize("case", ["lost", "complete"])
def test_sigterm_after_a_lost_local_rank_ends_the_rank_at_once(tmp_path: Path, case: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ORCH_")}
    env["ORCH_CHECKPOINT_DIR"] = str(tmp_path)
    proc = subprocess.run([sys.executable, "-c", TORCHRUN_STANDIN, case], env=env,
                          capture_output=True, text=True, timeout=60, cwd=os.getcwd())
    assert proc.returncode == 0, proc.stderr[-3000:]
    outcome = proc.stdout.strip().splitlines()[-1]
    if case == "lost":
        assert outcome == "1", proc.stderr[-3000:]  # a failure with a report, not a preemption
        [report] = (tmp_path / "run" / "errors" / "attempt-0").glob("rank-0.json")
        assert json.loads(report.read_text())["type"] == "GroupTornDown"
    else:
        # A complete group: the SIGTERM is a preemption request, honoured at a step boundary
        # this loop never reaches.
        assert outcome == "still running"
