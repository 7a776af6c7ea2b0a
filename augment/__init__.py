"""Negative builders and media augmentations (tensor in, tensor out, explicit generators).

One subpackage per method: :mod:`augment.mia` (MIA-DPO multi-image negatives) and :mod:`augment.video`
(video augmentations and PaMi-VDPO's candidate selection). The MIA-DPO names below are re-exported so
that ``from augment import build_augmented`` keeps working; they load on first use, so importing
``augment.video`` does not pull in the MIA builder's dependencies.
"""

import importlib
from typing import Any

__all__: list[str] = [
    "GRID_LAYOUTS",
    "AugmentedSample",
    "ImagePool",
    "SourceSample",
    "add_gaussian_noise",
    "augmented_token_groups",
    "box_to_patch_indices",
    "build_augmented",
    "build_grid",
    "build_pic_in_pic",
    "build_sequence",
    "compose_grid",
    "compose_pic_in_pic",
    "fit_image",
    "grid_target_token_indices",
    "image_token_spans",
    "pic_in_pic_token_indices",
    "PIC_IN_PIC_PHRASINGS",
    "grid_prompt",
    "labelled_image_prompt",
    "pic_in_pic_prompt",
    "refer_to_image",
    "sequence_prompt",
]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module("augment.mia"), name)
    raise AttributeError(f"module 'augment' has no attribute {name!r}")
