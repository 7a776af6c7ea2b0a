"""Tiny, randomly initialised diffusion pipelines built offline: SD 1.5-, SDXL-, SD3- and Wan 2.1-style.

Nothing can be fetched from a model hub in tests, so each builder makes the pipeline's components
from diffusers / transformers configs (a UNet, an MMDiT or a Wan video transformer, a VAE, CLIP, T5 or
UMT5 text encoders, a word-level tokenizer over the caller's words, the checkpoint's scheduler) and writes them
with the pipeline's ``save_pretrained``. Everything downstream loads the folder with
``from_pretrained(path, subfolder=...)`` exactly as it loads ``stable-diffusion-v1-5/stable-diffusion-v1-5``:
the loading path under test is the real one.

Example:
    >>> from mmpo.tiny.diffusion import build_tiny_sd
    >>> path = build_tiny_sd("runs/tiny-sd", words=["a", "red", "circle", "."])
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

import torch

from datamodules.core.atomic import atomic_directory
from mmpo.tiny.build import reusable_build
from mmpo.tiny.chat_templates import word_tokenizer

__all__ = ["TINY_TEXT_LENGTH", "build_tiny_sd", "build_tiny_sd3", "build_tiny_wan", "diffusion_word_tokenizer"]

#: tokens per caption (with <s> and </s>): the shapes world's longest caption has 13 words
TINY_TEXT_LENGTH = 24
_WIDTH = 32  # hidden width of the tiny text encoders (each CLIP's projection too)


def diffusion_word_tokenizer(words: Iterable[str], max_length: int = TINY_TEXT_LENGTH):
    """A word-level tokenizer that wraps each caption in ``<s> … </s>``, as CLIP's tokenizer does.

    The end token matters: CLIP's pooled output (SDXL's and SD3's pooled embedding) is read at the
    first ``</s>``. Captions are padded and cut to ``max_length`` (``model_max_length``).
    """
    from tokenizers.processors import TemplateProcessing

    tokenizer = word_tokenizer(words, "", {"pad": "<pad>", "bos": "<s>", "eos": "</s>"}, {})
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in ("<s>", "</s>")}
    tokenizer.backend_tokenizer.post_processor = TemplateProcessing(
        single="<s> $A </s>", special_tokens=list(ids.items())
    )
    tokenizer.model_max_length = max_length
    tokenizer.chat_template = None  # captions, not chats
    return tokenizer


def _clip(tokenizer: Any, projection: bool) -> Any:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=_WIDTH,
        intermediate_size=2 * _WIDTH,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=tokenizer.model_max_length,
        projection_dim=_WIDTH,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,  # not 2: the pooled output is read at the first </s>
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def _vae(shift_factor: float | None = None) -> Any:
    from diffusers import AutoencoderKL

    # three levels, so 4× fewer pixels per side: the latents of a 32-pixel image are 8 × 8
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(8, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=32,
        scaling_factor=0.5,
        shift_factor=shift_factor,
    )


def _unet(sdxl: bool) -> Any:
    from diffusers import UNet2DConditionModel

    extra: dict[str, Any] = {}
    if sdxl:  # SDXL conditions on the pooled CLIP-G embedding and six size/crop numbers ("text_time")
        extra = {
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": 8,
            "projection_class_embeddings_input_dim": _WIDTH + 6 * 8,
            "use_linear_projection": True,
        }
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        norm_num_groups=8,
        attention_head_dim=4,
        cross_attention_dim=2 * _WIDTH if sdxl else _WIDTH,  # SDXL: CLIP-L and CLIP-G side by side
        **extra,
    )


def _new_build(out: Path, settings: dict[str, Any], overwrite: bool) -> Any:
    """The word tokenizer over ``settings["words"]`` for a new build at ``out``; None when ``out`` already holds
    a build with these settings (and ``overwrite`` is off)."""
    return None if reusable_build(out, settings, overwrite) else diffusion_word_tokenizer(settings["words"])


def _write(out: Path, pipeline: Any, settings: dict[str, Any]) -> Path:
    with atomic_directory(out) as tmp:
        pipeline.save_pretrained(tmp)
        (tmp / "mmpo_tiny.json").write_text(json.dumps(settings, indent=1))
    return out


def build_tiny_sd(
    out: str | os.PathLike,
    words: Iterable[str],
    seed: int = 0,
    variant: Literal["sd15", "sdxl"] = "sd15",
    prediction_type: Literal["epsilon", "v_prediction"] = "epsilon",
    overwrite: bool = False,
) -> Path:
    """Build and save a tiny UNet pipeline: ``StableDiffusionPipeline`` (SD 1.5) or ``StableDiffusionXLPipeline``.

    Args:
        out: output directory (reused when it holds a build with the same settings).
        words: the captions' vocabulary.
        seed: weight initialisation seed.
        variant: ``sd15`` (one CLIP text encoder, PNDM scheduler as in SD 1.5) or ``sdxl`` (CLIP-L and
            CLIP-G with projection, the ``text_time`` added conditioning, Euler scheduler).
        prediction_type: what the UNet predicts (written into the scheduler config, as SD 2.x does).
        overwrite: rebuild even when ``out`` holds a matching build.

    Returns:
        ``out``.
    """
    from diffusers import EulerDiscreteScheduler, PNDMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    words = sorted(set(words))
    settings = {"kind": f"tiny-{variant}", "seed": seed, "prediction_type": prediction_type, "words": words}
    out = Path(out)
    if (tokenizer := _new_build(out, settings, overwrite)) is None:
        return out
    schedule = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}  # SD's betas
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet, vae = _unet(variant == "sdxl"), _vae()
        if variant == "sd15":
            pipeline = StableDiffusionPipeline(
                vae=vae,
                text_encoder=_clip(tokenizer, projection=False),
                tokenizer=tokenizer,
                unet=unet,
                scheduler=PNDMScheduler(
                    **schedule, prediction_type=prediction_type, skip_prk_steps=True, steps_offset=1
                ),
                safety_checker=None,
                feature_extractor=None,
                requires_safety_checker=False,
            )
        else:
            pipeline = StableDiffusionXLPipeline(
                vae=vae,
                text_encoder=_clip(tokenizer, projection=False),
                text_encoder_2=_clip(tokenizer, projection=True),
                tokenizer=tokenizer,
                tokenizer_2=tokenizer,
                unet=unet,
                scheduler=EulerDiscreteScheduler(**schedule, prediction_type=prediction_type, steps_offset=1),
            )
    return _write(out, pipeline, settings)


def build_tiny_sd3(out: str | os.PathLike, words: Iterable[str], seed: int = 0, overwrite: bool = False) -> Path:
    """Build and save a tiny ``StableDiffusion3Pipeline``: an MMDiT transformer trained by flow matching.

    Three text encoders as in SD3 (CLIP-L and CLIP-G with projections, a T5 encoder), a VAE with a
    shift factor, and ``FlowMatchEulerDiscreteScheduler`` with SD3's shift of 3.

    Args:
        out: output directory (reused when it holds a build with the same settings).
        words: the captions' vocabulary.
        seed: weight initialisation seed.
        overwrite: rebuild even when ``out`` holds a matching build.

    Returns:
        ``out``.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import T5Config, T5EncoderModel

    words = sorted(set(words))
    settings = {"kind": "tiny-sd3", "seed": seed, "words": words}
    out = Path(out)
    if (tokenizer := _new_build(out, settings, overwrite)) is None:
        return out
    t5 = T5Config(
        vocab_size=len(tokenizer),
        d_model=2 * _WIDTH,  # SD3 pads the CLIP embeddings (2 × width side by side) to T5's width
        d_ff=2 * _WIDTH,
        d_kv=16,
        num_layers=2,
        num_heads=2,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = SD3Transformer2DModel(
            sample_size=8,
            patch_size=2,
            in_channels=4,
            out_channels=4,
            num_layers=2,
            attention_head_dim=8,
            num_attention_heads=2,
            joint_attention_dim=2 * _WIDTH,
            caption_projection_dim=16,
            pooled_projection_dim=2 * _WIDTH,  # CLIP-L's and CLIP-G's pooled projections side by side
            pos_embed_max_size=16,
        )
        pipeline = StableDiffusion3Pipeline(
            transformer=transformer,
            scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
            vae=_vae(shift_factor=0.1),
            text_encoder=_clip(tokenizer, projection=True),
            tokenizer=tokenizer,
            text_encoder_2=_clip(tokenizer, projection=True),
            tokenizer_2=tokenizer,
            text_encoder_3=T5EncoderModel(t5),
            tokenizer_3=tokenizer,
        )
    return _write(out, pipeline, settings)


def build_tiny_wan(out: str | os.PathLike, words: Iterable[str], seed: int = 0, overwrite: bool = False) -> Path:
    """Build and save a tiny ``WanPipeline`` (Wan 2.1 text-to-video): a video transformer trained by flow matching.

    As the real checkpoint: a ``WanTransformer3DModel`` with (1, 2, 2) patches, a UMT5 text encoder, an
    ``AutoencoderKLWan`` with Wan's 4× temporal and 8× spatial compression (clips of 4n + 1 frames; 32 px
    frames give 4 × 4 latents) and per-channel latent statistics, and the ``UniPCMultistepScheduler`` Wan ships
    (flow sigmas, ``flow_prediction``, ``flow_shift`` 3).

    Args:
        out: output directory (reused when it holds a build with the same settings).
        words: the captions' vocabulary.
        seed: weight initialisation seed.
        overwrite: rebuild even when ``out`` holds a matching build.

    Returns:
        ``out``.
    """
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    words = sorted(set(words))
    settings = {"kind": "tiny-wan", "seed": seed, "words": words}
    out = Path(out)
    if (tokenizer := _new_build(out, settings, overwrite)) is None:
        return out
    umt5 = UMT5Config(
        vocab_size=len(tokenizer), d_model=_WIDTH, d_ff=2 * _WIDTH, d_kv=16, num_layers=2, num_heads=2,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        generator = torch.Generator().manual_seed(seed)
        pipeline = WanPipeline(
            tokenizer=tokenizer,
            text_encoder=UMT5EncoderModel(umt5),
            vae=AutoencoderKLWan(
                base_dim=8,
                z_dim=4,
                dim_mult=[1, 1, 2, 2],
                num_res_blocks=1,
                temperal_downsample=[False, True, True],
                latents_mean=(torch.randn(4, generator=generator) * 0.5).tolist(),
                latents_std=(1.0 + torch.rand(4, generator=generator)).tolist(),
            ),  # fmt: skip
            transformer=WanTransformer3DModel(
                patch_size=(1, 2, 2),
                num_attention_heads=2,
                attention_head_dim=8,
                in_channels=4,
                out_channels=4,
                text_dim=_WIDTH,
                freq_dim=16,
                ffn_dim=32,
                num_layers=2,
                rope_max_seq_len=32,
            ),  # fmt: skip
            scheduler=UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0),
        )
    return _write(out, pipeline, settings)
