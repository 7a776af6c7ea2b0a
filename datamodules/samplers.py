"""Samplers whose order is a pure function of (seed, epoch), so a resumed run replays it exactly."""

from __future__ import annotations

from collections.abc import Iterator, Sized

import torch
from torch.utils.data import Sampler

__all__ = ["EpochShuffleSampler"]


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
