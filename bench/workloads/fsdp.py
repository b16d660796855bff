"""The FSDP2 leg's worker: run by ``torchrun`` on 2 ranks (``save``) or 1 and 2 ranks (``resume``).

``save``: the MLP of :func:`bench.core.make_model` sharded with ``fully_shard`` (every Linear,
then the root) + AdamW, trained with real steps, snapshotted in interleaved rounds by ours
(:class:`trainer.Checkpointer`, which takes a sharded snapshot of a DTensor model: every rank
writes its own shard file) and by ``torch.distributed.checkpoint.async_save`` of the
``get_state_dict`` model + optimizer state (on a dedicated gloo group, as DCP documents, with a
reused :class:`DefaultStager`). Between a save and its wait two more training steps run, so an
asynchronous save that read the state after it changed fails the gate. Then the write rounds:
ours ``snapshot()`` + ``wait()`` (stage to commit), ``dd`` writing as many bytes on every rank in
parallel, and a synchronous ``dcp.save`` (every rank writing). Finally one snapshot of each tool at
the same step is kept for the resume runs, with the digest of the full (gathered) state.

``resume``: the same model on this run's world size; ours (``Checkpointer.resume()`` with
``allow_world_size_change``) and ``dcp.load`` + ``set_state_dict`` of the DCP checkpoint, in
turns, the page cache of both checkpoints dropped before each; after every load the full state is
gathered and its digest compared with the one recorded at the save (each load starts from a
zeroed model and optimizer state, so the check proves the load).

Every time is the slowest rank's (a max over a dedicated gloo group); rank 0 writes ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

import trainer
from bench import core
from trainer.settings import WorkerSettings

DD_BLOCK = 8 << 20
#: Training steps run between a save and its wait (the state changes meanwhile).
STEPS_BETWEEN = 2


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="FSDP2 benchmark worker (run under torchrun)")
    p.add_argument("mode", choices=("save", "resume"))
    p.add_argument("--size", type=int, required=True, help="model + AdamW state bytes")
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dir", required=True, help="the leg's scratch dir (ours/, dcp/, dd/ under it)")
    p.add_argument("--out", required=True, help="JSON written by rank 0")
    p.add_argument("--expected", default=None, help="resume: the save run's JSON")
    return p.parse_args(argv)


class World:
    """This rank, its device and a gloo group for the benchmark's own reductions and barriers."""

    def __init__(self) -> None:
        ctx = trainer.init_distributed()
        self.rank, self.size, self.device = ctx.rank, ctx.world_size, ctx.device
        # The harness's collectives never share a group with FSDP's or a DCP thread's.
        self.group = dist.new_group(backend="gloo")

    def barrier(self) -> None:
        dist.barrier(group=self.group)

    def max(self, value: float) -> float:
        t = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return float(t.item())

    def timed(self, fn: Callable[[], Any]) -> float:
        """Seconds of ``fn`` on the slowest rank, every rank starting after a barrier."""
        self.barrier()
        return self.max(core.timed(fn))


def build(size: int, width: int, device: torch.device) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model = core.make_model(size, device=str(device), seed=11, width=width)
    for layer in model.children():
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-4)


def step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    first = next(iter(model.parameters()))
    core.step_on(model, optimizer, torch.randn(8, first.shape[1], device=device))


def dcp_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    msd, osd = get_state_dict(model, optimizer)
    return {"model": msd, "optim": osd}


def full_digest(model: torch.nn.Module, optimizer: torch.optim.Optimizer, rank: int) -> str | None:
    """:func:`bench.core.tensor_digest` of the gathered model + optimizer state (rank 0)."""
    msd, osd = get_state_dict(model, optimizer,
                              options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return core.tensor_digest({"model": msd, "optim": osd}) if rank == 0 else None


def settings(directory: str, *, world_size_change: bool) -> WorkerSettings:
    return dataclasses.replace(WorkerSettings.from_env(), checkpoint_dir=directory, run_id="bench-fsdp",
                               allow_world_size_change=world_size_change)


def checkpointer(state: trainer.TrainingState, directory: str, size: int, *,
                 world_size_change: bool = False) -> trainer.Checkpointer:
    return trainer.Checkpointer(state, hparams={"size": size}, every=0,
                                settings=settings(directory, world_size_change=world_size_change))


def dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(root, f)) for root, _d, files in os.walk(path) for f in files)


def local_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Bytes of this rank's shards of the model + optimizer state (what its snapshot copies)."""
    total = 0
    for t in core.iter_tensors(dcp_state(model, optimizer)):
        local = t.to_local() if isinstance(t, DTensor) else t
        total += local.numel() * local.element_size()
    return total


def copy_seconds(nbytes: int) -> float:
    """One copy of ``nbytes`` between two touched host buffers (the stall's hardware limit)."""
    return core.memcpy_seconds(nbytes, repeats=1).median


def sha256_seconds(nbytes: int) -> float:
    """One sha256 over ``nbytes`` (the hash every byte of a verified write or load needs)."""
    buf = np.ones(nbytes, dtype=np.uint8)
    return core.timed(lambda: hashlib.sha256(buf.data).digest())


def dd(path: str, nbytes: int) -> float:
    """Seconds of ``dd if=/dev/zero bs=8M oflag=direct conv=fdatasync`` writing ``nbytes``."""
    count = max(1, -(-nbytes // DD_BLOCK))
    started = time.perf_counter()
    subprocess.run(["dd", "if=/dev/zero", f"of={path}", f"bs={DD_BLOCK}", f"count={count}",
                    "oflag=direct", "conv=fdatasync"], check=True, capture_output=True)
    seconds = time.perf_counter() - started
    os.unlink(path)
    return seconds


class Dcp:
    """``dcp.async_save`` of ``get_state_dict``'s state with a reused stager, on its own group."""

    def __init__(self, world: World, directory: str) -> None:
        from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

        self.world, self.directory = world, directory
        self.group = dist.new_group(backend="gloo")  # DCP's documented set-up for async_save
        cuda = world.device.type == "cuda"
        self.stager = DefaultStager(StagingOptions(
            use_pinned_memory=cuda, use_shared_memory=False, use_async_staging=cuda,
            use_non_blocking_copy=cuda,
        ))
        self.pending: Any = None

    def path(self, step: int) -> str:
        return os.path.join(self.directory, f"step-{step}")

    def async_save(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int) -> float:
        """Start a save of the state now; return the seconds the training thread was blocked
        (``get_state_dict``, which a user calls at every save, plus ``async_save`` until staged)."""
        from concurrent.futures import Future

        from torch.distributed.checkpoint.state_dict_saver import async_save

        started = time.perf_counter()
        result = async_save(dcp_state(model, optimizer), checkpoint_id=self.path(step),
                            process_group=self.group, async_stager=self.stager)
        if isinstance(result, Future):
            self.pending = result
        else:
            result.staging_completion.result()
            self.pending = result.upload_completion
        return time.perf_counter() - started

    def wait(self) -> None:
        if self.pending is not None:
            self.pending.result()
            self.pending = None

    def save(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
        from torch.distributed.checkpoint.state_dict_saver import save

        save(dcp_state(model, optimizer), checkpoint_id=self.path(step), process_group=self.group)

    def delete(self, step: int) -> None:
        self.world.barrier()
        if self.world.rank == 0:
            shutil.rmtree(self.path(step), ignore_errors=True)
        self.world.barrier()

    def close(self) -> None:
        self.wait()
        self.stager.close()


def run_save(args: argparse.Namespace, world: World) -> dict[str, Any]:
    model, optimizer = build(args.size, args.width, world.device)
    step(model, optimizer, world.device)
    nbytes = core.state_bytes(model, optimizer)  # DTensors report their global size
    state = trainer.TrainingState(model=model, optimizer=optimizer)
    ours = checkpointer(state, os.path.join(args.dir, "ours"), args.size)
    dcp = Dcp(world, os.path.join(args.dir, "dcp"))
    dd_dir = os.path.join(args.dir, "dd")
    os.makedirs(dd_dir, exist_ok=True)
    at = 1
    out: dict[str, Any] = {"state_bytes": nbytes, "world_size": world.size, "gates": []}
    samples: dict[str, list[float]] = {k: [] for k in (
        "ours_stall_s", "dcp_async_save_stall_s", "ours_MBps", "ours_writer_MBps", "dd_MBps",
        "dcp_save_MBps", "copy_limit_s", "sha256_MBps")}
    snapshot_bytes: list[int] = []

    def gate(what: str, expected: str | None, actual: str | None) -> None:
        if world.rank == 0:
            out["gates"].append({"what": what, "expected": expected, "actual": actual})

    def train(n: int = 1) -> None:
        nonlocal at
        for _ in range(n):
            step(model, optimizer, world.device)
            at += 1
        state.step = at

    def ours_stall(i: int) -> None:
        train()
        expected = ours.live_digest()
        saved = at
        ours.snapshot()
        train(STEPS_BETWEEN)
        stall = world.max(ours.last_stall_s)
        ours.wait()
        if i > 0:
            samples["ours_stall_s"].append(stall)
        if world.rank == 0:
            gate(f"ours stall save {i}: manifest digest vs the live state at its step",
                 expected, ours.store.read_manifest(saved).digest)
            ours.store.delete(saved)

    def dcp_stall(i: int) -> None:
        train()
        saved = at
        stall = world.max(dcp.async_save(model, optimizer, saved))
        train(STEPS_BETWEEN)
        dcp.wait()
        if i > 0:
            samples["dcp_async_save_stall_s"].append(stall)
        dcp.delete(saved)

    mine = local_bytes(model, optimizer)
    for _ in range(args.repeats):  # every rank copying its shards at once
        samples["copy_limit_s"].append(world.timed(functools.partial(copy_seconds, mine)))

    # 1. Stall, interleaved (order reversed every round); round 0 is a warm-up for both.
    for i in range(args.repeats + 1):
        for fn in (ours_stall, dcp_stall) if i % 2 == 0 else (dcp_stall, ours_stall):
            fn(i)

    # 2. Write throughput with every rank writing, and dd on every rank in parallel.
    for i in range(args.repeats + 1):
        train()
        expected = ours.live_digest()
        saved = at
        world.barrier()
        ours.snapshot()
        staged = time.perf_counter()
        ours.wait()  # rank 0 returns once the manifest is committed, after every rank reported
        committed = time.perf_counter() - staged
        seconds = world.max(committed if world.rank == 0 else 0.0)
        total = dir_bytes(ours.store.path(saved)) if world.rank == 0 else 0
        writer_s = ours.last_write_s or 0.0
        if world.rank == 0:
            gate(f"ours write {i}: manifest digest vs the live state at its step",
                 expected, ours.store.read_manifest(saved).digest)
            ours.store.delete(saved)
        world.barrier()
        per_rank = max(1, total // world.size) if world.rank == 0 else 0
        per_rank = int(world.max(per_rank))
        dd_s = world.timed(functools.partial(dd, os.path.join(dd_dir, f"rank-{world.rank}.bin"), per_rank))
        dd_bytes = world.size * max(1, -(-per_rank // DD_BLOCK)) * DD_BLOCK
        dcp_s = world.timed(functools.partial(dcp.save, model, optimizer, saved))
        hash_s = world.timed(functools.partial(sha256_seconds, per_rank))
        dcp_total = dir_bytes(dcp.path(saved)) if world.rank == 0 else 0
        dcp.delete(saved)
        if i == 0:
            continue  # warm-up: first-touch allocation of the staging buffers
        if world.rank == 0:
            snapshot_bytes.append(total)
            samples["ours_MBps"].append(total / core.MB / seconds)
            samples["ours_writer_MBps"].append(total / core.MB / writer_s if writer_s else 0.0)
            samples["dd_MBps"].append(dd_bytes / core.MB / dd_s)
            samples["dcp_save_MBps"].append(dcp_total / core.MB / dcp_s)
            samples["sha256_MBps"].append(world.size * per_rank / core.MB / hash_s)

    # 3. One snapshot of each tool at the same step, kept for the resume runs.
    train()
    ours.snapshot()
    ours.wait()
    dcp.save(model, optimizer, at)
    world.barrier()
    out.update(
        samples=samples, snapshot_bytes=snapshot_bytes, final_step=at,
        final_full_digest=full_digest(model, optimizer, world.rank),
        final_manifest_digest=ours.store.read_manifest(at).digest if world.rank == 0 else None,
        ours_dir=os.path.join(args.dir, "ours"), dcp_dir=dcp.path(at),
        dcp_bytes=dir_bytes(dcp.path(at)) if world.rank == 0 else 0,
    )
    dcp.close()
    ours.close()
    return out


def zero_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Scribble over the live state, so that only a load can bring the saved digest back."""
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        for per_param in optimizer.state.values():
            for v in per_param.values():
                if isinstance(v, torch.Tensor):
                    v.zero_()


def run_resume(args: argparse.Namespace, world: World) -> dict[str, Any]:
    with open(args.expected) as f:
        saved = json.load(f)
    model, optimizer = build(args.size, args.width, world.device)
    step(model, optimizer, world.device)  # AdamW state exists, as in a script that resumes
    state = trainer.TrainingState(model=model, optimizer=optimizer)
    group = dist.new_group(backend="gloo")
    samples: dict[str, list[float]] = {"ours_s": [], "dcp_load_s": []}
    gates: list[dict[str, Any]] = []
    resumed: list[int] = []

    errors: list[str] = []

    def ours_load() -> None:
        ckpt = checkpointer(state, saved["ours_dir"], args.size, world_size_change=True)
        try:
            resumed.append(ckpt.resume())
        except Exception as exc:  # reported as "ours unavailable", never as a time
            errors.append(f"{type(exc).__name__}: {exc}")
        finally:
            ckpt.close()

    def dcp_load() -> None:
        from torch.distributed.checkpoint.state_dict_loader import load

        sd = dcp_state(model, optimizer)
        load(sd, checkpoint_id=saved["dcp_dir"], process_group=group)
        set_state_dict(model, optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optim"])

    tools = {"ours_s": ours_load, "dcp_load_s": dcp_load}
    for i in range(args.repeats):
        for name in tools if i % 2 == 0 else list(tools)[::-1]:
            zero_state(model, optimizer)
            if world.rank == 0:
                core.drop_page_cache(saved["ours_dir"])
                core.drop_page_cache(saved["dcp_dir"])
            samples[name].append(world.timed(tools[name]))
            if world.rank == 0:
                gates.append({"what": f"{name.removesuffix('_s')} resume {i} on {world.size} rank(s): "
                                      "full state vs the saved one",
                              "expected": saved["final_full_digest"],
                              "actual": full_digest(model, optimizer, world.rank)})
            else:
                full_digest(model, optimizer, world.rank)  # collective
    return {"world_size": world.size, "samples": samples, "gates": gates, "resumed_from": resumed,
            "ours_errors": errors}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(1)
    world = World()
    out = run_save(args, world) if args.mode == "save" else run_resume(args, world)
    world.barrier()
    if world.rank == 0:
        core.write_json(args.out, out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
