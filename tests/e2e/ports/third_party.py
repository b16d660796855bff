"""A training script written the way third-party scripts often are: module-level code, no main().

``--mistake`` picks one habit that breaks bit-exact resume (check-resume must name it):
``unseeded`` (numpy never seeded, and it decides the data), ``held`` (the next batch is drawn at
the end of a step and held across the snapshot boundary), ``extras`` (a per-rank counter
registered in ``extras``, which are saved from rank 0 only); ``none`` is the fixed script.
"""

import argparse

import numpy as np
import torch

import trainer

parser = argparse.ArgumentParser()
parser.add_argument("--mistake", choices=("none", "unseeded", "held", "extras"), default="none")
parser.add_argument("--steps", type=int, default=40)
args = parser.parse_args()

ctx = trainer.init_distributed()
if args.mistake == "unseeded":
    torch.manual_seed(ctx.rank)  # torch only, as many scripts do
else:
    trainer.seed_everything(7)


class Counter:
    """How many batches this rank consumed; it offsets the rank's data."""

    def __init__(self) -> None:
        self.n = ctx.rank * 1000

    def state_dict(self) -> dict[str, int]:
        return {"n": self.n}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.n = state["n"]


counter = Counter()
model = torch.nn.Linear(8, 1)
ddp = torch.nn.parallel.DistributedDataParallel(model)
opt = torch.optim.SGD(model.parameters(), lr=0.05)
state = trainer.TrainingState(
    model=ddp,
    optimizer=opt,
    **({"extras": {"counter": counter}} if args.mistake == "extras" else
       {"per_rank": {"counter": counter}}),
)
ckpt = trainer.Checkpointer(state, hparams={"lr": 0.05, "mistake": args.mistake})
start = ckpt.resume()


def batch() -> torch.Tensor:
    counter.n += 1
    noise = np.random.standard_normal((16, 8)).astype(np.float32)
    return torch.from_numpy(noise) + torch.randn(16, 8) + counter.n * 1e-3


held = batch() if args.mistake == "held" else None
for step in range(start + 1, args.steps + 1):
    if args.mistake == "held":
        x, held = held, batch()
    else:
        x = batch()
    loss = ddp(x).square().mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    ckpt.step_done(step, {"loss": float(loss)})
ckpt.finish()
