"""Resumable data loading: a deterministic distributed sampler and a batch-counting loader.

:class:`ResumableDistributedSampler` draws the permutation of epoch ``e`` from ``seed + e``
(exactly like ``torch.utils.data.DistributedSampler``: padded to a multiple of the world size,
or truncated with ``drop_last``, then strided across ranks) and can start mid-epoch.
:class:`ResumableLoader` wraps a ``DataLoader`` and counts the batches actually *yielded to the
training loop* (never those prefetched by workers), so a snapshot taken after step ``S`` resumes
at the first batch not consumed: no batch repeated, none skipped, with ``num_workers > 0`` too.

Determinism traps handled here:

* Every ``DataLoader`` gets its own ``generator`` seeded from ``(seed, epoch)``: creating an
  iterator then never draws its base seed from the global torch RNG, so resuming mid-epoch does
  not shift the global RNG stream that dropout and friends use.
* After a resume the assignment of samples to worker processes changes, so worker RNGs must not
  drive per-sample randomness (augmentation). Derive it from ``(seed, epoch, index)`` with
  :func:`sample_seed` / :func:`sample_generator`; pass ``with_epoch=True`` to the loader and the
  dataset receives a :class:`SampleKey` ``(epoch, sample)`` instead of a bare index.
* Epoch rollover happens inside the iterator: iterating a :class:`ResumableLoader` is an endless
  stream of batches whose ``epoch`` advances by itself.

The loader's position is restored with ``load_state_dict`` *before* the first ``next()``.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import torch
from torch.utils.data import DataLoader, Dataset, Sampler


class SampleKey(NamedTuple):
    """What the dataset receives with ``with_epoch=True``: the epoch and the sample index."""

    epoch: int
    sample: int


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed that depends only on ``(seed, epoch, index)``, never on the worker."""
    digest = hashlib.blake2b(f"{seed}:{epoch}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def sample_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """A torch generator for the per-sample randomness of sample ``index`` in ``epoch``."""
    return torch.Generator().manual_seed(sample_seed(seed, epoch, index))


class ResumableDistributedSampler(Sampler[int]):
    """Deterministic per-epoch shard of ``range(dataset_len)`` for one rank, resumable mid-epoch."""

    def __init__(
        self,
        dataset_len: int,
        *,
        num_replicas: int = 1,
        rank: int = 0,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = False,
    ) -> None:
        if dataset_len < 1:
            raise ValueError(f"dataset_len must be >= 1, got {dataset_len}")
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"bad rank {rank} for {num_replicas} replicas")
        if drop_last and dataset_len < num_replicas:
            raise ValueError("drop_last with fewer samples than replicas leaves every rank empty")
        self.dataset_len = dataset_len
        self.num_replicas = num_replicas
        self.rank = rank
        self.seed = seed
        self.shuffle = shuffle
        self.drop_last = drop_last
        if drop_last:
            self.num_samples = dataset_len // num_replicas
        else:
            self.num_samples = math.ceil(dataset_len / num_replicas)
        self.total_size = self.num_samples * num_replicas
        self.epoch = 0
        self.start = 0

    def indices(self, epoch: int) -> list[int]:
        """This rank's full index list for ``epoch``."""
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + epoch)
            order: list[int] = torch.randperm(self.dataset_len, generator=g).tolist()
        else:
            order = list(range(self.dataset_len))
        if self.drop_last:
            order = order[: self.total_size]
        else:
            padding = self.total_size - len(order)
            if padding:
                order += (order * math.ceil(padding / len(order)))[:padding]
        return order[self.rank : self.total_size : self.num_replicas]

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select the epoch and the number of this rank's samples already consumed in it."""
        if epoch < 0 or not 0 <= start <= self.num_samples:
            raise ValueError(f"bad position epoch={epoch} start={start}")
        self.epoch = epoch
        self.start = start

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices(self.epoch)[self.start :])

    def __len__(self) -> int:
        return self.num_samples - self.start


class _KeySampler(Sampler[Any]):
    """Feeds a precomputed index list, optionally as ``SampleKey(epoch, index)``."""

    def __init__(self, indices: Sequence[int], epoch: int, with_epoch: bool) -> None:
        self._indices = indices
        self._epoch = epoch
        self._with_epoch = with_epoch

    def __iter__(self) -> Iterator[Any]:
        if self._with_epoch:
            return (SampleKey(self._epoch, i) for i in self._indices)
        return iter(self._indices)

    def __len__(self) -> int:
        return len(self._indices)


class ResumableLoader:
    """An endless, resumable stream of batches over ``dataset`` sharded by ``sampler``.

    ``state_dict()`` records ``(epoch, batches)``: the batches of the current epoch already
    yielded to the caller. Extra keyword arguments go to ``DataLoader`` (``collate_fn``,
    ``pin_memory``, ``worker_init_fn``, ...), except ``sampler``/``shuffle``/``generator``/
    ``batch_sampler``/``persistent_workers`` which this class owns.
    """

    def __init__(
        self,
        dataset: Dataset[Any],
        *,
        batch_size: int,
        sampler: ResumableDistributedSampler,
        num_workers: int = 0,
        drop_last: bool = False,
        with_epoch: bool = False,
        **dataloader_kwargs: Any,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        owned = {"sampler", "shuffle", "generator", "batch_sampler", "persistent_workers"}
        if owned & dataloader_kwargs.keys():
            raise ValueError(f"ResumableLoader owns these DataLoader arguments: {sorted(owned)}")
        self.dataset = dataset
        self.batch_size = batch_size
        self.sampler = sampler
        self.num_workers = num_workers
        self.drop_last = drop_last
        self.with_epoch = with_epoch
        self._dataloader_kwargs = dataloader_kwargs
        n = sampler.num_samples
        self.batches_per_epoch = n // batch_size if drop_last else math.ceil(n / batch_size)
        if self.batches_per_epoch == 0:
            raise ValueError("an epoch holds no batch on this rank (batch too large for drop_last)")
        self.epoch = 0
        self.batches = 0

    def state_dict(self) -> dict[str, Any]:
        """The position: epoch and batches of it already yielded, plus shape checks."""
        return {
            "epoch": self.epoch,
            "batches": self.batches,
            "batch_size": self.batch_size,
            "seed": self.sampler.seed,
            "dataset_len": self.sampler.dataset_len,
            "num_replicas": self.sampler.num_replicas,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the position; refuse one taken with another batch size, seed or dataset."""
        for key, mine in (
            ("batch_size", self.batch_size),
            ("seed", self.sampler.seed),
            ("dataset_len", self.sampler.dataset_len),
            ("num_replicas", self.sampler.num_replicas),
        ):
            if state_dict.get(key) != mine:
                raise ValueError(
                    f"loader state has {key}={state_dict.get(key)!r}, this loader has {mine!r}"
                )
        epoch, batches = int(state_dict["epoch"]), int(state_dict["batches"])
        if epoch < 0 or not 0 <= batches <= self.batches_per_epoch:
            raise ValueError(f"bad loader position epoch={epoch} batches={batches}")
        self.epoch = epoch
        self.batches = batches

    def _dataloader(self, epoch: int, start_batch: int) -> DataLoader[Any]:
        indices = self.sampler.indices(epoch)[start_batch * self.batch_size :]
        generator = torch.Generator()
        # Own generator: the DataLoader then never draws from the global torch RNG.
        generator.manual_seed(sample_seed(self.sampler.seed, epoch, -1))
        return DataLoader(
            self.dataset,
            batch_size=self.batch_size,
            sampler=_KeySampler(indices, epoch, self.with_epoch),
            num_workers=self.num_workers,
            drop_last=self.drop_last,
            generator=generator,
            **self._dataloader_kwargs,
        )

    def __iter__(self) -> Iterator[Any]:
        while True:
            if self.batches >= self.batches_per_epoch:
                self.epoch += 1
                self.batches = 0
            loader = self._dataloader(self.epoch, self.batches)
            for batch in loader:
                # Count before handing the batch over: a snapshot taken after the step that
                # consumed it must not replay it.
                self.batches += 1
                yield batch
            if self.batches < self.batches_per_epoch:
                raise RuntimeError(
                    f"epoch {self.epoch} ended after {self.batches} of "
                    f"{self.batches_per_epoch} batches"
                )

    def __len__(self) -> int:
        return self.batches_per_epoch

