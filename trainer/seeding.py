"""Seeding every random number generator a training script draws from, per rank.

:func:`seed_everything` seeds python ``random``, numpy's legacy global RNG, torch's CPU generator
and every CUDA device's generator (when CUDA is available) with one per-rank seed. Under DDP each
rank must draw different dropout masks and augmentations but reproducibly so: the per-rank seed
is ``seed + rank`` (the global rank), the convention of many DDP scripts (nanoGPT's
``1337 + seed_offset``). Two runs whose seeds differ by less than the world size therefore share
some per-rank streams; space the seeds of runs meant to be independent by at least the world
size.

Seeding is only the start: the RNG states themselves are part of every snapshot
(:func:`trainer.state.capture_rng`), so a resumed run continues each rank's streams exactly
where the snapshot left them.
"""

from __future__ import annotations

import random

import numpy as np
import torch
import torch.distributed as dist

from trainer.errors import UsageError
from trainer.settings import WorkerSettings

#: numpy's legacy ``np.random.seed`` accepts seeds in ``[0, 2**32)``; so must ``seed + rank``.
MAX_SEED = 2**32 - 1


def rank_seed(seed: int, rank: int) -> int:
    """The seed of global rank ``rank``: ``seed + rank`` (UsageError outside ``[0, 2**32)``)."""
    for name, value in (("seed", seed), ("rank", rank)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise UsageError(f"{name} must be an int, got {value!r}")
    if rank < 0:
        raise UsageError(f"rank must be >= 0, got {rank}")
    derived = seed + rank
    if seed < 0 or derived > MAX_SEED:
        raise UsageError(f"seed + rank must lie in [0, 2**32) (numpy's range), got {seed} + {rank}")
    return derived


def current_rank() -> int:
    """The global rank: the process group's when one exists, else torchrun's ``RANK``, else 0."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    try:
        return WorkerSettings.from_env().rank
    except ValueError as exc:
        raise UsageError(f"bad worker environment: {exc}") from exc


def seed_everything(seed: int, *, rank: int | None = None) -> int:
    """Seed python ``random``, numpy, torch (CPU) and CUDA with ``seed + rank``; return that seed.

    ``rank`` defaults to the global rank (:func:`current_rank`: the process group's, else
    torchrun's ``RANK``, else 0). CUDA generators are seeded only when CUDA is available (lazily,
    if it is not initialised yet). Call it once, after ``init_distributed()`` and before anything
    draws random numbers. For weights that must start identical on every rank, seed torch with
    the common seed around the model's construction (``torch.manual_seed(seed)``) or broadcast
    them (DDP does); everything else should draw from the per-rank streams seeded here.
    """
    derived = rank_seed(seed, current_rank() if rank is None else rank)
    random.seed(derived)
    np.random.seed(derived)
    torch.manual_seed(derived)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(derived)
    return derived
