"""MIA-DPO prompt rewriting: point a single-image question at one image of a multi-image input.

Liu et al., "MIA-DPO: Multi-Image Augmented Direct Preference Optimization for Large
Vision-Language Models" (2024). A single-image instruction sample keeps its question and answer;
only the prompt changes, so that it names the target among unrelated companions:

- sequence (one ``<image>`` per image)::

    Image1: <image>
    Image2: <image>
    In Image2, what is on the table?

- grid collage (one composed image whose tiles are labelled ``Image{i}``)::

    <image>
    In Image2, what is on the table?

- pic-in-pic (one composed image, the target pasted at its centre)::

    <image>
    For the image in the center, what is on the table?

Image numbers in prompts are 1-based; every ``target_index`` argument here is 0-based.
"""

from __future__ import annotations

import re

__all__ = [
    "IMAGE_PLACEHOLDER",
    "PIC_IN_PIC_PHRASINGS",
    "clean_question",
    "grid_prompt",
    "labelled_image_prompt",
    "lower_first",
    "pic_in_pic_prompt",
    "refer_to_image",
    "sequence_prompt",
]

# The placeholder mmpo's datamodules expand into the processor's image tokens.
IMAGE_PLACEHOLDER = "<image>"

# Prefixes for pic-in-pic prompts; a builder picks one with its seeded rng. Each is followed by
# ", " and the question with its first letter lower-cased.
PIC_IN_PIC_PHRASINGS: tuple[str, ...] = (
    "For the image in the center",
    "Looking only at the smaller picture placed in the middle",
    "Regarding the inset image at the centre of this picture",
    "Focusing on the picture pasted in the middle of the image",
    "Considering just the central inset image",
    "About the small image embedded in the center",
)

_ACRONYM = re.compile(r"[A-Z][A-Z0-9]+\b")


def clean_question(question: str, placeholder: str = IMAGE_PLACEHOLDER) -> str:
    """Remove the source sample's own image placeholders and surrounding whitespace.

    LLaVA-style questions carry ``<image>`` at their start or end (``"<image>\\nWhat is …"``);
    the augmented prompt places its placeholders itself.
    """
    return question.replace(placeholder, "").strip()


def lower_first(text: str) -> str:
    """Lower-case the first letter of ``text`` so it can follow ``"In Image3, "``.

    The first word is left alone when it is an acronym (two or more capitals or digits, e.g.
    ``"OCR"``, ``"TV"``) or the pronoun ``"I"``, where lower-casing would change the meaning.
    """
    if not text or _ACRONYM.match(text) or re.match(r"I\b", text):
        return text
    return text[0].lower() + text[1:]


def refer_to_image(question: str, image_number: int, placeholder: str = IMAGE_PLACEHOLDER) -> str:
    """``"In Image{image_number}, <question>"`` (1-based number, cleaned and lower-cased question)."""
    if image_number < 1:
        raise ValueError(f"image numbers in prompts are 1-based, got {image_number}")
    return f"In Image{image_number}, {lower_first(clean_question(question, placeholder))}"


def sequence_prompt(question: str, num_images: int, target_index: int, placeholder: str = IMAGE_PLACEHOLDER) -> str:
    """Prompt for the sequence format: one ``Image{i}: <image>`` line per image, then the question.

    Args:
        question: the source question (its own placeholders are removed).
        num_images: images in the sequence, target included.
        target_index: 0-based position of the target in the sequence.
        placeholder: image placeholder string.

    Returns:
        e.g. ``"Image1: <image>\\nImage2: <image>\\nIn Image2, what is this?"``.
    """
    if not 0 <= target_index < num_images:
        raise ValueError(f"target_index {target_index} outside a sequence of {num_images} images")
    header = "".join(f"Image{i}: {placeholder}\n" for i in range(1, num_images + 1))
    return header + refer_to_image(question, target_index + 1, placeholder)


def labelled_image_prompt(question: str, image_number: int, placeholder: str = IMAGE_PLACEHOLDER) -> str:
    """One image under a sequence-style label: ``"Image3: <image>\\nIn Image3, <question>"``.

    Still single-image data: it teaches a model without language pretraining the words of the sequence
    prompt (``Image{i}``, ``In``, ``,``) without ever showing it two images.
    """
    return f"Image{image_number}: {placeholder}\n" + refer_to_image(question, image_number, placeholder)


def grid_prompt(question: str, target_index: int, placeholder: str = IMAGE_PLACEHOLDER) -> str:
    """Prompt for a grid collage: ``"<image>\\nIn Image{target_index + 1}, <question>"``."""
    if target_index < 0:
        raise ValueError(f"target_index must be ≥ 0, got {target_index}")
    return f"{placeholder}\n{refer_to_image(question, target_index + 1, placeholder)}"


def pic_in_pic_prompt(question: str, phrasing: str, placeholder: str = IMAGE_PLACEHOLDER) -> str:
    """Prompt for pic-in-pic: ``"<image>\\n<phrasing>, <question>"``; see :data:`PIC_IN_PIC_PHRASINGS`."""
    return f"{placeholder}\n{phrasing}, {lower_first(clean_question(question, placeholder))}"
