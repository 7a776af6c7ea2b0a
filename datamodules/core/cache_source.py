"""What a datamodule offers a reference cache: the records of a split, how they are collated, and
every setting that changes a log-prob (the cache's fingerprint covers them all)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from torch.utils.data import Dataset

__all__ = ["CacheableSplit", "ReferenceCacheData"]


@dataclass
class CacheableSplit:
    """One split as a reference cache sees it.

    Attributes:
        dataset: the items in a fixed order (decoded on access, as the training loader decodes them).
        records: the validated records behind the items (dataclasses; every field is fingerprinted,
            and fields named ``*images``/``*videos``/``*media`` by the bytes of their files).
        collator: turns a list of items into a ``PreferenceBatch``, as in training.
        batch_size: groups per reference forward.
        settings: everything besides the records that changes a log-prob: processor and its
            settings, ``max_length``, frame sampling, ...
        noise_free: the items' statistics draw no noise whatever the backbone's settings (a diffusion
            model's recorded sampling steps), so a backbone that draws noise per step can still be cached.
    """

    dataset: Dataset
    records: Sequence[Any]
    collator: Callable[[list[Any]], Any]
    batch_size: int
    settings: dict[str, Any] = field(default_factory=dict)
    noise_free: bool = False


@runtime_checkable
class ReferenceCacheData(Protocol):
    """A datamodule whose splits can be cached (``reference: cached``)."""

    def reference_cache_split(self, split: str) -> CacheableSplit | None:
        """The split as a cache sees it; None when the datamodule has no such split.

        Raises:
            ValueError: the split's log-probs change from epoch to epoch (random frame windows,
                online negatives), so a cache of them would be wrong.
        """
