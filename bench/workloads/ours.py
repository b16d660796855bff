"""Benchmark workload on our stack: ``trainer.Checkpointer`` snapshots under ``orchestrator launch``.

A 2-rank DDP MLP whose model + AdamW state is about ``--size`` bytes trains ``--steps`` steps on
data that is a pure function of ``(seed, step, rank)``, with a snapshot every ``--every`` steps
(default: the supervisor's ``--checkpoint-every``). Resume is automatic: the supervisor picks
the newest valid snapshot and ``Checkpointer.resume()`` restores it. Rank 0 reports progress,
start-up phases and the final digests (see :mod:`bench.workloads.common`). Run from the
repository root with the root on ``PYTHONPATH``::

    orchestrator launch --nproc-per-node 2 --checkpoint-dir /tmp/ck --checkpoint-every 4 \\
        bench/workloads/ours.py --size 100000000 --steps 24 --progress /tmp/progress.txt
"""

from __future__ import annotations

import time

T_START = time.time()

import os  # noqa: E402

from torch.nn.parallel import DistributedDataParallel  # noqa: E402

import trainer  # noqa: E402
from bench import core  # noqa: E402
from bench.workloads import common  # noqa: E402
from trainer import preemption  # noqa: E402

T_IMPORTED = time.time()


def main() -> None:
    args = common.parse_args()
    ctx = trainer.init_distributed()
    t_dist = time.time()
    model, optimizer = common.build(args.size, args.seed)
    ddp = DistributedDataParallel(model) if ctx.world_size > 1 else model
    state = trainer.TrainingState(model=ddp, optimizer=optimizer)
    ckpt = trainer.Checkpointer(state, hparams=common.hparams(args), every=args.every)
    t_model = time.time()
    start = ckpt.resume()
    t_loaded = time.time()
    if ctx.rank == 0:
        common.append_json(args.phases, {
            "pid": os.getpid(), "attempt": os.environ.get("ORCH_ATTEMPT"), "resumed_from": start,
            "t_start": T_START, "t_imported": T_IMPORTED, "t_dist": t_dist, "t_model": t_model,
            "t_loaded": t_loaded,
        })
    progress = common.Progress(args.progress, ctx.rank == 0)
    pace = common.Pace(args.pace, release_if=preemption.signalled)
    try:
        for step in range(start + 1, args.steps + 1):
            pace.wait(step)
            x = common.batch(model, seed=args.seed, step=step, rank=ctx.rank, n=args.batch)
            core.step_on(ddp, optimizer, x)
            ckpt.step_done(step)
            progress.step(step)
        ckpt.finish()
        live = ckpt.live_digest()  # collective: what a snapshot taken now would record
    finally:
        progress.close()
    if ctx.rank == 0:
        common.write_json(args.result, {
            "step": args.steps,
            "digest": common.digest(model, optimizer),
            "manifest_digest": ckpt.last_digest,
            "live_manifest_digest": live,
            "resumed_from": start,
        })


if __name__ == "__main__":
    trainer.run(main)
