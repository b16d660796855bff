"""The real ``orchestrator launch`` under real torchrun: frictions found porting a script.

Start-up errors are fatal at once, a finished run is not relaunched, torchrun's tracebacks stay
in the attempt log. The scripts are plain Python (one imports ``trainer``, hence torch).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from contract.polling import wait_until
from tests.support import cli as support_cli
from tests.support.cli import cli, env, events, launch, names, state

#: Writes a heartbeat (progress) for step 10 * (attempt + 1), then behaves per argv[1].
WORKER = textwrap.dedent(
    """
    import json, os, sys, time
    rank = int(os.environ["RANK"])
    attempt = int(os.environ["ORCH_ATTEMPT"])
    ckpt = os.environ["ORCH_CHECKPOINT_DIR"]
    mode = sys.argv[1]
    print(f"rank {rank} attempt {attempt} args={sys.argv[1:]}", flush=True)
    os.makedirs(f"{ckpt}/run/progress", exist_ok=True)
    beat = {"pid": os.getpid(), "rank": rank, "step": 10 * (attempt + 1), "epoch": 0,
            "time": time.time(), "attempt": attempt}
    with open(f"{ckpt}/run/progress/.rank-{rank}.tmp", "w") as f:
        json.dump(beat, f)
    os.replace(f"{ckpt}/run/progress/.rank-{rank}.tmp", f"{ckpt}/run/progress/rank-{rank}.json")
    if mode == "lazy-import" and attempt == 0:
        import nonexistent_module_lazy  # noqa: F401  (after progress: an ordinary failure)
    if mode == "always" and rank == 0:
        raise RuntimeError("this script always fails")
    if mode == "steps":
        for step in range(1, 16):
            time.sleep(0.2)
            beat["step"], beat["time"] = step, time.time()
            tmp = f"{ckpt}/run/progress/.rank-{rank}.tmp"
            with open(tmp, "w") as f:
                json.dump(beat, f)
            os.replace(tmp, f"{ckpt}/run/progress/rank-{rank}.json")
    if mode == "block":
        open(f"{ckpt}/ready-{rank}", "w").close()
        time.sleep(120)
    """
)


@pytest.fixture
def run_dir(tmp_path: Path) -> Iterator[Path]:
    yield from support_cli.run_dir(tmp_path, WORKER)


# -- 2. start-up errors are fatal at once --------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("source", "root_cause"),
    [
        ("import os\nimport nonexistent_module_xyz\n",
         "exited with code 1: ModuleNotFoundError: No module named 'nonexistent_module_xyz'"),
        ("def broken(:\n    pass\n", "exited with code 1: SyntaxError: invalid syntax"),
        ("from os import no_such_name\n", "exited with code 1: ImportError: cannot import name "
         "'no_such_name' from 'os'"),
    ],
    ids=["module-not-found", "syntax-error", "import-error"],
)
def test_a_script_that_cannot_start_fails_at_once(
    run_dir: Path, source: str, root_cause: str
) -> None:
    (run_dir / "bad.py").write_text(source)
    out = launch(run_dir, "--max-restarts", "5", "bad.py")
    assert out.returncode == 1, out.stderr[-3000:]
    assert names(run_dir).count("supervisor.attempt_started") == 1
    gave_up = next(e for e in events(run_dir) if e["event"] == "supervisor.gave_up")
    assert gave_up["reason"] == "fatal" and root_cause in gave_up["root_cause"]
    failed = next(e for e in events(run_dir) if e["event"] == "supervisor.attempt_failed")
    assert failed["fatal"] is True and failed["progressed"] is False
    final = [line for line in out.stderr.splitlines() if "orchestrator: run failed:" in line]
    assert len(final) == 1 and root_cause in final[0], out.stderr[-3000:]
    s = state(run_dir)
    assert (s["phase"], s["restarts"]) == ("failed", 0) and root_cause in s["last_failure"]


@pytest.mark.timeout(90)
def test_an_import_error_inside_trainer_run_fails_at_once(run_dir: Path) -> None:
    (run_dir / "script.py").write_text(textwrap.dedent(
        """
        import trainer

        def main() -> None:
            import nonexistent_module_in_main  # noqa: F401

        trainer.run(main)
        """
    ))
    out = launch(run_dir, "--max-restarts", "5", "script.py")
    assert out.returncode == 1, out.stderr[-3000:]
    assert names(run_dir).count("supervisor.attempt_started") == 1
    assert ": ModuleNotFoundError: No module named 'nonexistent_module_in_main'" in (
        state(run_dir)["last_failure"])
    failed = next(e for e in events(run_dir) if e["event"] == "supervisor.attempt_failed")
    assert failed["source"] == "error_file" and failed["fatal"] is True


@pytest.mark.timeout(90)
def test_an_import_error_after_progress_is_retried(run_dir: Path) -> None:
    out = launch(run_dir, "--max-restarts", "2", "worker.py", "lazy-import")
    assert out.returncode == 0, out.stderr[-3000:]
    assert names(run_dir).count("supervisor.attempt_started") == 2
    failed = next(e for e in events(run_dir) if e["event"] == "supervisor.attempt_failed")
    assert failed["progressed"] is True and failed["fatal"] is False
    assert "ModuleNotFoundError" in failed["root_cause"]
    assert (state(run_dir)["phase"], state(run_dir)["restarts"]) == ("done", 1)


# -- 3. a finished run is not relaunched ---------------------------------------------------

TRAIN = textwrap.dedent(
    """
    import sys

    import torch

    import trainer


    def main() -> None:
        trainer.init_distributed()
        steps = int(sys.argv[1])
        torch.manual_seed(0)
        model = torch.nn.Linear(2, 1)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        ckpt = trainer.Checkpointer(trainer.TrainingState(model=model, optimizer=opt),
                                    hparams={"steps": steps})
        for step in range(ckpt.resume(), steps):
            opt.zero_grad()
            model(torch.ones(1, 2)).sum().backward()
            opt.step()
            ckpt.step_done(step + 1)
        ckpt.finish()


    trainer.run(main)
    """
)


def train(run_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "orchestrator.cli", "launch", "--checkpoint-dir",
           str(run_dir / "ck"), "--checkpoint-every", "5", *args]
    return subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=120,
                          cwd=run_dir, check=False)


def attempt_logs(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "ck" / "run" / "logs").iterdir())


@pytest.mark.timeout(240)
def test_relaunching_a_finished_run_starts_nothing(run_dir: Path) -> None:
    (run_dir / "train.py").write_text(TRAIN)
    first = train(run_dir, "train.py", "12")
    assert first.returncode == 0, first.stderr[-3000:]
    state_file = run_dir / "ck" / "run" / "state.json"
    before = state_file.read_bytes()
    assert state(run_dir)["launch"] == {
        "script": str(run_dir / "train.py"), "script_args": ["12"], "nodes": 1,
        "nproc_per_node": 1, "mirror": None}

    t0 = time.monotonic()
    again = train(run_dir, "train.py", "12")
    elapsed = time.monotonic() - t0
    assert again.returncode == 0, again.stderr[-3000:]
    assert elapsed < 2.0, elapsed
    assert "already done at step 12" in again.stderr
    assert attempt_logs(run_dir) == ["attempt-0.log"]  # no torchrun started
    assert state_file.read_bytes() == before  # status stays what the finished run wrote
    done = [e for e in events(run_dir) if e["event"] == "supervisor.already_done"]
    assert len(done) == 1 and done[0]["step"] == 12
    status = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "status", "--checkpoint-dir",
         str(run_dir / "ck"), "--json"], env=env(), capture_output=True, text=True, timeout=30,
        check=False)
    doc = json.loads(status.stdout)
    assert (doc["phase"], doc["step"], doc["supervisor_alive"]) == ("done", 12, False)

    # Other script arguments: launched (here it trains on to step 14).
    longer = train(run_dir, "--allow-config-change", "train.py", "14")
    assert longer.returncode == 0, longer.stderr[-3000:]
    assert "already done" not in longer.stderr
    assert attempt_logs(run_dir) == ["attempt-0.log", "attempt-1.log"]
    assert (state(run_dir)["phase"], state(run_dir)["step"]) == ("done", 14)

    # --force launches a finished run anyway (it resumes from its final snapshot).
    forced = train(run_dir, "--force", "--allow-config-change", "train.py", "14")
    assert forced.returncode == 0, forced.stderr[-3000:]
    assert "already done" not in forced.stderr
    assert attempt_logs(run_dir) == ["attempt-0.log", "attempt-1.log", "attempt-2.log"]
    assert state(run_dir)["resumed_from_step"] == 14


@pytest.mark.timeout(120)
def test_a_done_state_without_its_final_snapshot_is_launched(run_dir: Path) -> None:
    # The worker heartbeats but writes no snapshot: "done" alone is not evidence enough.
    first = launch(run_dir, "worker.py", "ok")
    assert first.returncode == 0, first.stderr[-3000:]
    assert state(run_dir)["phase"] == "done"
    again = launch(run_dir, "worker.py", "ok")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "already done" not in again.stderr
    assert names(run_dir).count("supervisor.attempt_started") == 2


# -- 4. torchrun's tracebacks stay in the attempt log ---------------------------------------


@pytest.mark.timeout(90)
def test_tracebacks_stay_in_the_attempt_log(run_dir: Path) -> None:
    out = launch(run_dir, "--max-restarts", "1", "worker.py", "always")
    assert out.returncode == 1, out.stderr[-3000:]
    logs = run_dir / "ck" / "run" / "logs"
    for attempt in (0, 1):
        text = (logs / f"attempt-{attempt}.log").read_text()
        assert "Traceback (most recent call last)" in text
        assert "RuntimeError: this script always fails" in text
        assert "Root Cause (first observed failure)" in text
        assert f"rank 0 attempt {attempt}" in text
    for noise in ("Traceback", "Root Cause", "this script always fails", "ChildFailedError"):
        assert noise not in out.stderr, (noise, out.stderr[-3000:])
    assert "rank 0 attempt 1" in out.stderr  # the ranks' ordinary lines are still echoed
    assert "steps/s" not in out.stderr  # no progress line off a terminal
    notes = [line for line in out.stderr.splitlines() if "kept out of the terminal" in line]
    assert [n.rsplit(" ", 1)[-1] for n in notes] == [
        str(logs / "attempt-0.log"), str(logs / "attempt-1.log")]
    final = [line for line in out.stderr.splitlines() if "orchestrator: run failed:" in line]
    assert final == [
        "orchestrator: run failed: rank 0 exited with code 1 "
        f"(torchrun's output: {logs / 'attempt-1.log'})"]


@pytest.mark.timeout(90)
def test_ctrl_c_leaves_no_traceback_on_the_terminal(run_dir: Path) -> None:
    ck = run_dir / "ck"
    proc = subprocess.Popen(cli(run_dir, "--grace", "5", "worker.py", "block"), env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            cwd=run_dir)
    try:
        wait_until(lambda: (ck / "ready-0").exists() and (ck / "ready-1").exists(),
                   timeout=60, what="both ranks running")
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=40)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert proc.returncode == 128 + signal.SIGINT, err[-3000:]
    log = (ck / "run" / "logs" / "attempt-0.log").read_text()
    assert "Traceback (most recent call last)" in log  # torchrun's SignalException
    assert "Traceback" not in err and "SignalException" not in err, err[-3000:]
    final = [line for line in err.splitlines() if "orchestrator: run failed:" in line]
    assert len(final) == 1 and "SIGINT" in final[0] and "attempt-0.log" in final[0], err[-3000:]


# -- 5. the progress line on a terminal ----------------------------------------------------


@pytest.mark.timeout(90)
def test_a_progress_line_on_a_terminal(run_dir: Path) -> None:
    import pty

    master, slave = pty.openpty()
    proc = subprocess.Popen(cli(run_dir, "worker.py", "steps", "--steps", "15"),
                            env=env(ORCH_LOG_FORMAT="console"), stdin=subprocess.DEVNULL,
                            stdout=slave, stderr=slave, cwd=run_dir)
    os.close(slave)
    chunks = []
    try:
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: every writer closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        proc.wait(60)
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    text = b"".join(chunks).decode(errors="replace")
    assert proc.returncode == 0, text[-3000:]
    lines = [part for part in text.split("\r\x1b[K") if part.startswith("orchestrator: step")]
    assert len(lines) >= 2, text[-3000:]
    assert any(re.match(r"orchestrator: step \d+/15 \| [0-9.]+ steps/s \| last snapshot - \| "
                        r"restarts 0 \| running", line) for line in lines), lines
    assert lines[-1].startswith("orchestrator: step 15/15") and "| done" in lines[-1], lines


# -- check-resume when a run itself fails ---------------------------------------------------------


def test_check_resume_on_a_script_that_fails_is_not_exact(run_dir: Path) -> None:
    """A failed run is "could not check", exit 1 with the reason and the log: never exit 0."""
    (run_dir / "broken.py").write_text("import no_such_module_here\n")
    p = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "check-resume", "--json", "--workdir",
         str(run_dir / "ck"), str(run_dir / "broken.py")],
        env=env(), capture_output=True, text=True, timeout=90, cwd=run_dir, check=False,
    )
    assert p.returncode == 1, p.stderr
    out = json.loads(p.stdout)
    assert out["exact"] is False and out["first_divergence"] is None
    assert "the fresh-a run exited 1" in out["error"] and "fresh-a.log" in out["error"]
    assert any("without any fault" in h for h in out["hints"]), out
    assert "ModuleNotFoundError" in (run_dir / "ck" / "fresh-a.log").read_text()
