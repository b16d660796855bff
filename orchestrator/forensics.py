"""Hang forensics: every rank's Python stack, captured before the watchdog kills the group.

A hung collective or a deadlocked data loader leaves nothing behind once the group is killed:
the only evidence is where each rank was stuck. When ``--hang-timeout`` fires, the supervisor
runs ``py-spy dump`` on every rank it knows from the heartbeats (the pid each rank reports),
all at once and bounded in time, and writes one file per rank into
``run/logs/hang-attempt-<A>/``; the ``supervisor.hang_detected`` event (and its alert) names that
directory, or says why there are no stacks (py-spy missing, ptrace refused, the time bound).
Nothing here may delay the kill for long or raise into the supervisor: a failed capture is a
note in the event, never an error.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import structlog

log = structlog.get_logger("orchestrator.forensics")


@dataclass(frozen=True, kw_only=True)
class Capture:
    """What a capture left: the directory, the ranks whose stacks were written, and a note
    for the ranks without (why)."""

    directory: str | None
    captured: tuple[int, ...] = ()
    missing: Mapping[int, str] = field(default_factory=dict)
    note: str | None = None

    def summary(self) -> str:
        """One line for the event, the alert and the terminal."""
        if self.note is not None:
            return self.note
        text = f"stacks of ranks {', '.join(map(str, self.captured)) or 'none'} in {self.directory}"
        if self.missing:
            text += "; none for " + ", ".join(f"rank {r} ({why})" for r, why in sorted(self.missing.items()))
        return text


def find_py_spy() -> str | None:
    """The ``py-spy`` executable: beside this interpreter (a virtualenv's bin), else on PATH."""
    beside = os.path.join(os.path.dirname(sys.executable), "py-spy")
    if os.access(beside, os.X_OK):
        return beside
    return shutil.which("py-spy")


def capture_stacks(pids: Mapping[int, int], directory: str, *, timeout_s: float) -> Capture:
    """Dump the Python stack of every ``rank -> pid`` into ``directory/rank-<R>.txt``.

    All dumps run at once, and the whole capture is bounded by ``timeout_s``: a dump still
    running then is killed and its rank noted as timed out.
    """
    if not pids:
        return Capture(directory=None, note="no stacks: no rank has reported its pid yet")
    exe = find_py_spy()
    if exe is None:
        return Capture(directory=None, note="no stacks: py-spy is not installed "
                       "(pip install py-spy, or the orchestrator's dependencies)")
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as exc:
        return Capture(directory=None, note=f"no stacks: cannot create {directory}: {exc.strerror}")
    procs: dict[int, subprocess.Popen[bytes]] = {}
    missing: dict[int, str] = {}
    outputs: dict[int, str] = {}
    for rank, pid in sorted(pids.items()):
        path = os.path.join(directory, f"rank-{rank}.txt")
        try:
            # The file is the process's stdout: py-spy's own output goes straight to disk.
            with open(path, "wb") as out:
                # Its own session: a dump past the bound is killed with whatever it started.
                procs[rank] = subprocess.Popen(
                    [exe, "dump", "--pid", str(pid)], stdout=out, stderr=subprocess.PIPE,
                    stdin=subprocess.DEVNULL, start_new_session=True,
                )
            outputs[rank] = path
        except OSError as exc:
            missing[rank] = f"py-spy did not start: {exc.strerror}"
    deadline = time.monotonic() + timeout_s
    for rank, proc in procs.items():
        try:
            _, err = proc.communicate(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            missing[rank] = f"py-spy took longer than {timeout_s:g}s"
            continue
        if proc.returncode != 0:
            reason = err.decode("utf-8", "replace").strip().splitlines()
            missing[rank] = reason[-1] if reason else f"py-spy exited {proc.returncode}"
    captured = tuple(r for r in outputs if r not in missing)
    for rank in missing:
        if rank in outputs:
            with open(outputs[rank], "ab") as f:
                f.write(f"\n(no stack: {missing[rank]})\n".encode())
    capture = Capture(directory=directory, captured=captured, missing=missing)
    log.info("forensics.captured", directory=directory, captured=list(captured),
             missing={str(k): v for k, v in missing.items()})
    return capture
