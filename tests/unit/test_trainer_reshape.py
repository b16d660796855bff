"""World-size changes: the loader's global position and trainer.reshape's per-rank rules."""

from __future__ import annotations

import itertools
import random
from collections import Counter
from typing import Any

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

from trainer.data import ResumableDistributedSampler, ResumableLoader
from trainer.errors import StateMismatch
from trainer.reshape import derived_seed, rank_state_for
from trainer.state import capture_rng, restore_rng

pytestmark = pytest.mark.timeout(120)


class Indices(Dataset[int]):
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i


def loaders(n: int, world: int, batch: int, *, drop_last: bool = False, seed: int = 3) -> list[ResumableLoader]:
    return [
        ResumableLoader(
            Indices(n),
            batch_size=batch,
            sampler=ResumableDistributedSampler(
                n, num_replicas=world, rank=r, seed=seed, drop_last=drop_last
            ),
            drop_last=drop_last,
        )
        for r in range(world)
    ]


def take(group: list[ResumableLoader], steps: int) -> list[int]:
    """Every rank draws ``steps`` batches in lock step; the sample indices they saw."""
    seen: list[int] = []
    its = [iter(loader) for loader in group]
    for _ in range(steps):
        for it in its:
            seen += [int(i) for i in next(it)]
    return seen


def finish_epoch(group: list[ResumableLoader]) -> list[int]:
    epoch = group[0].epoch
    seen: list[int] = []
    its = [iter(loader) for loader in group]
    while group[0].batches < group[0].layout_batches and group[0].epoch == epoch:
        for it in its:
            seen += [int(i) for i in next(it)]
    return seen


@pytest.mark.parametrize(
    ("n", "sizes", "global_batch"),
    [(96, (2, 1, 2), 8), (96, (4, 3, 2), 12), (120, (2, 4, 1), 8), (60, (3, 2), 6)],
)
def test_every_sample_once_per_epoch_across_world_size_changes(
    n: int, sizes: tuple[int, ...], global_batch: int
) -> None:
    """2 -> 1 -> 2 (and others) ranks, global batch kept: each sample of the epoch exactly once."""
    seen: list[int] = []
    state: dict[str, Any] | None = None
    steps = [2, 3][: len(sizes) - 1]  # steps taken before each change
    for world, before in itertools.zip_longest(sizes, steps):
        group = loaders(n, world, global_batch // world)
        if state is not None:
            for loader in group:
                loader.load_state_dict(dict(state))
        assert all(loader.epoch == 0 for loader in group)
        if before is None:
            seen += finish_epoch(group)
        else:
            seen += take(group, before)
            state = group[0].state_dict()
            # every rank is at the same global position
            assert {loader.consumed for loader in group} == {sum(1 for _ in seen)}
    assert Counter(seen) == Counter(range(n)), "a sample was skipped or repeated"


def test_same_world_size_restores_the_exact_position() -> None:
    group = loaders(50, 2, 4)
    take(group, 3)
    saved = [loader.state_dict() for loader in group]
    again = loaders(50, 2, 4)
    for loader, s in zip(again, saved, strict=True):
        loader.load_state_dict(s)
    a = take(group, 4)
    b = take(again, 4)
    assert a == b


def test_padding_duplicates_only_at_the_end_of_a_resharded_epoch() -> None:
    """101 samples, 2 -> 3 ranks: every sample at least once; extras only as end padding."""
    n = 101
    group = loaders(n, 2, 5)
    seen = take(group, 4)
    state = group[0].state_dict()
    group = loaders(n, 3, 5)
    for loader in group:
        loader.load_state_dict(dict(state))
    seen += finish_epoch(group)
    counts = Counter(seen)
    assert set(counts) == set(range(n))
    assert sum(counts.values()) - n < 3  # fewer duplicates than ranks (the padding)


def test_a_finished_epoch_starts_the_next_on_another_world_size() -> None:
    group = loaders(40, 2, 4)
    take(group, 5)  # the whole epoch: 20 samples per rank, 5 batches
    state = group[0].state_dict()
    new = loaders(40, 4, 2)
    for loader in new:
        loader.load_state_dict(dict(state))
    assert new[0].epoch == 1 and new[0].base == 0 and new[0].batches == 0


def test_next_epoch_uses_the_ordinary_layout_after_a_change() -> None:
    group = loaders(40, 2, 4)
    take(group, 2)
    state = group[0].state_dict()
    new = loaders(40, 4, 2)
    for loader in new:
        loader.load_state_dict(dict(state))
    assert new[0].base == 16
    finish_epoch(new)
    nxt = take(new, 1)
    fresh = loaders(40, 4, 2)
    for loader in fresh:
        loader.load_state_dict({**loader.state_dict(), "epoch": 1})
    assert nxt == take(fresh, 1)
    assert "base" not in new[0].state_dict() or new[0].state_dict()["base"] == 0


def test_drop_last_skips_only_the_tail() -> None:
    n = 50
    group = loaders(n, 2, 4, drop_last=True)
    seen = take(group, 3)
    state = group[0].state_dict()
    new = loaders(n, 3, 4, drop_last=True)
    for loader in new:
        loader.load_state_dict(dict(state))
    seen += finish_epoch(new)
    counts = Counter(seen)
    assert max(counts.values()) == 1
    assert len(counts) > n - 3 * 4  # at most one short batch per rank dropped


def test_batch_size_must_match_on_the_same_world_size() -> None:
    group = loaders(50, 2, 4)
    state = group[0].state_dict()
    other = loaders(50, 2, 5)[0]
    with pytest.raises(ValueError, match="batch_size"):
        other.load_state_dict(state)


def _ranks(world: int, *, loader: dict[str, Any] | None = None) -> dict[int, dict[str, Any]]:
    out = {}
    for r in range(world):
        torch.manual_seed(100 + r)
        out[r] = {"step": 7, "rng": capture_rng(), "loader": loader}
    return out


def test_rank_state_rules() -> None:
    position = {"epoch": 1, "batches": 3, "batch_size": 4, "seed": 0, "dataset_len": 64, "num_replicas": 2}
    ranks = _ranks(2, loader=position)
    same = rank_state_for(ranks, saved_world_size=2, rank=1, world_size=2, step=7)
    assert same["rng"] is ranks[1]["rng"]
    survivor = rank_state_for(ranks, saved_world_size=2, rank=1, world_size=3, step=7)
    assert torch.equal(survivor["rng"]["torch"], ranks[1]["rng"]["torch"])
    assert survivor["loader"] == position
    newcomer = rank_state_for(ranks, saved_world_size=2, rank=2, world_size=3, step=7)
    again = rank_state_for(ranks, saved_world_size=2, rank=2, world_size=3, step=7)
    other = rank_state_for(ranks, saved_world_size=2, rank=3, world_size=4, step=7)
    assert torch.equal(newcomer["rng"]["torch"], again["rng"]["torch"])  # reproducible
    assert not torch.equal(newcomer["rng"]["torch"], other["rng"]["torch"])
    for existing in ranks.values():
        assert not torch.equal(newcomer["rng"]["torch"], existing["rng"]["torch"])
    # the fresh streams are usable states of every generator
    before = capture_rng()
    try:
        restore_rng(newcomer["rng"])
        a = (random.random(), float(np.random.rand()), float(torch.rand(1)))
        restore_rng(again["rng"])
        assert a == (random.random(), float(np.random.rand()), float(torch.rand(1)))
    finally:
        restore_rng(before)
    assert derived_seed(7, 2, None) != derived_seed(8, 2, None)


def test_rank_state_refusals() -> None:
    position = {"epoch": 0, "batches": 3, "batch_size": 4, "seed": 0, "dataset_len": 64, "num_replicas": 2}
    ranks = _ranks(2, loader=position)
    ranks[1]["loader"] = {**position, "batches": 4}
    with pytest.raises(StateMismatch, match="different loader positions"):
        rank_state_for(ranks, saved_world_size=2, rank=0, world_size=1, step=7)
    ranks = _ranks(2, loader=position)
    ranks[0]["per_rank"] = {"prefetch": {"x": 1}}
    with pytest.raises(StateMismatch, match="per_rank"):
        rank_state_for(ranks, saved_world_size=2, rank=0, world_size=1, step=7)
    with pytest.raises(StateMismatch, match="lacks"):
        rank_state_for({0: ranks[0]}, saved_world_size=2, rank=0, world_size=1, step=7)
