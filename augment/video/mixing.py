"""Content-replacing augmentations: frames from another clip of the batch, or masked out.

Clip swap makes a negative whose content belongs to a different video (the answer no longer
matches what is shown); frame masking removes evidence, whole frames or patches of every frame.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from augment.video.base import Others, VideoAugmentation, check_fraction, draw_int, to_dtype, to_working

__all__ = ["ClipSwap", "FrameMask", "stack_others"]


def _segment_length(fraction: float, num_frames: int) -> int:
    """``round(fraction * T)`` frames, at least 1 and at most T."""
    return min(num_frames, max(1, round(fraction * num_frames)))


def stack_others(clip: Tensor, others: Others | None, name: str = "clip_swap") -> list[Tensor]:
    """The other clips of the batch as a list of ``(T, C, H, W)`` tensors shaped and typed like ``clip``.

    Args:
        clip: the clip being augmented, ``(T, C, H, W)``.
        others: ``(N, T, C, H, W)``, or a sequence of N ``(T, C, H, W)`` tensors, N >= 1.
        name: the transform's name, for the messages.

    Raises:
        ValueError: no other clip, a 4-D tensor (ambiguous: pass ``(1, T, C, H, W)``), or a shape or
            dtype that differs from ``clip``'s.
    """
    if others is None:
        raise ValueError(f"{name}: needs the other clips of the batch (others=...), got None")
    if isinstance(others, Tensor):
        if others.dim() != 5:
            raise ValueError(
                f"{name}: others must be (N, T, C, H, W) or a sequence of (T, C, H, W) clips, "
                f"got a tensor of shape {tuple(others.shape)}"
            )
        clips = list(others.unbind(0))
    elif isinstance(others, Sequence):
        clips = list(others)
    else:
        raise ValueError(f"{name}: others must be a tensor or a sequence of tensors, got {type(others).__name__}")
    if not clips:
        raise ValueError(f"{name}: needs at least one other clip of the batch, got none")
    for i, other in enumerate(clips):
        if not isinstance(other, Tensor) or other.shape != clip.shape:
            shape = tuple(other.shape) if isinstance(other, Tensor) else type(other).__name__
            raise ValueError(f"{name}: other clip {i} must have the clip's shape {tuple(clip.shape)}, got {shape}")
        if other.dtype != clip.dtype:
            raise ValueError(f"{name}: other clip {i} has dtype {other.dtype}, the clip has {clip.dtype}")
    return clips


class ClipSwap(VideoAugmentation):
    """Replace the clip, or one temporal segment of it, by the same frames of another clip of the batch.

    One other clip is drawn uniformly from ``others``; a contiguous segment of
    ``max(1, round(fraction * T))`` frames starting at a uniform position is copied from it, frame
    ``t`` from frame ``t`` (``fraction=1`` swaps the whole clip). Pass the batch *without* the clip
    itself: an other clip equal to it gives an identical result.

    Args:
        fraction: share of the T frames replaced, in (0, 1].
    """

    name = "clip_swap"
    needs_others = True
    identical_when = "the other clip drawn equals the clip on the swapped segment (e.g. the clip itself)"

    def __init__(self, fraction: float = 1.0) -> None:
        self.fraction = check_fraction("fraction", fraction)

    def apply(self, clip: Tensor, generator: torch.Generator, others: Others | None = None) -> Tensor:
        clips = stack_others(clip, others, self.name)
        other = clips[draw_int(generator, 0, len(clips))]
        num_frames = clip.shape[0]
        length = _segment_length(self.fraction, num_frames)
        start = draw_int(generator, 0, num_frames - length + 1)
        out = clip.clone()
        out[start : start + length] = other[start : start + length].to(clip.device)  # (length, C, H, W)
        return out


class FrameMask(VideoAugmentation):
    """Mask whole frames, or random grid patches of every frame, with a constant or the clip mean.

    ``mode="frames"``: ``max(1, round(fraction * T))`` frames drawn without replacement are filled.
    ``mode="patches"``: each frame is cut into a grid of ``patch_size`` cells (``ceil(H / ph)`` by
    ``ceil(W / pw)``; edge cells are smaller when the sizes do not divide) and
    ``max(1, round(fraction * cells))`` cells, drawn independently per frame, are filled: exactly
    ``fraction`` of the area when the patch size divides H and W and the count is whole.

    Args:
        mode: ``"frames"`` or ``"patches"``.
        fraction: share of the frames (or of each frame's cells) masked, in (0, 1].
        patch_size: cell height and width (an int for square cells), for ``patches``.
        fill: a constant in the clip's units (uint8: 0-255), or ``"mean"`` for the clip's
            per-channel mean over all frames and pixels (rounded for uint8).
    """

    name = "mask"
    identical_when = "the masked frames or patches already hold the fill value"

    def __init__(
        self,
        mode: Literal["frames", "patches"] = "frames",
        fraction: float = 0.25,
        patch_size: int | tuple[int, int] = 4,
        fill: float | Literal["mean"] = 0.0,
    ) -> None:
        if mode not in ("frames", "patches"):
            raise ValueError(f"mode must be 'frames' or 'patches', got {mode!r}")
        self.mode = mode
        self.fraction = check_fraction("fraction", fraction)
        size = (patch_size, patch_size) if isinstance(patch_size, int) else tuple(patch_size)
        if len(size) != 2 or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in size):
            raise ValueError(f"patch_size must be a positive integer or a pair of them, got {patch_size!r}")
        self.patch_size = size
        if fill != "mean" and (isinstance(fill, bool) or not isinstance(fill, int | float) or not math.isfinite(fill)):
            raise ValueError(f"fill must be a finite number or 'mean', got {fill!r}")
        self.fill = fill

    def mask(self, clip_shape: Sequence[int], generator: torch.Generator) -> Tensor:
        """The boolean mask of the pixels to fill, ``(T, 1, H, W)`` on the generator's device.

        Args:
            clip_shape: ``(T, C, H, W)``.
            generator: the only source of randomness.
        """
        num_frames, _, height, width = clip_shape
        device = generator.device
        if self.mode == "frames":
            count = _segment_length(self.fraction, num_frames)
            chosen = torch.randperm(num_frames, generator=generator, device=device)[:count]
            frames = torch.zeros(num_frames, dtype=torch.bool, device=device)
            frames[chosen] = True
            return frames.view(-1, 1, 1, 1).expand(num_frames, 1, height, width)
        ph, pw = self.patch_size
        rows, cols = math.ceil(height / ph), math.ceil(width / pw)
        count = min(rows * cols, max(1, round(self.fraction * rows * cols)))
        # an independent random subset of `count` cells per frame: the smallest keys of uniform noise
        keys = torch.rand(num_frames, rows * cols, generator=generator, device=device)  # (T, cells)
        chosen = keys.argsort(dim=1)[:, :count]
        cells = torch.zeros(num_frames, rows * cols, dtype=torch.bool, device=device)
        cells.scatter_(1, chosen, True)
        cells = cells.view(num_frames, rows, cols)
        pixels = cells.repeat_interleave(ph, dim=1).repeat_interleave(pw, dim=2)  # (T, rows ph, cols pw)
        return pixels[:, None, :height, :width]

    def apply(self, clip: Tensor, generator: torch.Generator, others: Others | None = None) -> Tensor:
        if self.fill == "mean":
            value = to_working(clip).mean(dim=(0, 2, 3), keepdim=True)  # (1, C, 1, 1)
        else:
            if not clip.is_floating_point():
                info = torch.iinfo(clip.dtype)
                if not info.min <= self.fill <= info.max:
                    raise ValueError(f"{self.name}: fill {self.fill!r} is outside the range of {clip.dtype}")
            value = torch.tensor(float(self.fill), dtype=torch.float64, device=clip.device)
        value = to_dtype(value, clip)
        mask = self.mask(clip.shape, generator).to(clip.device)  # (T, 1, H, W), broadcast over C
        return torch.where(mask, value, clip)
