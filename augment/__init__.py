"""Negative builders and media augmentations (tensor in, tensor out, explicit generators)."""

from augment.mia_formats import (
    GRID_LAYOUTS,
    AugmentedSample,
    ImagePool,
    SourceSample,
    add_gaussian_noise,
    build_augmented,
    build_grid,
    build_pic_in_pic,
    build_sequence,
    compose_grid,
    compose_pic_in_pic,
    fit_image,
)
from augment.mia_prompts import (
    PIC_IN_PIC_PHRASINGS,
    grid_prompt,
    labelled_image_prompt,
    pic_in_pic_prompt,
    refer_to_image,
    sequence_prompt,
)
from augment.mia_tokens import (
    augmented_token_groups,
    box_to_patch_indices,
    grid_target_token_indices,
    image_token_spans,
    pic_in_pic_token_indices,
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
