"""Colour jitter of a whole clip: one brightness, contrast, saturation and hue draw for all frames.

The factors follow torchvision's ``ColorJitter``: a strength ``s`` draws a factor uniformly in
``[max(0, 1 - s), 1 + s]`` (brightness, contrast, saturation) and a hue strength ``h`` draws a shift
in ``[-h, h]`` turns of the hue circle. They are applied in a fixed order (brightness, contrast,
saturation, hue), unlike torchvision's random order, so one generator state means one result.

Value range: uint8 clips are [0, 255]; floating clips are taken to be [0, 1] (the range of
``ToTensor``/``ToDtype(scale=True)``) and are clamped to it after each adjustment applied, as
torchvision does. Normalised (mean/std) clips should be jittered before normalisation.
"""

from __future__ import annotations

import torch
from torch import Tensor

from augment.video.base import Others, VideoAugmentation, draw_uniform, to_dtype, to_working

__all__ = ["ColorJitter", "hsv_to_rgb", "rgb_to_hsv"]

# ITU-R 601 luma weights exactly as torchvision's rgb_to_grayscale rounds them, so the results match it
_LUMA = (0.2989, 0.587, 0.114)


def _grayscale(x: Tensor) -> Tensor:
    """``(T, 1, H, W)`` luma of an RGB clip, or the channel mean when C != 3."""
    if x.shape[1] != 3:
        return x.mean(dim=1, keepdim=True)
    r, g, b = x.unbind(1)
    return (_LUMA[0] * r + _LUMA[1] * g + _LUMA[2] * b).unsqueeze(1)


def rgb_to_hsv(x: Tensor) -> Tensor:
    """RGB ``(..., 3, H, W)`` in [0, 1] to HSV with hue, saturation and value in [0, 1].

    Args:
        x: floating RGB images, channels at dim -3.
    """
    r, g, b = x.unbind(-3)
    maxc, minc = x.amax(dim=-3), x.amin(dim=-3)
    delta = maxc - minc
    grey = delta == 0
    # grey pixels have no hue and no saturation: divide by 1 there instead of 0
    saturation = torch.where(grey, 0.0, delta / torch.where(maxc == 0, 1.0, maxc))
    safe = torch.where(grey, 1.0, delta)
    rc, gc, bc = (maxc - r) / safe, (maxc - g) / safe, (maxc - b) / safe
    hue = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    hue = torch.where(grey, 0.0, torch.remainder(hue / 6.0, 1.0))
    return torch.stack((hue, saturation, maxc), dim=-3)


def hsv_to_rgb(x: Tensor) -> Tensor:
    """HSV ``(..., 3, H, W)`` with components in [0, 1] back to RGB in [0, 1].

    Args:
        x: floating HSV images, channels at dim -3.
    """
    h, s, v = x.unbind(-3)
    sector = torch.floor(h * 6.0)
    f = h * 6.0 - sector
    sector = sector.long() % 6
    p = v * (1.0 - s)
    q = v * (1.0 - s * f)
    t = v * (1.0 - s * (1.0 - f))
    # the (r, g, b) of each of the six hue sectors, picked per pixel
    table = torch.stack(
        (
            torch.stack((v, t, p), dim=-3),
            torch.stack((q, v, p), dim=-3),
            torch.stack((p, v, t), dim=-3),
            torch.stack((p, q, v), dim=-3),
            torch.stack((t, p, v), dim=-3),
            torch.stack((v, p, q), dim=-3),
        ),
        dim=0,
    )  # (6, ..., 3, H, W)
    index = sector.unsqueeze(-3).expand_as(table[0]).unsqueeze(0)  # (1, ..., 3, H, W)
    return table.gather(0, index).squeeze(0).clamp(0.0, 1.0)


class ColorJitter(VideoAugmentation):
    """Random brightness, contrast, saturation and hue, drawn once for the clip.

    A strength of 0 skips its adjustment (no draw, no clamp), so all-zero strengths return an exact
    copy. Contrast blends each frame with its own mean luma; saturation blends each pixel with its
    luma; hue rotates the hue in HSV. Saturation and hue need RGB clips (C = 3); brightness and
    contrast work for any C (contrast then uses the channel mean).

    Args:
        brightness: factor range ``[max(0, 1 - b), 1 + b]``, b >= 0.
        contrast: factor range ``[max(0, 1 - c), 1 + c]``, c >= 0.
        saturation: factor range ``[max(0, 1 - s), 1 + s]``, s >= 0.
        hue: shift range ``[-h, h]`` in turns of the hue circle, 0 <= h <= 0.5.
    """

    name = "color_jitter"
    identical_when = "all strengths are 0, the factors drawn are close to 1, or clamping undoes them"

    def __init__(self, brightness: float = 0.4, contrast: float = 0.4, saturation: float = 0.4, hue: float = 0.1):
        for key, value, high in (
            ("brightness", brightness, float("inf")),
            ("contrast", contrast, float("inf")),
            ("saturation", saturation, float("inf")),
            ("hue", hue, 0.5),
        ):
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= high:
                raise ValueError(f"{key} must be a number in [0, {high}], got {value!r}")
        self.brightness = float(brightness)
        self.contrast = float(contrast)
        self.saturation = float(saturation)
        self.hue = float(hue)

    def apply(self, clip: Tensor, generator: torch.Generator, others: Others | None = None) -> Tensor:
        if (self.saturation > 0 or self.hue > 0) and clip.shape[1] != 3:
            raise ValueError(f"{self.name}: saturation and hue need RGB clips (C = 3), got shape {tuple(clip.shape)}")
        scale = 1.0 if clip.is_floating_point() else 255.0
        x = to_working(clip) / scale  # (T, C, H, W) in [0, 1]
        if self.brightness > 0:
            factor = draw_uniform(generator, max(0.0, 1.0 - self.brightness), 1.0 + self.brightness)
            x = (x * factor).clamp(0.0, 1.0)
        if self.contrast > 0:
            factor = draw_uniform(generator, max(0.0, 1.0 - self.contrast), 1.0 + self.contrast)
            mean = _grayscale(x).mean(dim=(1, 2, 3), keepdim=True)  # (T, 1, 1, 1): one mean per frame
            x = (factor * x + (1.0 - factor) * mean).clamp(0.0, 1.0)
        if self.saturation > 0:
            factor = draw_uniform(generator, max(0.0, 1.0 - self.saturation), 1.0 + self.saturation)
            x = (factor * x + (1.0 - factor) * _grayscale(x)).clamp(0.0, 1.0)
        if self.hue > 0:
            shift = draw_uniform(generator, -self.hue, self.hue)
            hsv = rgb_to_hsv(x)
            hue = torch.remainder(hsv[:, 0] + shift, 1.0)
            x = hsv_to_rgb(torch.stack((hue, hsv[:, 1], hsv[:, 2]), dim=1))
        return to_dtype(x * scale, clip)
