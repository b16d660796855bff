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

from tests.unit.test_trainer_checkpoint import Job
from trainer import preemption
from trainer.errors import EXIT_PREEMPTED, Preempted
from trainer.settings import WorkerSettings

pytestmark = pytest.mark.timeout(120)


def _request(directory: Path, attempt: int = 0) -> None:
    path = Path(preemption.request_path(str(directory)))
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
    ack = json.loads(Path(preemption.ack_path(str(tmp_path / "run"))).read_text())
    assert ack["step"] == at and ack["attempt"] == 0 and ack["digest"]
    os.unlink(preemption.request_path(str(tmp_path / "run")))  # the supervisor consumes it
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
