"""The three ways of saving a training state that the in-process legs compare, behind one seam.

Each :class:`Saver` takes a snapshot of the live model+optimizer at a step (``save`` returns how
long the training thread was blocked), finishes in the background where it can (``wait``), and
can prove what it wrote (``saved_digest``: the tensors read back from disk, digested the same way
as the live state was at the step). Ours goes through the real :class:`trainer.Checkpointer`;
the peers are synchronous ``torch.save`` with fsync and atomic rename (what a careful user
writes) and ``torch.distributed.checkpoint.async_save`` with its documented fast settings.
"""

from __future__ import annotations

import copy
import os
import shutil
import time
from concurrent.futures import Future
from typing import Any, Protocol

import torch

import trainer
from bench import core
from contract.atomic import fsync_dir
from trainer.settings import WorkerSettings


def prepare(config: core.BenchConfig, size_bytes: int, leg: str) -> tuple[
    torch.nn.Module, torch.optim.Optimizer, core.LegResult, str
]:
    """The in-process legs' common start: a trained-once model + AdamW of about ``size_bytes``
    (one torch thread, as ``OMP_NUM_THREADS=1`` workers), its empty result and scratch dir."""
    torch.set_num_threads(1)
    model = core.make_model(size_bytes, device=config.device)
    optimizer = core.make_optimizer(model)
    core.train_step(model, optimizer)
    nbytes = core.state_bytes(model, optimizer)
    result = core.LegResult(leg=leg, size=core.size_label(size_bytes), size_bytes=nbytes)
    return model, optimizer, result, config.scratch(leg)


class Saver(Protocol):
    name: str

    def save(self, step: int) -> float:
        """Snapshot the state at ``step``; return the seconds the caller was blocked."""

    def blocked(self) -> float:
        """Seconds the training loop was blocked by the last save, once the next step ran."""

    def wait(self) -> float:
        """Block until the last save is durable; return the seconds waited."""

    def saved_digest(self, step: int) -> str:
        """:func:`bench.core.tensor_digest`-comparable digest of what was saved at ``step``."""

    def delete(self, step: int) -> None:
        """Remove what ``save(step)`` wrote (the disk must not fill up over many repeats)."""

    def close(self) -> None: ...


class Ours:
    """:class:`trainer.Checkpointer` on a single rank, snapshot taken at the caller's step."""

    name = "ours"

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, directory: str) -> None:
        self.directory = directory
        self.state = trainer.TrainingState(model=model, optimizer=optimizer)
        settings = WorkerSettings(checkpoint_dir=directory, run_id="bench")
        self.ckpt = trainer.Checkpointer(self.state, hparams={}, every=0, settings=settings)
        self.live: dict[int, str] = {}

    def save(self, step: int) -> float:
        self.state.step = step
        started = time.perf_counter()
        self.ckpt.snapshot()
        return time.perf_counter() - started

    def blocked(self) -> float:
        # snapshot()'s own time plus optimizer.step()'s wait for the deferred copy, if any.
        return self.ckpt.last_stall_s

    def wait(self) -> float:
        started = time.perf_counter()
        self.ckpt.wait()
        return time.perf_counter() - started

    def manifest_digest(self, step: int) -> str:
        return self.ckpt.store.read_manifest(step).digest

    def live_digest(self) -> str:
        """The digest a snapshot taken now records (our own codec's content digest)."""
        digest = self.ckpt.live_digest()
        if digest is None:
            raise RuntimeError("live_digest is None on rank 0")
        return digest

    def saved_digest(self, step: int) -> str:
        """Re-read the committed snapshot (checksums verified) and digest its model+optim tensors."""
        model = copy.deepcopy(self.state.model)
        reader = trainer.TrainingState(model=model, optimizer=torch.optim.AdamW(model.parameters()))
        restored = trainer.Checkpointer(
            reader, hparams={}, every=0,
            settings=WorkerSettings(checkpoint_dir=self.directory, run_id="bench",
                                            resume_mode="step", resume_step=step),
        )
        restored.resume()
        restored.close()
        return core.tensor_digest(core.training_state(reader.model, reader.optimizer))

    def delete(self, step: int) -> None:
        self.ckpt.store.delete(step)

    def close(self) -> None:
        self.ckpt.close()


class TorchSave:
    """Synchronous ``torch.save`` to a temp file, flush, fsync, rename, fsync the directory."""

    name = "torch_save"

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, directory: str) -> None:
        self.model, self.optimizer, self.directory = model, optimizer, directory
        self.last = 0.0
        os.makedirs(directory, exist_ok=True)

    def path(self, step: int) -> str:
        return os.path.join(self.directory, f"step-{step}.pt")

    def save(self, step: int) -> float:
        started = time.perf_counter()
        tmp = self.path(step) + ".tmp"
        with open(tmp, "wb") as f:
            torch.save(core.training_state(self.model, self.optimizer), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path(step))
        fsync_dir(self.directory)
        self.last = time.perf_counter() - started
        return self.last

    def blocked(self) -> float:
        return self.last

    def wait(self) -> float:
        return 0.0

    def saved_digest(self, step: int) -> str:
        return core.tensor_digest(torch.load(self.path(step), map_location="cpu", weights_only=True))

    def delete(self, step: int) -> None:
        os.unlink(self.path(step))

    def close(self) -> None:
        pass


class DcpAsync:
    """``dcp.async_save`` (thread), no process group, a reused :class:`DefaultStager`.

    A stager kept across saves caches its staging storages (like our arena), DCP's documented
    way to cut staging latency; the first save, which allocates them, is a warm-up. Pinned
    memory, non-blocking copies and asynchronous staging need an accelerator: on CUDA all are
    on and the stall counts until staging completed (the next optimizer step may not run
    earlier); on CPU staging is synchronous, as DCP requires.
    """

    name = "dcp_async_save"

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, directory: str) -> None:
        from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

        self.model, self.optimizer, self.directory = model, optimizer, directory
        self.future: Future[Any] | None = None
        self.last = 0.0
        cuda = torch.cuda.is_available()
        self.stager = DefaultStager(StagingOptions(
            use_pinned_memory=cuda, use_shared_memory=False,
            use_async_staging=cuda, use_non_blocking_copy=cuda,
        ))

    def path(self, step: int) -> str:
        return os.path.join(self.directory, f"step-{step}")

    def save(self, step: int) -> float:
        from torch.distributed.checkpoint.state_dict_saver import async_save

        if self.future is not None:
            self.future.result()
        started = time.perf_counter()
        result = async_save(
            core.training_state(self.model, self.optimizer),
            checkpoint_id=self.path(step),
            no_dist=True,
            async_stager=self.stager,
        )
        if isinstance(result, Future):
            self.future = result
        else:  # AsyncSaveResponse: training may mutate the state only once staging is done
            result.staging_completion.result()
            self.future = result.upload_completion
        self.last = time.perf_counter() - started
        return self.last

    def blocked(self) -> float:
        return self.last

    def wait(self) -> float:
        started = time.perf_counter()
        if self.future is not None:
            self.future.result()
        return time.perf_counter() - started

    def saved_digest(self, step: int) -> str:
        from torch.distributed.checkpoint.state_dict_loader import load

        template = {
            "model": {k: torch.empty_like(v) for k, v in self.model.state_dict().items()},
            "optim": copy.deepcopy(self.optimizer.state_dict()),
        }
        for t in core.iter_tensors(template["optim"]):
            t.zero_()
        load(template, checkpoint_id=self.path(step), no_dist=True)
        return core.tensor_digest(template)

    def delete(self, step: int) -> None:
        shutil.rmtree(self.path(step), ignore_errors=True)

    def close(self) -> None:
        self.wait()
        self.stager.close()
