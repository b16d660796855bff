"""Resumable DDP training of a small GPT-style language model on deterministic synthetic tokens.

Meant for benchmarks and fault tests where the state size matters: ``--size`` picks a preset from
``tiny`` (about 0.1M parameters) to ``1b`` (about 1.0B), and ``--d-model``/``--layers``/``--heads``/
``--vocab``/``--seq-len`` override any of its fields. Sample ``i`` is a function of
``(seed, i)`` only: an arithmetic progression modulo the vocabulary with a random start and
stride and 10% random tokens, so the loss falls while the data needs no download and no disk.

    OMP_NUM_THREADS=1 torchrun --standalone --nproc-per-node 2 examples/synthetic_lm.py \
        --size tiny --steps 100 --checkpoint-dir /tmp/lm

``--fsdp`` shards the model with FSDP2 (``fully_shard`` on every block, then the root) instead
of DDP: snapshots are then sharded, every rank writing its own shards (see the README's
"Sharded snapshots (FSDP2)"). ``--step-delay SECONDS`` sleeps after each step so that external
fault tests can pace a run.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import time
from dataclasses import asdict, dataclass, replace
from typing import Any

import structlog
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset

import trainer
import trainer.distributed

log = structlog.get_logger("examples.synthetic_lm")

DATASET_LEN = 1 << 20


@dataclass(frozen=True, kw_only=True)
class LMConfig:
    """Model shape."""

    vocab: int
    d_model: int
    layers: int
    heads: int
    seq_len: int
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if min(self.vocab, self.d_model, self.layers, self.heads, self.seq_len) < 1:
            raise ValueError("vocab, d_model, layers, heads and seq_len must be >= 1")
        if self.d_model % self.heads:
            raise ValueError(f"d_model {self.d_model} is not a multiple of heads {self.heads}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")


PRESETS: dict[str, LMConfig] = {
    "tiny": LMConfig(vocab=256, d_model=64, layers=2, heads=4, seq_len=64),
    "small": LMConfig(vocab=4096, d_model=256, layers=4, heads=4, seq_len=128),
    "125m": LMConfig(vocab=50304, d_model=768, layers=12, heads=12, seq_len=1024),
    "350m": LMConfig(vocab=50304, d_model=1024, layers=24, heads=16, seq_len=1024),
    "1b": LMConfig(vocab=50304, d_model=2048, layers=18, heads=16, seq_len=1024),
}


class SyntheticTokens(Dataset[torch.Tensor]):
    """``seq_len + 1`` tokens per sample, a pure function of ``(seed, index)``."""

    def __init__(self, *, seed: int, vocab: int, seq_len: int) -> None:
        self.seed = seed
        self.vocab = vocab
        self.seq_len = seq_len

    def __len__(self) -> int:
        return DATASET_LEN

    def __getitem__(self, index: int) -> torch.Tensor:
        g = trainer.sample_generator(self.seed, 0, index)
        n = self.seq_len + 1
        start, stride = torch.randint(0, self.vocab, (2,), generator=g).tolist()
        tokens = (start + stride * torch.arange(n)) % self.vocab
        noise = torch.rand(n, generator=g) < 0.1
        random_tokens = torch.randint(0, self.vocab, (n,), generator=g)
        return torch.where(noise, random_tokens, tokens)


class Block(nn.Module):
    """Pre-norm transformer block: causal self-attention and a 4x GELU MLP."""

    def __init__(self, cfg: LMConfig) -> None:
        super().__init__()
        self.heads = cfg.heads
        self.dropout = cfg.dropout
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.fc = nn.Linear(cfg.d_model, 4 * cfg.d_model)
        self.out = nn.Linear(4 * cfg.d_model, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=2)
        shape = (b, t, self.heads, d // self.heads)
        q, k, v = (z.view(shape).transpose(1, 2) for z in (q, k, v))
        attn = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0
        )
        x = x + self.drop(self.proj(attn.transpose(1, 2).reshape(b, t, d)))
        y: torch.Tensor = x + self.drop(self.out(F.gelu(self.fc(self.ln2(x)))))
        return y


class GPT(nn.Module):
    """Token + learned position embeddings, N blocks, final norm, head tied to the embedding."""

    def __init__(self, cfg: LMConfig) -> None:
        super().__init__()
        self.tok = nn.Embedding(cfg.vocab, cfg.d_model)
        self.pos = nn.Embedding(cfg.seq_len, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.ln = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab, bias=False)
        self.head.weight = self.tok.weight
        for name, p in self.named_parameters():
            if p.dim() == 2:
                std = 0.02 / math.sqrt(2 * cfg.layers) if name.endswith(("proj.weight", "out.weight")) else 0.02
                nn.init.normal_(p, std=std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(idx.shape[1], device=idx.device)
        x = self.drop(self.tok(idx) + self.pos(positions))
        for block in self.blocks:
            x = block(x)
        logits: torch.Tensor = self.head(self.ln(x))
        return logits


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, LMConfig]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=sorted(PRESETS), default="tiny")
    for name in ("d-model", "layers", "heads", "vocab", "seq-len"):
        p.add_argument(f"--{name}", type=int, default=None, help="override the preset")
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--batch-size", type=int, default=8, help="per rank")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--amp", choices=("off", "bf16", "fp16"), default="off")
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--fast-attention", action="store_true",
                   help="CUDA: allow fused attention kernels (faster, not bitwise reproducible)")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--checkpoint-dir", default=None, help="default: ORCH_CHECKPOINT_DIR")
    p.add_argument("--checkpoint-every", type=int, default=None,
                   help="default 50; orchestrator launch --checkpoint-every wins")
    p.add_argument("--fsdp", action="store_true",
                   help="shard with FSDP2 (fully_shard per block and the root) instead of DDP")
    p.add_argument("--step-delay", type=float, default=0.0,
                   help="sleep this many seconds after each step (pacing for fault tests)")
    args = p.parse_args(argv)
    if args.step_delay < 0:
        p.error("--step-delay must be >= 0")
    if args.steps < 1 or args.batch_size < 1 or args.warmup < 1 or args.warmup >= args.steps + 1:
        p.error("--steps, --batch-size and --warmup must be >= 1, warmup <= steps")
    overrides = {
        field: getattr(args, field)
        for field in ("d_model", "layers", "heads", "vocab", "seq_len")
        if getattr(args, field) is not None
    }
    try:
        cfg = replace(PRESETS[args.size], dropout=args.dropout, **overrides)
    except ValueError as exc:
        p.error(str(exc))
    return args, cfg


def main(argv: list[str] | None = None) -> None:
    args, cfg = parse_args(argv)
    if torch.cuda.is_available():
        # cuBLAS is deterministic only with a fixed workspace; must be set before its first use.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    ctx = trainer.init_distributed()
    # The script's own default; `orchestrator launch --checkpoint-every` wins over it.
    every = args.checkpoint_every if args.checkpoint_every is not None else 50
    cuda = ctx.device.type == "cuda"
    torch.use_deterministic_algorithms(True, warn_only=cuda)
    if cuda and not args.fast_attention:
        # The fused attention backward kernels (flash, memory-efficient, cuDNN) accumulate with
        # atomics: runs differ bitwise. The math kernel is deterministic, so resumes are exact.
        torch.backends.cuda.enable_flash_sdp(False)
        torch.backends.cuda.enable_mem_efficient_sdp(False)
        torch.backends.cuda.enable_cudnn_sdp(False)

    torch.manual_seed(args.seed)
    model = GPT(cfg).to(ctx.device)
    n_params = sum(p.numel() for p in model.parameters())
    # Per-rank streams (dropout, ...): python, numpy, torch and CUDA seeded with seed * 1000 + 1 + rank.
    trainer.seed_everything(args.seed * 1000 + 1)

    dataset = SyntheticTokens(seed=args.seed, vocab=cfg.vocab, seq_len=cfg.seq_len)
    sampler = trainer.ResumableDistributedSampler(
        len(dataset), num_replicas=ctx.world_size, rank=ctx.rank, seed=args.seed
    )
    loader = trainer.ResumableLoader(
        dataset, batch_size=args.batch_size, sampler=sampler, num_workers=args.workers, drop_last=True
    )
    ddp: nn.Module
    if args.fsdp:
        if not torch.distributed.is_initialized():
            raise trainer.UsageError("--fsdp needs a process group: run under torchrun or orchestrator launch")
        from torch.distributed.fsdp import fully_shard

        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)
        ddp = model
    else:
        ddp = DistributedDataParallel(model) if ctx.world_size > 1 else model
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.95),
    )
    scheduler = torch.optim.lr_scheduler.SequentialLR(
        optimizer,
        schedulers=[
            torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.1, total_iters=args.warmup),
            torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, args.steps - args.warmup)),
        ],
        milestones=[args.warmup],
    )
    scaler = torch.amp.GradScaler(ctx.device.type, enabled=args.amp == "fp16")
    amp: contextlib.AbstractContextManager[Any] = (
        torch.autocast(ctx.device.type, dtype=torch.bfloat16 if args.amp == "bf16" else torch.float16)
        if args.amp != "off"
        else contextlib.nullcontext()
    )
    state = trainer.TrainingState(
        model=ddp, optimizer=optimizer, scheduler=scheduler, scaler=scaler, loader=loader,
        metadata={"dataset_version": f"synthetic-ap-v1-seed{args.seed}"},
    )
    hparams = {k: v for k, v in vars(args).items()
               if k not in ("checkpoint_dir", "checkpoint_every", "workers", "log_every",
                            "fast_attention", "step_delay")}
    hparams.update(model=asdict(cfg), world_size=ctx.world_size)
    ckpt = trainer.Checkpointer(state, checkpoint_dir=args.checkpoint_dir, every=every, hparams=hparams)
    start = ckpt.resume()
    log.info("train.start", start_step=start, steps=args.steps, params=n_params,
             world_size=ctx.world_size, device=str(ctx.device))

    batches = iter(loader)
    started = time.perf_counter()
    for step in range(start + 1, args.steps + 1):
        tokens = next(batches).to(ctx.device, non_blocking=True)
        with amp:
            logits = ddp(tokens[:, :-1])
            loss = F.cross_entropy(logits.float().reshape(-1, cfg.vocab), tokens[:, 1:].reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()  # type: ignore[no-untyped-call]
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        value = float(loss.detach())
        if step % args.log_every == 0 or step == args.steps:
            elapsed = time.perf_counter() - started
            log.info("train.progress", step=step, loss=round(value, 4),
                     lr=optimizer.param_groups[0]["lr"], steps_per_s=round((step - start) / elapsed, 3))
        ckpt.step_done(step, {"loss": value})
        if args.step_delay:
            time.sleep(args.step_delay)  # pacing for external fault tests, not synchronisation
    ckpt.finish()
    log.info("train.done", steps=args.steps, seconds=round(time.perf_counter() - started, 3),
             digest=ckpt.last_digest)


if __name__ == "__main__":
    trainer.run(main)
