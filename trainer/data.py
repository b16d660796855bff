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

**World-size changes** (``--allow-world-size-change``). The position is also kept as a *global*
one: the samples of the epoch's permutation consumed by all ranks together. Ranks step in lock
step and the permutation is strided across them, so after ``b`` batches of ``B`` on ``W`` ranks
exactly the first ``b * B * W`` samples of the epoch's order are consumed, whichever rank read
them. A loader restored from a position saved by another number of ranks starts a new *layout*
at that global offset: what is left of the epoch's order is padded (or, with ``drop_last``,
truncated) to a multiple of the new world size and strided across the new ranks, so every
sample of the epoch is seen exactly once across the change (apart from the padding duplicates
that ``DistributedSampler`` adds at the end of every epoch too). The next epoch starts with the
ordinary layout. The batch size may change with the world size (a script that keeps its global
batch by dividing it by the world size); what stays bit-exact and what becomes sample-exact is
written down in the README.
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

    def order(self, epoch: int) -> list[int]:
        """The whole epoch's permutation of ``range(dataset_len)`` (every rank's, unpadded)."""
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + epoch)
            order: list[int] = torch.randperm(self.dataset_len, generator=g).tolist()
        else:
            order = list(range(self.dataset_len))
        return order

    def layout_size(self, base: int = 0) -> int:
        """Samples per rank in the layout that starts at global offset ``base`` of an epoch."""
        left = max(0, self.dataset_len - base)
        return left // self.num_replicas if self.drop_last else math.ceil(left / self.num_replicas)

    def indices(self, epoch: int, base: int = 0) -> list[int]:
        """This rank's index list for ``epoch``, in the layout starting at global offset ``base``.

        ``base=0`` is ``DistributedSampler``'s layout; a larger one is what is left of the
        epoch after a world-size change (see the module docstring).
        """
        if not 0 <= base <= self.dataset_len:
            raise ValueError(f"base {base} outside the epoch of {self.dataset_len} samples")
        order = self.order(epoch)[base:]
        total = self.layout_size(base) * self.num_replicas
        if self.drop_last or not order:
            order = order[:total]
        else:
            padding = total - len(order)
            if padding:
                order += (order * math.ceil(padding / len(order)))[:padding]
        return order[self.rank : total : self.num_replicas]

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
        #: Batches per rank in a whole epoch (the ordinary layout).
        self.batches_per_epoch = self._batches_in(sampler.num_samples)
        if self.batches_per_epoch == 0:
            raise ValueError("an epoch holds no batch on this rank (batch too large for drop_last)")
        self.epoch = 0
        #: Batches yielded in the current layout of the current epoch.
        self.batches = 0
        #: Global offset in the epoch's order where the current layout starts (0 unless this
        #: epoch was resumed on another world size).
        self.base = 0

    def _batches_in(self, samples: int) -> int:
        return samples // self.batch_size if self.drop_last else math.ceil(samples / self.batch_size)

    @property
    def layout_batches(self) -> int:
        """Batches per rank in the current layout of the current epoch."""
        if self.base == 0:
            return self.batches_per_epoch
        return self._batches_in(self.sampler.layout_size(self.base))

    @property
    def consumed(self) -> int:
        """Samples of the current epoch's order consumed by all ranks together (the global
        position; padding duplicates are not counted)."""
        return _saved_position(self.state_dict(), self.sampler, self.drop_last).consumed

    def state_dict(self) -> dict[str, Any]:
        """The position: epoch, layout and batches of it already yielded, plus shape checks."""
        state: dict[str, Any] = {
            "epoch": self.epoch,
            "batches": self.batches,
            "batch_size": self.batch_size,
            "seed": self.sampler.seed,
            "dataset_len": self.sampler.dataset_len,
            "num_replicas": self.sampler.num_replicas,
        }
        if self.base:
            # Only after a world-size change: other states (and their digests) are unchanged.
            state["base"] = self.base
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the position; refuse one taken with another seed or dataset.

        A position saved by another number of ranks (``num_replicas``) continues the epoch
        from its global position in a new layout (see the module docstring); the batch size may
        differ then. With the same number of ranks the batch size must match.
        """
        for key, mine in (("seed", self.sampler.seed), ("dataset_len", self.sampler.dataset_len)):
            if state_dict.get(key) != mine:
                raise ValueError(
                    f"loader state has {key}={state_dict.get(key)!r}, this loader has {mine!r}"
                )
        replicas = state_dict.get("num_replicas")
        if not isinstance(replicas, int) or replicas < 1:
            raise ValueError(f"loader state has num_replicas={replicas!r}")
        if replicas == self.sampler.num_replicas and state_dict.get("batch_size") != self.batch_size:
            raise ValueError(
                f"loader state has batch_size={state_dict.get('batch_size')!r}, this loader has "
                f"{self.batch_size!r}"
            )
        saved = _saved_position(state_dict, self.sampler, self.drop_last)
        if replicas == self.sampler.num_replicas:
            self.epoch, self.base, self.batches = saved.epoch, saved.base, saved.batches
            if not 0 <= self.batches <= self.layout_batches:
                raise ValueError(f"bad loader position epoch={self.epoch} batches={self.batches}")
            return
        # Another world size: continue the epoch at its global position, re-partitioned.
        self.epoch, self.base, self.batches = saved.epoch, saved.consumed, 0
        if self.base >= self.sampler.dataset_len or self.layout_batches == 0:
            self.epoch, self.base = self.epoch + 1, 0

    def _dataloader(self, epoch: int, start_batch: int) -> DataLoader[Any]:
        indices = self.sampler.indices(epoch, self.base)[start_batch * self.batch_size :]
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
            if self.batches >= self.layout_batches:
                self.epoch += 1
                self.batches = 0
                self.base = 0
            loader = self._dataloader(self.epoch, self.batches)
            expected = self.layout_batches
            for batch in loader:
                # Count before handing the batch over: a snapshot taken after the step that
                # consumed it must not replay it.
                self.batches += 1
                yield batch
            if self.batches < expected:
                raise RuntimeError(
                    f"epoch {self.epoch} ended after {self.batches} of {expected} batches"
                )

    def __len__(self) -> int:
        return self.batches_per_epoch



class _Position(NamedTuple):
    epoch: int
    base: int
    batches: int
    consumed: int


def _saved_position(
    state: dict[str, Any], sampler: ResumableDistributedSampler, drop_last: bool
) -> _Position:
    """The position a loader state describes, with its global offset in the epoch's order.

    Computed with the *saved* number of ranks and batch size (the layout that wrote it); the
    sampler's and the loader's ``drop_last`` are the script's, the same on both sides.
    """
    try:
        epoch, batches = int(state["epoch"]), int(state["batches"])
        base, batch_size = int(state.get("base", 0)), int(state["batch_size"])
        replicas = int(state["num_replicas"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"bad loader state: {exc}") from None
    n = sampler.dataset_len
    if epoch < 0 or batches < 0 or batch_size < 1 or replicas < 1 or not 0 <= base <= n:
        raise ValueError(f"bad loader position epoch={epoch} base={base} batches={batches}")
    left = n - base
    per_rank = left // replicas if sampler.drop_last else math.ceil(left / replicas)
    layout_batches = per_rank // batch_size if drop_last else math.ceil(per_rank / batch_size)
    # A finished layout consumed the epoch (a drop_last tail is skipped by design).
    consumed = n if batches >= layout_batches else min(n, base + batches * batch_size * replicas)
    return _Position(epoch=epoch, base=base, batches=batches, consumed=consumed)
