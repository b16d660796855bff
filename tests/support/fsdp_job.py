"""A tiny FSDP2 (``fully_shard``) training script for the sharded-snapshot tests.

Trains a two-layer MLP whose layer sizes do not divide by the world size (uneven shards) with
AdamW and a resumable loader, snapshotting every ``--every`` steps. With ``--out FILE`` rank 0
writes a JSON report: the step it resumed from, ``live_digest()`` right after the resume, and the
live digest at every snapshot step (taken after ``step_done``, so equal to that snapshot's).
``--stop-after N`` ends the process (exit 0) after step N's snapshot committed.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.utils.data import Dataset

import trainer
import trainer.distributed


class Points(Dataset[torch.Tensor]):
    def __len__(self) -> int:
        return 4096

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.randn(13, generator=trainer.sample_generator(5, 0, index))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--every", type=int, default=4)
    parser.add_argument("--out", default=None)
    parser.add_argument("--stop-after", type=int, default=None)
    args = parser.parse_args()
    ctx = trainer.init_distributed()
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(13, 37), nn.GELU(), nn.Linear(37, 5))
    if ctx.world_size >= 1 and torch.distributed.is_initialized():
        fully_shard(model[0])
        fully_shard(model)
    else:
        from torch.distributed.device_mesh import init_device_mesh

        raise SystemExit(f"needs a process group (torchrun); {init_device_mesh.__name__}")
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=5, gamma=0.5)
    sampler = trainer.ResumableDistributedSampler(4096, num_replicas=ctx.world_size, rank=ctx.rank, seed=1)
    loader = trainer.ResumableLoader(Points(), batch_size=4, sampler=sampler, drop_last=True)
    state = trainer.TrainingState(model=model, optimizer=optimizer, scheduler=scheduler, loader=loader)
    ckpt = trainer.Checkpointer(state, every=args.every, hparams={"steps": args.steps})
    step = ckpt.resume()
    report: dict[str, object] = {"resumed_from": step, "world_size": ctx.world_size,
                                 "resume_digest": ckpt.live_digest(), "snapshots": {}}
    batches = iter(loader)
    while step < args.steps:
        step += 1
        x = next(batches)
        loss = F.mse_loss(model(x), x[:, :5])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        optimizer.step()
        scheduler.step()
        ckpt.step_done(step, {"loss": float(loss.detach())})
        if step % args.every == 0:
            report["snapshots"][str(step)] = ckpt.live_digest()  # type: ignore[index]
        if args.stop_after is not None and step == args.stop_after:
            ckpt.wait()
            break
    else:
        ckpt.finish()
    ckpt.wait()
    report["final_digest"] = ckpt.live_digest()
    if args.out and ctx.rank == 0:
        with open(args.out + ".tmp", "w") as f:
            json.dump(report, f)
        os.replace(args.out + ".tmp", args.out)
    ckpt.close()
    # trainer.run ends the rank without interpreter finalisation (gloo aborts there).

if __name__ == "__main__":
    trainer.run(main)
