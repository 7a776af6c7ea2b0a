"""Video augmentations: seeded transforms of one clip ``(T, C, H, W)``, tensor in, tensor out.

The negatives of video preference learning (PaMi-VDPO's candidates): temporal ones keep every
frame but break the order or timing (:mod:`~augment.video.temporal`), spatial ones change every
frame alike (:mod:`~augment.video.spatial`, :mod:`~augment.video.color`), and content ones swap in
another clip of the batch or mask frames (:mod:`~augment.video.mixing`). Each takes an explicit
``torch.Generator`` and preserves shape, dtype and device; :mod:`~augment.video.compose` chains
them and builds them by name; :mod:`~augment.video.pami` selects PaMi-VDPO's candidates close to far.
These modules import only torch, so they are usable without ``mmpo``.
"""

from augment.video.base import (
    FrameIndexAugmentation,
    Others,
    VideoAugmentation,
    check_clip,
    clips_identical,
)
from augment.video.color import ColorJitter, hsv_to_rgb, rgb_to_hsv
from augment.video.compose import VIDEO_AUGMENTATIONS, Compose, RandomChoice, build_augmentation
from augment.video.mixing import ClipSwap, FrameMask, stack_others
from augment.video.pami import CandidateSelection, CloseToFar, close_to_far_target, select_candidates
from augment.video.spatial import GaussianBlur, SpatialCrop, gaussian_kernel1d
from augment.video.temporal import FrameDrop, FrameRepeat, Reverse, Shuffle, SpeedChange, StaticClip

__all__: list[str] = [
    "VIDEO_AUGMENTATIONS",
    "CandidateSelection",
    "CloseToFar",
    "close_to_far_target",
    "select_candidates",
    "ClipSwap",
    "ColorJitter",
    "Compose",
    "FrameDrop",
    "FrameIndexAugmentation",
    "FrameMask",
    "FrameRepeat",
    "GaussianBlur",
    "Others",
    "RandomChoice",
    "Reverse",
    "Shuffle",
    "SpatialCrop",
    "SpeedChange",
    "StaticClip",
    "VideoAugmentation",
    "build_augmentation",
    "check_clip",
    "clips_identical",
    "gaussian_kernel1d",
    "hsv_to_rgb",
    "rgb_to_hsv",
    "stack_others",
]
