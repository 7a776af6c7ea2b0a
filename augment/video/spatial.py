"""Spatial augmentations: every frame is changed the same way, so the motion is kept.

One draw per clip (crop box, blur sigma) applied to all T frames: the clip stays temporally
coherent while its appearance degrades, the "spatial" counterpart of the temporal candidates.
Pixels are computed in float32 and cast back (integer clips rounded and clamped).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from augment.video.base import Others, VideoAugmentation, check_range, draw_int, draw_uniform, to_dtype, to_working

__all__ = ["GaussianBlur", "SpatialCrop", "gaussian_kernel1d"]


class SpatialCrop(VideoAugmentation):
    """Crop one random box (the same for every frame) and resize it back to H × W (zoom in).

    The box keeps the clip's aspect ratio and covers ``scale`` of its area: side lengths
    ``max(1, round(H * sqrt(scale)))`` by ``max(1, round(W * sqrt(scale)))``, placed uniformly. The
    crop is resized back with bilinear interpolation (``align_corners=False``).

    Args:
        scale: area fraction of the box, or a ``(min, max)`` range drawn once per clip, in (0, 1].
    """

    name = "crop"
    identical_when = "the box is the whole frame (scale rounds to 1), or the clip is spatially constant"

    def __init__(self, scale: float | tuple[float, float] = 0.5) -> None:
        lo, hi = check_range("scale", scale, 0.0, 1.0)
        if lo <= 0:
            raise ValueError(f"scale must be in (0, 1], got {scale!r}")
        self.scale = (lo, hi)

    def apply(self, clip: Tensor, generator: torch.Generator, others: Others | None = None) -> Tensor:
        _, _, height, width = clip.shape
        side = math.sqrt(draw_uniform(generator, *self.scale))
        crop_h, crop_w = max(1, round(height * side)), max(1, round(width * side))
        top = draw_int(generator, 0, height - crop_h + 1)
        left = draw_int(generator, 0, width - crop_w + 1)
        if (crop_h, crop_w) == (height, width):
            return clip.clone()
        box = to_working(clip[:, :, top : top + crop_h, left : left + crop_w])  # (T, C, h, w)
        resized = F.interpolate(box, size=(height, width), mode="bilinear", align_corners=False)  # (T, C, H, W)
        return to_dtype(resized, clip)


def gaussian_kernel1d(kernel_size: int, sigma: float, device: torch.device | None = None) -> Tensor:
    """Normalised 1-D Gaussian weights ``(kernel_size,)`` centred on the middle tap, float64.

    Args:
        kernel_size: odd number of taps.
        sigma: standard deviation in pixels, > 0.
        device: where to build the kernel.
    """
    offsets = torch.arange(kernel_size, dtype=torch.float64, device=device) - (kernel_size - 1) / 2
    weights = torch.exp(-(offsets**2) / (2 * sigma**2))
    return weights / weights.sum()


class GaussianBlur(VideoAugmentation):
    """Blur every frame with the same separable Gaussian kernel (replicate padding at the borders).

    Replicate padding keeps a constant clip constant (up to float rounding; exact for uint8).

    Args:
        kernel_size: odd number of taps, at least 3.
        sigma: standard deviation in pixels, or a ``(min, max)`` range drawn once per clip, in
            [0.01, 100].
    """

    name = "blur"
    identical_when = "the clip is spatially constant per frame and channel (or the blur rounds away in uint8)"

    def __init__(self, kernel_size: int = 9, sigma: float | Sequence[float] = (1.0, 3.0)) -> None:
        if isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or kernel_size < 3 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be an odd integer >= 3, got {kernel_size!r}")
        self.kernel_size = kernel_size
        self.sigma = check_range("sigma", sigma, 0.01, 100.0)

    def apply(self, clip: Tensor, generator: torch.Generator, others: Others | None = None) -> Tensor:
        channels = clip.shape[1]
        sigma = draw_uniform(generator, *self.sigma)
        x = to_working(clip)
        kernel = gaussian_kernel1d(self.kernel_size, sigma, device=clip.device).to(x.dtype)
        pad = self.kernel_size // 2
        # one depthwise kernel per channel, the T frames as the batch: (C, 1, k, 1) then (C, 1, 1, k)
        vertical = kernel.view(1, 1, -1, 1).expand(channels, 1, -1, 1)
        horizontal = kernel.view(1, 1, 1, -1).expand(channels, 1, 1, -1)
        x = F.pad(x, (0, 0, pad, pad), mode="replicate")  # (T, C, H + 2 pad, W)
        x = F.conv2d(x, vertical, groups=channels)  # (T, C, H, W)
        x = F.pad(x, (pad, pad, 0, 0), mode="replicate")  # (T, C, H, W + 2 pad)
        x = F.conv2d(x, horizontal, groups=channels)  # (T, C, H, W)
        return to_dtype(x, clip)
