"""Launcher pieces without torchrun: command line, worker environment, tee, process tracking."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import pytest

from orchestrator.config import LaunchConfig
from orchestrator.launcher import (
    TOKEN_VAR,
    WRAPPER,
    LossyEcho,
    Tee,
    build_torchrun_command,
    build_worker_env,
    find_processes,
    kill_and_wait,
    kill_orphans,
)
from orchestrator.settings import Settings

pytestmark = pytest.mark.timeout(20)


def cfg(**kw: object) -> LaunchConfig:
    return LaunchConfig(checkpoint_dir="ck", script="train.py", script_args=("--lr", "1"),
                        nproc_per_node=2, **kw)  # type: ignore[arg-type]


def test_single_node_command() -> None:
    cmd = build_torchrun_command(cfg(), Settings(monitor_interval_s=0.1), "r-0")
    assert cmd[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert cmd[3:] == ["--nnodes=1", "--nproc-per-node=2", "--standalone", "--max-restarts=0",
                       "--monitor-interval=0.1", "train.py", "--lr", "1"]


def test_wrap_runs_the_script_under_trainer_script() -> None:
    cmd = build_torchrun_command(cfg(wrap=True), Settings(monitor_interval_s=0.1), "r-0")
    assert cmd[-4:] == [WRAPPER, "train.py", "--lr", "1"]
    # the file `python -m trainer.script --path` prints, without importing trainer (torch)
    printed = subprocess.run([sys.executable, "-m", "trainer.script", "--path"], capture_output=True,
                             text=True, check=True, cwd=Path(__file__).resolve().parents[2])
    assert os.path.samefile(WRAPPER, printed.stdout.strip())


def test_multi_node_command_uses_c10d() -> None:
    c = cfg(nodes=2, node_rank=1, rdzv_endpoint="h:29400")
    cmd = build_torchrun_command(c, Settings(), "r-3")
    assert "--standalone" not in cmd
    for arg in ("--nnodes=2", "--rdzv-backend=c10d", "--rdzv-endpoint=h:29400",
                "--rdzv-id=r-3", "--node-rank=1", "--max-restarts=0",
                "--rdzv-conf=join_timeout=600"):
        assert arg in cmd
    assert cmd.index("train.py") > cmd.index("--max-restarts=0")
    cmd = build_torchrun_command(c, Settings(rdzv_join_timeout_s=45), "r")
    assert "--rdzv-conf=join_timeout=45" in cmd


def test_worker_env() -> None:
    base = {"ORCH_FAULTS": "step_end@3:rank=1", "ORCH_CHECKPOINT_EVERY": "999", "PATH": "/bin"}
    env = build_worker_env(base=base, config=cfg(allow_config_change=True),
                           settings=Settings(pg_timeout_s=45, log_format="json"),
                           run_id="r", attempt=2, resume_step=None, token="t")
    assert env["ORCH_CHECKPOINT_DIR"] == os.path.abspath("ck")
    assert (env["ORCH_RUN_ID"], env["ORCH_ATTEMPT"], env["ORCH_NODE_RANK"]) == ("r", "2", "0")
    assert env["ORCH_RESUME_STEP"] == "none"
    assert env["ORCH_ALLOW_CONFIG_CHANGE"] == "1"
    assert env["ORCH_PG_TIMEOUT_S"] == "45"
    assert env["ORCH_LOG_FORMAT"] == "json"
    assert env["ORCH_FAULTS"] == "step_end@3:rank=1"
    assert "ORCH_CHECKPOINT_EVERY" not in env  # not configured: the script decides
    assert env["OMP_NUM_THREADS"] == "1" and env["PATH"] == "/bin"
    assert env[TOKEN_VAR] == "t"
    env = build_worker_env(base={"OMP_NUM_THREADS": "4"}, config=cfg(checkpoint_every=50),
                           settings=Settings(), run_id="r", attempt=0, resume_step=40, token="t")
    assert env["ORCH_RESUME_STEP"] == "40" and env["ORCH_CHECKPOINT_EVERY"] == "50"
    assert env["OMP_NUM_THREADS"] == "4"


class BrokenSink(io.BytesIO):
    def write(self, data: object) -> int:
        raise OSError(28, "No space left on device")


def test_tee_drains_past_a_failing_sink() -> None:
    r, w = os.pipe()
    good = io.BytesIO()
    with os.fdopen(r, "rb") as source:
        tee = Tee(source, {"log": BrokenSink(), "stderr": good})
        payload = b"x" * 300_000  # more than a pipe buffer: a stalled tee would block us
        os.write(w, payload)
        os.close(w)
        assert tee.join(10)
    assert good.getvalue() == payload
    assert set(tee.sink_errors) == {"log"}


def test_tee_thread_failure_is_reraised() -> None:
    class NoFileno(io.BytesIO):
        def fileno(self) -> int:
            raise RuntimeError("broken pipe object")

    tee = Tee(NoFileno(), {})
    with pytest.raises(RuntimeError, match="tee thread failed"):
        tee.join(5)


def _sleeper(env_extra: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"],
                            env={**os.environ, **env_extra})


def test_find_and_kill_processes_by_token() -> None:
    token = uuid.uuid4().hex
    procs = [_sleeper({TOKEN_VAR: token}) for _ in range(2)]
    other = _sleeper({TOKEN_VAR: "someone-else"})
    try:
        found = sorted(find_processes({TOKEN_VAR: token}))
        assert found == sorted(p.pid for p in procs)
        assert kill_and_wait(found, 10) == []
        for p in procs:
            assert p.wait(5) == -9
        assert find_processes({TOKEN_VAR: token}) == []
        assert other.poll() is None
    finally:
        other.kill()
        other.wait(5)
        for p in procs:
            p.kill()
            p.wait(5)


def test_kill_orphans_needs_a_launch_token(tmp_path: Path) -> None:
    ck = str(tmp_path / "ck")
    orphan = _sleeper({"ORCH_CHECKPOINT_DIR": ck, TOKEN_VAR: "x"})
    bystander = _sleeper({"ORCH_CHECKPOINT_DIR": ck})  # e.g. a shell that exported the var
    try:
        assert kill_orphans(ck, 10) == [orphan.pid]
        assert orphan.wait(5) == -9
        assert bystander.poll() is None
    finally:
        for p in (orphan, bystander):
            p.kill()
            p.wait(5)


def test_lossy_echo_never_blocks_the_tee() -> None:
    gate = threading.Event()

    class Stuck(io.BytesIO):
        def write(self, data: object) -> int:
            gate.wait(10)  # an unread stderr pipe
            return 0

    echo = LossyEcho(Stuck(), max_chunks=4)
    for _ in range(100):
        echo.write(b"x" * 1000)  # returns at once even though the stream is stuck
    assert echo.dropped_bytes >= 90_000
    gate.set()


def test_world_size_and_node_copies_reach_torchrun_and_the_workers() -> None:
    c = cfg(nodes="1:3", rdzv_endpoint="h:29400", node_copies=False)
    assert "--nnodes=1:3" in build_torchrun_command(c, Settings(), "r")
    env = build_worker_env(base={}, config=c, settings=Settings(), run_id="r", attempt=0,
                           resume_step=None, token="t")
    assert env["ORCH_ALLOW_WORLD_SIZE_CHANGE"] == "1" and env["ORCH_NODE_COPIES"] == "0"
    env = build_worker_env(base={}, config=cfg(), settings=Settings(), run_id="r", attempt=0,
                           resume_step=None, token="t")
    assert env["ORCH_ALLOW_WORLD_SIZE_CHANGE"] == "0" and env["ORCH_NODE_COPIES"] == "1"
