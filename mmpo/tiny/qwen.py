"""Tiny Qwen2-VL and Qwen2.5-VL builds (multimodal rotary positions), listed in :mod:`mmpo.tiny.families`."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from mmpo.tiny import build
from mmpo.tiny.build import PathLike
from mmpo.tiny.chat_templates import QWEN2_VL_TEMPLATE, word_tokenizer

__all__ = ["build_tiny_qwen2_5_vl", "build_tiny_qwen2_vl"]

_QWEN_NAMED = {
    "image_token": "<|image_pad|>",
    "video_token": "<|video_pad|>",
    "vision_bos_token": "<|vision_start|>",
    "vision_eos_token": "<|vision_end|>",
}
# 4-pixel patches merged 2 x 2: a 32-pixel image is 8 x 8 patches and 16 image tokens
_QWEN_PATCHES = {"patch_size": 4, "temporal_patch_size": 2}
# multimodal rotary positions: (temporal, height, width) sections of the 16-wide heads' 8 frequencies
_MROPE = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}


def _qwen(words, processor_class, config_class, vision: dict[str, Any], text: dict | None = None, frame_px: int = 0):
    """A Qwen2-VL-style processor and model config (``processor_class``, ``config_class``); ``text`` overrides
    the language model's settings, ``frame_px`` > 0 lets video frames up to that side through unresized."""
    import transformers as tf

    specials = {"pad": "<|endoftext|>", "eos": "<|im_end|>"}
    tokenizer = word_tokenizer(words, QWEN2_VL_TEMPLATE, specials, _QWEN_NAMED, extra=["<|im_start|>"])
    side = build.IMAGE_SIZE
    pixels = {"shortest_edge": side * side, "longest_edge": side * side}
    frames = {**pixels, "longest_edge": max(8 * side * side, frame_px * frame_px)}
    patches = {**_QWEN_PATCHES, "patch_size": vision.get("patch_size", _QWEN_PATCHES["patch_size"])}
    processor = processor_class(
        image_processor=tf.Qwen2VLImageProcessor(size=pixels, merge_size=2, **patches),
        tokenizer=tokenizer,
        video_processor=tf.Qwen2VLVideoProcessor(size=frames, merge_size=2, **patches),
        chat_template=QWEN2_VL_TEMPLATE,
    )
    image, video, start, end = build.token_ids(tokenizer, *_QWEN_NAMED.values())
    config = config_class(
        text_config=build.text_config(tokenizer, **({"rope_parameters": _MROPE} | (text or {}))),
        vision_config={**_QWEN_PATCHES, "spatial_merge_size": 2, "num_heads": 2, **vision},
        image_token_id=image,
        video_token_id=video,
        vision_start_token_id=start,
        vision_end_token_id=end,
    )
    return config, processor


def build_tiny_qwen2_vl(
    out_dir: PathLike,
    words: Iterable[str],
    seed: int = 0,
    overwrite: bool = False,
    sizes: dict[str, Any] | None = None,
) -> Path:
    """A ``Qwen2VLForConditionalGeneration`` with a ``Qwen2VLProcessor`` (multimodal rotary positions).

    ``sizes`` (optional) makes a larger build: ``{"text": language model settings, "vision": vision tower
    settings (``patch_size``, ``depth``, ``embed_dim``, ...), "frame_px": the largest video frame side kept}``.
    """
    import transformers as tf

    text, more = (sizes or {}).get("text", {}), (sizes or {}).get("vision", {})

    def make(words):
        width = text.get("hidden_size", build.TEXT["hidden_size"])  # the merger's output is the language model's width
        vision = {"depth": 1, "embed_dim": build.VISION_WIDTH, "hidden_size": width, "mlp_ratio": 2, **more}
        frame_px = (sizes or {}).get("frame_px", 0)
        config, processor = _qwen(words, tf.Qwen2VLProcessor, tf.Qwen2VLConfig, vision, text, frame_px)
        return config, tf.Qwen2VLForConditionalGeneration, processor

    extra = {"sizes": sizes} if sizes else None  # a build of other sizes is not reused for this one
    return build.write_family_build(out_dir, "qwen2_vl", words, seed, overwrite, make, extra=extra)


def build_tiny_qwen2_5_vl(out_dir: PathLike, words: Iterable[str], seed: int = 0, overwrite: bool = False) -> Path:
    """A ``Qwen2_5_VLForConditionalGeneration`` with a ``Qwen2_5_VLProcessor``.

    Its vision tower has two blocks: windowed attention (16-pixel windows, 2 x 2 per image) and full.
    """
    import transformers as tf

    def make(words):
        vision = {"depth": 2, "hidden_size": build.VISION_WIDTH, "intermediate_size": 2 * build.VISION_WIDTH}
        vision |= {"out_hidden_size": build.TEXT["hidden_size"], "window_size": 16, "fullatt_block_indexes": [1]}
        config, processor = _qwen(words, tf.Qwen2_5_VLProcessor, tf.Qwen2_5_VLConfig, vision)
        return config, tf.Qwen2_5_VLForConditionalGeneration, processor

    return build.write_family_build(out_dir, "qwen2_5_vl", words, seed, overwrite, make)
