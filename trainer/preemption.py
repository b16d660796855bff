"""Worker side of preemption: the supervisor's control request and a SIGTERM that reaches a rank.

The supervisor asks for an emergency snapshot by writing ``run/control/preempt.json``
(``{"requested_at", "deadline", "attempt", "signal"}``); a signal delivered to the rank itself
(SLURM signalling every process, torchrun forwarding one) sets an in-process flag instead of
killing it. :meth:`trainer.Checkpointer.step_done` reads both at every step boundary and all
ranks agree (an all-reduce of one integer) to stop at the same step; rank 0 then writes the
acknowledgement ``run/control/preempted.json`` (``{"step", "attempt", "time"}``) once the
emergency snapshot is committed, and every rank exits :data:`~trainer.errors.EXIT_PREEMPTED`.
"""

from __future__ import annotations

import json
import os
import signal
import threading
from collections.abc import Callable, Mapping
from types import FrameType
from typing import Any

from trainer.errors import GroupTornDown

CONTROL_DIR = os.path.join("run", "control")
REQUEST_FILE = "preempt.json"
ACK_FILE = "preempted.json"

_flag = threading.Event()
#: Callbacks run before a teardown SIGTERM ends the rank (see on_teardown).
_drains: list[Callable[[], None]] = []


def request_path(checkpoint_dir: str) -> str:
    """``<checkpoint-dir>/run/control/preempt.json``."""
    return os.path.join(checkpoint_dir, CONTROL_DIR, REQUEST_FILE)


def ack_path(checkpoint_dir: str) -> str:
    """``<checkpoint-dir>/run/control/preempted.json``."""
    return os.path.join(checkpoint_dir, CONTROL_DIR, ACK_FILE)


def request() -> None:
    """Ask this process to stop with an emergency snapshot at the next step boundary."""
    _flag.set()


def clear() -> None:
    """Forget an in-process request (tests)."""
    _flag.clear()


def signalled() -> bool:
    """True once :func:`request` was called (or a handled signal arrived)."""
    return _flag.is_set()


def read_request(checkpoint_dir: str, attempt: int) -> dict[str, Any] | None:
    """The supervisor's request for ``attempt``; None if absent, unreadable or for another one."""
    try:
        with open(request_path(checkpoint_dir), "rb") as f:
            doc = json.loads(f.read())
    except (OSError, ValueError):
        return None
    if not isinstance(doc, dict) or doc.get("attempt") != attempt:
        return None
    return doc


def local_peer_gone(
    environ: Mapping[str, str] | None = None, parent: int | None = None, proc: str = "/proc"
) -> bool:
    """Whether torchrun (this process's parent) has fewer live ranks than it started.

    torchrun reaps a rank that exited within its monitor interval and only then signals the
    others, so its SIGTERM that finds a sibling missing is the teardown of a broken group, not a
    preemption: without that rank no step boundary can be agreed nor snapshot taken. (SLURM and
    torchrun's own stop signal a complete group.) False when not under torchrun or unsure.
    """
    env = os.environ if environ is None else environ
    try:
        expected = int(env.get("LOCAL_WORLD_SIZE", "0"))
    except ValueError:
        return False
    if expected < 2 or "TORCHELASTIC_RUN_ID" not in env:
        return False
    ppid = os.getppid() if parent is None else parent
    children: set[str] = set()
    try:
        for task in os.listdir(os.path.join(proc, str(ppid), "task")):
            with open(os.path.join(proc, str(ppid), "task", task, "children")) as f:
                children.update(f.read().split())
    except OSError:
        return False
    return 0 < len(children) < expected


def on_teardown(drain: Callable[[], None]) -> None:
    """Run ``drain`` before a teardown SIGTERM ends this rank (the snapshot writer's flush)."""
    _drains.append(drain)


def install_signal_handlers(signums: tuple[int, ...] = (signal.SIGTERM,)) -> None:
    """Turn the first ``signums`` signal into a preemption request; a second one kills as usual.

    A SIGTERM that torchrun sends because a rank of this node already exited (see
    :func:`local_peer_gone`) instead raises :class:`~trainer.errors.GroupTornDown` at once,
    after the :func:`on_teardown` drains ran: waiting for the next step boundary would only add
    up to a step to every recovery, since the lost rank's collectives fail anyway.
    Call from the main thread only (Python's rule for signal handlers).
    """

    def handler(signum: int, _frame: FrameType | None) -> None:
        if local_peer_gone():
            signal.signal(signum, signal.SIG_DFL)  # a second one kills
            for drain in list(_drains):
                drain()
            raise GroupTornDown(f"signal {signum} from torchrun: a rank of this node exited")
        if _flag.is_set():
            # Asked twice: fall back to the default action (the atomic commit protocol keeps
            # every older snapshot valid whatever moment this lands in).
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        _flag.set()

    for s in signums:
        signal.signal(s, handler)
