"""The real ``orchestrator launch`` under real torchrun (gloo-free tiny scripts, 2 ranks, CPU).

The training scripts here are plain Python (no torch import in the ranks) so each attempt costs
only torchrun's own start-up. Ranks announce readiness through a FIFO, which lets the tests
signal the supervisor at a known point without sleeping. Every test checks that no process of
the run is left behind.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from orchestrator.launcher import find_processes
from tests.support import cli as support_cli
from tests.support.cli import cli, env, events, launch, names, state

WORKER = textwrap.dedent(
    """
    import json, os, signal, sys, time
    rank = int(os.environ["RANK"])
    attempt = int(os.environ["ORCH_ATTEMPT"])
    ckpt = os.environ["ORCH_CHECKPOINT_DIR"]
    mode = sys.argv[1]
    print(f"rank {rank} attempt {attempt} resume={os.environ['ORCH_RESUME_STEP']} "
          f"args={sys.argv[1:]}", flush=True)
    os.makedirs(f"{ckpt}/run/progress", exist_ok=True)
    beat = {"pid": os.getpid(), "rank": rank, "step": 10 * (attempt + 1), "epoch": 0,
            "time": time.time(), "attempt": attempt}
    with open(f"{ckpt}/run/progress/.rank-{rank}.tmp", "w") as f:
        json.dump(beat, f)
    os.replace(f"{ckpt}/run/progress/.rank-{rank}.tmp", f"{ckpt}/run/progress/rank-{rank}.json")
    if mode == "flaky" and attempt == 0 and rank == 1:
        sys.exit(3)
    if mode == "sigkill" and attempt == 0 and rank == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    if mode == "always" and rank == 0:
        raise RuntimeError("this script always fails")
    if mode == "fatal" and rank == 0:
        d = f"{ckpt}/run/errors/attempt-{attempt}"
        os.makedirs(d, exist_ok=True)
        with open(f"{d}/rank-0.json", "w") as f:
            json.dump({"rank": 0, "attempt": attempt, "time": time.time(),
                       "type": "ConfigMismatch", "message": "lr differs from snapshot",
                       "traceback": "", "fatal": True}, f)
        sys.exit(78)
    if mode == "block":
        with open(os.environ["READY_FIFO"], "w") as f:
            f.write(f"{rank}\\n")
        time.sleep(120)
    """
)


@pytest.fixture
def run_dir(tmp_path: Path) -> Iterator[Path]:
    yield from support_cli.run_dir(tmp_path, WORKER)


def wait_ready(fifo: str, ranks: int, timeout_s: float) -> None:
    """Block until ``ranks`` lines arrived on the FIFO (event-driven, bounded)."""
    # O_RDWR keeps the FIFO open for writing too, so it never reports EOF/HUP between writers.
    fd = os.open(fifo, os.O_RDWR | os.O_NONBLOCK)
    try:
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        data = b""
        while data.count(b"\n") < ranks:
            if not poller.poll(timeout_s * 1000):
                raise TimeoutError(f"ranks not ready after {timeout_s}s: {data!r}")
            data += os.read(fd, 4096)
    finally:
        os.close(fd)


def wait_gone(pids: list[int], timeout_s: float) -> list[int]:
    """Wait (on pidfds) until ``pids`` exited; those still alive after ``timeout_s``."""
    fds = {}
    for pid in pids:
        try:
            fds[os.pidfd_open(pid)] = pid
        except ProcessLookupError:
            continue
    try:
        poller = select.poll()
        for fd in fds:
            poller.register(fd, select.POLLIN)
        pending = set(fds)
        while pending:
            ready = poller.poll(timeout_s * 1000)
            if not ready:
                break
            for fd, _ in ready:
                pending.discard(fd)
                poller.unregister(fd)
        return [fds[fd] for fd in pending]
    finally:
        for fd in fds:
            os.close(fd)


@pytest.mark.timeout(90)
def test_crash_then_success(run_dir: Path) -> None:
    out = launch(run_dir, "worker.py", "flaky", "--passed-through", "x")
    assert out.returncode == 0, out.stderr[-3000:]
    s = state(run_dir)
    assert (s["phase"], s["restarts"], s["attempt"], s["step"]) == ("done", 1, 1, 20)
    assert s["last_failure"] == "rank 1 exited with code 3" and s["resumed_from_step"] is None
    assert s["nodes"][0]["phase"] == "done"
    ev = events(run_dir)
    failed = next(e for e in ev if e["event"] == "supervisor.attempt_failed")
    assert failed["root_cause"] == "rank 1 exited with code 3"
    assert [e["event"] for e in ev if e["event"].startswith("supervisor.attempt")] == [
        "supervisor.attempt_started", "supervisor.attempt_ended", "supervisor.attempt_failed",
        "supervisor.attempt_started", "supervisor.attempt_ended"]
    ended = [e for e in ev if e["event"] == "supervisor.attempt_ended"]
    assert [(e["attempt"], e["exit_code"] != 0) for e in ended] == [(0, True), (1, False)]
    assert names(run_dir)[-1] == "supervisor.finished"
    logs = run_dir / "ck" / "run" / "logs"
    assert sorted(p.name for p in logs.iterdir()) == ["attempt-0.log", "attempt-1.log"]
    first = (logs / "attempt-0.log").read_text()
    assert "rank 1 attempt 0 resume=none args=['flaky', '--passed-through', 'x']" in first
    assert "Root Cause (first observed failure)" in first
    # The tee also reached the supervisor's stderr.
    assert "rank 0 attempt 1" in out.stderr

    status = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "status", "--checkpoint-dir",
         str(run_dir / "ck"), "--json"], env=env(), capture_output=True, text=True, timeout=30,
        check=False)
    assert status.returncode == 0, status.stderr
    doc = json.loads(status.stdout)
    assert (doc["phase"], doc["step"], doc["restarts"]) == ("done", 20, 1)


@pytest.mark.timeout(90)
def test_rank_sigkill_root_cause_and_relaunch(run_dir: Path) -> None:
    out = launch(run_dir, "worker.py", "sigkill")
    assert out.returncode == 0, out.stderr[-3000:]
    failed = next(e for e in events(run_dir) if e["event"] == "supervisor.attempt_failed")
    assert failed["root_cause"] == "rank 1 killed by SIGKILL"


@pytest.mark.timeout(90)
def test_budget_spent_exits_1_with_root_cause(run_dir: Path) -> None:
    out = launch(run_dir, "--max-restarts", "1", "worker.py", "always")
    assert out.returncode == 1
    assert "orchestrator: run failed: rank 0 exited with code 1" in out.stderr
    s = state(run_dir)
    assert (s["phase"], s["restarts"]) == ("failed", 1)
    assert s["last_failure"] == "rank 0 exited with code 1"
    gave_up = next(e for e in events(run_dir) if e["event"] == "supervisor.gave_up")
    assert gave_up["reason"] == "restart_budget_spent"


@pytest.mark.timeout(60)
def test_fatal_error_file_stops_at_once(run_dir: Path) -> None:
    out = launch(run_dir, "--max-restarts", "5", "worker.py", "fatal")
    assert out.returncode == 1
    assert "ConfigMismatch [relaunch with --allow-config-change" in out.stderr
    assert "lr differs from snapshot" in out.stderr
    assert names(run_dir).count("supervisor.attempt_started") == 1


@pytest.mark.timeout(90)
def test_sigterm_stops_workers_and_second_launch_is_refused(run_dir: Path) -> None:
    fifo = str(run_dir / "ready")
    os.mkfifo(fifo)
    proc = subprocess.Popen(cli(run_dir, "--grace", "5", "worker.py", "block"),
                            env=env(READY_FIFO=fifo), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, cwd=run_dir)
    try:
        wait_ready(fifo, 2, 60)
        assert state(run_dir)["phase"] == "running"
        second = launch(run_dir, "worker.py", "flaky", timeout=30)
        assert second.returncode == 2
        assert "held by a live supervisor" in second.stderr
        ranks = find_processes({"ORCH_CHECKPOINT_DIR": str(run_dir / "ck")})
        assert len(ranks) >= 3  # torchrun + 2 ranks
        proc.send_signal(signal.SIGINT)  # SIGINT: a plain interrupt (SIGTERM means preemption)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert proc.returncode == 128 + signal.SIGINT, err[-3000:]
    assert wait_gone(ranks, 10) == []
    s = state(run_dir)
    assert s["phase"] == "failed" and "SIGINT" in s["last_failure"]
    assert "supervisor.interrupted" in names(run_dir)


@pytest.mark.timeout(90)
def test_sigterm_preemption_without_emergency_snapshot_fails_after_grace(run_dir: Path) -> None:
    """Workers that never reach a step boundary: after --grace the group goes, exit 1."""
    fifo = str(run_dir / "ready")
    os.mkfifo(fifo)
    proc = subprocess.Popen(cli(run_dir, "--grace", "2", "worker.py", "block"),
                            env=env(READY_FIFO=fifo), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, cwd=run_dir)
    try:
        wait_ready(fifo, 2, 60)
        ranks = find_processes({"ORCH_CHECKPOINT_DIR": str(run_dir / "ck")})
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=40)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert proc.returncode == 1, err[-3000:]
    assert wait_gone(ranks, 10) == []
    s = state(run_dir)
    assert s["phase"] == "failed" and "within --grace 2s" in s["last_failure"], s
    assert s["preemptions"] == 0 and s["restarts"] == 0
    assert "supervisor.preempt_requested" in names(run_dir)
    assert not os.path.exists(run_dir / "ck" / "run" / "control" / "preempt.json")


@pytest.mark.timeout(90)
def test_sigkilled_supervisor_takes_its_workers_down(run_dir: Path) -> None:
    fifo = str(run_dir / "ready")
    os.mkfifo(fifo)
    proc = subprocess.Popen(cli(run_dir, "worker.py", "block"), env=env(READY_FIFO=fifo),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=run_dir)
    try:
        wait_ready(fifo, 2, 60)
        ranks = find_processes({"ORCH_CHECKPOINT_DIR": str(run_dir / "ck")})
        assert len(ranks) >= 3
        proc.kill()
        proc.wait(10)
        # torchrun gets SIGTERM (parent-death signal) and tears its ranks down.
        assert wait_gone(ranks, 45) == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
