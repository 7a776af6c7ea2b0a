"""Temporal augmentations: the frames are kept, their order or count over time changes.

Each is a :class:`~augment.video.base.FrameIndexAugmentation`: output frame ``t`` is input frame
``frame_indices(T)[t]``, so the output holds only input frames and T is kept. They break the
temporal story of a clip while every single frame stays realistic: the negatives that a
temporally blind model cannot tell from the original (PaMi-VDPO's "temporal" candidates).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from augment.video.base import FrameIndexAugmentation, check_fraction, check_range, draw_int, draw_uniform

__all__ = ["FrameDrop", "FrameRepeat", "Reverse", "Shuffle", "SpeedChange", "StaticClip"]


def _count(fraction: float, num_frames: int, most: int) -> int:
    """``round(fraction * T)``, at least 1 and at most ``most``."""
    return min(most, max(1, round(fraction * num_frames)))


def _arange(num_frames: int, generator: torch.Generator) -> Tensor:
    return torch.arange(num_frames, device=generator.device)


class Reverse(FrameIndexAugmentation):
    """Play the clip backwards: output frame ``t`` is input frame ``T - 1 - t``.

    Deterministic (the generator is not read). Identical output for a palindromic clip (a static
    one, or T = 1).
    """

    name = "reverse"
    identical_when = "the clip is a palindrome in time (e.g. static, or T = 1)"

    def frame_indices(self, num_frames: int, generator: torch.Generator) -> Tensor:
        return _arange(num_frames, generator).flip(0)


class Shuffle(FrameIndexAugmentation):
    """Permute the frames: all of them (``full``) or within consecutive windows (``local``).

    The permutation is never the identity: a full permutation drawn as the identity is rotated by
    one frame; a local one drawn as the identity is rotated within its first window. The output
    therefore differs from the input whenever the frames it moves differ (not for a static clip).

    Args:
        mode: ``"full"`` (one permutation of all T frames) or ``"local"`` (frames move only within
            windows ``[0, window), [window, 2 window), ...``; the last window may be shorter).
        window: window length for ``local``, at least 2.
    """

    name = "shuffle"
    min_frames = 2
    identical_when = "the frames swapped are equal to each other (e.g. a static clip)"

    def __init__(self, mode: Literal["full", "local"] = "full", window: int = 4) -> None:
        if mode not in ("full", "local"):
            raise ValueError(f"mode must be 'full' or 'local', got {mode!r}")
        if isinstance(window, bool) or not isinstance(window, int) or window < 2:
            raise ValueError(f"window must be an integer >= 2, got {window!r}")
        self.mode = mode
        self.window = window

    def frame_indices(self, num_frames: int, generator: torch.Generator) -> Tensor:
        identity = _arange(num_frames, generator)
        if self.mode == "full":
            index = torch.randperm(num_frames, generator=generator, device=generator.device)
            return index.roll(1) if torch.equal(index, identity) else index
        index = identity.clone()
        for start in range(0, num_frames, self.window):
            stop = min(start + self.window, num_frames)
            perm = torch.randperm(stop - start, generator=generator, device=generator.device)
            index[start:stop] = start + perm
        if torch.equal(index, identity):  # the first window has >= 2 frames since T >= 2
            stop = min(self.window, num_frames)
            index[:stop] = index[:stop].roll(1)
        return index


class FrameDrop(FrameIndexAugmentation):
    """Drop frames and hold the previous kept frame in their place, so the clip stutters.

    ``max(1, round(fraction * T))`` frames (at most T - 1) are drawn among frames 1..T-1 (frame 0
    is always kept, so every dropped frame has a predecessor); output frame ``t`` is the last kept
    input frame at or before ``t``. Source indices are non-decreasing.

    Args:
        fraction: share of the T frames to drop, in (0, 1).
    """

    name = "frame_drop"
    min_frames = 2
    identical_when = "every dropped frame equals the kept frame before it (e.g. a static clip)"

    def __init__(self, fraction: float = 0.25) -> None:
        self.fraction = check_fraction("fraction", fraction, allow_one=False)

    def frame_indices(self, num_frames: int, generator: torch.Generator) -> Tensor:
        n_drop = _count(self.fraction, num_frames, num_frames - 1)
        dropped = 1 + torch.randperm(num_frames - 1, generator=generator, device=generator.device)[:n_drop]
        kept = torch.ones(num_frames, dtype=torch.bool, device=generator.device)
        kept[dropped] = False
        # last kept index at or before t: a running maximum over (t if kept else 0)
        index = torch.where(kept, _arange(num_frames, generator), 0)
        return index.cummax(0).values


class FrameRepeat(FrameIndexAugmentation):
    """Duplicate some frames; the later frames are pushed back and the last ones fall off the end.

    ``max(1, round(fraction * T))`` frames (at most T - 1) are drawn among frames 0..T-2 (repeating
    frame T-1 would push nothing out) and each is shown ``1 + repeats`` times; the sequence is then
    cut to T frames. Source indices are non-decreasing; the clip ends early and lingers.

    Args:
        fraction: share of the T frames to duplicate, in (0, 1].
        repeats: extra copies of each chosen frame, at least 1.
    """

    name = "frame_repeat"
    min_frames = 2
    identical_when = "each repeated frame equals the frames it pushes along (e.g. a static clip)"

    def __init__(self, fraction: float = 0.25, repeats: int = 1) -> None:
        self.fraction = check_fraction("fraction", fraction)
        if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
            raise ValueError(f"repeats must be an integer >= 1, got {repeats!r}")
        self.repeats = repeats

    def frame_indices(self, num_frames: int, generator: torch.Generator) -> Tensor:
        n_repeat = _count(self.fraction, num_frames, num_frames - 1)
        chosen = torch.randperm(num_frames - 1, generator=generator, device=generator.device)[:n_repeat]
        counts = torch.ones(num_frames, dtype=torch.long, device=generator.device)
        counts[chosen] += self.repeats
        return _arange(num_frames, generator).repeat_interleave(counts)[:num_frames]


class SpeedChange(FrameIndexAugmentation):
    """Resample time by ``factor``: output frame ``t`` is input frame ``floor(t * factor)``.

    ``factor > 1`` plays faster and runs past the last frame: ``mode="wrap"`` loops back to the
    start (index modulo T, e.g. T = 8, factor 2: 0 2 4 6 0 2 4 6); ``mode="clamp"`` freezes on the
    last frame (0 2 4 6 7 7 7 7). ``factor < 1`` plays slower and shows only the first
    ``ceil(T * factor)`` frames, each held about ``1 / factor`` times (factor 0.5: 0 0 1 1 2 2 3 3);
    the clip always starts at frame 0. A ``(min, max)`` factor is drawn once per clip, uniformly.

    Args:
        factor: speed multiplier, or a ``(min, max)`` range, within [0.05, 20].
        mode: ``"wrap"`` or ``"clamp"``: what a fast clip does after its last frame.
    """

    name = "speed"
    identical_when = "the factor is 1, T = 1, or the frames resampled are equal (e.g. a static clip)"

    def __init__(self, factor: float | tuple[float, float] = 2.0, mode: Literal["wrap", "clamp"] = "wrap") -> None:
        self.factor = check_range("factor", factor, 0.05, 20.0)
        if mode not in ("wrap", "clamp"):
            raise ValueError(f"mode must be 'wrap' or 'clamp', got {mode!r}")
        self.mode = mode

    def frame_indices(self, num_frames: int, generator: torch.Generator) -> Tensor:
        factor = draw_uniform(generator, *self.factor)
        # float64 and a small epsilon so that exact products (3 * (1/3)) do not floor one frame short
        position = torch.arange(num_frames, dtype=torch.float64, device=generator.device) * factor
        index = (position + 1e-9).floor().long()
        return index % num_frames if self.mode == "wrap" else index.clamp(max=num_frames - 1)


class StaticClip(FrameIndexAugmentation):
    """Freeze the clip: one uniformly drawn frame repeated T times (all motion removed).

    Identical output when the clip is already static (or T = 1).
    """

    name = "static"
    identical_when = "the clip is already static (or T = 1)"

    def frame_indices(self, num_frames: int, generator: torch.Generator) -> Tensor:
        frame = draw_int(generator, 0, num_frames)
        return torch.full((num_frames,), frame, dtype=torch.long, device=generator.device)
