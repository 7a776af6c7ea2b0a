"""MIA-DPO token bookkeeping: which positions of a prompt belong to which image, tile or region.

Attention-aware selection (``augment.mia.select``) compares the attention a generated answer pays to
the target against the attention it pays to the other images. These functions find, in a processed
``input_ids`` sequence, the token positions of each image (sequence format), of the target tile's
block of the patch grid (grid collage), or of the central region (pic-in-pic). The number of tokens
per image and the patch grid come from the processor, never a hard-coded 576.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch

from augment.mia.formats import AugmentedSample

__all__ = [
    "augmented_token_groups",
    "box_to_patch_indices",
    "grid_target_token_indices",
    "image_token_spans",
    "pic_in_pic_token_indices",
]

ResizeMode = Literal["squash", "crop", "pad"]
Ids = Sequence[int] | torch.Tensor


def image_token_spans(
    input_ids: Ids, image_token_id: int, tokens_per_image: int | None = None
) -> list[tuple[int, int]]:
    """``[(start, end)]`` (end-exclusive) of each image's tokens, in order.

    Args:
        input_ids: (T,) token ids with image placeholders already expanded by the processor.
        image_token_id: id of the image token.
        tokens_per_image: when given, runs of image tokens are cut into chunks of this size (two
            images with no text between them) and every span is checked to have it; None makes
            each contiguous run one image.
    """
    ids = input_ids.tolist() if isinstance(input_ids, torch.Tensor) else list(input_ids)
    runs: list[tuple[int, int]] = []
    for i, token in enumerate(ids):
        if token != image_token_id:
            continue
        if runs and runs[-1][1] == i:
            runs[-1] = (runs[-1][0], i + 1)
        else:
            runs.append((i, i + 1))
    if tokens_per_image is None:
        return runs
    spans = []
    for start, end in runs:
        if (end - start) % tokens_per_image:
            raise ValueError(f"a run of {end - start} image tokens at {start} is not a multiple of {tokens_per_image}")
        spans += [(s, s + tokens_per_image) for s in range(start, end, tokens_per_image)]
    return spans


def box_to_patch_indices(
    box: Sequence[float],
    image_size: tuple[int, int],
    patch_grid: tuple[int, int],
    input_size: int,
    resize_mode: ResizeMode = "crop",
    min_coverage: float = 0.5,
) -> list[int]:
    """Row-major patch indices covered by a pixel box once the image is fed to the vision tower.

    The image (``image_size`` = (width, height)) becomes the tower's ``input_size`` square by
    ``resize_mode``: ``"crop"`` (default) resizes the short side to ``input_size`` and centre-crops,
    as CLIPImageProcessor does for the llava-hf checkpoints and mmpo's tiny LLaVA, so parts of a
    wide collage fall outside the crop and map to no patch; ``"squash"`` resizes both sides to
    ``input_size`` (aspect not kept); ``"pad"`` pads to a centred square first, then resizes (the
    original LLaVA-1.5 code's ``image_aspect_ratio="pad"``). The square is cut into ``patch_grid``
    = (rows, cols) patches; a patch is kept when the box covers at least ``min_coverage`` of its
    area (and some of it).
    """
    width, height = image_size
    rows, cols = patch_grid
    if resize_mode == "squash":
        sx, sy, ox, oy = input_size / width, input_size / height, 0.0, 0.0
    elif resize_mode == "crop":
        sx = sy = input_size / min(width, height)
        ox, oy = (width * sx - input_size) / 2, (height * sy - input_size) / 2
    elif resize_mode == "pad":
        side = max(width, height)
        sx = sy = input_size / side
        ox, oy = -((side - width) // 2) * sx, -((side - height) // 2) * sy
    else:
        raise ValueError(f"unknown resize_mode {resize_mode!r}")
    x0, x1 = (min(max(v * sx - ox, 0.0), input_size) for v in (box[0], box[2]))
    y0, y1 = (min(max(v * sy - oy, 0.0), input_size) for v in (box[1], box[3]))
    ph, pw = input_size / rows, input_size / cols
    keep = []
    for i in range(rows):
        dy = min(y1, (i + 1) * ph) - max(y0, i * ph)
        for j in range(cols):
            dx = min(x1, (j + 1) * pw) - max(x0, j * pw)
            coverage = max(dy, 0.0) * max(dx, 0.0) / (ph * pw)
            if coverage > 0 and coverage >= min_coverage - 1e-9:
                keep.append(i * cols + j)
    return keep


def _patch_map_start(
    input_ids: Ids,
    image_token_id: int,
    tokens_per_image: int,
    patch_grid: tuple[int, int],
    image_index: int,
) -> int:
    """First token position of image ``image_index``, after checking the patch grid matches the span size."""
    if patch_grid[0] * patch_grid[1] != tokens_per_image:
        raise ValueError(f"patch grid {patch_grid} does not hold {tokens_per_image} tokens per image")
    spans = image_token_spans(input_ids, image_token_id, tokens_per_image)
    if not 0 <= image_index < len(spans):
        raise ValueError(f"image {image_index} requested but input_ids hold {len(spans)} images")
    return spans[image_index][0]


def grid_target_token_indices(
    input_ids: Ids,
    image_token_id: int,
    *,
    box: Sequence[float],
    image_size: tuple[int, int],
    tokens_per_image: int,
    patch_grid: tuple[int, int],
    input_size: int,
    resize_mode: ResizeMode = "crop",
    min_coverage: float = 0.5,
    image_index: int = 0,
) -> list[int]:
    """Token positions of the patches a collage tile covers (sorted).

    Args:
        input_ids: (T,) ids with image tokens expanded.
        image_token_id: id of the image token.
        box: the tile's pixel box in the collage (``geometry["tile_boxes"][k]``, or
            ``content_boxes`` to leave out the white padding).
        image_size: the collage's (width, height).
        tokens_per_image: image tokens per image; must equal rows · cols of ``patch_grid``.
        patch_grid: (rows, cols) of the vision tower's patch map, e.g. (24, 24) for LLaVA-1.5.
        input_size: side of the tower's square input, e.g. 336.
        resize_mode, min_coverage: see :func:`box_to_patch_indices`.
        image_index: which image of ``input_ids`` is the collage.
    """
    start = _patch_map_start(input_ids, image_token_id, tokens_per_image, patch_grid, image_index)
    patches = box_to_patch_indices(box, image_size, patch_grid, input_size, resize_mode, min_coverage)
    return [start + p for p in patches]


def pic_in_pic_token_indices(
    input_ids: Ids,
    image_token_id: int,
    *,
    tokens_per_image: int,
    patch_grid: tuple[int, int],
    scale: float = 0.7,
    inner_grid: tuple[int, int] | None = None,
    box: Sequence[float] | None = None,
    image_size: tuple[int, int] | None = None,
    input_size: int | None = None,
    resize_mode: ResizeMode = "crop",
    min_coverage: float = 0.5,
    image_index: int = 0,
) -> list[int]:
    """Token positions of the pic-in-pic inset (sorted).

    Two regions. Default: the central ``inner_grid`` block of the patch map, ``inner_grid``
    defaulting to ``(floor(scale · rows), floor(scale · cols))`` (24 × 24 at 0.7 → 16 × 16, the
    paper's block), offset ``(rows − inner) // 2``. With ``box`` (the pasted box,
    ``geometry["box"]``), ``image_size`` and ``input_size``: exactly the patches the box covers,
    as in :func:`box_to_patch_indices`. Other arguments as in :func:`grid_target_token_indices`.
    """
    start = _patch_map_start(input_ids, image_token_id, tokens_per_image, patch_grid, image_index)
    rows, cols = patch_grid
    if box is not None:
        if image_size is None or input_size is None:
            raise ValueError("box mode needs image_size and input_size")
        patches = box_to_patch_indices(box, image_size, patch_grid, input_size, resize_mode, min_coverage)
        return [start + p for p in patches]
    inner_rows, inner_cols = inner_grid or (int(scale * rows + 1e-9), int(scale * cols + 1e-9))
    if not (1 <= inner_rows <= rows and 1 <= inner_cols <= cols):
        raise ValueError(f"inner block {inner_rows}×{inner_cols} must fit in {rows}×{cols}")
    top, left = (rows - inner_rows) // 2, (cols - inner_cols) // 2
    return [start + i * cols + j for i in range(top, top + inner_rows) for j in range(left, left + inner_cols)]


def augmented_token_groups(
    sample: AugmentedSample,
    input_ids: Ids,
    image_token_id: int,
    *,
    tokens_per_image: int,
    patch_grid: tuple[int, int],
    input_size: int,
    resize_mode: ResizeMode = "crop",
    min_coverage: float = 0.5,
    pic_in_pic_region: Literal["center", "box"] = "center",
) -> list[list[int]]:
    """Token groups for attention-aware selection; group ``sample.target_index`` is the target.

    sequence: one group per image span. grid: one group per tile square (margins and label bands
    belong to no group). pic-in-pic: ``[inset, rest of the patch map]``, the inset being the
    central block (``"center"``) or the pasted box (``"box"``). Feed them to
    :func:`augment.mia.select.target_attention_ratio`.
    """
    if sample.format == "sequence":
        spans = image_token_spans(input_ids, image_token_id, tokens_per_image)
        if len(spans) != len(sample.images):
            raise ValueError(f"input_ids hold {len(spans)} images, the sample has {len(sample.images)}")
        return [list(range(start, end)) for start, end in spans]
    geometry = sample.geometry
    mapping = {"image_size": geometry["canvas_size"], "input_size": input_size, "resize_mode": resize_mode}
    common = {"tokens_per_image": tokens_per_image, "patch_grid": patch_grid, "min_coverage": min_coverage}
    if sample.format == "grid":
        return [
            grid_target_token_indices(input_ids, image_token_id, box=box, **mapping, **common)
            for box in geometry["tile_boxes"]
        ]
    if pic_in_pic_region == "box":
        inset = pic_in_pic_token_indices(input_ids, image_token_id, box=geometry["box"], **mapping, **common)
    else:
        inset = pic_in_pic_token_indices(input_ids, image_token_id, scale=geometry["scale"], **common)
    start = _patch_map_start(input_ids, image_token_id, tokens_per_image, patch_grid, 0)
    inside = set(inset)
    return [inset, [t for t in range(start, start + tokens_per_image) if t not in inside]]
