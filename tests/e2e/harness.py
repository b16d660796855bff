"""Helpers for end-to-end fault tests: run the real CLI on a real example, inspect the result.

Every run goes through `orchestrator launch` in a subprocess (real torchrun, gloo, 2 ranks on
CPU) with a bounded wall-clock limit, and is judged by the snapshots' content digests compared
with an uninterrupted golden run of the same command.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
DIGITS = str(REPO / "examples" / "digits_cnn.py")
ORCH = [sys.executable, "-m", "orchestrator.cli"]

# The standard scenario: long enough to span several epochs and snapshots, short enough for CI.
STEPS = 120
EVERY = 20


def base_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ORCH_", "TORCHELASTIC_"))}
    env.update(
        OMP_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
        ORCH_LOG_FORMAT="json",
        ORCH_RESTART_BACKOFF_INITIAL_S="0.2",
        ORCH_RESTART_BACKOFF_MAX_S="1",
        ORCH_PG_TIMEOUT_S="30",
    )
    env.update(extra)
    return env


@dataclass
class Result:
    rc: int
    stdout: str
    stderr: str
    ckpt: Path

    def snapshots(self, verify: bool = True) -> list[dict[str, Any]]:
        return snapshots(self.ckpt, verify=verify)

    def status(self) -> dict[str, Any]:
        return status(self.ckpt)


def launch_args(
    ckpt: Path,
    *,
    steps: int = STEPS,
    every: int = EVERY,
    max_restarts: int = 3,
    extra_launch: tuple[str, ...] = (),
    script_args: tuple[str, ...] = (),
) -> list[str]:
    return [
        *ORCH, "launch", "--nproc-per-node", "2", "--checkpoint-dir", str(ckpt),
        "--checkpoint-every", str(every), "--max-restarts", str(max_restarts), *extra_launch,
        DIGITS, "--steps", str(steps), "--seed", "7", *script_args,
    ]


def launch(
    ckpt: Path,
    *,
    faults: str | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 240,
    **kw: Any,
) -> Result:
    env = base_env(**(env or {}), **({"ORCH_FAULTS": faults} if faults else {}))
    p = subprocess.run(
        launch_args(ckpt, **kw), env=env, cwd=REPO, capture_output=True, text=True,
        timeout=timeout,
    )
    return Result(p.returncode, p.stdout, p.stderr, ckpt)


def start(ckpt: Path, *, env: dict[str, str] | None = None, **kw: Any) -> subprocess.Popen[str]:
    return subprocess.Popen(
        launch_args(ckpt, **kw), env=base_env(**(env or {})), cwd=REPO, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
    )


def snapshots(
    ckpt: Path | None = None,
    *,
    verify: bool = True,
    mirror: str | None = None,
    env: dict[str, str] | None = None,
) -> list[dict[str, Any]]:
    where = ["--mirror", mirror] if mirror else ["--checkpoint-dir", str(ckpt)]
    args = [*ORCH, "snapshots", *where, "--json"]
    if verify:
        args.append("--verify")
    p = subprocess.run(args, env=base_env(**(env or {})), capture_output=True, text=True, timeout=120)
    if p.returncode != 0:
        raise AssertionError(f"snapshots failed rc={p.returncode}: {p.stderr}")
    out: list[dict[str, Any]] = json.loads(p.stdout)
    return out


def status(ckpt: Path) -> dict[str, Any]:
    p = subprocess.run(
        [*ORCH, "status", "--checkpoint-dir", str(ckpt), "--json"],
        env=base_env(), capture_output=True, text=True, timeout=60,
    )
    if p.returncode != 0:
        raise AssertionError(f"status failed rc={p.returncode}: {p.stderr}")
    out: dict[str, Any] = json.loads(p.stdout)
    return out


def digests(snaps: list[dict[str, Any]]) -> dict[int, str]:
    return {s["step"]: s["digest"] for s in snaps if s["valid"]}


def progress(ckpt: Path, rank: int) -> dict[str, Any] | None:
    path = ckpt / "run" / "progress" / f"rank-{rank}.json"
    try:
        out: dict[str, Any] = json.loads(path.read_text())
        return out
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for a rendezvous endpoint)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def kill_group(p: subprocess.Popen[str]) -> None:
    if p.poll() is None:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait(timeout=30)


def assert_matches_golden(
    result: Result, golden: dict[int, str], *, off_schedule: tuple[int, ...] = ()
) -> dict[int, str]:
    """Every snapshot the run left must equal the golden run's at the same step, final included.

    ``off_schedule``: steps of emergency snapshots (preemption), which the golden run has not.
    """
    assert result.rc == 0, f"run failed rc={result.rc}\n{result.stderr[-4000:]}"
    got = digests(result.snapshots())
    final = max(golden)
    assert final in got, f"no final snapshot at step {final}: {sorted(got)}"
    assert got[final] == golden[final], "final state differs from the uninterrupted run"
    for step, digest in got.items():
        if step in off_schedule and step not in golden:
            continue
        assert digest == golden[step], f"snapshot at step {step} differs from the golden run"
    return got
