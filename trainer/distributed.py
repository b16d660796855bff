"""Process group set-up from torchrun's environment, with a short collective timeout.

:func:`init_distributed` joins the group that torchrun describes (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``): gloo on CPU, NCCL on CUDA with the device taken
from ``LOCAL_RANK``. Its timeout comes from ``ORCH_PG_TIMEOUT_S`` (60 s by default), never
torch's 30 minutes, so a dead peer turns into an error the supervisor can act on. Run without
torchrun, it returns a world of one and creates no process group.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import structlog
import torch
import torch.distributed as dist

from trainer.settings import WorkerSettings

log = structlog.get_logger("trainer.distributed")


@dataclass(frozen=True, kw_only=True)
class DistContext:
    """Where this process sits in the worker group."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None

    def __post_init__(self) -> None:
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(f"bad rank {self.rank} for world size {self.world_size}")

    @property
    def is_main(self) -> bool:
        """True on global rank 0."""
        return self.rank == 0


def is_initialized() -> bool:
    """True when a default process group exists."""
    return dist.is_available() and dist.is_initialized()


def init_distributed(
    timeout_s: float | None = None, *, settings: WorkerSettings | None = None
) -> DistContext:
    """Join torchrun's process group (or none when run alone) and pick this rank's device."""
    s = settings or WorkerSettings.from_env()
    use_cuda = torch.cuda.is_available()
    device = torch.device("cuda", s.local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    timeout = timedelta(seconds=timeout_s if timeout_s is not None else s.pg_timeout_s)
    if is_initialized():
        return DistContext(
            rank=dist.get_rank(),
            world_size=dist.get_world_size(),
            local_rank=s.local_rank,
            device=device,
            backend=str(dist.get_backend()),
        )
    if not s.launched_by_torchrun and s.world_size == 1:
        return DistContext(rank=0, world_size=1, local_rank=0, device=device, backend=None)
    backend = "nccl" if use_cuda else "gloo"
    dist.init_process_group(
        backend=backend,
        init_method="env://",
        rank=s.rank,
        world_size=s.world_size,
        timeout=timeout,
        device_id=device if use_cuda else None,
    )
    log.info(
        "dist.initialized",
        backend=backend,
        world_size=s.world_size,
        timeout_s=timeout.total_seconds(),
    )
    return DistContext(
        rank=s.rank,
        world_size=s.world_size,
        local_rank=s.local_rank,
        device=device,
        backend=backend,
    )


def shutdown() -> None:
    """Destroy the default process group if one exists (safe to call more than once)."""
    if is_initialized():
        dist.destroy_process_group()


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the world size (0 and 1 without a process group)."""
    if is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def barrier() -> None:
    """A barrier over the default group; a no-op without one."""
    if is_initialized():
        dist.barrier()
