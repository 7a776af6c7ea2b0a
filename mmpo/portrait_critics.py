"""Critics of talking-portrait clips: lip sync, motion naturalness and visual quality, read from the frames.

The three preference dimensions of TLPO (FantasyTalking2: motion naturalness, lip sync, visual quality),
scored on clips of the synthetic portrait world (`datamodules.worlds.portrait`). The critics never read
ground truth: they measure the face in the pixels.

Measurements (frames ``(T, H, W, 3)``, uint8 or float in [0, 1]):

- *face mask*: pixels whose largest channel difference from the world's background exceeds 30/255;
- *head position*: the mask's centroid (pixels), per frame;
- *mouth opening*: the "darkness mass" of the lower face, the sum over mask pixels below the centroid row
  (mask eroded by one pixel, so the anti-aliased outline is left out) of
  ``clamp((Y_skin − Y) / (Y_skin − Y_mouth), 0, 1)``, with ``Y`` luminance (BT.601), ``Y_skin`` the median
  luminance of that region and ``Y_mouth`` that of the world's mouth colour. Grows with the drawn opening.

Scores, each in [0, 1], higher is better:

- `lip_sync_score`: ``max(0, r)``, r the Pearson correlation over frames between the measured mouth
  opening and the audio envelope (0 when either is constant: a frozen mouth is not in sync);
- `motion_score`: ``(1 − frozen) · exp(−max(0, J − jitter_free) / jitter_scale
  − max(0, Φ − flicker_free) / flicker_scale)``; ``J`` is the mean length of the head track's second
  difference ``‖p[t+1] − 2p[t] + p[t−1]‖`` over the frame side (jitter), ``Φ`` the mean absolute second
  temporal difference of the pixels ``|f[t+1] − 2f[t] + f[t−1]|`` (flicker: noise that changes every
  frame, which leaves the head centroid still), ``frozen`` the share of frame steps whose mean absolute
  pixel change is under ``freeze_tol`` (only steps where the audio is active, envelope > 0.1 at either end,
  when an envelope is given; 0 when no step is active). Tolerances in `MotionSettings`;
- `quality_score`: mean over frames of ``sharpness · structure``; ``sharpness = min(1, v / v_ref)`` with
  ``v`` the variance of the luminance Laplacian over the frame and ``v_ref`` that of the reference face;
  ``structure = max(0, NCC)``, the normalised cross-correlation of the frame's luminance with the reference's
  over the reference face's bounding box (grown by 2 px), after moving the reference onto the frame's head
  position (best of the integer shifts within 1 px of the centroid difference).

`preference_pairs` keeps the pairs one dimension decides: it differs by more than ``margin`` and by more
than each other dimension does. `PortraitCritics` holds the settings as one typed object.

Limits: the critics know the world's background and mouth colours; a face drawn on another background, or a
mouth the colour of the skin, is not measured. Noise that changes every frame lowers motion (flicker) as
well as quality, so the pair rule gives such pairs to whichever of the two drops more.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from datamodules.worlds.portrait_face import BACKGROUND, MOUTH_COLOR

__all__ = [
    "DIMENSIONS",
    "MotionSettings",
    "PortraitCritics",
    "face_mask",
    "lip_sync_score",
    "measure_head",
    "measure_mouth",
    "motion_score",
    "preference_pairs",
    "quality_score",
    "score_clip",
]

DIMENSIONS: tuple[str, ...] = ("lip_sync", "motion", "quality")
_LUMA = torch.tensor([0.299, 0.587, 0.114])
_MASK_TOL = 30 / 255
_ACTIVE = 0.1  # envelope above which the speaker is talking


def _pixels(frames: Tensor | np.ndarray) -> Tensor:
    """Frames as float32 in [0, 1], ``(T, H, W, 3)`` (a single ``(H, W, 3)`` image gets T = 1)."""
    x = frames.detach().cpu() if isinstance(frames, Tensor) else torch.from_numpy(np.array(frames))  # a copy
    x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"frames must be (T, H, W, 3) or (H, W, 3), got {tuple(x.shape)}")
    return x


def _luma(x: Tensor) -> Tensor:
    return x @ _LUMA  # (T, H, W)


def face_mask(frames: Tensor | np.ndarray) -> Tensor:
    """``(T, H, W)`` bool: pixels unlike the background (face, hair, eyes, mouth)."""
    x = _pixels(frames)
    return (x - torch.tensor(BACKGROUND) / 255.0).abs().amax(-1) > _MASK_TOL


def measure_head(frames: Tensor | np.ndarray) -> Tensor:
    """Head position per frame: the face mask's centroid ``(x, y)`` in pixels, ``(T, 2)`` (NaN when no face)."""
    mask = face_mask(frames).float()  # (T, H, W)
    h, w = mask.shape[1:]
    ys, xs = torch.arange(h) + 0.5, torch.arange(w) + 0.5  # pixel centres, as the world's coordinates
    area = mask.sum((1, 2))
    cx = (mask.sum(1) * xs).sum(1) / area
    cy = (mask.sum(2) * ys).sum(1) / area
    return torch.stack([cx, cy], 1)


def measure_mouth(frames: Tensor | np.ndarray) -> Tensor:
    """Mouth opening per frame as the lower face's darkness mass (pixels; see the module doc): ``(T,)``."""
    x = _pixels(frames)
    mask = face_mask(x)
    inner = -F.max_pool2d(-mask[:, None].float(), 3, stride=1, padding=1)[:, 0] > 0.5  # eroded by 1 px
    cy = measure_head(x)[:, 1]  # (T,)
    rows = torch.arange(x.shape[1]) + 0.5
    lower = inner & (rows[None, :, None] > cy[:, None, None])  # (T, H, W)
    y = _luma(x)
    y_mouth = float(torch.tensor(MOUTH_COLOR) / 255.0 @ _LUMA)
    out = torch.zeros(x.shape[0])
    for t in range(x.shape[0]):
        values = y[t][lower[t]]
        if values.numel() == 0:
            continue  # no face: nothing measured
        y_skin = values.median()
        out[t] = ((y_skin - values) / (y_skin - y_mouth).clamp(min=1e-3)).clamp(0.0, 1.0).sum()
    return out


def _pearson(a: Tensor, b: Tensor) -> float:
    a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
    denom = float(a.norm() * b.norm())
    return float((a * b).sum()) / denom if denom > 1e-12 else 0.0


def lip_sync_score(frames: Tensor | np.ndarray, envelope: Tensor | np.ndarray | Sequence[float]) -> float:
    """``max(0, Pearson r)`` between the measured mouth opening and the audio envelope, in [0, 1].

    Args:
        frames: ``(T, H, W, 3)``.
        envelope: ``(T,)`` audio loudness per frame.
    """
    env = torch.as_tensor(np.asarray(envelope, dtype=np.float64))
    mouth = measure_mouth(frames)
    if env.shape != mouth.shape:
        raise ValueError(f"envelope has shape {tuple(env.shape)} but the clip has {mouth.shape[0]} frames")
    return max(0.0, _pearson(mouth, env))


@dataclass(frozen=True)
class MotionSettings:
    """Tolerances of `motion_score` (lengths as fractions of the frame side, pixel values in [0, 1]).

    Args:
        jitter_free: Mean head-track second difference tolerated without penalty (the world's smooth head
            paths stay under it).
        jitter_scale: E-folding excess of that jitter.
        flicker_free: Mean absolute second temporal difference of the pixels tolerated (true clips: under 0.02).
        flicker_scale: E-folding excess of that flicker.
        freeze_tol: A frame step whose mean absolute pixel change is below this is frozen.
    """

    jitter_free: float = 0.01
    jitter_scale: float = 0.02
    flicker_free: float = 0.03
    flicker_scale: float = 0.1
    freeze_tol: float = 1e-3


def motion_score(
    frames: Tensor | np.ndarray,
    envelope: Tensor | np.ndarray | Sequence[float] | None = None,
    settings: MotionSettings | None = None,
) -> float:
    """Motion naturalness in [0, 1]: smooth head motion, no flicker, no frozen steps while talking (module doc).

    Args:
        frames: ``(T, H, W, 3)`` with T >= 2 (the jitter and flicker terms need T >= 3).
        envelope: ``(T,)`` audio loudness; freezing counts only while it is active. None: every step counts.
        settings: Tolerances; `MotionSettings` defaults when None.
    """
    s = settings or MotionSettings()
    x = _pixels(frames)
    if x.shape[0] < 2:
        raise ValueError(f"motion needs at least 2 frames, got {x.shape[0]}")
    change = (x[1:] - x[:-1]).abs().mean((1, 2, 3))  # (T - 1,)
    frozen_steps = change < s.freeze_tol
    if envelope is not None:
        env = torch.as_tensor(np.asarray(envelope, dtype=np.float32))
        if env.shape != (x.shape[0],):
            raise ValueError(f"envelope has shape {tuple(env.shape)} but the clip has {x.shape[0]} frames")
        active = torch.maximum(env[1:], env[:-1]) > _ACTIVE
        frozen = float(frozen_steps[active].float().mean()) if bool(active.any()) else 0.0
    else:
        frozen = float(frozen_steps.float().mean())
    jitter = flicker = 0.0
    if x.shape[0] >= 3:
        flicker = float((x[2:] - 2 * x[1:-1] + x[:-2]).abs().mean())
        head = measure_head(x)  # (T, 2)
        if bool(torch.isfinite(head).all()):
            jitter = float((head[2:] - 2 * head[1:-1] + head[:-2]).norm(dim=1).mean()) / x.shape[2]
    penalty = max(0.0, jitter - s.jitter_free) / s.jitter_scale + max(0.0, flicker - s.flicker_free) / s.flicker_scale
    return (1.0 - frozen) * float(np.exp(-penalty))


def _laplacian_var(y: Tensor) -> Tensor:
    """Variance of the 4-neighbour Laplacian of ``(T, H, W)`` luminance (interior pixels): ``(T,)``."""
    kernel = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]])[None, None]
    return F.conv2d(y[:, None], kernel)[:, 0].flatten(1).var(1)


def quality_score(frames: Tensor | np.ndarray, reference_face: Tensor | np.ndarray) -> float:
    """Visual quality in [0, 1]: mean over frames of sharpness (vs the reference) times structure (module doc).

    Args:
        frames: ``(T, H, W, 3)``.
        reference_face: ``(H, W, 3)``, the identity's reference image.
    """
    x, ref = _pixels(frames), _pixels(reference_face)
    if ref.shape[1:] != x.shape[1:]:
        raise ValueError(f"reference face is {tuple(ref.shape[1:])} but frames are {tuple(x.shape[1:])}")
    y, y_ref = _luma(x), _luma(ref)[0]
    sharp = (_laplacian_var(y) / _laplacian_var(y_ref[None]).clamp(min=1e-8)).clamp(max=1.0)  # (T,)
    ref_mask = face_mask(ref)[0]
    rows, cols = torch.nonzero(ref_mask.any(1))[:, 0], torch.nonzero(ref_mask.any(0))[:, 0]
    if rows.numel() == 0:
        raise ValueError("the reference face has no pixels unlike the background")
    h, w = ref_mask.shape
    y0, y1 = max(0, int(rows[0]) - 2), min(h, int(rows[-1]) + 3)
    x0, x1 = max(0, int(cols[0]) - 2), min(w, int(cols[-1]) + 3)
    offset = measure_head(x) - measure_head(ref)  # (T, 2): where the head moved, in pixels
    structure = torch.zeros(x.shape[0])
    for t in range(x.shape[0]):
        if not bool(torch.isfinite(offset[t]).all()):
            continue  # no face in the frame
        base_x, base_y = round(float(offset[t, 0])), round(float(offset[t, 1]))
        best = -1.0
        for dy in (base_y - 1, base_y, base_y + 1):
            for dx in (base_x - 1, base_x, base_x + 1):
                if not (0 <= y0 + dy and y1 + dy <= h and 0 <= x0 + dx and x1 + dx <= w):
                    continue
                best = max(best, _pearson(y[t, y0 + dy : y1 + dy, x0 + dx : x1 + dx], y_ref[y0:y1, x0:x1]))
        structure[t] = max(0.0, best)
    return float((sharp * structure).mean())


def score_clip(
    frames: Tensor | np.ndarray,
    envelope: Tensor | np.ndarray | Sequence[float],
    reference_face: Tensor | np.ndarray,
    motion: MotionSettings | None = None,
) -> dict[str, float]:
    """All three critics of one clip: ``{"lip_sync", "motion", "quality"}``, each in [0, 1].

    Args:
        frames: ``(T, H, W, 3)``.
        envelope: ``(T,)`` audio loudness per frame.
        reference_face: ``(H, W, 3)``.
        motion: Tolerances of `motion_score`.
    """
    return {
        "lip_sync": lip_sync_score(frames, envelope),
        "motion": motion_score(frames, envelope, motion),
        "quality": quality_score(frames, reference_face),
    }


@dataclass(frozen=True)
class PortraitCritics:
    """The critics and the pair rule with their settings, as one typed object (a YAML config block).

    Args:
        margin: Smallest score difference on the deciding dimension (`preference_pairs`).
        motion: Tolerances of `motion_score`.
    """

    margin: float = 0.05
    motion: MotionSettings = field(default_factory=MotionSettings)

    def score(
        self,
        frames: Tensor | np.ndarray,
        envelope: Tensor | np.ndarray | Sequence[float],
        reference_face: Tensor | np.ndarray,
    ) -> dict[str, float]:
        """`score_clip` with these settings."""
        return score_clip(frames, envelope, reference_face, self.motion)

    def pairs(
        self, scores_a: Sequence[Mapping[str, float]], scores_b: Sequence[Mapping[str, float]], dimension: str
    ) -> list[tuple[int, int]]:
        """`preference_pairs` with this margin."""
        return preference_pairs(scores_a, scores_b, dimension, self.margin)


def preference_pairs(
    scores_a: Sequence[Mapping[str, float]],
    scores_b: Sequence[Mapping[str, float]],
    dimension: str,
    margin: float = 0.05,
) -> list[tuple[int, int]]:
    """Pairs (a[i], b[i]) that ``dimension`` decides, for training that dimension's expert.

    Kept when ``|d| > margin`` and ``|d_o| < |d|`` for every other dimension o (d = a − b on a dimension):
    the pair differs most, and clearly, on this one, so its label teaches this dimension.

    Args:
        scores_a: Scores of the first sample of each pair (`score_clip` dicts).
        scores_b: Scores of the second sample, same length.
        dimension: One of `DIMENSIONS`.
        margin: Smallest difference on ``dimension`` that counts.

    Returns:
        ``[(i, winner), ...]`` with ``winner`` 0 when a[i] is preferred, 1 when b[i] is.
    """
    if dimension not in DIMENSIONS:
        raise ValueError(f"unknown dimension {dimension!r}; expected one of {DIMENSIONS}")
    if len(scores_a) != len(scores_b):
        raise ValueError(f"{len(scores_a)} first samples but {len(scores_b)} second samples")
    kept = []
    for i, (a, b) in enumerate(zip(scores_a, scores_b, strict=True)):
        d = a[dimension] - b[dimension]
        others = [abs(a[o] - b[o]) for o in DIMENSIONS if o != dimension]
        if abs(d) > margin and all(o < abs(d) for o in others):
            kept.append((i, 0 if d > 0 else 1))
    return kept
