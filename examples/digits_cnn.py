"""Resumable DDP training of a small CNN on scikit-learn's bundled digits (real data, no download).

The example exercises everything a snapshot must capture: AdamW, a linear-warmup + cosine
schedule (SequentialLR), dropout (so the RNGs matter), AMP (bf16 autocast of the head on CPU,
fp16 autocast with a GradScaler on CUDA), an EMA of the weights, a resumable sampler + DataLoader (``--workers``),
per-sample augmentation derived from ``(seed, epoch, index)``, periodic validation with
keep-best on validation accuracy and an early-stopping counter registered as an extra Stateful.

    OMP_NUM_THREADS=1 torchrun --standalone --nproc-per-node 2 examples/digits_cnn.py \
        --steps 400 --checkpoint-dir /tmp/digits
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import importlib.util
import json
import os
import time
from typing import Any

import numpy as np
import structlog
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import Dataset

import trainer

log = structlog.get_logger("examples.digits_cnn")

DATASET_VERSION = "sklearn-digits-1797-v1"
VAL_SIZE = 297


class Digits(Dataset[tuple[torch.Tensor, ...]]):
    """The digits images (1x8x8 in [0, 1]) with an optional random one-pixel shift."""

    def __init__(
        self, images: torch.Tensor, labels: torch.Tensor, *, seed: int, augment: bool,
        with_index: bool = False,
    ) -> None:
        self.images = images
        self.labels = labels
        self.seed = seed
        self.augment = augment
        #: Also return the sample index (``--record-samples``), as a third batch element.
        self.with_index = with_index

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, key: trainer.SampleKey) -> tuple[torch.Tensor, ...]:
        image = self.images[key.sample]
        if self.augment:
            # Augmentation randomness comes from (seed, epoch, index), never from a worker's RNG,
            # so it is the same whichever worker loads the sample after a resume.
            g = trainer.sample_generator(self.seed, key.epoch, key.sample)
            dx, dy = (int(v) for v in torch.randint(-1, 2, (2,), generator=g))
            image = torch.roll(image, shifts=(dy, dx), dims=(1, 2))
        if self.with_index:
            return image, self.labels[key.sample], torch.tensor(key.sample)
        return image, self.labels[key.sample]


class DigitsCNN(nn.Module):
    """Two conv layers, max-pool, dropout and a two-layer head.

    ``head_dtype`` runs the head under autocast (bf16 on CPU): CPUs without native bf16
    convolutions run the conv trunk several times slower in bf16, so the trunk stays fp32 there.
    """

    def __init__(self, dropout: float, head_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.head_dtype = head_dtype
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.drop = nn.Dropout(dropout)
        self.fc1 = nn.Linear(32 * 4 * 4, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = self.drop(torch.flatten(x, 1))
        head = (
            torch.autocast(x.device.type, dtype=self.head_dtype)
            if self.head_dtype is not None
            else contextlib.nullcontext()
        )
        with head:
            x = self.drop(F.relu(self.fc1(x)))
            logits: torch.Tensor = self.fc2(x).float()
        return logits


class EarlyStopping:
    """Counts evaluations without improvement; a Stateful extra of the training state."""

    def __init__(self, patience: int) -> None:
        self.patience = patience
        self.best = -1.0
        self.bad_evals = 0

    def update(self, metric: float) -> bool:
        """Record an evaluation; True when training should stop."""
        if metric > self.best:
            self.best = metric
            self.bad_evals = 0
        else:
            self.bad_evals += 1
        return self.patience > 0 and self.bad_evals >= self.patience

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "bad_evals": self.bad_evals, "patience": self.patience}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.best = float(state_dict["best"])
        self.bad_evals = int(state_dict["bad_evals"])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--batch-size", type=int, default=32, help="per rank")
    p.add_argument("--global-batch-size", type=int, default=None,
                   help="batch over all ranks, divided by the world size (instead of "
                   "--batch-size): the trajectory then does not depend on the number of ranks, "
                   "so a world-size change keeps every step's samples")
    p.add_argument("--record-samples", metavar="DIR", default=None,
                   help="each rank appends {step, epoch, samples} per completed step to "
                   "DIR/rank-<R>.jsonl (which dataset indices it trained on)")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--dropout", type=float, default=0.2)
    p.add_argument("--ema-decay", type=float, default=0.98)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--patience", type=int, default=0, help="early stopping (0: off)")
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    p.add_argument("--checkpoint-dir", default=None, help="default: ORCH_CHECKPOINT_DIR")
    p.add_argument("--checkpoint-every", type=int, default=None,
                   help="default 25; orchestrator launch --checkpoint-every wins")
    p.add_argument("--no-augment", action="store_true")
    p.add_argument("--step-delay", type=float, default=0.0,
                   help="seconds to idle after each step (tests that kill from outside need time)")
    p.add_argument("--amp", choices=("auto", "off"), default="auto",
                   help="auto: fp16 + GradScaler on CUDA, bf16 head on CPU")
    args = p.parse_args(argv)
    if args.steps < 1 or args.batch_size < 1 or args.eval_every < 1 or args.warmup < 1:
        p.error("--steps, --batch-size, --eval-every and --warmup must be >= 1")
    if args.global_batch_size is not None and args.global_batch_size < 1:
        p.error("--global-batch-size must be >= 1")
    if args.step_delay < 0:
        p.error("--step-delay must be >= 0")
    if args.warmup >= args.steps:
        p.error("--warmup must be smaller than --steps")
    return args


def load_digits_arrays() -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
    """The 1797 digits as (images 8x8, labels), read from scikit-learn's bundled CSV.

    Reading the file directly skips importing scikit-learn (over a second per rank at start-up);
    the bytes are the ones ``sklearn.datasets.load_digits`` parses.
    """
    spec = importlib.util.find_spec("sklearn")
    locations = list(spec.submodule_search_locations or []) if spec else []
    path = os.path.join(locations[0], "datasets", "data", "digits.csv.gz") if locations else ""
    if not os.path.exists(path):
        from sklearn.datasets import load_digits

        bunch = load_digits()
        return np.asarray(bunch.images), np.asarray(bunch.target)
    with gzip.open(path, "rt") as f:
        data = np.loadtxt(f, delimiter=",", dtype=np.float64)
    return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(np.int64)


def load_split(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Train/validation tensors with a split fixed by ``seed``."""
    raw_images, raw_labels = load_digits_arrays()
    images = torch.tensor(raw_images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(raw_labels, dtype=torch.int64)
    order = torch.from_numpy(np.random.default_rng(seed).permutation(len(labels)))
    val, train = order[:VAL_SIZE], order[VAL_SIZE:]
    return images[train], labels[train], images[val], labels[val]


@torch.no_grad()
def evaluate(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    amp: contextlib.AbstractContextManager[Any],
) -> float:
    """Accuracy on the full validation set (same on every rank: no collective needed)."""
    was_training = model.training
    model.eval()
    with amp:
        logits = model(images)
    model.train(was_training)
    return float((logits.argmax(dim=1) == labels).float().mean())


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if torch.cuda.is_available():
        # cuBLAS is deterministic only with a fixed workspace; must be set before its first use.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    # warn_only on CUDA: max-pool backward has no flagged-deterministic kernel there, but with
    # non-overlapping windows each input receives at most one gradient, so it is exact anyway.
    torch.use_deterministic_algorithms(True, warn_only=torch.cuda.is_available())
    ctx = trainer.init_distributed()
    # The script's own default; `orchestrator launch --checkpoint-every` wins over it.
    every = args.checkpoint_every if args.checkpoint_every is not None else 25

    # Same seed on every rank for identical initial weights; per-rank seeds for the rest.
    cuda = ctx.device.type == "cuda"
    use_amp = args.amp == "auto"
    # On CUDA the whole forward runs under fp16 autocast; on CPU only the head, in bf16.
    amp: contextlib.AbstractContextManager[Any] = (
        torch.autocast("cuda", dtype=torch.float16) if cuda and use_amp else contextlib.nullcontext()
    )
    torch.manual_seed(args.seed)
    model = DigitsCNN(args.dropout, torch.bfloat16 if use_amp and not cuda else None).to(ctx.device)
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(args.ema_decay), use_buffers=True)  # type: ignore[no-untyped-call]
    # Per-rank streams (dropout, ...): python, numpy, torch and CUDA seeded with seed * 1000 + 1 + rank.
    trainer.seed_everything(args.seed * 1000 + 1)

    train_x, train_y, val_x, val_y = load_split(args.seed)
    val_x, val_y = val_x.to(ctx.device), val_y.to(ctx.device)
    recording = args.record_samples is not None
    dataset = Digits(
        train_x, train_y, seed=args.seed, augment=not args.no_augment, with_index=recording
    )
    sampler = trainer.ResumableDistributedSampler(
        len(dataset), num_replicas=ctx.world_size, rank=ctx.rank, seed=args.seed
    )
    batch_size = args.batch_size
    if args.global_batch_size is not None:
        # The global batch is kept whatever the world size; the README's World-size changes.
        if args.global_batch_size % ctx.world_size:
            raise trainer.UsageError(
                f"--global-batch-size {args.global_batch_size} is not divisible by the world "
                f"size {ctx.world_size}"
            )
        batch_size = args.global_batch_size // ctx.world_size
    loader = trainer.ResumableLoader(
        dataset, batch_size=batch_size, sampler=sampler, num_workers=args.workers,
        drop_last=True, with_epoch=True,
    )
    samples_log = None
    if recording:
        os.makedirs(args.record_samples, exist_ok=True)
        samples_log = open(  # noqa: SIM115 -- open for the whole run, closed at its end
            os.path.join(args.record_samples, f"rank-{ctx.rank}.jsonl"), "a", encoding="utf-8"
        )

    ddp: nn.Module = DistributedDataParallel(model) if ctx.world_size > 1 else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.SequentialLR(
        optimizer,
        schedulers=[
            torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.1, total_iters=args.warmup),
            torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.steps - args.warmup),
        ],
        milestones=[args.warmup],
    )
    scaler = torch.amp.GradScaler("cuda", enabled=cuda and use_amp)
    stopper = EarlyStopping(args.patience)

    state = trainer.TrainingState(
        model=ddp, optimizer=optimizer, scheduler=scheduler, scaler=scaler, ema=ema,
        loader=loader, extras={"early_stopping": stopper},
        metadata={"dataset_version": DATASET_VERSION},
    )
    # Everything that changes the training trajectory; not where or how often it is saved.
    excluded = ("checkpoint_dir", "checkpoint_every", "workers", "step_delay", "record_samples")
    hparams = {k: v for k, v in vars(args).items() if k not in excluded}
    if args.global_batch_size is None:
        # A per-rank batch makes the global batch, hence the trajectory, depend on it.
        hparams["world_size"] = ctx.world_size
    else:
        del hparams["batch_size"]
    ckpt = trainer.Checkpointer(
        state, checkpoint_dir=args.checkpoint_dir, every=every, hparams=hparams,
        best=trainer.BestPolicy(metric="val_acc", mode="max"),  # also what --keep-best ranks by
    )
    start = ckpt.resume()
    log.info("train.start", start_step=start, steps=args.steps, world_size=ctx.world_size)

    batches = iter(loader)
    started = time.perf_counter()
    step = start
    stop = start > 0 and args.patience > 0 and stopper.bad_evals >= args.patience
    while step < args.steps and not stop:
        step += 1
        batch = next(batches)
        images, labels = batch[0].to(ctx.device), batch[1].to(ctx.device)
        with amp:
            loss = F.cross_entropy(ddp(images), labels)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()  # type: ignore[no-untyped-call]
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        ema.update_parameters(model)
        metrics: dict[str, float] = {"loss": float(loss.detach())}
        if step % args.eval_every == 0 or step == args.steps:
            metrics["val_acc"] = evaluate(ema.module, val_x, val_y, amp)
            stop = stopper.update(metrics["val_acc"])
            log.info("train.eval", step=step, epoch=loader.epoch, loss=round(metrics["loss"], 4),
                     val_acc=metrics["val_acc"], lr=optimizer.param_groups[0]["lr"])
        if samples_log is not None:
            # Before step_done: a preemption ends the process inside it, with this step saved.
            record = {"step": step, "epoch": loader.epoch, "samples": batch[2].tolist()}
            samples_log.write(json.dumps(record) + "\n")
            samples_log.flush()
        ckpt.step_done(step, metrics)
        if args.step_delay:
            time.sleep(args.step_delay)  # pacing for external fault tests, not synchronisation
    ckpt.finish()
    if samples_log is not None:
        samples_log.close()
    log.info("train.done", step=step, seconds=round(time.perf_counter() - started, 3),
             best_val_acc=state.best_metric, digest=ckpt.last_digest)


if __name__ == "__main__":
    trainer.run(main)
