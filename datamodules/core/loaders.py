"""A stateful training loader that starts an epoch at its first batch, not when it is asked for an iterator."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from typing import Any

from torchdata.stateful_dataloader import StatefulDataLoader

__all__ = ["FirstBatchStatefulDataLoader", "pins_memory"]


class _StartsAtFirstNext(Iterator):
    """An iterator that makes the real one (``make()``) when the first item is asked for."""

    def __init__(self, make: Callable[[], Iterator]) -> None:
        self._make = make
        self._it: Iterator | None = None

    def __next__(self) -> Any:
        if self._it is None:
            self._it = self._make()
        return next(self._it)


class FirstBatchStatefulDataLoader(StatefulDataLoader):
    """torchdata's ``StatefulDataLoader``, whose iterator is made at the first batch.

    With worker processes, making a DataLoader iterator starts (or resets) the workers, which copy the
    dataset as it is then (its epoch, for per-epoch augmentation) and are handed the first
    ``prefetch_factor * num_workers`` batches of indices, drawn from the sampler there and then.
    Lightning asks for the training iterator when it sets up the data; on resuming from a checkpoint
    taken after an epoch's last batch, that is *before* it advances the epoch counter and calls
    ``set_epoch``, so the workers would serve the finished epoch's order again. Deferring the iterator
    to the first ``next`` draws the order and copies the dataset after ``set_epoch``, as in a run that
    never stopped. Positions restored by ``load_state_dict`` apply to that iterator as usual.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        with warnings.catch_warnings():  # torchdata calls its own deprecated torch.set_vital: nothing to act on
            warnings.filterwarnings("ignore", message="'set_vital' is deprecated", category=UserWarning)
            super().__init__(*args, **kwargs)

    def __iter__(self) -> Iterator:
        return _StartsAtFirstNext(lambda: StatefulDataLoader.__iter__(self))


def pins_memory(setting: bool | None, trainer: Any) -> bool:
    """Whether a loader collates into page-locked memory: ``setting``, or when it is None, whether
    ``trainer`` trains on a CUDA device (where pinned batches are copied without blocking)."""
    if setting is not None:
        return setting
    root = getattr(getattr(trainer, "strategy", None), "root_device", None)
    return root is not None and root.type == "cuda"
