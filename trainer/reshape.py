"""Resuming on another world size: which per-rank state each new rank gets.

A snapshot stores the shared state once and one per-rank state per rank that wrote it (RNGs,
loader position, ``per_rank`` objects). When the group that resumes it has another size
(``--allow-world-size-change``, or ``--nodes MIN:MAX``), :func:`rank_state_for` builds each new
rank's per-rank state by these rules, written down here and in the README:

* **Data.** Every saved rank must be at the same loader position (ranks step in lock step); the
  new rank gets that position and :class:`~trainer.data.ResumableLoader` re-partitions the rest
  of the epoch across the new ranks from its global offset (sample-exact, see
  :mod:`trainer.data`). Saved positions that disagree are refused.
* **RNG streams.** A rank that existed in the snapshot (``rank < saved world size``) continues
  its own streams (python, numpy, torch CPU, CUDA), so shrinking keeps the survivors' streams.
  A new rank gets fresh streams seeded from the snapshot step, its rank and the saved rank 0's
  torch state, so the same change replayed gives the same streams, and no two ranks share one.
* **``per_rank`` objects** (a prefetched batch, a private cursor) have no general rule for
  being split or merged: a world-size change with any registered is refused
  (:class:`~trainer.errors.StateMismatch`) rather than resumed with state that is not what was
  saved.

The shared state (model, optimizer, schedules) is the same on every DDP rank and is loaded as
is; sharded (FSDP) tensors are resharded by DCP (:mod:`trainer.sharded`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from trainer.errors import StateMismatch

#: Loader state keys that locate the position; they must agree across the saved ranks.
_POSITION_KEYS = ("epoch", "base", "batches", "batch_size", "num_replicas", "seed", "dataset_len")


def derived_seed(step: int, rank: int, saved_torch_state: torch.Tensor | None) -> int:
    """The seed of a new rank's RNG streams (63 bits; see the module docstring)."""
    h = hashlib.blake2b(f"orchestrator.reshape:{step}:{rank}:".encode(), digest_size=8)
    if saved_torch_state is not None:
        h.update(saved_torch_state.detach().cpu().contiguous().numpy().tobytes())
    return int.from_bytes(h.digest(), "little") & ((1 << 63) - 1)


def fresh_rng(seed: int, like: Mapping[str, Any]) -> dict[str, Any]:
    """RNG states (the :func:`trainer.state.capture_rng` layout of ``like``) seeded by ``seed``.

    Built without touching this process's generators.
    """
    import random

    python = random.Random(seed).getstate()
    numpy = np.random.RandomState(seed % (1 << 32)).get_state(legacy=True)
    cpu = torch.Generator().manual_seed(seed).get_state()
    cuda: list[torch.Tensor] = []
    for index, _ in enumerate(like.get("cuda") or []):
        # A CPU generator's state is not a CUDA one: CUDA's Philox state is (seed, offset).
        cuda.append(_cuda_state(seed + index + 1))
    return {"python": python, "numpy": numpy, "torch": cpu, "cuda": cuda}


def _cuda_state(seed: int) -> torch.Tensor:
    """The state tensor of a CUDA generator seeded with ``seed`` (Philox: seed and offset 0)."""
    return torch.tensor([seed, 0], dtype=torch.int64).view(torch.uint8)


def _position(loader: Mapping[str, Any] | None) -> tuple[Any, ...] | None:
    if loader is None:
        return None
    return tuple(loader.get(k, 0 if k == "base" else None) for k in _POSITION_KEYS)


def rank_state_for(
    ranks: Mapping[int, Mapping[str, Any]],
    *,
    saved_world_size: int,
    rank: int,
    world_size: int,
    step: int,
) -> dict[str, Any]:
    """The per-rank state new ``rank`` of ``world_size`` restores from a snapshot's ``ranks``.

    Equal world sizes: the rank's own saved state. Otherwise the rules of the module docstring;
    :class:`StateMismatch` when they cannot be applied.
    """
    if world_size == saved_world_size:
        own = ranks.get(rank)
        if own is None:
            raise StateMismatch(f"snapshot of step {step} holds no per-rank state for rank {rank}")
        return dict(own)
    missing = [r for r in range(saved_world_size) if r not in ranks]
    if missing:
        raise StateMismatch(f"snapshot of step {step} lacks the per-rank state of ranks {missing}")
    named = sorted({name for r in ranks.values() for name in (r.get("per_rank") or {})})
    if named:
        raise StateMismatch(
            f"cannot resume on {world_size} ranks a snapshot written by {saved_world_size}: "
            f"per_rank state {named} has no rule to be re-partitioned; resume on "
            f"{saved_world_size} ranks, or keep that state out of per_rank"
        )
    positions = {_position(ranks[r].get("loader")) for r in range(saved_world_size)}
    if len(positions) != 1:
        raise StateMismatch(
            f"cannot re-partition the data of step {step}: its ranks are at different loader "
            f"positions {sorted(map(str, positions))}"
        )
    first = ranks[0]
    if rank < saved_world_size:
        rng = ranks[rank]["rng"]
    else:
        rng = fresh_rng(derived_seed(step, rank, first["rng"].get("torch")), first["rng"])
    state: dict[str, Any] = {"step": first["step"], "rng": rng, "loader": first.get("loader")}
    return state
