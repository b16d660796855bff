"""Lower the calling thread's CPU and I/O priority (Linux: nice and ionice are per thread).

Used by the threads that work *beside* training: the supervisor's mirror uploads
(:mod:`orchestrator.throttle`) and the ranks' snapshot writer, whose hashing and writing would
otherwise take CPU time from the training thread on a machine whose cores it uses. Threads
created by a lowered thread inherit its priority (the writer's hashing threads do). The thread
gets nice 19 and the lowest best-effort I/O priority (``ioprio_set``, class best-effort, level
7: it still progresses under sustained I/O, which the idle class would not promise). Refusals
(EPERM in a locked-down container, another OS) are logged once per event name and ignored.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import threading
from collections.abc import Callable
from dataclasses import dataclass

import structlog

log = structlog.get_logger("contract.priority")

_IOPRIO_CLASS_SHIFT = 13
_IOPRIO_CLASS_BE = 2
_IOPRIO_WHO_PROCESS = 1  # with who = a thread id: that thread
#: SYS_ioprio_set per machine (asm-generic for the 64-bit ARM and RISC-V ports).
_SYS_IOPRIO_SET = {"x86_64": 251, "aarch64": 30, "arm64": 30, "riscv64": 30, "ppc64le": 273,
                   "s390x": 282, "i686": 289, "i386": 289}

_warned: set[tuple[str, str]] = set()
_warned_lock = threading.Lock()


def _warn_once(event: str, what: str, error: str) -> None:
    with _warned_lock:
        if (event, what) in _warned:
            return
        _warned.add((event, what))
    log.info(event, what=what, error=error)


def _setpriority(tid: int, value: int) -> None:
    os.setpriority(os.PRIO_PROCESS, tid, value)


def _ioprio_set(tid: int, klass: int, level: int) -> None:
    """``ioprio_set(IOPRIO_WHO_PROCESS, tid, class << 13 | level)``; OSError on failure."""
    number = _SYS_IOPRIO_SET.get(platform.machine())
    if number is None:
        raise OSError(errno.ENOSYS, f"ioprio_set: unknown syscall number on {platform.machine()}")
    libc = ctypes.CDLL(None, use_errno=True)
    prio = (klass << _IOPRIO_CLASS_SHIFT) | level
    if libc.syscall(number, _IOPRIO_WHO_PROCESS, tid, prio) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


@dataclass(frozen=True)
class PrioritySetter:
    """What :func:`lower_thread_priority` calls (injectable: tests record or refuse)."""

    setpriority: Callable[[int, int], None] = _setpriority
    ioprio_set: Callable[[int, int, int], None] = _ioprio_set
    native_id: Callable[[], int] = threading.get_native_id


def lower_thread_priority(
    setter: PrioritySetter | None = None, *, event: str = "priority.unavailable"
) -> None:
    """Nice 19 and best-effort I/O level 7 for the calling thread (Linux); failures are logged
    once per ``event`` name (``mirror.priority_unavailable``, ``snapshot.priority_unavailable``)."""
    if setter is None and platform.system() != "Linux":
        # Elsewhere a thread id is no PRIO_PROCESS target (it could name another process).
        _warn_once(event, "nice", f"per-thread priority is Linux only ({platform.system()})")
        return
    s = setter or PrioritySetter()
    tid = s.native_id()
    try:
        s.setpriority(tid, 19)
    except OSError as exc:
        _warn_once(event, "nice", str(exc))
    try:
        s.ioprio_set(tid, _IOPRIO_CLASS_BE, 7)
    except OSError as exc:
        _warn_once(event, "ionice", str(exc))
