"""Helpers for tests that run the real ``orchestrator launch`` under real torchrun.

A run directory holds the worker script and the checkpoint dir ``ck``; the environment shrinks
backoffs and torchrun's monitor interval so an attempt costs only start-up; nothing of a run may
outlive its test (:func:`run_dir`).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from orchestrator.launcher import find_processes

REPO = Path(__file__).resolve().parents[2]


def run_dir(tmp_path: Path, worker: str) -> Iterator[Path]:
    """A fixture body: ``worker.py`` written, and afterwards no process of the run left."""
    (tmp_path / "worker.py").write_text(worker)
    yield tmp_path
    leftovers = find_processes({"ORCH_CHECKPOINT_DIR": str(tmp_path / "ck")})
    for pid in leftovers:
        os.kill(pid, signal.SIGKILL)
    assert leftovers == [], "processes of the run were left behind"


def env(*, base: Mapping[str, str] | None = None, **extra: str) -> dict[str, str]:
    """``base`` (default: this process's environment) with short backoffs, JSON logs, ``extra``."""
    e = dict(os.environ if base is None else base)
    e.update(
        PYTHONPATH=str(REPO),
        ORCH_RESTART_BACKOFF_INITIAL_S="0.05",
        ORCH_RESTART_BACKOFF_MAX_S="0.1",
        ORCH_RESTART_BACKOFF_JITTER_S="0.05",
        ORCH_LOG_FORMAT="json",
        ORCH_TORCHRUN_MONITOR_INTERVAL_S="0.1",
    )
    e.update(extra)
    return e


def cli(run_dir: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "orchestrator.cli", "launch", "--nproc-per-node", "2",
            "--checkpoint-dir", str(run_dir / "ck"), *args]


def launch(run_dir: Path, *args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cli(run_dir, *args), env=env(), capture_output=True, text=True,
                          timeout=timeout, cwd=run_dir, check=False)


def state(run_dir: Path) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((run_dir / "ck" / "run" / "state.json").read_text())
    return doc


def events(run_dir: Path) -> list[dict[str, Any]]:
    lines = (run_dir / "ck" / "run" / "events.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def names(run_dir: Path) -> list[str]:
    return [e["event"] for e in events(run_dir)]
