"""trainer.seed_everything: every RNG a script draws from, seeded with ``seed + rank``."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import pytest
import torch

import trainer
from trainer.errors import UsageError
from trainer.seeding import rank_seed


def _draws() -> tuple[float, float, list[float]]:
    return random.random(), float(np.random.rand()), torch.rand(3).tolist()


def test_every_rng_gets_seed_plus_rank() -> None:
    assert trainer.seed_everything(7, rank=3) == 10
    seeded = _draws()
    random.seed(10)
    np.random.seed(10)
    torch.manual_seed(10)
    assert seeded == _draws()


def test_ranks_differ_and_each_rank_is_reproducible() -> None:
    trainer.seed_everything(7, rank=0)
    rank0 = _draws()
    trainer.seed_everything(7, rank=1)
    rank1 = _draws()
    trainer.seed_everything(7, rank=0)
    assert _draws() == rank0
    # every generator differs between ranks, not just one of them
    assert all(a != b for a, b in zip(rank0, rank1, strict=True))


def test_rank_defaults_to_torchruns_rank(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert trainer.seed_everything(5) == 7
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    assert trainer.seed_everything(5) == 5


def test_the_examples_per_rank_seeds_are_unchanged() -> None:
    # examples/*.py seeded torch, random and numpy with seed * 1000 + rank + 1 by hand.
    for seed, rank in [(7, 0), (7, 1), (3, 5)]:
        assert trainer.seed_everything(seed * 1000 + 1, rank=rank) == seed * 1000 + rank + 1


def test_cuda_generators_are_seeded_when_cuda_is_available(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Any] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "manual_seed_all", calls.append)
    trainer.seed_everything(11, rank=1)
    assert calls and set(calls) == {12}


@pytest.mark.parametrize(("seed", "rank"), [(-1, 0), (2**32 - 1, 1), (True, 0), (1.5, 0), (1, -1)])
def test_bad_seeds_are_usage_errors(seed: Any, rank: int) -> None:
    with pytest.raises(UsageError):
        rank_seed(seed, rank)
    with pytest.raises(UsageError):
        trainer.seed_everything(seed, rank=rank)
