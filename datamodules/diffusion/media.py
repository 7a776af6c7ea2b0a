"""What a diffusion record's files become: images resized and cropped, clips of frames, conditioning arrays.

:func:`pair_pixels` resizes a group's images to cover the training size and cuts one crop out of each (the
same offsets for every image of a group). With the datamodule's ``frames: F`` every image path of a record
names a clip (:func:`load_clip_frames`):

- a video file (``.mp4``, ``.avi``, ``.mov``, ``.mkv``, ``.webm``, ``.gif``): F frames at the centres of F equal
  segments of the whole video (decord, :func:`~datamodules.vision_text.video_io.read_video`); a video with fewer
  than F frames is refused, not padded by repeats;
- an image: a film strip of F frames side by side (what the TLPO portrait world writes), cut into F equal
  columns; a strip whose width is not a multiple of F is refused.

Each frame is then resized and cropped like an image (one crop and flip for every frame of a group), so a
group's clips stack to (K, 3, F, H, W). :func:`load_condition` reads a record's conditioning array. Every
failure is a ``BadSampleError`` naming the record and the file.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torchvision.transforms.functional import pil_to_tensor

from datamodules.core.records import BadSampleError
from datamodules.vision_text.collator import load_image

__all__ = ["VIDEO_SUFFIXES", "image_size", "load_clip_frames", "load_condition", "pair_pixels"]

VIDEO_SUFFIXES = frozenset({".mp4", ".avi", ".mov", ".mkv", ".webm", ".gif"})


def image_size(resolution: int | Sequence[int]) -> tuple[int, int]:
    """``(height, width)`` of training images: a square side, or ``[height, width]`` (e.g. a film strip of frames)."""
    size = (resolution, resolution) if isinstance(resolution, int) else tuple(int(r) for r in resolution)
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"resolution must be a positive side or [height, width], got {resolution!r}")
    return size


def pair_pixels(
    images: Sequence[Image.Image],
    resolution: int | Sequence[int],
    crop: tuple[float, float] = (0.5, 0.5),
    flip: bool = False,
) -> Tensor:
    """Resize to cover the target size (bilinear, antialiased), crop it, flip, scale.

    ``resolution`` R is a square R × R (the shorter side resized to R) or ``[height, width]`` (the image
    scaled by the larger of the two ratios, so that it covers both, then cropped). Every image gets the
    same crop, given as relative offsets ``(x, y)`` in [0, 1] of the free space (0.5, 0.5 is the centre
    crop), so images of one size get the same pixels cut out.

    Returns:
        (K, 3, height, width) float in [-1, 1] for K images (a pair: K = 2).
    """
    height, width = image_size(resolution)
    out = []
    for im in images:
        w, h = im.size
        if (w, h) != (width, height) and (h < height or w < width or (h != height and w != width)):
            s = max(height / h, width / w)
            w, h = max(width, round(w * s)), max(height, round(h * s))
            im = im.resize((w, h), Image.Resampling.BILINEAR)
        left, top = round(crop[0] * (w - width)), round(crop[1] * (h - height))
        im = im.crop((left, top, left + width, top + height))
        if flip:
            im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        out.append(pil_to_tensor(im).float() / 127.5 - 1.0)  # uint8 (3, H, W) -> [-1, 1]
    return torch.stack(out)


def load_clip_frames(path: str, frames: int, where: str) -> list[Image.Image]:
    """The ``frames`` RGB frames of the clip at ``path`` (a video file or a film strip), in time order.

    Raises:
        BadSampleError: naming ``where`` and the file: missing or undecodable, a video shorter than
            ``frames``, a strip whose width does not divide into ``frames`` columns.
    """
    if Path(path).suffix.lower() in VIDEO_SUFFIXES:
        from datamodules.vision_text.video_io import read_video

        decoded, _ = read_video(path, frames, "uniform", where=where, min_frames=frames)  # (F, H, W, 3) uint8
        return [Image.fromarray(frame) for frame in decoded.numpy()]
    strip = load_image(path, where)
    width, height = strip.size
    if width % frames:
        raise BadSampleError(
            f"{where}: film strip {path} is {width} px wide, which does not cut into frames={frames} equal columns"
        )
    step = width // frames
    return [strip.crop((i * step, 0, (i + 1) * step, height)) for i in range(frames)]


def load_condition(path: str, where: str) -> Tensor:
    """A record's conditioning tensor: the ``.npy`` array at ``path`` as (c, h, w) float32, or (c, f, h, w) for a
    video model (per latent frame).

    Raises:
        BadSampleError: naming ``where`` and the file, when it is missing, unreadable (pickled objects are
            refused), not 3- or 4-dimensional or not finite.
    """
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise BadSampleError(f"{where}: cannot read condition {path}: {e}") from e
    if array.ndim not in (3, 4) or not np.issubdtype(array.dtype, np.number):
        raise BadSampleError(
            f"{where}: condition {path} must be a (channels, height, width) numeric array, or (channels, frames, "
            f"height, width) for a video model, got {array.dtype} {tuple(array.shape)}"
        )
    tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
    if not bool(torch.isfinite(tensor).all()):
        raise BadSampleError(f"{where}: condition {path} holds NaN or infinite values")
    return tensor
