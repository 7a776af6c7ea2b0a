"""Samplers whose order is a pure function of (seed, epoch), so a resumed run replays it exactly."""

from __future__ import annotations

from collections.abc import Iterator, Sized

import torch
from torch.utils.data import DistributedSampler, Sampler

__all__ = ["EpochShuffleSampler", "ShardedEpochShuffleSampler"]


class EpochShuffleSampler(Sampler[int]):
    """A fresh permutation each epoch, drawn from ``seed + epoch``.

    Lightning calls ``set_epoch`` at the start of every epoch, so the order of epoch k is the same
    whether the run went straight through or was resumed from a checkpoint.
    """

    def __init__(self, data: Sized, seed: int = 0, shuffle: bool = True) -> None:
        self.data = data
        self.n = len(data)
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if hasattr(self.data, "set_epoch"):  # per-epoch augmentation (e.g. random video segments)
            self.data.set_epoch(epoch)

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[int]:
        if not self.shuffle:
            return iter(range(self.n))
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())


class ShardedEpochShuffleSampler(DistributedSampler):
    """This rank's share of :class:`EpochShuffleSampler`'s order (``rank::num_replicas``).

    The permutation is the same ``randperm`` drawn from ``seed + epoch``, so with N ranks and a
    per-rank batch of b, the N batches of step k hold exactly the b*N records of a single process's
    step k with batch b*N: a distributed run sees the data a single-process run sees. Being a
    ``DistributedSampler``, Lightning uses it as it is instead of wrapping the loader's sampler.
    """

    def __init__(self, data: Sized, num_replicas: int, rank: int, seed: int = 0, shuffle: bool = True) -> None:
        super().__init__(data, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)
