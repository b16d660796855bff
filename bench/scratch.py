"""The scratch directory of one ``python -m bench`` run, and its end.

Every run works in a fresh ``run-*`` directory that it makes under ``--workdir`` (default
``./.bench``): snapshots, torch.save files, object-store uploads' sources, logs; a full run
writes tens of GB there. :func:`run_dir` deletes it when the run ends, however it ends (return,
exception, Ctrl-C, or a SIGTERM turned into ``SystemExit`` by :func:`sigterm_exits`), unless
``keep``. Only that ``run-*`` directory is ever deleted; the directory it sits in (the user's
``--workdir``, or ``./.bench``) is kept.

Before deleting, whatever the run started and is still alive goes: every process of the run
inherits ``BENCH_RUN=<token>`` from this process's environment (the legs build their children's
environments from it, and :func:`bench.workloads.harness.base_env` keeps it), and
:func:`stop_leftovers` SIGKILLs every live process that carries this run's token. The legs stop
their own processes first (:class:`bench.workloads.harness.Job`, the mirror leg's SeaweedFS
server and uploaders); this is the net under an interrupted leg.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sys
import tempfile
import threading
import uuid
from collections.abc import Iterator
from types import FrameType

from orchestrator.launcher import find_processes, kill_and_wait

#: The variable that marks every process of one bench run (value: the run's token).
RUN_VAR = "BENCH_RUN"


def default_base() -> str:
    """Where run directories go without ``--workdir``."""
    return os.path.join(os.getcwd(), ".bench")


@contextlib.contextmanager
def run_dir(workdir: str | None, *, keep: bool = False) -> Iterator[str]:
    """A fresh ``run-*`` directory under ``workdir`` (default ``./.bench``) for the ``with`` body.

    The body's child processes carry this run's :data:`RUN_VAR` (set in ``os.environ`` for the
    duration, restored after). On exit, however the body ends, live processes carrying it are
    killed, then the directory is deleted unless ``keep`` (its path is printed either way when
    it stays). ``workdir`` itself is never deleted.
    """
    base = workdir or default_base()
    os.makedirs(base, exist_ok=True)
    path = tempfile.mkdtemp(prefix="run-", dir=base)
    token = uuid.uuid4().hex
    previous = os.environ.get(RUN_VAR)
    os.environ[RUN_VAR] = token
    try:
        yield path
    finally:
        if previous is None:
            os.environ.pop(RUN_VAR, None)
        else:
            os.environ[RUN_VAR] = previous
        alive = stop_leftovers(token)
        if alive:
            print(f"[bench] processes {alive} of this run would not die", file=sys.stderr, flush=True)
        if keep:
            print(f"[bench] scratch kept: {path}", file=sys.stderr, flush=True)
        else:
            shutil.rmtree(path, ignore_errors=True)
            if os.path.lexists(path):
                print(f"[bench] could not delete all of the scratch dir {path}", file=sys.stderr,
                      flush=True)


def stop_leftovers(token: str, *, rounds: int = 20) -> list[int]:
    """SIGKILL every live process carrying ``RUN_VAR=token``; the pids still alive after that.

    Scanned again after each round: a parent killed mid-fork may have started one more.
    """
    for _ in range(rounds):
        pids = find_processes({RUN_VAR: token})
        if not pids:
            return []
        kill_and_wait(sorted(pids), 10.0)
    return find_processes({RUN_VAR: token})


def _exit_on_sigterm(signum: int, _frame: FrameType | None) -> None:
    signal.signal(signum, signal.SIG_DFL)  # a second one ends the process at once
    raise SystemExit(128 + signum)


@contextlib.contextmanager
def sigterm_exits() -> Iterator[None]:
    """Within the block, a SIGTERM raises ``SystemExit(143)`` so that cleanup (``finally``) runs.

    Python's default for SIGTERM ends the process at once, leaving the scratch directory and
    the legs' processes behind; a second SIGTERM still does. Only in the main thread (where
    signal handlers live); the previous handler is restored afterwards.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
