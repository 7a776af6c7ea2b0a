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

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from mmpo.tiny.build import (
    IMAGE_SIZE,
    TEXT,
    VISION_WIDTH,
    PathLike,
    text_config,
    token_ids,
    vit_config,
    write_family_build,
)
from mmpo.tiny.chat_templates import (
    GEMMA3_TEMPLATE,
    IDEFICS3_TEMPLATE,
    INTERNVL_TEMPLATE,
    MISTRAL3_TEMPLATE,
    MLLAMA_TEMPLATE,
    ONEVISION_TEMPLATE,
    PALIGEMMA_TEMPLATE,
    SMOLVLM_TEMPLATE,
    word_tokenizer,
)
from mmpo.tiny.qwen import build_tiny_qwen2_5_vl, build_tiny_qwen2_vl

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

# -- SigLIP towers: LLaVA-OneVision, PaliGemma 2, Gemma 3 ----------------------------------------------------


def _siglip(**overrides: Any) -> dict[str, Any]:
    return vit_config(model_type="siglip_vision_model", **overrides)


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
        image, video = token_ids(tokenizer, "<image>", "<video>")
        config = tf.LlavaOnevisionConfig(
            vision_config=_siglip(),
            text_config={"model_type": "qwen2", **text_config(tokenizer)},
            image_token_index=image,
            video_token_index=video,
            vision_feature_select_strategy="full",
            vision_feature_layer=-1,
            image_grid_pinpoints=grid,
        )
        return config, tf.LlavaOnevisionForConditionalGeneration, processor

    return write_family_build(out_dir, "llava_onevision", words, seed, overwrite, make)


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
        text = text_config(tokenizer, head_dim=16, query_pre_attn_scalar=16, sliding_window=16)
        config = tf.PaliGemmaConfig(
            vision_config=_siglip(projection_dim=TEXT["hidden_size"]),
            text_config={"model_type": "gemma2", **text},
            image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
            projection_dim=TEXT["hidden_size"],
            hidden_size=TEXT["hidden_size"],
        )
        return config, tf.PaliGemmaForConditionalGeneration, processor

    return write_family_build(out_dir, "paligemma2", words, seed, overwrite, make)


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
        image, boi, eoi = token_ids(tokenizer, *named.values())
        text = text_config(tokenizer, head_dim=16, query_pre_attn_scalar=16, sliding_window=16)
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

    return write_family_build(out_dir, "gemma3", words, seed, overwrite, make, after_init=project_images)


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
            vision_config=vit_config(),
            text_config={"model_type": "llama", **text_config(tokenizer)},
            image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
            scale_factor=2,
        )
        return config, tf.Idefics3ForConditionalGeneration, processor

    return write_family_build(out_dir, "idefics3", words, seed, overwrite, make)


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
            vision_config=vit_config(),
            text_config={"model_type": "llama", **text_config(tokenizer)},
            image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
            scale_factor=2,
        )
        return config, tf.SmolVLMForConditionalGeneration, processor

    return write_family_build(out_dir, "smolvlm", words, seed, overwrite, make)


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
        vision = vit_config(num_global_layers=1, max_num_tiles=1, intermediate_layers_indices=[0])
        vision["attention_heads"] = vision.pop("num_attention_heads")
        config = tf.MllamaConfig(
            vision_config={**vision, "vision_output_dim": 2 * VISION_WIDTH, "supported_aspect_ratios": [[1, 1]]},
            text_config=text_config(tokenizer, num_hidden_layers=3, cross_attention_layers=[1]),
            image_token_index=tokenizer.convert_tokens_to_ids("<|image|>"),
        )
        return config, tf.MllamaForConditionalGeneration, processor

    def open_gates(model):
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith(("cross_attn_attn_gate", "cross_attn_mlp_gate")):
                    p.fill_(1.0)

    return write_family_build(out_dir, "mllama", words, seed, overwrite, make, after_init=open_gates)


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
    text = {"model_type": "mistral", **text_config(tokenizer, head_dim=16, sliding_window=None)}
    return processor, text


_PIXTRAL_VISION = vit_config(model_type="pixtral", head_dim=VISION_WIDTH // 2)


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

    return write_family_build(out_dir, "mistral3", words, seed, overwrite, make)


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

    return write_family_build(out_dir, "pixtral", words, seed, overwrite, make)


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
            vision_config=vit_config(image_size=[IMAGE_SIZE, IMAGE_SIZE], patch_size=[8, 8]),
            text_config={"model_type": "qwen2", **text_config(tokenizer)},
            image_token_id=tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"),
            image_seq_length=4,
            downsample_ratio=0.5,
        )
        return config, tf.InternVLForConditionalGeneration, processor

    return write_family_build(out_dir, "internvl", words, seed, overwrite, make)


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
