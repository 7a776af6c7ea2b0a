"""Batched greedy answers of a vision- or video-language model to plain-text prompts about images or clips.

Prompts go through the processor's chat template as one user turn (the same split the datamodules
use), are left-padded so every row ends where generation starts, and the answers come back decoded
without special tokens. Used by evaluations that need the model's own words (hallucination rates).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

__all__ = ["generate_answers"]


@torch.no_grad()
def generate_answers(
    model: Any,
    processor: Any,
    prompts: Sequence[str],
    images: Sequence[Sequence[Image.Image]] | None = None,
    *,
    videos: Sequence[np.ndarray] | None = None,
    video_metadata: Sequence[dict[str, Any]] | None = None,
    batch_size: int = 16,
    max_new_tokens: int = 32,
) -> list[str]:
    """Greedy answers, one per prompt, in order.

    Args:
        model: an image- or video-text-to-text model (a PEFT-wrapped one too); its training mode is
            restored after.
        processor: its processor (chat template, tokenizer, image or video processor).
        prompts: plain text; with ``images``, one ``<image>`` per image of the same index; with
            ``videos``, no placeholder (the video comes first in the user turn).
        images: the images of each prompt, in placeholder order.
        videos: one clip per prompt, ``(N, H, W, 3)`` uint8 frames (give ``images`` or ``videos``).
        video_metadata: each clip's timing (``datamodules.vision_text.collator.video_metadata`` fields:
            the frames kept and the video's fps), which processors such as Qwen2.5-VL's read; without it
            they assume 24 fps. The frames are never sampled again by the processor.
        batch_size: prompts per ``generate`` call.
        max_new_tokens: longest answer.
    """
    from augment.mia.generate import prompt_messages

    if (images is None) == (videos is None):
        raise ValueError("give the prompts' images or their videos (one of the two)")
    media = images if images is not None else videos
    if len(prompts) != len(media):
        raise ValueError(f"{len(prompts)} prompts but {len(media)} {'image lists' if videos is None else 'videos'}")
    tokenizer = processor.tokenizer
    padding_side, was_training = tokenizer.padding_side, model.training
    tokenizer.padding_side = "left"
    model.eval()
    device = next(model.parameters()).device
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    answers: list[str] = []
    try:
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]
            if videos is None:
                messages = [prompt_messages(p) for p in chunk]
                kwargs = {"images": [list(im) for im in images[start : start + batch_size]]}
            else:
                video_first = [{"type": "video"}]
                messages = [[{"role": "user", "content": [*video_first, {"type": "text", "text": p}]}] for p in chunk]
                kwargs = {"videos": list(videos[start : start + batch_size]), "do_sample_frames": False}
                if video_metadata is not None:
                    kwargs["video_metadata"] = list(video_metadata[start : start + batch_size])
            texts = [processor.apply_chat_template(m, add_generation_prompt=True, tokenize=False) for m in messages]
            enc = processor(text=texts, return_tensors="pt", padding=True, **kwargs).to(device)
            for key in ("pixel_values", "pixel_values_videos"):
                if key in enc:
                    enc[key] = enc[key].to(dtype)
            out = model.generate(
                **enc, do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id
            )
            generated = out[:, enc["input_ids"].shape[1] :]
            answers += [a.strip() for a in tokenizer.batch_decode(generated, skip_special_tokens=True)]
    finally:
        tokenizer.padding_side = padding_side
        model.train(was_training)
    return answers
