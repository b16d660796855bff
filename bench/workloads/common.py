"""What ``ours.py`` and ``plain.py`` share: arguments, data, the step, and what they report.

Each completed step appends ``"<step> <time.time()>\\n"`` to the progress file (rank 0, flushed),
so the harness sees exactly when every step completed. Rank 0 also appends one JSON line per
process start to the phases file (when the script started, finished its imports, joined the
process group, built the model and loaded its checkpoint), and writes the final state's digest
(:func:`bench.core.tensor_digest` of model + optimizer) to the result file at the end. With
``--pace FILE`` every rank holds before each step until the harness allows it (:class:`Pace`).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
from typing import IO, Any

import torch

from bench import core


def parse_args(argv: list[str] | None = None, *, plain: bool = False) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="benchmark workload: 2-rank DDP MLP of a given state size")
    p.add_argument("--size", type=int, required=True, help="model + AdamW state bytes")
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--every", type=int, default=None, help="snapshot/save interval in steps")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--batch", type=int, default=8, help="samples per rank and step")
    p.add_argument("--progress", required=True, help="file each completed step is appended to")
    p.add_argument("--phases", default=None, help="file of per-start timestamps (JSON lines)")
    p.add_argument("--result", default=None, help="JSON file with the final digest")
    p.add_argument("--pace", default=None,
                   help="hold before step K until this file holds a number >= K (the harness's leash)")
    if plain:
        p.add_argument("--ckpt", required=True, help="the checkpoint file (torch.save)")
    args = p.parse_args(argv)
    if args.steps < 1 or args.size < 1 or (args.every is not None and args.every < 1):
        p.error("--size, --steps and --every must be >= 1")
    return args


def hparams(args: argparse.Namespace) -> dict[str, Any]:
    """What must match for a resume to be allowed."""
    return {"size": args.size, "steps": args.steps, "seed": args.seed, "batch": args.batch}


def build(size: int, seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """The model and its AdamW, identical on every rank and in both scripts."""
    model = core.make_model(size, seed=seed)
    return model, core.make_optimizer(model)


def batch(model: torch.nn.Module, *, seed: int, step: int, rank: int, n: int) -> torch.Tensor:
    """Input of ``rank`` at ``step``: a pure function of ``(seed, step, rank)``."""
    width = next(iter(model.parameters())).shape[1]
    g = torch.Generator().manual_seed((seed * 1_000_003 + step) * 64 + rank)
    return torch.randn(n, width, generator=g)


def digest(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> str:
    return core.tensor_digest(core.training_state(model, optimizer))


class Progress:
    """Rank 0's append-only step log; other ranks write nothing."""

    def __init__(self, path: str, enabled: bool) -> None:
        self._file: IO[str] | None = open(path, "a") if enabled else None  # noqa: SIM115

    def step(self, step: int) -> None:
        if self._file is not None:
            self._file.write(f"{step} {time.time():.6f}\n")
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


class Pace:
    """``--pace FILE``: step ``k`` starts only once FILE holds a number >= ``k``.

    The harness writes the step it wants to interrupt the run after (atomically, by rename), so
    the run waits there instead of running on past it or to its end. Every rank reads the file
    itself; a missing or unreadable file allows nothing yet. The number only grows (the harness
    never lowers it), so a value once read is kept. Without a file nothing is held.
    ``release_if``: stop holding when it turns true (ours: a SIGTERM that reached the rank
    itself, which it honours at the next step boundary).
    """

    def __init__(self, path: str | None, *, release_if: Callable[[], bool] | None = None,
                 interval: float = 0.005) -> None:
        self._path = path
        self._release_if = release_if
        self._interval = interval
        self._allowed = 0

    def wait(self, step: int) -> None:
        if self._path is None:
            return
        while self._allowed < step:
            self._allowed = max(self._allowed, read_pace(self._path))
            if self._allowed >= step or (self._release_if is not None and self._release_if()):
                return
            time.sleep(self._interval)


def read_pace(path: str) -> int:
    """The step a paced run may run to; 0 when the file is missing or unreadable."""
    try:
        with open(path) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return 0


def append_json(path: str | None, doc: dict[str, Any]) -> None:
    if path is None:
        return
    with open(path, "a") as f:
        f.write(json.dumps(doc) + "\n")
        f.flush()


def write_json(path: str | None, doc: dict[str, Any]) -> None:
    if path is None:
        return
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f)
    os.replace(tmp, path)
