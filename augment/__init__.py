"""Negative builders and media augmentations (tensor in, tensor out, explicit generators).

One subpackage per method: :mod:`augment.mia` (MIA-DPO multi-image negatives). The names below are
re-exported so that ``from augment import build_augmented`` keeps working as the package grows.
"""

from augment.mia import (
    GRID_LAYOUTS,
    PIC_IN_PIC_PHRASINGS,
    AugmentedSample,
    ImagePool,
    SourceSample,
    add_gaussian_noise,
    augmented_token_groups,
    box_to_patch_indices,
    build_augmented,
    build_grid,
    build_pic_in_pic,
    build_sequence,
    compose_grid,
    compose_pic_in_pic,
    fit_image,
    grid_prompt,
    grid_target_token_indices,
    image_token_spans,
    labelled_image_prompt,
    pic_in_pic_prompt,
    pic_in_pic_token_indices,
    refer_to_image,
    sequence_prompt,
)

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
