"""Benchmark baseline: what a careful user writes without us, run under plain ``torchrun``.

The same 2-rank DDP model, data and step as ``ours.py``. Every ``--every`` steps rank 0 saves
``{"model", "optim", "step"}`` with ``torch.save`` to a temporary file, flushes, fsyncs, renames
it over ``--ckpt`` and fsyncs the directory (synchronous: training waits). On start every rank
``torch.load``s ``--ckpt`` if it exists (``map_location="cpu"``, ``weights_only=True``) and
continues from its step. Rank 0 reports progress, phases and the final digest like ``ours.py``.
Run from the repository root with the root on ``PYTHONPATH``::

    torchrun --standalone --nproc-per-node 2 bench/workloads/plain.py --size 100000000 \\
        --steps 24 --every 4 --ckpt /tmp/plain/ckpt.pt --progress /tmp/progress.txt
"""

from __future__ import annotations

import time

T_START = time.time()

import os  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.nn.parallel import DistributedDataParallel  # noqa: E402

from bench import core  # noqa: E402
from bench.workloads import common  # noqa: E402

T_IMPORTED = time.time()


def save(path: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
    """Durable, atomic ``torch.save``: temp file, fsync, rename, fsync the directory."""
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        torch.save({"model": model.state_dict(), "optim": optimizer.state_dict(), "step": step}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def main() -> None:
    args = common.parse_args(plain=True)
    every = args.every or args.steps
    dist.init_process_group("gloo")  # what users write: torch's default timeout
    rank, world = dist.get_rank(), dist.get_world_size()
    t_dist = time.time()
    model, optimizer = common.build(args.size, args.seed)
    ddp = DistributedDataParallel(model)
    t_model = time.time()
    start = 0
    if os.path.exists(args.ckpt):
        saved = torch.load(args.ckpt, map_location="cpu", weights_only=True)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optim"])
        start = int(saved["step"])
        del saved
    t_loaded = time.time()
    if rank == 0:
        common.append_json(args.phases, {
            "pid": os.getpid(), "attempt": os.environ.get("TORCHELASTIC_RESTART_COUNT"),
            "resumed_from": start, "t_start": T_START, "t_imported": T_IMPORTED, "t_dist": t_dist,
            "t_model": t_model, "t_loaded": t_loaded, "world_size": world,
        })
    progress = common.Progress(args.progress, rank == 0)
    pace = common.Pace(args.pace)
    try:
        for step in range(start + 1, args.steps + 1):
            pace.wait(step)
            x = common.batch(model, seed=args.seed, step=step, rank=rank, n=args.batch)
            core.step_on(ddp, optimizer, x)
            if step % every == 0 and rank == 0:
                save(args.ckpt, model, optimizer, step)
            progress.step(step)
    finally:
        progress.close()
    if rank == 0:
        common.write_json(args.result, {"step": args.steps, "digest": common.digest(model, optimizer),
                                        "resumed_from": start})
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
