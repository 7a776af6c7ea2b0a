"""Tiny random-init builds of the vision-language families transformers' image-text-to-text class covers.

One builder per family, each written offline like :func:`mmpo.tiny.llava.build_tiny_llava`: the family's
real model and processor classes, a word-level tokenizer that carries the family's special tokens (image
placeholder, vision start and end, turn markers), and a chat template with the structure of the family's
own (the real template's markers and layout; word-level tokens make whitespace insignificant). The
directory is written with ``save_pretrained`` and loads with ``AutoModelForImageTextToText`` and
``AutoProcessor``, the path real checkpoints take.

Every build has a 64-wide language model of 2 decoder layers (Llama 3.2 Vision adds a cross-attention
layer) with 4 query and 2 key/value heads, a 32-wide vision tower of one layer (Qwen2.5-VL: two blocks)
and 32-pixel images; docs/models.md lists the image tokens each family gives an image.

Example:
    >>> from mmpo.tiny.families import TINY_FAMILIES
    >>> path = TINY_FAMILIES["qwen2_vl"]("runs/tiny-qwen2-vl", words=["a", "red", "circle", "."])
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from mmpo.tiny.build import write_tiny_build
from mmpo.tiny.chat_templates import (
    GEMMA3_TEMPLATE,
    IDEFICS3_TEMPLATE,
    INTERNVL_TEMPLATE,
    MISTRAL3_TEMPLATE,
    MLLAMA_TEMPLATE,
    ONEVISION_TEMPLATE,
    PALIGEMMA_TEMPLATE,
    QWEN2_VL_TEMPLATE,
    SMOLVLM_TEMPLATE,
    word_tokenizer,
)

__all__ = [
    "TINY_FAMILIES",
    "build_tiny_gemma3",
    "build_tiny_idefics3",
    "build_tiny_internvl",
    "build_tiny_llava_onevision",
    "build_tiny_mistral3",
    "build_tiny_mllama",
    "build_tiny_paligemma2",
    "build_tiny_pixtral",
    "build_tiny_qwen2_5_vl",
    "build_tiny_qwen2_vl",
    "build_tiny_smolvlm",
]

PathLike = str | os.PathLike

IMAGE_SIZE = 32
# The language model every family gets (its own config class): 2 layers of attention and gated MLP.
TEXT = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 1024,
}
VISION_WIDTH = 32
# -- shared pieces -------------------------------------------------------------------------------------------


def _vit(**overrides: Any) -> dict[str, Any]:
    """A one-layer, 32-wide vision transformer on 32-pixel images in 8-pixel patches (4 x 4 patches)."""
    base = {"hidden_size": VISION_WIDTH, "intermediate_size": 2 * VISION_WIDTH, "num_hidden_layers": 1}
    return {**base, "num_attention_heads": 2, "image_size": IMAGE_SIZE, "patch_size": 8, **overrides}


def _ids(tokenizer, *tokens: str) -> list[int]:
    return [tokenizer.convert_tokens_to_ids(t) for t in tokens]


def _text_config(tokenizer, **overrides: Any) -> dict[str, Any]:
    """The language model's settings (``TEXT``) with the tokenizer's vocabulary size and special ids."""
    ids = {f"{role}_token_id": getattr(tokenizer, f"{role}_token_id") for role in ("pad", "bos", "eos")}
    return {**TEXT, "vocab_size": len(tokenizer), **ids, **overrides}


def _write(
    out_dir: PathLike,
    family: str,
    words: Iterable[str],
    seed: int,
    overwrite: bool,
    make: Callable,
    after_init: Callable | None = None,
) -> Path:
    """Build ``make(words) -> (config, model class, processor)``, initialise the model, save both atomically.

    ``after_init(model)`` may change the fresh weights. A directory already holding a build of the same
    family, words and seed is reused.
    """
    words = sorted(set(words))
    settings = {"family": family, "version": 1, "seed": seed, "words": words}
    return write_tiny_build(out_dir, settings, seed, lambda: make(words), overwrite=overwrite, after_init=after_init)


# -- Qwen2-VL and Qwen2.5-VL ---------------------------------------------------------------------------------

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


def _qwen(words, processor_class, config_class, vision: dict[str, Any]):
    """A Qwen2-VL-style processor and model config (``processor_class``, ``config_class``)."""
    import transformers as tf

    specials = {"pad": "<|endoftext|>", "eos": "<|im_end|>"}
    tokenizer = word_tokenizer(words, QWEN2_VL_TEMPLATE, specials, _QWEN_NAMED, extra=["<|im_start|>"])
    pixels = {"shortest_edge": IMAGE_SIZE * IMAGE_SIZE, "longest_edge": IMAGE_SIZE * IMAGE_SIZE}
    frames = {**pixels, "longest_edge": 8 * IMAGE_SIZE * IMAGE_SIZE}
    processor = processor_class(
        image_processor=tf.Qwen2VLImageProcessor(size=pixels, merge_size=2, **_QWEN_PATCHES),
        tokenizer=tokenizer,
        video_processor=tf.Qwen2VLVideoProcessor(size=frames, merge_size=2, **_QWEN_PATCHES),
        chat_template=QWEN2_VL_TEMPLATE,
    )
    image, video, start, end = _ids(tokenizer, *_QWEN_NAMED.values())
    config = config_class(
        text_config=_text_config(tokenizer, rope_parameters=_MROPE),
        vision_config={**vision, **_QWEN_PATCHES, "spatial_merge_size": 2, "num_heads": 2},
        image_token_id=image,
        video_token_id=video,
        vision_start_token_id=start,
        vision_end_token_id=end,
    )
    return config, processor


def build_tiny_qwen2_vl(out_dir: PathLike, words: Iterable[str], seed: int = 0, overwrite: bool = False) -> Path:
    """A ``Qwen2VLForConditionalGeneration`` with a ``Qwen2VLProcessor`` (multimodal rotary positions)."""
    import transformers as tf

    def make(words):
        vision = {"depth": 1, "embed_dim": VISION_WIDTH, "hidden_size": TEXT["hidden_size"], "mlp_ratio": 2}
        config, processor = _qwen(words, tf.Qwen2VLProcessor, tf.Qwen2VLConfig, vision)
        return config, tf.Qwen2VLForConditionalGeneration, processor

    return _write(out_dir, "qwen2_vl", words, seed, overwrite, make)


def build_tiny_qwen2_5_vl(out_dir: PathLike, words: Iterable[str], seed: int = 0, overwrite: bool = False) -> Path:
    """A ``Qwen2_5_VLForConditionalGeneration`` with a ``Qwen2_5_VLProcessor``.

    Its vision tower has two blocks: windowed attention (16-pixel windows, 2 x 2 per image) and full.
    """
    import transformers as tf

    def make(words):
        vision = {"depth": 2, "hidden_size": VISION_WIDTH, "intermediate_size": 2 * VISION_WIDTH}
        vision |= {"out_hidden_size": TEXT["hidden_size"], "window_size": 16, "fullatt_block_indexes": [1]}
        config, processor = _qwen(words, tf.Qwen2_5_VLProcessor, tf.Qwen2_5_VLConfig, vision)
        return config, tf.Qwen2_5_VLForConditionalGeneration, processor

    return _write(out_dir, "qwen2_5_vl", words, seed, overwrite, make)


# -- SigLIP towers: LLaVA-OneVision, PaliGemma 2, Gemma 3 ----------------------------------------------------


def _siglip(**overrides: Any) -> dict[str, Any]:
    return _vit(model_type="siglip_vision_model", **overrides)


def build_tiny_llava_onevision(out_dir: PathLike, words: Iterable[str], seed: int = 0, overwrite: bool = False) -> Path:
    """A ``LlavaOnevisionForConditionalGeneration`` (SigLIP tower, Qwen2 language model).

    One grid resolution (the image side), so an image is its base view plus one crop: 16 + 16 features
    and 4 row ends.
    """
    import transformers as tf

    def make(words):
        named = {"image_token": "<image>", "video_token": "<video>"}
        specials = {"pad": "<|endoftext|>", "eos": "<|im_end|>"}
        tokenizer = word_tokenizer(words, ONEVISION_TEMPLATE, specials, named, extra=["<|im_start|>"])
        square, grid = {"height": IMAGE_SIZE, "width": IMAGE_SIZE}, [[IMAGE_SIZE, IMAGE_SIZE]]
        processor = tf.LlavaOnevisionProcessor(
            image_processor=tf.LlavaOnevisionImageProcessor(size=square, image_grid_pinpoints=grid),
            tokenizer=tokenizer,
            video_processor=tf.LlavaOnevisionVideoProcessor(size=square),
            num_image_tokens=(IMAGE_SIZE // 8) ** 2,
            vision_feature_select_strategy="full",
            chat_template=ONEVISION_TEMPLATE,
        )
        image, video = _ids(tokenizer, "<image>", "<video>")
        config = tf.LlavaOnevisionConfig(
            vision_config=_siglip(),
            text_config={"model_type": "qwen2", **_text_config(tokenizer)},
            image_token_index=image,
            video_token_index=video,
            vision_feature_select_strategy="full",
            vision_feature_layer=-1,
            image_grid_pinpoints=grid,
        )
        return config, tf.LlavaOnevisionForConditionalGeneration, processor

    return _write(out_dir, "llava_onevision", words, seed, overwrite, make)


def build_tiny_paligemma2(out_dir: PathLike, words: Iterable[str], seed: int = 0, overwrite: bool = False) -> Path:
    """A ``PaliGemmaForConditionalGeneration`` with a Gemma 2 language model, as PaliGemma 2 has.

    The processor adds PaliGemma's 1,152 location and segmentation tokens to the vocabulary.
    """
    import transformers as tf

    def make(words):
        specials = {"pad": "<pad>", "bos": "<bos>", "eos": "<eos>"}
        tokenizer = word_tokenizer(words, PALIGEMMA_TEMPLATE, specials, {"image_token": "<image>"})
        image_processor = tf.SiglipImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
        image_processor.image_seq_length = (IMAGE_SIZE // 8) ** 2
        processor = tf.PaliGemmaProcessor(image_processor, tokenizer, chat_template=PALIGEMMA_TEMPLATE)
        text = _text_config(tokenizer, head_dim=16, query_pre_attn_scalar=16, sliding_window=16)
        config = tf.PaliGemmaConfig(
            vision_config=_siglip(projection_dim=TEXT["hidden_size"]),
            text_config={"model_type": "gemma2", **text},
            image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
            projection_dim=TEXT["hidden_size"],
            hidden_size=TEXT["hidden_size"],
        )
        return config, tf.PaliGemmaForConditionalGeneration, processor

    return _write(out_dir, "paligemma2", words, seed, overwrite, make)


def build_tiny_gemma3(out_dir: PathLike, words: Iterable[str], seed: int = 0, overwrite: bool = False) -> Path:
    """A ``Gemma3ForConditionalGeneration``: 4 x 4 SigLIP patches pooled to 4 tokens; a sliding-window layer.

    The image projection is drawn at random (std 0.02) rather than left at transformers' initial 0.
    """
    import transformers as tf

    def make(words):
        named = {"image_token": "<image_soft_token>", "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>"}
        specials = {"pad": "<pad>", "bos": "<bos>", "eos": "<eos>"}
        tokenizer = word_tokenizer(words, GEMMA3_TEMPLATE, specials, named, extra=["<start_of_turn>", "<end_of_turn>"])
        processor = tf.Gemma3Processor(
            image_processor=tf.Gemma3ImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}),
            tokenizer=tokenizer,
            chat_template=GEMMA3_TEMPLATE,
            image_seq_length=4,
        )
        image, boi, eoi = _ids(tokenizer, *named.values())
        text = _text_config(tokenizer, head_dim=16, query_pre_attn_scalar=16, sliding_window=16)
        config = tf.Gemma3Config(
            vision_config=_siglip(),
            text_config={**text, "model_type": "gemma3_text", "layer_types": ["sliding_attention", "full_attention"]},
            mm_tokens_per_image=4,
            image_token_index=image,
            boi_token_index=boi,
            eoi_token_index=eoi,
        )
        return config, tf.Gemma3ForConditionalGeneration, processor

    def project_images(model):  # transformers initialises the projection to 0, which would hide the images
        torch.nn.init.normal_(model.model.multi_modal_projector.mm_input_projection_weight, std=0.02)

    return _write(out_dir, "gemma3", words, seed, overwrite, make, after_init=project_images)


# -- Idefics3 and SmolVLM ------------------------------------------------------------------------------------


def build_tiny_idefics3(out_dir: PathLike, words: Iterable[str], seed: int = 0, overwrite: bool = False) -> Path:
    """An ``Idefics3ForConditionalGeneration`` (Llama language model as ``text_model``), no image splitting.

    An image is one 32-pixel view: 4 x 4 patches, pixel-shuffled by 2 to 4 ``<image>`` tokens.
    """
    import transformers as tf

    def make(words):
        specials = {"pad": "<|end_of_text|>", "bos": "<|begin_of_text|>", "eos": "<end_of_utterance>"}
        extra = ["<fake_token_around_image>", "<global-img>"]
        tokenizer = word_tokenizer(words, IDEFICS3_TEMPLATE, specials, {"image_token": "<image>"}, extra=extra)
        side = {"longest_edge": IMAGE_SIZE}
        processor = tf.Idefics3Processor(
            image_processor=tf.Idefics3ImageProcessor(size=side, max_image_size=side, do_image_splitting=False),
            tokenizer=tokenizer,
            image_seq_len=4,
            chat_template=IDEFICS3_TEMPLATE,
        )
        config = tf.Idefics3Config(
            vision_config=_vit(),
            text_config={"model_type": "llama", **_text_config(tokenizer)},
            image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
            scale_factor=2,
        )
        return config, tf.Idefics3ForConditionalGeneration, processor

    return _write(out_dir, "idefics3", words, seed, overwrite, make)


def build_tiny_smolvlm(out_dir: PathLike, words: Iterable[str], seed: int = 0, overwrite: bool = False) -> Path:
    """A ``SmolVLMForConditionalGeneration`` (Idefics3's architecture and image tokens), no image splitting.

    ``SmolVLMProcessor`` needs the ``num2words`` package, which mmpo does not depend on.
    """
    import transformers as tf

    def make(words):
        named = {
            "image_token": "<image>",
            "fake_image_token": "<fake_token_around_image>",
            "global_image_token": "<global-img>",
            "end_of_utterance_token": "<end_of_utterance>",
            "video_token": "<video>",
        }
        specials = {"pad": "<|im_end|>", "eos": "<end_of_utterance>"}
        tokenizer = word_tokenizer(words, SMOLVLM_TEMPLATE, specials, named, extra=["<|im_start|>"])
        side = {"longest_edge": IMAGE_SIZE}
        processor = tf.SmolVLMProcessor(
            image_processor=tf.SmolVLMImageProcessor(size=side, max_image_size=side, do_image_splitting=False),
            tokenizer=tokenizer,
            video_processor=tf.SmolVLMVideoProcessor(size=side, max_image_size=side),
            image_seq_len=4,
            chat_template=SMOLVLM_TEMPLATE,
        )
        config = tf.SmolVLMConfig(
            vision_config=_vit(),
            text_config={"model_type": "llama", **_text_config(tokenizer)},
            image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
            scale_factor=2,
        )
        return config, tf.SmolVLMForConditionalGeneration, processor

    return _write(out_dir, "smolvlm", words, seed, overwrite, make)


# -- Llama 3.2 Vision, Mistral 3 and Pixtral, InternVL -------------------------------------------------------


def build_tiny_mllama(out_dir: PathLike, words: Iterable[str], seed: int = 0, overwrite: bool = False) -> Path:
    """A ``MllamaForConditionalGeneration`` (Llama 3.2 Vision): images enter through cross-attention layers.

    The language model has 3 layers, the second a cross-attention layer; an image is one 32-pixel tile.
    The cross-attention layer's gates are opened (1): transformers initialises them to 0, which keeps
    the images and the layer's own weights out of the output until training moves them.
    """
    import transformers as tf

    def make(words):
        specials = {"pad": "<|finetune_right_pad_id|>", "bos": "<|begin_of_text|>", "eos": "<|eot_id|>"}
        extra = ["<|start_header_id|>", "<|end_header_id|>", "<|python_tag|>"]
        tokenizer = word_tokenizer(words, MLLAMA_TEMPLATE, specials, {"image_token": "<|image|>"}, extra=extra)
        square = {"height": IMAGE_SIZE, "width": IMAGE_SIZE}
        processor = tf.MllamaProcessor(
            tf.MllamaImageProcessor(size=square, max_image_tiles=1), tokenizer, chat_template=MLLAMA_TEMPLATE
        )
        vision = _vit(num_global_layers=1, max_num_tiles=1, intermediate_layers_indices=[0])
        vision["attention_heads"] = vision.pop("num_attention_heads")
        config = tf.MllamaConfig(
            vision_config={**vision, "vision_output_dim": 2 * VISION_WIDTH, "supported_aspect_ratios": [[1, 1]]},
            text_config=_text_config(tokenizer, num_hidden_layers=3, cross_attention_layers=[1]),
            image_token_index=tokenizer.convert_tokens_to_ids("<|image|>"),
        )
        return config, tf.MllamaForConditionalGeneration, processor

    def open_gates(model):
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith(("cross_attn_attn_gate", "cross_attn_mlp_gate")):
                    p.fill_(1.0)

    return _write(out_dir, "mllama", words, seed, overwrite, make, after_init=open_gates)


def _pixtral(words, spatial_merge_size: int):
    """A ``PixtralProcessor`` (8-pixel patches) and the Mistral language model's config."""
    import transformers as tf

    specials = {"pad": "<pad>", "bos": "<s>", "eos": "</s>"}
    extra = ["[INST]", "[/INST]", "[IMG_BREAK]", "[IMG_END]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]"]
    tokenizer = word_tokenizer(words, MISTRAL3_TEMPLATE, specials, {"image_token": "[IMG]"}, extra=extra)
    processor = tf.PixtralProcessor(
        image_processor=tf.PixtralImageProcessor(size={"longest_edge": IMAGE_SIZE}, patch_size=8),
        tokenizer=tokenizer,
        patch_size=8,
        spatial_merge_size=spatial_merge_size,
        chat_template=MISTRAL3_TEMPLATE,
    )
    text = {"model_type": "mistral", **_text_config(tokenizer, head_dim=16, sliding_window=None)}
    return processor, text


_PIXTRAL_VISION = _vit(model_type="pixtral", head_dim=VISION_WIDTH // 2)


def build_tiny_mistral3(out_dir: PathLike, words: Iterable[str], seed: int = 0, overwrite: bool = False) -> Path:
    """A ``Mistral3ForConditionalGeneration`` (Pixtral tower, 2 x 2 patch merger) with a ``PixtralProcessor``.

    An image is 4 x 4 patches merged to 2 x 2 ``[IMG]`` tokens, an ``[IMG_BREAK]`` after each row and
    ``[IMG_END]`` last.
    """
    import transformers as tf

    def make(words):
        processor, text = _pixtral(words, spatial_merge_size=2)
        image = processor.tokenizer.convert_tokens_to_ids("[IMG]")
        config = tf.Mistral3Config(
            vision_config=_PIXTRAL_VISION, text_config=text, image_token_index=image, spatial_merge_size=2
        )
        return config, tf.Mistral3ForConditionalGeneration, processor

    return _write(out_dir, "mistral3", words, seed, overwrite, make)


def build_tiny_pixtral(out_dir: PathLike, words: Iterable[str], seed: int = 0, overwrite: bool = False) -> Path:
    """Pixtral 12B's layout: a ``LlavaForConditionalGeneration`` with a Pixtral tower and a Mistral model.

    No patch merger: an image is 4 x 4 ``[IMG]`` tokens with an ``[IMG_BREAK]`` after each row.
    """
    import transformers as tf

    def make(words):
        processor, text = _pixtral(words, spatial_merge_size=1)
        config = tf.LlavaConfig(
            vision_config=_PIXTRAL_VISION,
            text_config=text,
            image_token_index=processor.tokenizer.convert_tokens_to_ids("[IMG]"),
            vision_feature_select_strategy="full",
            vision_feature_layer=-1,
        )
        return config, tf.LlavaForConditionalGeneration, processor

    return _write(out_dir, "pixtral", words, seed, overwrite, make)


def build_tiny_internvl(out_dir: PathLike, words: Iterable[str], seed: int = 0, overwrite: bool = False) -> Path:
    """An ``InternVLForConditionalGeneration`` (transformers' native class, Qwen2 language model).

    An image is one 32-pixel tile (at most one crop): 4 x 4 patches, pixel-shuffled to 4 tokens.
    """
    import transformers as tf

    def make(words):
        named = {
            "start_image_token": "<img>",
            "end_image_token": "</img>",
            "context_image_token": "<IMG_CONTEXT>",
            "video_token": "<video>",
        }
        specials = {"pad": "<|endoftext|>", "eos": "<|im_end|>"}
        tokenizer = word_tokenizer(words, INTERNVL_TEMPLATE, specials, named, extra=["<|im_start|>"])
        square = {"height": IMAGE_SIZE, "width": IMAGE_SIZE}
        processor = tf.InternVLProcessor(
            # InternVLProcessor asks for crops; with at most one there is no thumbnail either
            image_processor=tf.GotOcr2ImageProcessor(size=square, crop_to_patches=False, max_patches=1),
            tokenizer=tokenizer,
            video_processor=tf.InternVLVideoProcessor(size=square),
            image_seq_length=4,
            chat_template=INTERNVL_TEMPLATE,
        )
        config = tf.InternVLConfig(
            vision_config=_vit(image_size=[IMAGE_SIZE, IMAGE_SIZE], patch_size=[8, 8]),
            text_config={"model_type": "qwen2", **_text_config(tokenizer)},
            image_token_id=tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"),
            image_seq_length=4,
            downsample_ratio=0.5,
        )
        return config, tf.InternVLForConditionalGeneration, processor

    return _write(out_dir, "internvl", words, seed, overwrite, make)


# Family name -> builder, in the order of the model-coverage issue (SmolVLM after Idefics3, Pixtral
# after Mistral 3).
TINY_FAMILIES: dict[str, Callable[..., Path]] = {
    "qwen2_vl": build_tiny_qwen2_vl,
    "qwen2_5_vl": build_tiny_qwen2_5_vl,
    "llava_onevision": build_tiny_llava_onevision,
    "idefics3": build_tiny_idefics3,
    "smolvlm": build_tiny_smolvlm,
    "paligemma2": build_tiny_paligemma2,
    "gemma3": build_tiny_gemma3,
    "mllama": build_tiny_mllama,
    "mistral3": build_tiny_mistral3,
    "pixtral": build_tiny_pixtral,
    "internvl": build_tiny_internvl,
}
