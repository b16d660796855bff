"""Deferred staging: copy the bulk of a snapshot off the training thread, before it can change.

A snapshot must hold the state as it was at its step. The small, volatile parts (RNG states,
loader position, model buffers, scheduler and scaler values) are captured on the training thread
when the snapshot is taken. The bulk, the parameters and the optimizer's state on the CPU, is only
mutated by ``optimizer.step()``, so it can be copied into the staging arena on a background thread
while the next step's forward and backward run; a step pre-hook on the optimizer makes
``optimizer.step()`` wait until that copy is done. The time the training loop is blocked is then
the synchronous part plus whatever of the copy the next forward/backward did not cover.

As a safety net against a mutation that bypasses the optimizer (an in-place update in user code),
each deferred tensor's version counter is recorded when the snapshot is taken and checked after
its copy: a change fails the snapshot loudly instead of committing a state that never existed.
CUDA tensors are never deferred (their copies are already asynchronous on the stream).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from concurrent import futures
from concurrent.futures import Future

import torch

from contract.threads import run_in_thread
from trainer.codec import EncodedState, StagingArena
from trainer.errors import SnapshotError


def deferrable_slots(encoded: EncodedState, optimizers: Iterable[torch.optim.Optimizer]) -> frozenset[int]:
    """Indices of sources that only ``optimizer.step()`` mutates: CPU params and optimizer state.

    Sources are matched by storage (``state_dict()`` hands out detached views of the parameters,
    not the parameter objects).
    """
    storages: set[int] = set()
    for opt in optimizers:
        for group in opt.param_groups:
            for p in group["params"]:
                if p.device.type == "cpu":
                    storages.add(p.untyped_storage().data_ptr())
        for per_param in opt.state.values():
            for value in per_param.values():
                if isinstance(value, torch.Tensor) and value.device.type == "cpu":
                    storages.add(value.untyped_storage().data_ptr())
    return frozenset(
        i
        for i, src in enumerate(encoded.sources)
        if isinstance(src, torch.Tensor)
        and src.device.type == "cpu"
        and encoded.slots[i].nbytes > 0
        and src.untyped_storage().data_ptr() in storages
    )


class DeferredStaging:
    """Copies the deferred slots of one snapshot into the arena on a thread (:meth:`start`);
    :meth:`wait` re-raises its errors."""

    def __init__(self, arena: StagingArena, encoded: EncodedState, indices: frozenset[int]) -> None:
        self._arena = arena
        self._encoded = encoded
        self._indices = sorted(indices)
        # Recorded now, on the training thread: the versions the snapshot's step saw.
        self._versions = {i: encoded.sources[i]._version for i in self._indices}  # type: ignore[union-attr]
        self.nbytes = sum(encoded.slots[i].nbytes for i in self._indices)
        self._copy: Future[None] | None = None

    def start(self) -> None:
        """Begin the copy beside the training thread."""
        self._copy = run_in_thread(self._run, name="trainer-staging")

    def _run(self) -> None:
        try:
            for i in self._indices:
                self._arena.copy_slot(self._encoded, i)
                src = self._encoded.sources[i]
                if src._version != self._versions[i]:  # type: ignore[union-attr]
                    raise SnapshotError(
                        f"tensor {i} of the snapshot (arena offset {self._encoded.slots[i].offset}) "
                        "was modified in place while it was being staged, outside "
                        "optimizer.step(); set "
                        "ORCH_SNAPSHOT_STAGING=sync (or Checkpointer(staging='sync'))"
                    )
        finally:
            self._encoded.sources = []  # drop references to live tensors once copied

    def wait(self) -> float:
        """Block until the copy finished; return the seconds blocked; re-raise its error."""
        if self._copy is None:
            raise RuntimeError("staging was never started")
        started = time.perf_counter()
        futures.wait([self._copy])
        waited = time.perf_counter() - started
        self._copy.result()  # its error, re-raised on the thread that needs the arena
        return waited
