"""Resumable sampler and loader: determinism, DistributedSampler parity, exact mid-epoch resume."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
import torch
from torch.utils.data import Dataset, DistributedSampler

from trainer.data import (
    ResumableDistributedSampler,
    ResumableLoader,
    SampleKey,
    sample_generator,
    sample_seed,
)


class Keyed(Dataset[tuple[int, int, float]]):
    """Returns (epoch, index, per-sample random value) so tests can see what was served."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, key: SampleKey) -> tuple[int, int, float]:
        g = sample_generator(11, key.epoch, key.sample)
        return key.epoch, key.sample, float(torch.rand((), generator=g))


def batches_as_lists(batches: list[Any]) -> list[tuple[list[int], list[int], list[float]]]:
    return [(b[0].tolist(), b[1].tolist(), b[2].tolist()) for b in batches]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("drop_last", [False, True])
@pytest.mark.parametrize("n,world", [(10, 3), (12, 2), (7, 1), (5, 4)])
def test_sampler_matches_torch_distributed_sampler(n: int, world: int, drop_last: bool) -> None:
    for rank in range(world):
        mine = ResumableDistributedSampler(n, num_replicas=world, rank=rank, seed=3, drop_last=drop_last)
        ref: DistributedSampler[Any] = DistributedSampler(
            Keyed(n), num_replicas=world, rank=rank, seed=3, drop_last=drop_last
        )
        for epoch in range(3):
            mine.set_epoch(epoch)
            ref.set_epoch(epoch)
            assert list(mine) == list(ref)
            assert len(mine) == len(ref)


@pytest.mark.timeout(60)
def test_sampler_is_deterministic_and_resumes_mid_epoch() -> None:
    s = ResumableDistributedSampler(50, num_replicas=2, rank=1, seed=9)
    full = s.indices(4)
    assert full == ResumableDistributedSampler(50, num_replicas=2, rank=1, seed=9).indices(4)
    assert full != s.indices(5)
    s.set_epoch(4, start=7)
    assert list(s) == full[7:]
    with pytest.raises(ValueError):
        s.set_epoch(4, start=26)


def consume(loader: ResumableLoader, n: int) -> list[Any]:
    it = iter(loader)
    return [next(it) for _ in range(n)]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("cut", [1, 3, 4, 9])
def test_mid_epoch_resume_repeats_and_skips_nothing(workers: int, cut: int) -> None:
    def make() -> ResumableLoader:
        sampler = ResumableDistributedSampler(37, num_replicas=2, rank=0, seed=5)
        return ResumableLoader(Keyed(37), batch_size=4, sampler=sampler, num_workers=workers,
                               with_epoch=True)

    total = 12  # 19 samples per rank -> 5 batches per epoch: crosses two epoch boundaries
    golden = batches_as_lists(consume(make(), total))
    first = make()
    prefix = batches_as_lists(consume(first, cut))
    saved = first.state_dict()
    resumed = make()
    resumed.load_state_dict(saved)
    suffix = batches_as_lists(consume(resumed, total - cut))
    assert prefix + suffix == golden
    epochs = [b[0][0] for b in golden]
    assert epochs == [0] * 5 + [1] * 5 + [2] * 2


@pytest.mark.timeout(60)
def test_prefetched_batches_are_not_counted() -> None:
    sampler = ResumableDistributedSampler(40, seed=1)
    loader = ResumableLoader(Keyed(40), batch_size=4, sampler=sampler, num_workers=2,
                             with_epoch=True, prefetch_factor=4)
    consume(loader, 2)
    assert loader.state_dict()["batches"] == 2


@pytest.mark.timeout(60)
def test_creating_iterators_does_not_touch_the_global_rng() -> None:
    torch.manual_seed(123)
    before = torch.get_rng_state()
    sampler = ResumableDistributedSampler(20, seed=1)
    loader = ResumableLoader(Keyed(20), batch_size=3, sampler=sampler, with_epoch=True)
    consume(loader, 15)  # crosses epoch boundaries: several DataLoader iterators created
    assert torch.equal(before, torch.get_rng_state())


@pytest.mark.timeout(60)
def test_loader_refuses_a_state_from_another_configuration() -> None:
    sampler = ResumableDistributedSampler(20, seed=1)
    loader = ResumableLoader(Keyed(20), batch_size=3, sampler=sampler, with_epoch=True)
    state = loader.state_dict()
    other = ResumableLoader(Keyed(20), batch_size=4, sampler=sampler, with_epoch=True)
    with pytest.raises(ValueError, match="batch_size"):
        other.load_state_dict(state)
    with pytest.raises(ValueError):
        loader.load_state_dict({**state, "batches": 99})


@pytest.mark.timeout(60)
def test_sample_seed_depends_only_on_seed_epoch_index() -> None:
    seeds = {sample_seed(s, e, i) for s, e, i in itertools.product(range(3), range(3), range(3))}
    assert len(seeds) == 27
    assert sample_seed(1, 2, 3) == sample_seed(1, 2, 3)
    assert 0 <= sample_seed(1, 2, 3) < 2**63


@pytest.mark.timeout(60)
def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError):
        ResumableDistributedSampler(0)
    with pytest.raises(ValueError):
        ResumableDistributedSampler(10, num_replicas=2, rank=2)
    sampler = ResumableDistributedSampler(10)
    with pytest.raises(ValueError):
        ResumableLoader(Keyed(10), batch_size=0, sampler=sampler)
    with pytest.raises(ValueError):
        ResumableLoader(Keyed(10), batch_size=2, sampler=sampler, generator=torch.Generator())
