"""Worker side of preemption: the supervisor's control request and a SIGTERM that reaches a rank.

The supervisor asks for an emergency snapshot by writing ``run/control/preempt.json``
(a :class:`contract.documents.PreemptRequest`); a signal delivered to the rank itself
(SLURM signalling every process, torchrun forwarding one) sets an in-process flag instead of
killing it. :meth:`trainer.Checkpointer.step_done` asks :func:`agreed` at step boundaries,
where all ranks agree (one all-reduce of two integers, which also carries the vote of a
time-based snapshot interval) to stop at the same step; :func:`stop` then
takes the emergency snapshot, rank 0 writes the acknowledgement ``run/control/preempted.json``
(a :class:`contract.documents.PreemptAck`) once it is committed, and every rank raises
:class:`~trainer.errors.Preempted` (exit :data:`~contract.codes.EXIT_PREEMPTED`).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import FrameType
from typing import NoReturn, Protocol

import structlog
import torch
import torch.distributed as dist

from contract.documents import PreemptAck, PreemptRequest, read_document, write_document
from contract.paths import RunPaths
from trainer.distributed import is_initialized
from trainer.errors import GroupTornDown, Preempted
from trainer.settings import WorkerSettings
from trainer.writer import BackgroundWriter

log = structlog.get_logger("trainer.preemption")

_flag = threading.Event()
#: Callbacks run before a teardown SIGTERM ends the rank (see on_teardown).
_drains: list[Callable[[], None]] = []


def request() -> None:
    """Ask this process to stop with an emergency snapshot at the next step boundary."""
    _flag.set()


def clear() -> None:
    """Forget an in-process request (tests)."""
    _flag.clear()


def signalled() -> bool:
    """True once :func:`request` was called (or a handled signal arrived)."""
    return _flag.is_set()


def read_request(paths: RunPaths, attempt: int) -> PreemptRequest | None:
    """The supervisor's request for ``attempt``; None if absent, unreadable or for another one."""
    doc = read_document(paths.preempt_request, PreemptRequest)
    return doc if doc is not None and doc.attempt == attempt else None


def local_peer_gone(
    local_world_size: int, under_torchelastic: bool, parent: int | None = None, proc: str = "/proc"
) -> bool:
    """Whether torchrun (this process's parent) has fewer live ranks than it started.

    torchrun reaps a rank that exited within its monitor interval and only then signals the
    others, so its SIGTERM that finds a sibling missing is the teardown of a broken group, not a
    preemption: without that rank no step boundary can be agreed nor snapshot taken. (SLURM and
    torchrun's own stop signal a complete group.) False when not under torchrun or unsure.
    """
    expected = local_world_size
    if expected < 2 or not under_torchelastic:
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


def install_signal_handlers(
    *, local_world_size: int, under_torchelastic: bool, signums: tuple[int, ...] = (signal.SIGTERM,)
) -> None:
    """Turn the first ``signums`` signal into a preemption request; a second one kills as usual.

    A SIGTERM that torchrun sends because a rank of this node already exited (see
    :func:`local_peer_gone`) instead raises :class:`~trainer.errors.GroupTornDown` at once,
    after the :func:`on_teardown` drains ran: waiting for the next step boundary would only add
    up to a step to every recovery, since the lost rank's collectives fail anyway.
    Call from the main thread only (Python's rule for signal handlers).
    """

    def handler(signum: int, _frame: FrameType | None) -> None:
        if local_peer_gone(local_world_size, under_torchelastic):
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


class StopHost(Protocol):
    """What the emergency stop needs from the checkpointer it serves (read at each use)."""

    settings: WorkerSettings
    paths: RunPaths
    rank: int
    world_size: int
    #: Whether this rank writes snapshots (global rank 0; a node copy's local rank 0; every
    #: rank of a sharded snapshot) and whether its commit completes one on this node.
    writes: bool
    commits: bool
    writer: BackgroundWriter
    last_snapshot_step: int | None
    last_digest: str | None

    def snapshot(self) -> None:
        """Take a snapshot of the current step (collective)."""
        ...


@dataclass(frozen=True)
class Agreement:
    """What every rank agreed on at a step boundary (the same on all ranks)."""

    #: Some rank saw a preemption request: stop at this step.
    preempt: bool
    #: Some rank's snapshot timer said due (time-based ``--checkpoint-every``): snapshot this step.
    snapshot: bool

    def __bool__(self) -> bool:
        raise TypeError("an Agreement has two answers: use .preempt or .snapshot")


#: The four possible answers, built once: agreed() runs every step and allocates nothing.
_ANSWERS: dict[tuple[bool, bool], Agreement] = {
    (p, s): Agreement(preempt=p, snapshot=s) for p in (False, True) for s in (False, True)
}


def agreed(host: StopHost, *, snapshot_due: bool = False) -> Agreement:
    """Whether any rank saw a preemption request or has a snapshot due; every rank gets the
    same answers.

    Each rank looks for the supervisor's control file (one ``stat``) and its own signal
    flag, and brings its own snapshot vote (a time-based interval: each rank's clock, so ranks
    may disagree by a step); one all-reduce(MAX) of ``[preempt, snapshot_due]`` per step makes
    them agree on this very step boundary for both. A single process needs no collective.
    """
    mine = signalled() or (
        os.path.exists(host.paths.preempt_request)
        and read_request(host.paths, host.settings.attempt) is not None
    )
    if not (is_initialized() and host.world_size > 1):
        return _ANSWERS[bool(mine), bool(snapshot_due)]
    device = (
        torch.device("cuda", torch.cuda.current_device())
        if dist.get_backend() == "nccl"
        else torch.device("cpu")
    )
    flags = torch.tensor([int(bool(mine)), int(bool(snapshot_due))], dtype=torch.int32, device=device)
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    preempt, snapshot = flags.tolist()
    return _ANSWERS[bool(preempt), bool(snapshot)]


def stop(host: StopHost, step: int, *, heartbeat: Callable[[], None]) -> NoReturn:
    """Snapshot ``step`` (unless just taken), wait for its commit, acknowledge, raise Preempted."""
    started = time.perf_counter()
    log.warning("preempt.requested", step=step)
    heartbeat()
    if host.last_snapshot_step != step:
        host.snapshot()
    settings = host.settings
    if host.writes:
        host.writer.wait()  # this rank's part is written (a committer's copy is committed)
    if host.commits:
        ack = PreemptAck(step=step, attempt=settings.attempt, time=time.time(),
                         digest=host.last_digest, snapshot_rank=host.rank)
        write_document(host.paths.preempt_ack, ack, durable=True)
    # No rank exits before every writer committed: torchrun stops the whole group on the first
    # exit.
    if is_initialized() and host.world_size > 1:
        dist.barrier()
        if not host.commits and settings.local_rank == 0:
            # Every node's supervisor waits for an ack in its own checkpoint dir; this node
            # holds no copy (--no-node-copies): the snapshot is on rank 0's node and its mirror.
            ack = PreemptAck(
                step=step,
                attempt=settings.attempt,
                time=time.time(),
                digest=host.last_digest,
                snapshot_rank=0,
            )
            write_document(host.paths.preempt_ack, ack, durable=True)
    log.warning(
        "preempt.snapshot_committed",
        step=step,
        seconds=round(time.perf_counter() - started, 4),
        digest=host.last_digest,
    )
    raise Preempted(step)
