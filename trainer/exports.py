"""Weights-only exports: ``exports/last.pt`` at the end of a run and ``exports/best.pt`` on keep-best.

A :class:`BestPolicy` is the one place a run names the metric that decides which weights are
"best" (``metric``, ``mode``, ``source``). :class:`Exporter` tracks that metric from the values
passed to :meth:`trainer.Checkpointer.step_done`, copies the weights into reused CPU buffers on
every improvement and queues the write on the snapshot writer thread; the policy is also recorded
in every snapshot's manifest (:meth:`BestPolicy.manifest_record`), which is where the supervisor's
``--keep-best K`` retention reads the metric and mode from. Exports are flat tensor dicts for
``torch.load(path, weights_only=True)`` with a JSON sidecar (step, metric, sha256).
"""

from __future__ import annotations

import hashlib
import math
import os
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import structlog
import torch
from torch.distributed.tensor import DTensor

from contract.atomic import atomic_write_json, fsync_dir
from trainer.errors import UsageError
from trainer.state import TrainingState
from trainer.writer import BackgroundWriter, Job

log = structlog.get_logger("trainer.exports")

BEST_MODES = ("max", "min")
BEST_SOURCES = ("ema", "model")
#: The manifest metadata key holding :meth:`BestPolicy.manifest_record` (read by retention).
MANIFEST_KEY = "best"


@dataclass(frozen=True, kw_only=True)
class BestPolicy:
    """Which metric makes weights the best ones: named once, here, for the whole run.

    ``metric`` is a key of the metrics passed to ``step_done`` (the same value on every rank);
    ``mode`` says whether higher (``"max"``) or lower (``"min"``) is better; ``source`` picks the
    exported weights: ``"ema"`` (when an EMA is registered) or ``"model"``. The supervisor's
    ``--keep-best K`` ranks snapshots by this metric, read from their manifests.
    """

    metric: str
    mode: Literal["max", "min"] = "max"
    source: Literal["ema", "model"] = "ema"

    def __post_init__(self) -> None:
        if not isinstance(self.metric, str) or not self.metric:
            raise UsageError(f"BestPolicy.metric must be a non-empty metric name, got {self.metric!r}")
        if self.mode not in BEST_MODES:
            raise UsageError(f"BestPolicy.mode must be 'max' or 'min', got {self.mode!r}")
        if self.source not in BEST_SOURCES:
            raise UsageError(f"BestPolicy.source must be 'ema' or 'model', got {self.source!r}")

    def better(self, value: float, best: float | None) -> bool:
        """Whether ``value`` improves on ``best`` (None: nothing recorded yet)."""
        return best is None or (value > best if self.mode == "max" else value < best)

    def manifest_record(self) -> dict[str, str]:
        """What each manifest records under ``metadata["best"]`` for the supervisor's retention."""
        return {"metric": self.metric, "mode": self.mode}


def json_metric(value: Any) -> Any:
    """``value`` as a JSON scalar: tensors and numpy scalars unwrapped, non-finite floats None."""
    if isinstance(value, torch.Tensor | np.generic):
        value = value.item()
    if isinstance(value, bool | int | str) or value is None:
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    return str(value)


def write_weights_export(
    directory: str, name: str, tensors: dict[str, torch.Tensor], sidecar: dict[str, Any]
) -> str:
    """Write ``<name>.pt`` (torch.save of a flat tensor dict) and ``<name>.json`` durably.

    The ``.pt`` file goes to a temporary name, is fsynced and renamed; its sha256 goes into the
    sidecar, written the same way afterwards. Load it with ``torch.load(..., weights_only=True)``.
    """
    os.makedirs(directory, exist_ok=True)
    final = os.path.join(directory, f"{name}.pt")
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.pt.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(tensors, f)
            f.flush()
            os.fsync(f.fileno())
        h = hashlib.sha256()
        with open(tmp, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
        os.replace(tmp, final)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_dir(directory)
    doc = dict(sidecar, sha256=h.hexdigest(), file=f"{name}.pt", time=time.time())
    atomic_write_json(os.path.join(directory, f"{name}.json"), doc, durable=True)
    return final


class Exporter:
    """Keep-best tracking and the weights-only exports of one rank (only rank 0 writes files)."""

    def __init__(
        self,
        best: BestPolicy | None,
        *,
        state: TrainingState,
        writer: BackgroundWriter,
        directory: str,
        run_id: str,
        rank: int,
    ) -> None:
        self.best = best
        self.state = state
        self.writer = writer
        self.directory = directory
        self.run_id = run_id
        self.rank = rank
        self._buffers: dict[str, torch.Tensor] | None = None
        self._job: Job | None = None
        #: Sharded (FSDP2) weights: exporting gathers every DTensor to its full tensor, a
        #: collective, so every rank takes part and rank 0 writes (set by the Checkpointer).
        self.collective = False

    def track(self, step: int, metrics: Mapping[str, Any], recorded: Mapping[str, Any]) -> None:
        """Update the best value from ``metrics``; on rank 0 export the weights if it improved.

        ``recorded`` (the step's metrics as JSON values) goes into the sidecar.
        """
        policy = self.best
        if policy is None or policy.metric not in metrics:
            return
        raw = json_metric(metrics[policy.metric])
        if not isinstance(raw, int | float) or isinstance(raw, bool) or not math.isfinite(raw):
            return
        value = float(raw)
        if not policy.better(value, self.state.best_metric):
            return
        self.state.best_metric = value
        log.info("best.improved", step=step, metric=policy.metric, value=value)
        if self.rank == 0 or self.collective:
            self._export_best(policy, step, value, dict(recorded))

    def _weights(self, policy: BestPolicy) -> tuple[str, dict[str, torch.Tensor]]:
        """The exported weights (full tensors; on every rank a collective when sharded)."""
        ema = self.state.ema
        if policy.source == "ema" and ema is not None:
            inner = getattr(ema, "module", None)
            sd = inner.state_dict() if isinstance(inner, torch.nn.Module) else ema.state_dict()
            return "ema", _full(sd)
        return "model", _full(self.state.unwrapped_model.state_dict())

    def _export_best(self, policy: BestPolicy, step: int, value: float, metrics: dict[str, Any]) -> None:
        if self._job is not None:
            # The buffers are reused: the previous best must be written before they change.
            self._job.wait()
            self.writer.raise_if_failed()
        source, weights = self._weights(policy)
        if self.rank != 0:
            return  # a sharded model's other ranks took part in the gather only
        buffers = self._buffers
        if buffers is None or buffers.keys() != weights.keys() or any(
            buffers[k].shape != v.shape or buffers[k].dtype != v.dtype for k, v in weights.items()
        ):
            buffers = {k: torch.empty_like(v, device="cpu") for k, v in weights.items()}
            self._buffers = buffers
        for k, v in weights.items():
            buffers[k].copy_(v.detach())
        sidecar = {
            "step": step,
            "metric": policy.metric,
            "value": value,
            "mode": policy.mode,
            "source": source,
            "metrics": metrics,
            "run_id": self.run_id,
        }
        directory = self.directory
        frozen = buffers

        def job() -> None:
            write_weights_export(directory, "best", frozen, sidecar)
            log.info("export.best_written", step=step, value=value, source=source)

        self._job = self.writer.submit(job, label=f"best@{step}")

    def export_last(self, step: int, metrics: Mapping[str, Any], digest: str | None) -> str:
        """Write ``exports/last.pt`` from the live model (rank 0, after the final snapshot).

        Sharded: every rank calls it (the full tensors are gathered); only rank 0 writes, the
        others return ``""``.
        """
        full = _full(self.state.unwrapped_model.state_dict())
        if self.rank != 0:
            return ""
        weights = {k: v.detach().to("cpu", copy=True) for k, v in full.items()}
        path = write_weights_export(
            self.directory,
            "last",
            weights,
            {"step": step, "metrics": dict(metrics), "run_id": self.run_id, "digest": digest},
        )
        log.info("export.last_written", step=step, path=path)
        return path


def _full(state_dict: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The tensors of ``state_dict`` with every DTensor gathered to its full tensor.

    ``full_tensor()`` is a collective: under FSDP2 every rank walks the same (ordered) dict.
    Exports hold the weights as the model computes with them, whatever the sharding.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if isinstance(value, DTensor):
            value = value.full_tensor()
        if isinstance(value, torch.Tensor):
            out[key] = value
    return out
