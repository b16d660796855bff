"""A training script with a classic resume bug, for tests/e2e/test_determinism.py: it prefetches
the next batch before the step's ``step_done``, so every snapshot records a loader position one
batch ahead of the model. A resumed run then trains step S+1 on the batch of step S+2: the run
finishes, but not as the failed attempt did, and the determinism audit must say so.

``--no-prefetch`` fetches each batch inside its step (the correct pattern).
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset

import trainer


class Points(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    def __len__(self) -> int:
        return 512

    def __getitem__(self, key: trainer.SampleKey) -> tuple[torch.Tensor, torch.Tensor]:
        g = trainer.sample_generator(5, key.epoch, key.sample)
        x = torch.randn(8, generator=g)
        return x, (x.sum() > 0).long()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--no-prefetch", action="store_true")
    args = parser.parse_args()
    ctx = trainer.init_distributed()
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    ddp: nn.Module = DistributedDataParallel(model) if ctx.world_size > 1 else model
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    sampler = trainer.ResumableDistributedSampler(512, num_replicas=ctx.world_size, rank=ctx.rank, seed=1)
    loader = trainer.ResumableLoader(Points(), batch_size=8, sampler=sampler, drop_last=True,
                                     with_epoch=True)
    state = trainer.TrainingState(model=ddp, optimizer=optimizer, loader=loader)
    ckpt = trainer.Checkpointer(state, every=10, hparams={"steps": args.steps, "prefetch": not args.no_prefetch})
    step = ckpt.resume()
    batches = iter(loader)
    upcoming = None if args.no_prefetch else next(batches)
    while step < args.steps:
        step += 1
        if upcoming is None:
            x, y = next(batches)
        else:
            (x, y), upcoming = upcoming, next(batches)  # the bug: one batch ahead of the model
        loss = F.cross_entropy(ddp(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        optimizer.step()
        ckpt.step_done(step, {"loss": float(loss.detach())})
    ckpt.finish()


if __name__ == "__main__":
    trainer.run(main)
