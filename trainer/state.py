"""The full training state: what a snapshot captures and a resume restores.

:class:`TrainingState` registers the model (unwrapped from DDP / ``torch.compile``), optimizer,
LR scheduler, AMP GradScaler, EMA, the resumable loader and any extra :class:`Stateful`
(early-stopping counters, ...), plus ``step``, ``epoch``, ``best_metric`` and JSON metadata.
Its state splits in two: the *shared* state, identical on every rank under DDP and stored once
(rank 0's copy), and the *per-rank* state (python/numpy/torch/CUDA RNGs, the loader position
and the objects registered with ``per_rank=``), gathered from every rank and stored under
``ranks/<r>``. On load each rank restores the shared state and its own per-rank state.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch import nn

from trainer.errors import ResumeError, StateMismatch


@runtime_checkable
class Stateful(Protocol):
    """Anything with ``state_dict()`` and ``load_state_dict()`` (the torch convention)."""

    def state_dict(self) -> dict[str, Any]:
        """Return the state as plain containers, scalars and tensors."""
        ...

    def load_state_dict(self, state_dict: dict[str, Any], /) -> Any:
        """Restore the state returned by :meth:`state_dict`."""
        ...


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module whose parameters are trained: strips DDP/FSDP ``.module`` and compile wrappers."""
    current = model
    for _ in range(8):
        inner = getattr(current, "_orig_mod", None)
        if isinstance(inner, nn.Module):
            current = inner
            continue
        if isinstance(current, nn.parallel.DistributedDataParallel | nn.DataParallel):
            current = current.module
            continue
        break
    return current


def capture_rng() -> dict[str, Any]:
    """This process's RNG states: python ``random``, numpy legacy global, torch CPU, CUDA."""
    cuda: list[torch.Tensor] = []
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
        cuda = [torch.cuda.get_rng_state(i) for i in range(torch.cuda.device_count())]
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(legacy=True),
        "torch": torch.get_rng_state(),
        "cuda": cuda,
    }


def restore_rng(state: dict[str, Any]) -> None:
    """Restore what :func:`capture_rng` returned."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    # contiguous clones: set_rng_state reads the storage from its start, whatever the view.
    torch.set_rng_state(state["torch"].clone())
    cuda = state.get("cuda") or []
    if cuda:
        if not torch.cuda.is_available() or torch.cuda.device_count() != len(cuda):
            raise ResumeError(
                f"snapshot holds {len(cuda)} CUDA RNG states but this process sees "
                f"{torch.cuda.device_count() if torch.cuda.is_available() else 0} devices"
            )
        for i, s in enumerate(cuda):
            torch.cuda.set_rng_state(s.clone(), i)


def _to_cpu(value: Any) -> Any:
    """``value`` with every tensor in its dicts, lists and tuples moved to (a copy on) the CPU.

    Per-rank state travels to rank 0 pickled (``gather_object``); a CUDA tensor would be
    unpickled onto rank 0's device of the same index, or fail where that device does not exist.
    """
    if isinstance(value, torch.Tensor):
        return value.detach().cpu() if value.device.type != "cpu" else value
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_to_cpu(v) for v in value]
    if isinstance(value, tuple) and not hasattr(value, "_fields"):
        return tuple(_to_cpu(v) for v in value)
    return value


class TrainingState:
    """Everything needed to continue training bit-identically.

    ``extras`` are :class:`Stateful` objects identical on every rank (early-stopping counters):
    rank 0's state is saved and every rank restores it. ``per_rank`` are :class:`Stateful`
    objects whose state differs between ranks (a prefetched batch, a per-rank data cursor, a
    private generator): every rank's state is saved, under ``ranks/<r>/per_rank/<name>``, and
    each rank restores its own; their tensors are saved as CPU tensors (load_state_dict gets CPU
    tensors back: move them to the device there). Both are part of the content digest, and a
    snapshot whose ``extras`` or ``per_rank`` names differ from the registered ones is refused
    with :class:`~trainer.errors.StateMismatch`. ``metadata`` is a JSON-able dict of user facts
    recorded in every manifest (for instance ``dataset_version``); it is not part of the training
    state's digest. ``epoch`` follows the loader when one is registered.
    """

    def __init__(
        self,
        *,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: Stateful | None = None,
        scaler: Stateful | None = None,
        ema: Stateful | None = None,
        loader: Stateful | None = None,
        extras: dict[str, Stateful] | None = None,
        per_rank: dict[str, Stateful] | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.scaler = scaler
        self.ema = ema
        self.loader = loader
        self.extras: dict[str, Stateful] = dict(extras or {})
        for name, obj in self.extras.items():
            if not isinstance(obj, Stateful):
                raise TypeError(f"extra {name!r} has no state_dict/load_state_dict")
        self.per_rank: dict[str, Stateful] = dict(per_rank or {})
        for name, obj in self.per_rank.items():
            if not isinstance(name, str):
                raise TypeError(f"per_rank names must be strings, got {name!r}")
            if not isinstance(obj, Stateful):
                raise TypeError(f"per_rank {name!r} has no state_dict/load_state_dict")
        self.metadata: dict[str, Any] = dict(metadata or {})
        self.step = 0
        self._epoch = 0
        self.best_metric: float | None = None

    @property
    def epoch(self) -> int:
        """The current epoch: the loader's when one is registered."""
        loader_epoch = getattr(self.loader, "epoch", None)
        return int(loader_epoch) if isinstance(loader_epoch, int) else self._epoch

    @epoch.setter
    def epoch(self, value: int) -> None:
        self._epoch = value

    @property
    def unwrapped_model(self) -> nn.Module:
        """The model without DDP/compile wrappers."""
        return unwrap_model(self.model)

    def shared_state_dict(self) -> dict[str, Any]:
        """State identical on every rank (only rank 0's copy is stored)."""
        return {
            "model": self.unwrapped_model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": None if self.scheduler is None else self.scheduler.state_dict(),
            "scaler": None if self.scaler is None else self.scaler.state_dict(),
            "ema": None if self.ema is None else self.ema.state_dict(),
            "extras": {name: obj.state_dict() for name, obj in self.extras.items()},
            "progress": {
                "step": self.step,
                "epoch": self.epoch,
                "best_metric": self.best_metric,
            },
        }

    def rank_state_dict(self) -> dict[str, Any]:
        """State of this rank only: RNGs, loader position and the ``per_rank`` objects."""
        state: dict[str, Any] = {
            "step": self.step,
            "rng": capture_rng(),
            "loader": None if self.loader is None else self.loader.state_dict(),
        }
        if self.per_rank:
            # Absent when none are registered: snapshots (and digests) of states without
            # per-rank objects are exactly what they were before per_rank existed.
            state["per_rank"] = {
                name: _to_cpu(obj.state_dict()) for name, obj in self.per_rank.items()
            }
        return state

    def load_shared_state_dict(
        self,
        state: dict[str, Any],
        *,
        model_and_optimizer: Callable[[Any, Any], None] | None = None,
    ) -> None:
        """Restore the shared part; refuse a snapshot whose components differ from this state's.

        ``model_and_optimizer(model_state, optimizer_state)`` replaces the plain
        ``load_state_dict`` of the model and optimizer (sharded states: ``set_state_dict``).
        """
        for name in ("scheduler", "scaler", "ema"):
            mine = getattr(self, name)
            if (state.get(name) is None) != (mine is None):
                have = "has" if state.get(name) is not None else "has no"
                raise StateMismatch(
                    f"snapshot {have} {name} state but this TrainingState "
                    f"{'registers none' if mine is None else 'registers one'}"
                )
        saved_extras = state.get("extras") or {}
        if set(saved_extras) != set(self.extras):
            raise StateMismatch(
                f"snapshot extras {sorted(saved_extras)} differ from registered {sorted(self.extras)}"
            )
        if model_and_optimizer is not None:
            model_and_optimizer(state["model"], state["optimizer"])
        else:
            self.unwrapped_model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None:
            self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        for name, obj in self.extras.items():
            obj.load_state_dict(saved_extras[name])
        progress = state["progress"]
        self.step = int(progress["step"])
        self._epoch = int(progress["epoch"])
        best = progress.get("best_metric")
        self.best_metric = None if best is None else float(best)

    def load_rank_state_dict(self, state: dict[str, Any]) -> None:
        """Restore this rank's RNGs, loader position and ``per_rank`` objects."""
        if (state.get("loader") is None) != (self.loader is None):
            raise StateMismatch("snapshot and TrainingState disagree on whether a loader is registered")
        saved_per_rank = state.get("per_rank") or {}
        if set(saved_per_rank) != set(self.per_rank):
            raise StateMismatch(
                f"snapshot per_rank {sorted(saved_per_rank)} differ from registered "
                f"{sorted(self.per_rank)}"
            )
        if self.loader is not None:
            self.loader.load_state_dict(state["loader"])
        for name, obj in self.per_rank.items():
            obj.load_state_dict(saved_per_rank[name])
        restore_rng(state["rng"])

    def snapshot_object(self, rank_states: list[dict[str, Any]]) -> dict[str, Any]:
        """The object a snapshot stores: shared state plus every rank's ``rank_state_dict()``.

        ``codec.state_digest(state.snapshot_object(rank_states))`` equals the digest recorded in
        the manifest of a snapshot taken at this point.
        """
        return {
            "shared": self.shared_state_dict(),
            "ranks": dict(enumerate(rank_states)),
            "world_size": len(rank_states),
        }

    def lr(self) -> list[float]:
        """The current learning rate of each parameter group."""
        return [float(g["lr"]) for g in self.optimizer.param_groups]
