"""MIA-DPO augmented inputs: one single-image sample plus unrelated companions → a multi-image sample.

Liu et al., "MIA-DPO: Multi-Image Augmented Direct Preference Optimization for Large
Vision-Language Models" (2024). The question and answer of a single-image instruction sample stay;
the input becomes one of three multi-image formats, and the prompt names the target
(:mod:`augment.mia.prompts`):

- ``"sequence"``: 2–5 separate images, the target at a random position.
- ``"grid"``: one collage of 2, 3, 4, 6 or 9 tiles (1×2, 1×3, 2×2, 2×3, 3×3), row-major. Every
  image is fitted, aspect kept, into a white ``tile_size`` square (centred); tiles are ``margin``
  apart and each row has a ``margin``-high band above it holding the labels ``Image{i}``::

      ┌ label band (margin) ─┐        ┌──────────────────────┐
      │ Image1               │ margin │ Image2               │
      ├──────────────────────┤        ├──────────────────────┤
      │ tile 1 (tile_size²)  │        │ tile 2               │
      └──────────────────────┘        └──────────────────────┘

  canvas = (cols·T + (cols−1)·M) × (rows·(T + M)); tile (r, c) at (c·(T+M), r·(T+M) + M).
- ``"pic_in_pic"``: the target fitted into ``scale`` (0.7) × the background's size and pasted at
  the centre of one companion.

Companions come from a pool and are never the target, compared by key (never by pixels). Builders
draw everything from the explicit ``random.Random`` they are given, in a fixed order, so one seed
gives identical images and prompts; optional Gaussian corruption of the target (off by default)
uses a ``torch.Generator`` seeded from that rng and is drawn whether or not it is used, so turning
it on changes pixels only. The second half maps the result to token indices for attention-aware
selection (:mod:`augment.mia.select`).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from augment.mia.prompts import PIC_IN_PIC_PHRASINGS, grid_prompt, pic_in_pic_prompt, sequence_prompt

__all__ = [
    "GRID_LAYOUTS",
    "AugmentedSample",
    "ImagePool",
    "SourceSample",
    "add_gaussian_noise",
    "build_augmented",
    "build_grid",
    "build_pic_in_pic",
    "build_sequence",
    "compose_grid",
    "compose_pic_in_pic",
    "fit_image",
]

Box = tuple[int, int, int, int]  # (x0, y0, x1, y1) in pixels, end-exclusive, PIL order
Format = Literal["sequence", "grid", "pic_in_pic"]

# tiles → (rows, cols)
GRID_LAYOUTS: dict[int, tuple[int, int]] = {2: (1, 2), 3: (1, 3), 4: (2, 2), 6: (2, 3), 9: (3, 3)}
WHITE = (255, 255, 255)
BLACK = (0, 0, 0)


@dataclass(frozen=True)
class SourceSample:
    """One single-image instruction sample.

    Args:
        key: unique id of the image in the pool (path, dataset id); companions are compared to it.
        image: the target image.
        question: the question; its own ``<image>`` placeholders are dropped by the prompt builders.
        answer: the ground-truth answer (MIA-DPO's *chosen* response).
    """

    key: str
    image: Image.Image
    question: str
    answer: str


class ImagePool:
    """Companion images: unique keys plus a loader that is called only for the images drawn.

    Args:
        keys: unique image keys (e.g. relative paths of the source dataset).
        loader: ``key -> PIL.Image``; the caller owns any I/O it does.
    """

    def __init__(self, keys: Sequence[str], loader: Callable[[str], Image.Image]) -> None:
        self.keys = list(keys)
        self._key_set = set(self.keys)
        if len(self._key_set) != len(self.keys):
            raise ValueError("pool keys must be unique")
        self.loader = loader

    @classmethod
    def from_pairs(cls, pairs: Sequence[tuple[str, Image.Image]]) -> ImagePool:
        """A pool over in-memory ``(key, image)`` pairs."""
        images = dict(pairs)
        return cls([key for key, _ in pairs], images.__getitem__)

    def __len__(self) -> int:
        return len(self.keys)

    def draw(self, rng: random.Random, k: int, exclude: str) -> list[tuple[str, Image.Image]]:
        """``k`` distinct companions in random order, none keyed ``exclude``; O(k) draws, not O(pool)."""
        available = len(self.keys) - (exclude in self._key_set)
        if k > available:
            raise ValueError(f"need {k} companions but the pool has only {available} images besides {exclude!r}")
        # k + 1 distinct picks hold at least k non-target keys: the target can be at most one of them.
        picks = rng.sample(range(len(self.keys)), min(k + 1, len(self.keys)))
        keys = [self.keys[i] for i in picks if self.keys[i] != exclude][:k]
        return [(key, self.loader(key)) for key in keys]


PoolLike = ImagePool | Sequence[tuple[str, Image.Image]]  # a pool, or in-memory (key, image) pairs


@dataclass
class AugmentedSample:
    """A multi-image sample built from one :class:`SourceSample`.

    Attributes:
        format: ``"sequence"``, ``"grid"`` or ``"pic_in_pic"``.
        images: RGB images in prompt order (sequence: one per image; grid, pic-in-pic: one canvas).
        prompt: text with one ``<image>`` per entry of ``images``.
        target_index: 0-based target: its position (sequence), its tile (grid), 0 (pic-in-pic).
            It is also the target's group in :func:`augmented_token_groups`.
        geometry: format details: ``noise_std`` always; grid: ``layout`` (rows, cols),
            ``canvas_size``, ``tile_boxes``, ``content_boxes``, ``label_boxes``; pic-in-pic:
            ``canvas_size``, ``box``, ``scale``, ``phrasing``; sequence: ``image_sizes``.
        keys: source image keys, in image/tile order; pic-in-pic: ``[target, background]``. In every
            format ``keys[target_index] == target_key``.
        target_key, question, answer: from the source sample (question as given, uncleaned).
    """

    format: Format
    images: list[Image.Image]
    prompt: str
    target_index: int
    geometry: dict[str, Any]
    keys: list[str]
    target_key: str
    question: str
    answer: str

    @property
    def n_images(self) -> int:
        """The count selection thresholds are keyed by: images, tiles, or 1 for pic-in-pic."""
        return len(self.keys) if self.format != "pic_in_pic" else 1


# --------------------------------------------------------------------------- image operations


def _fit_size(size: tuple[int, int], bound: tuple[int, int]) -> tuple[int, int]:
    """Largest (w, h) with the aspect ratio of ``size`` inside ``bound`` (up- or down-scaling)."""
    (w, h), (bw, bh) = size, bound
    scale = min(bw / w, bh / h)
    return max(1, min(bw, round(w * scale))), max(1, min(bh, round(h * scale)))


def fit_image(image: Image.Image, size: tuple[int, int], fill: tuple[int, int, int] = WHITE) -> tuple[Image.Image, Box]:
    """Resize keeping the aspect ratio to fit ``size`` (w, h), centred on a ``fill`` canvas.

    Returns:
        The (w, h) RGB canvas and the box the resized image occupies in it.
    """
    nw, nh = _fit_size(image.size, size)
    canvas = Image.new("RGB", size, fill)
    x0, y0 = (size[0] - nw) // 2, (size[1] - nh) // 2
    canvas.paste(image.convert("RGB").resize((nw, nh), Image.Resampling.BICUBIC), (x0, y0))
    return canvas, (x0, y0, x0 + nw, y0 + nh)


def add_gaussian_noise(image: Image.Image, std: float, generator: torch.Generator) -> Image.Image:
    """Add N(0, std²) noise per pixel and channel, ``std`` in units of the [0, 1] intensity range.

    The result is clamped to [0, 1] and rounded back to 8 bits.
    """
    if std < 0:
        raise ValueError(f"noise std must be ≥ 0, got {std}")
    pixels = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0)  # (H, W, 3)
    noisy = pixels + std * torch.randn(pixels.shape, generator=generator)
    return Image.fromarray((noisy.clamp(0, 1) * 255).round().to(torch.uint8).numpy())


def compose_grid(
    images: Sequence[Image.Image],
    tile_size: int = 448,
    margin: int = 40,
    font_size: int | None = None,
    square: bool = False,
) -> tuple[Image.Image, dict[str, Any]]:
    """Labelled collage of 2, 3, 4, 6 or 9 images, row-major (layout in the module docstring).

    Args:
        images: the tiles' images, in label order (``Image1`` first).
        tile_size: side of each square tile (the paper uses 448).
        margin: gap between tiles and height of the label band above each row (paper: 40). With 0
            no labels are drawn.
        font_size: label size in pixels; None means ``round(0.7 · margin)``.
        square: pad the collage, centred on white, to a square. A processor that centre-crops
            (llava-hf's CLIPImageProcessor) otherwise cuts the outer tiles of 1×2, 1×3 and 2×3
            collages away; the paper's LLaVA code padded to square itself.

    Returns:
        The RGB canvas and its geometry: ``layout``, ``canvas_size``, ``tile_boxes`` (the squares),
        ``content_boxes`` (where each image's pixels are), ``label_boxes`` (the band above each tile).
    """
    if len(images) not in GRID_LAYOUTS:
        raise ValueError(f"a grid has {sorted(GRID_LAYOUTS)} tiles, got {len(images)}")
    if tile_size < 1 or margin < 0:
        raise ValueError(f"need tile_size ≥ 1 and margin ≥ 0, got {tile_size} and {margin}")
    rows, cols = GRID_LAYOUTS[len(images)]
    step = tile_size + margin
    canvas = Image.new("RGB", (cols * tile_size + (cols - 1) * margin, rows * step), WHITE)
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=font_size or max(1, round(0.7 * margin))) if margin else None
    tile_boxes, content_boxes, label_boxes = [], [], []
    for i, image in enumerate(images):
        r, c = divmod(i, cols)
        x, y = c * step, r * step + margin
        tile, (cx0, cy0, cx1, cy1) = fit_image(image, (tile_size, tile_size))
        canvas.paste(tile, (x, y))
        tile_boxes.append((x, y, x + tile_size, y + tile_size))
        content_boxes.append((x + cx0, y + cy0, x + cx1, y + cy1))
        label_boxes.append((x, y - margin, x + tile_size, y))
        if font is not None:
            draw.text((x + margin // 2, y - margin / 2), f"Image{i + 1}", fill=BLACK, font=font, anchor="lm")
    if square:
        side = max(canvas.size)
        dx, dy = (side - canvas.width) // 2, (side - canvas.height) // 2
        padded = Image.new("RGB", (side, side), WHITE)
        padded.paste(canvas, (dx, dy))
        canvas = padded
        tile_boxes, content_boxes, label_boxes = (
            [(x0 + dx, y0 + dy, x1 + dx, y1 + dy) for x0, y0, x1, y1 in boxes]
            for boxes in (tile_boxes, content_boxes, label_boxes)
        )
    geometry = {
        "layout": (rows, cols),
        "canvas_size": canvas.size,
        "tile_boxes": tile_boxes,
        "content_boxes": content_boxes,
        "label_boxes": label_boxes,
    }
    return canvas, geometry


def compose_pic_in_pic(background: Image.Image, inset: Image.Image, scale: float = 0.7) -> tuple[Image.Image, Box]:
    """Paste ``inset``, fitted (aspect kept) into ``scale`` × the background's size, at its centre.

    Returns:
        The RGB canvas (the background's size) and the pasted box.
    """
    if not 0 < scale <= 1:
        raise ValueError(f"scale must be in (0, 1], got {scale}")
    canvas = background.convert("RGB")  # a copy; the pool's image is left untouched
    width, height = canvas.size
    nw, nh = _fit_size(inset.size, (max(1, round(scale * width)), max(1, round(scale * height))))
    x0, y0 = (width - nw) // 2, (height - nh) // 2
    canvas.paste(inset.convert("RGB").resize((nw, nh), Image.Resampling.BICUBIC), (x0, y0))
    return canvas, (x0, y0, x0 + nw, y0 + nh)


# --------------------------------------------------------------------------- builders


def _pick_count(count: int | Sequence[int], rng: random.Random, what: str, allowed: Callable[[int], bool]) -> int:
    n = count if isinstance(count, int) else rng.choice(list(count))
    if not allowed(n):
        raise ValueError(f"unsupported number of {what}: {n}")
    return n


def _check_rng(rng: random.Random) -> None:
    if not isinstance(rng, random.Random):
        raise TypeError(f"pass an explicit random.Random, got {type(rng).__name__}")


def _as_pool(pool: PoolLike) -> ImagePool:
    return pool if isinstance(pool, ImagePool) else ImagePool.from_pairs(pool)


def _draw_with_target(
    sample: SourceSample, pool: PoolLike, rng: random.Random, n: int
) -> tuple[int, list[tuple[str, Image.Image]], torch.Generator]:
    """Target position, the n entries with the target inserted there, and the noise generator.

    The draw order is fixed (position, companions, noise seed) and the seed is drawn even when no
    noise is added, so switching corruption on changes pixels only.
    """
    target = rng.randrange(n)
    entries = [(key, image.convert("RGB")) for key, image in _as_pool(pool).draw(rng, n - 1, exclude=sample.key)]
    entries.insert(target, (sample.key, sample.image.convert("RGB")))
    return target, entries, torch.Generator().manual_seed(rng.getrandbits(63))


def _result(sample: SourceSample, **fields: Any) -> AugmentedSample:
    return AugmentedSample(**fields, target_key=sample.key, question=sample.question, answer=sample.answer)


def build_sequence(
    sample: SourceSample,
    pool: PoolLike,
    rng: random.Random,
    *,
    num_images: int | Sequence[int] = (2, 3, 4, 5),
    noise_std: float = 0.0,
) -> AugmentedSample:
    """Sequence format: the target among ``num_images − 1`` companions, each its own ``<image>``.

    Args:
        sample: the single-image sample.
        pool: an :class:`ImagePool` or ``(key, image)`` pairs; may contain the target's key.
        rng: the only source of randomness.
        num_images: images in total (≥ 2), or choices drawn uniformly by ``rng`` (paper: 2–5).
        noise_std: Gaussian corruption of the target image ([0, 1] units); 0 leaves it intact.
    """
    _check_rng(rng)
    n = _pick_count(num_images, rng, "sequence images", lambda k: k >= 2)
    target, entries, generator = _draw_with_target(sample, pool, rng, n)
    if noise_std > 0:
        entries[target] = (sample.key, add_gaussian_noise(entries[target][1], noise_std, generator))
    images = [image for _, image in entries]
    return _result(
        sample,
        format="sequence",
        images=images,
        prompt=sequence_prompt(sample.question, n, target),
        target_index=target,
        geometry={"image_sizes": [image.size for image in images], "noise_std": noise_std},
        keys=[key for key, _ in entries],
    )


def build_grid(
    sample: SourceSample,
    pool: PoolLike,
    rng: random.Random,
    *,
    num_tiles: int | Sequence[int] = (2, 3, 4, 6, 9),
    tile_size: int = 448,
    margin: int = 40,
    font_size: int | None = None,
    square: bool = False,
    noise_std: float = 0.0,
) -> AugmentedSample:
    """Grid collage: the target as one labelled tile among companions (see :func:`compose_grid`).

    Args:
        num_tiles: 2, 3, 4, 6 or 9, or choices drawn uniformly by ``rng``.
        tile_size, margin, font_size, square: as in :func:`compose_grid`.
        noise_std: Gaussian corruption of the target tile only (its whole square, padding included).
        sample, pool, rng: as in :func:`build_sequence`.
    """
    _check_rng(rng)
    n = _pick_count(num_tiles, rng, "grid tiles", GRID_LAYOUTS.__contains__)
    target, entries, generator = _draw_with_target(sample, pool, rng, n)
    canvas, geometry = compose_grid([image for _, image in entries], tile_size, margin, font_size, square)
    if noise_std > 0:
        box = geometry["tile_boxes"][target]
        canvas.paste(add_gaussian_noise(canvas.crop(box), noise_std, generator), box[:2])
    return _result(
        sample,
        format="grid",
        images=[canvas],
        prompt=grid_prompt(sample.question, target),
        target_index=target,
        geometry={**geometry, "tile_size": tile_size, "margin": margin, "noise_std": noise_std},
        keys=[key for key, _ in entries],
    )


def build_pic_in_pic(
    sample: SourceSample,
    pool: PoolLike,
    rng: random.Random,
    *,
    scale: float = 0.7,
    phrasings: Sequence[str] = PIC_IN_PIC_PHRASINGS,
    noise_std: float = 0.0,
) -> AugmentedSample:
    """Pic-in-pic: the target pasted at the centre of one companion (see :func:`compose_pic_in_pic`).

    Args:
        scale: the target fits inside ``scale`` × the background's width and height (paper: 0.7).
        phrasings: prompt prefixes, one drawn by ``rng``.
        noise_std: Gaussian corruption of the whole composed image.
        sample, pool, rng: as in :func:`build_sequence`.
    """
    _check_rng(rng)
    if not phrasings:
        raise ValueError("need at least one pic-in-pic phrasing")
    ((background_key, background),) = _as_pool(pool).draw(rng, 1, exclude=sample.key)
    phrasing = rng.choice(list(phrasings))
    generator = torch.Generator().manual_seed(rng.getrandbits(63))
    canvas, box = compose_pic_in_pic(background, sample.image, scale)
    if noise_std > 0:
        canvas = add_gaussian_noise(canvas, noise_std, generator)
    return _result(
        sample,
        format="pic_in_pic",
        images=[canvas],
        prompt=pic_in_pic_prompt(sample.question, phrasing),
        target_index=0,
        geometry={"canvas_size": canvas.size, "box": box, "scale": scale, "phrasing": phrasing, "noise_std": noise_std},
        keys=[sample.key, background_key],
    )


_BUILDERS: dict[str, Callable[..., AugmentedSample]] = {
    "sequence": build_sequence,
    "grid": build_grid,
    "pic_in_pic": build_pic_in_pic,
}


def build_augmented(
    sample: SourceSample,
    pool: PoolLike,
    fmt: Format,
    rng: random.Random,
    **options: Any,
) -> AugmentedSample:
    """Build one augmented sample; ``options`` are the keyword arguments of the format's builder.

    Unknown options raise ``TypeError`` (they go straight to :func:`build_sequence`,
    :func:`build_grid` or :func:`build_pic_in_pic`).
    """
    if fmt not in _BUILDERS:
        raise ValueError(f"unknown MIA-DPO format {fmt!r}; choose one of {sorted(_BUILDERS)}")
    return _BUILDERS[fmt](sample, pool, rng, **options)
