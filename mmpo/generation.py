"""Batched greedy answers of a vision-language model to plain-text prompts with ``<image>`` placeholders.

Prompts go through the processor's chat template as one user turn (the same split the datamodules
use), are left-padded so every row ends where generation starts, and the answers come back decoded
without special tokens. Used by evaluations that need the model's own words (hallucination rates).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image

__all__ = ["generate_answers"]


@torch.no_grad()
def generate_answers(
    model: Any,
    processor: Any,
    prompts: Sequence[str],
    images: Sequence[Sequence[Image.Image]],
    *,
    batch_size: int = 16,
    max_new_tokens: int = 32,
) -> list[str]:
    """Greedy answers, one per prompt, in order.

    Args:
        model: an image-text-to-text model (a PEFT-wrapped one too); its training mode is restored after.
        processor: its processor (chat template, tokenizer, image processor).
        prompts: plain text, one ``<image>`` per image of the same index of ``images``.
        images: the images of each prompt, in placeholder order.
        batch_size: prompts per ``generate`` call.
        max_new_tokens: longest answer.
    """
    from augment.mia.generate import prompt_messages

    if len(prompts) != len(images):
        raise ValueError(f"{len(prompts)} prompts but {len(images)} image lists")
    tokenizer = processor.tokenizer
    padding_side, was_training = tokenizer.padding_side, model.training
    tokenizer.padding_side = "left"
    model.eval()
    device = next(model.parameters()).device
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    answers: list[str] = []
    try:
        for start in range(0, len(prompts), batch_size):
            texts = [
                processor.apply_chat_template(prompt_messages(p), add_generation_prompt=True, tokenize=False)
                for p in prompts[start : start + batch_size]
            ]
            batch_images = [list(im) for im in images[start : start + batch_size]]
            enc = processor(text=texts, images=batch_images, return_tensors="pt", padding=True).to(device)
            if "pixel_values" in enc:
                enc["pixel_values"] = enc["pixel_values"].to(dtype)
            out = model.generate(
                **enc, do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id
            )
            generated = out[:, enc["input_ids"].shape[1] :]
            answers += [a.strip() for a in tokenizer.batch_decode(generated, skip_special_tokens=True)]
    finally:
        tokenizer.padding_side = padding_side
        model.train(was_training)
    return answers
