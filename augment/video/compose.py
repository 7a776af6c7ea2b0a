"""Combining video augmentations, and building them by name.

:class:`Compose` (in sequence) and :class:`RandomChoice` (one of several) are augmentations
themselves and pass the one generator (and the batch's ``others``) down, so a seeded generator
makes the whole pipeline reproducible. :data:`VIDEO_AUGMENTATIONS` maps each name to its class; a
candidate builder's configuration names augmentations (``"reverse"``, ``"shuffle"`` with
``mode: local``, ...) and :func:`build_augmentation` turns a name and its arguments into a transform.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from augment.video.base import Others, VideoAugmentation
from augment.video.color import ColorJitter
from augment.video.mixing import ClipSwap, FrameMask
from augment.video.spatial import GaussianBlur, SpatialCrop
from augment.video.temporal import FrameDrop, FrameRepeat, Reverse, Shuffle, SpeedChange, StaticClip

__all__ = ["VIDEO_AUGMENTATIONS", "Compose", "RandomChoice", "build_augmentation"]


def _check_transforms(transforms: Sequence[VideoAugmentation]) -> list[VideoAugmentation]:
    items = list(transforms)
    if not items:
        raise ValueError("transforms must hold at least one augmentation, got none")
    for i, item in enumerate(items):
        if not isinstance(item, VideoAugmentation):
            raise ValueError(f"transforms[{i}] must be a VideoAugmentation, got {type(item).__name__}")
    return items


class Compose(VideoAugmentation):
    """Apply several augmentations in order, each to the previous one's output.

    Args:
        transforms: the augmentations, first applied first.
    """

    name = "compose"
    identical_when = "every step returns its input (see each step)"

    def __init__(self, transforms: Sequence[VideoAugmentation]) -> None:
        self.transforms = _check_transforms(transforms)

    @property
    def min_frames(self) -> int:  # type: ignore[override]
        return max(t.min_frames for t in self.transforms)

    @property
    def needs_others(self) -> bool:  # type: ignore[override]
        return any(t.needs_others for t in self.transforms)

    def apply(self, clip: Tensor, generator: torch.Generator, others: Others | None = None) -> Tensor:
        for transform in self.transforms:
            clip = transform(clip, generator, others)
        return clip


class RandomChoice(VideoAugmentation):
    """Apply one augmentation drawn from several, uniformly or with the given probabilities.

    Args:
        transforms: the candidates.
        probabilities: one non-negative weight per candidate (normalised to sum to 1); uniform when
            None.
    """

    name = "random_choice"
    identical_when = "the augmentation drawn returns its input (see each candidate)"

    def __init__(self, transforms: Sequence[VideoAugmentation], probabilities: Sequence[float] | None = None) -> None:
        self.transforms = _check_transforms(transforms)
        if probabilities is None:
            weights = [1.0] * len(self.transforms)
        else:
            weights = list(probabilities)
            if len(weights) != len(self.transforms):
                raise ValueError(
                    f"probabilities must have one entry per transform ({len(self.transforms)}), got {probabilities!r}"
                )
            if any(
                isinstance(w, bool) or not isinstance(w, int | float) or not math.isfinite(w) or w < 0 for w in weights
            ):
                raise ValueError(f"probabilities must be finite numbers >= 0, got {probabilities!r}")
            if sum(weights) <= 0:
                raise ValueError(f"probabilities must not all be 0, got {probabilities!r}")
        total = float(sum(weights))
        self.probabilities = [float(w) / total for w in weights]

    @property
    def min_frames(self) -> int:  # type: ignore[override]
        # the smallest T some candidate accepts; a shorter-clip candidate drawn still raises
        return min(t.min_frames for t, p in zip(self.transforms, self.probabilities, strict=True) if p > 0)

    @property
    def needs_others(self) -> bool:  # type: ignore[override]
        return any(t.needs_others for t, p in zip(self.transforms, self.probabilities, strict=True) if p > 0)

    def choose(self, generator: torch.Generator) -> int:
        """Draw the index of the candidate to apply (what :meth:`__call__` does first).

        Args:
            generator: the only source of randomness.
        """
        probs = torch.tensor(self.probabilities, dtype=torch.float64, device=generator.device)
        return int(torch.multinomial(probs, 1, generator=generator).item())

    def apply(self, clip: Tensor, generator: torch.Generator, others: Others | None = None) -> Tensor:
        return self.transforms[self.choose(generator)](clip, generator, others)


# --------------------------------------------------------------------------- by name

# The atomic augmentations (Compose and RandomChoice take other augmentations, so they are built in code).
VIDEO_AUGMENTATIONS: dict[str, type[VideoAugmentation]] = {
    cls.name: cls
    for cls in (
        Reverse,
        Shuffle,
        FrameDrop,
        FrameRepeat,
        SpeedChange,
        StaticClip,
        SpatialCrop,
        GaussianBlur,
        ColorJitter,
        ClipSwap,
        FrameMask,
    )
}


def build_augmentation(name: str, **kwargs: Any) -> VideoAugmentation:
    """The augmentation registered as ``name``, built with ``kwargs`` as its ``__init__`` arguments.

    Args:
        name: a key of :data:`VIDEO_AUGMENTATIONS`.
        **kwargs: the class's ``__init__`` arguments (validated there).

    Raises:
        ValueError: an unknown name (the message lists the known ones) or an unknown argument.
    """
    if name not in VIDEO_AUGMENTATIONS:
        raise ValueError(f"unknown video augmentation {name!r}; known: {', '.join(sorted(VIDEO_AUGMENTATIONS))}")
    cls = VIDEO_AUGMENTATIONS[name]
    try:
        return cls(**kwargs)
    except TypeError as error:  # an argument the class does not take
        raise ValueError(f"video augmentation {name!r} ({cls.__name__}): {error}") from error
