"""A programmatic reward for images of the shapes world: how faithfully an image shows its caption.

The world draws flat, unshaded shapes in six palette colours on a grey background, so an image can be
read back exactly: each pixel goes to its nearest palette colour (or the background, or "unknown" when
it is far from all of them), pixels of one colour form 4-connected objects, and each object's shape is
told from its mask (how much of its bounding box it fills, and where its mass sits). A caption names
(colour, shape) pairs; the reward compares the two lists:

- per named object: 0.5 when an object of its colour is in the image, 0.5 more when one of them also
  has its shape;
- minus ``extra_penalty`` per object in the image whose (colour, shape) the caption does not name;
- averaged over the named objects and clipped to [0, 1].

On the world's own renderings the reading is exact (``tests/test_shapes_reward.py`` checks every shape
and colour at 32 and 64 px), so the ground-truth image of a caption scores 1 and an image with the
caption's shapes in other colours scores 0. Generated images are noisier: objects smaller than
``min_pixels`` are ignored as speckle, and a pixel further than ``tolerance`` from every palette colour
is unknown. Everything is plain Python and numpy on (H, W, 3) arrays; no model is involved.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from datamodules.worlds.shapes import BACKGROUND, COLORS, objects_in_text

__all__ = [
    "FoundObject",
    "ImageReward",
    "batch_rewards",
    "caption_reward",
    "classify_shape",
    "find_objects",
    "label_pixels",
]

_PALETTE_NAMES = ("background", *COLORS)
_PALETTE = np.array([BACKGROUND, *COLORS.values()], dtype=np.float32)  # (7, 3)
UNKNOWN = -1


@dataclass(frozen=True)
class FoundObject:
    """One object read back from an image: its colour, shape, bounding box (half-open) and pixel count."""

    color: str
    shape: str
    bbox: tuple[int, int, int, int]
    pixels: int


@dataclass(frozen=True)
class ImageReward:
    """The reward of one image against one caption, and how it was reached."""

    score: float
    named: list[tuple[str, str]]
    found: list[FoundObject]
    color_hits: int
    shape_hits: int
    extras: int
    details: dict = field(default_factory=dict)


def label_pixels(image: Image.Image | np.ndarray, tolerance: float = 60.0) -> np.ndarray:
    """(H, W) int labels: 0 background, 1..6 the colours of ``COLORS`` in order, -1 unknown.

    A pixel takes the nearest palette entry (Euclidean RGB distance) when it is within ``tolerance``.
    """
    rgb = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image, dtype=np.float32)
    if rgb.ndim != 3 or rgb.shape[-1] != 3:
        raise ValueError(f"expected an RGB image (H, W, 3), got shape {rgb.shape}")
    distance = np.linalg.norm(rgb[:, :, None, :] - _PALETTE[None, None], axis=-1)  # (H, W, 7)
    labels = distance.argmin(axis=-1)
    labels[distance.min(axis=-1) > tolerance] = UNKNOWN
    return labels


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """The 4-connected components of a boolean mask, as (N, 2) arrays of (row, column)."""
    seen = np.zeros_like(mask, dtype=bool)
    height, width = mask.shape
    out = []
    for r0, c0 in zip(*np.nonzero(mask), strict=True):
        if seen[r0, c0]:
            continue
        seen[r0, c0] = True
        queue, cells = deque([(r0, c0)]), []
        while queue:
            r, c = queue.popleft()
            cells.append((r, c))
            for rr, cc in ((r - 1, c), (r + 1, c), (r, c - 1), (r, c + 1)):
                if 0 <= rr < height and 0 <= cc < width and mask[rr, cc] and not seen[rr, cc]:
                    seen[rr, cc] = True
                    queue.append((rr, cc))
        out.append(np.array(cells))
    return out


def classify_shape(cells: np.ndarray) -> str:
    """The shape of one object from its pixels (N, 2): square, circle, triangle or diamond.

    Fill of the bounding box tells squares (≈ 1), circles (≈ π/4) and the two half-filling shapes apart;
    a triangle (apex up) has its mass low in its box (centroid at ≈ 2/3 of the height), a diamond in
    the middle.
    """
    rows, cols = cells[:, 0], cells[:, 1]
    top, height = rows.min(), rows.max() - rows.min() + 1
    width = cols.max() - cols.min() + 1
    fill = len(cells) / float(height * width)
    if fill > 0.9:
        return "square"
    if fill > 0.66:
        return "circle"
    centroid = (rows.mean() - top + 0.5) / height
    return "triangle" if centroid > 0.58 else "diamond"


def find_objects(image: Image.Image | np.ndarray, min_pixels: int | None = None, tolerance: float = 60.0) -> list:
    """The objects of an image: one per 4-connected region of one palette colour, left to right.

    Args:
        image: an RGB image of the shapes world (or a generated one).
        min_pixels: smaller regions are speckle and ignored; default (side / 16)², at least 4.
        tolerance: RGB distance within which a pixel takes a palette colour.
    """
    labels = label_pixels(image, tolerance)
    side = min(labels.shape)
    min_pixels = max(4, (side // 16) ** 2) if min_pixels is None else min_pixels
    found = []
    for index, name in enumerate(_PALETTE_NAMES):
        if name == "background":
            continue
        for cells in _components(labels == index):
            if len(cells) < min_pixels:
                continue
            r0, c0 = cells.min(axis=0)
            r1, c1 = cells.max(axis=0) + 1
            found.append(FoundObject(name, classify_shape(cells), (int(c0), int(r0), int(c1), int(r1)), len(cells)))
    return sorted(found, key=lambda o: (o.bbox[0], o.bbox[1]))


def caption_reward(
    image: Image.Image | np.ndarray,
    caption: str,
    extra_penalty: float = 0.25,
    min_pixels: int | None = None,
    tolerance: float = 60.0,
) -> ImageReward:
    """How faithfully ``image`` shows ``caption`` (see the module docstring), in [0, 1].

    Raises:
        ValueError: the caption names no "<colour> <shape>" pair of the world.
    """
    named = sorted(objects_in_text(caption))
    if not named:
        raise ValueError(f"caption {caption!r} names no '<colour> <shape>' object of the shapes world")
    found = find_objects(image, min_pixels, tolerance)
    present = {(o.color, o.shape) for o in found}
    colors = {o.color for o in found}
    color_hits = sum(color in colors for color, _ in named)
    shape_hits = sum(pair in present for pair in named)
    extras = sum((o.color, o.shape) not in set(named) for o in found)
    raw = (0.5 * color_hits + 0.5 * shape_hits - extra_penalty * extras) / len(named)
    return ImageReward(min(1.0, max(0.0, raw)), named, found, color_hits, shape_hits, extras)


def batch_rewards(images: Sequence[Image.Image | np.ndarray], captions: Sequence[str], **kwargs) -> list[float]:
    """``caption_reward(...).score`` for each (image, caption)."""
    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    return [caption_reward(i, c, **kwargs).score for i, c in zip(images, captions, strict=True)]
