"""Samplers whose order is a pure function of (seed, epoch), so a resumed run replays it exactly."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sized

import torch
from torch.utils.data import DistributedSampler, Sampler

__all__ = ["EpochShuffleSampler", "ShardedEpochShuffleSampler"]


class EpochShuffleSampler(Sampler[int]):
    """A fresh permutation each epoch, drawn from ``seed + epoch``.

    Lightning calls ``set_epoch`` at the start of every epoch, so the order of epoch k is the same
    whether the run went straight through or was resumed from a checkpoint. On resume Lightning makes
    (and a stateful loader fast-forwards) the iterator *before* ``set_epoch``; ``epoch_source`` (the
    trainer's epoch counter, restored from the checkpoint) gives the right epoch then.
    """

    def __init__(
        self, data: Sized, seed: int = 0, shuffle: bool = True, epoch_source: Callable[[], int] | None = None
    ) -> None:
        self.data = data
        self.n = len(data)
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.epoch_source = epoch_source

    def current_epoch(self) -> int:
        return self.epoch_source() if self.epoch_source is not None else self.epoch

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if hasattr(self.data, "set_epoch"):  # per-epoch augmentation (e.g. random video segments)
            self.data.set_epoch(epoch)

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[int]:
        # A generator: the order is drawn at the first index, not when the iterator is made. Lightning
        # (and a stateful loader) may create the iterator before calling set_epoch on resume.
        if not self.shuffle:
            yield from range(self.n)
            return
        g = torch.Generator().manual_seed(self.seed + self.current_epoch())
        yield from torch.randperm(self.n, generator=g).tolist()


class ShardedEpochShuffleSampler(DistributedSampler):
    """This rank's share of :class:`EpochShuffleSampler`'s order (``rank::num_replicas``), padded like
    ``DistributedSampler``: when the size does not divide by the ranks, the order's first records are
    served again to even the shards out (at most ``num_replicas - 1`` of them an epoch).

    The permutation is the same ``randperm`` drawn from ``seed + epoch``, so with N ranks and a
    per-rank batch of b, the N batches of step k hold exactly the b*N records of a single process's
    step k with batch b*N: a distributed run sees the data a single-process run sees. Being a
    ``DistributedSampler``, Lightning uses it as it is instead of wrapping the loader's sampler.
    """

    def __init__(
        self,
        data: Sized,
        num_replicas: int,
        rank: int,
        seed: int = 0,
        shuffle: bool = True,
        epoch_source: Callable[[], int] | None = None,
    ) -> None:
        super().__init__(data, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)
        self.epoch_source = epoch_source

    def __iter__(self) -> Iterator[int]:
        # lazily, and with the restored epoch, for the same reason as EpochShuffleSampler
        if self.epoch_source is not None:
            self.epoch = self.epoch_source()
        yield from super().__iter__()

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)
