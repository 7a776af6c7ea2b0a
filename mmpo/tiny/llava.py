"""A tiny, randomly initialised LLaVA with an offline word-level tokenizer and a real processor.

Nothing can be fetched from a model hub in tests or in the quickstart, so this module builds a
LLaVA-architecture checkpoint from transformers configs and writes it with ``save_pretrained``.
Everything downstream then loads it with ``from_pretrained`` exactly as it would load
``llava-hf/llava-1.5-7b-hf``: the loading path under test is the real one.

Example:
    >>> from mmpo.tiny.llava import build_tiny_llava
    >>> path = build_tiny_llava("runs/tiny-llava", words=["a", "red", "circle", "."])
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

import torch

from datamodules.core.atomic import atomic_directory
from mmpo.tiny.build import reusable_build, save_tiny_build, seeded_model

__all__ = [
    "TINY_CHAT_TEMPLATE",
    "TINY_SPECIAL_TOKENS",
    "build_tiny_llava",
    "build_tiny_processor",
    "pretraining_loop",
    "read_tiny_stamp",
    "reused_pretraining",
    "save_tiny_weights",
    "warmup_cosine",
]

# A LLaVA-1.5-like template ("USER: <image> question ASSISTANT: answer</s>") with a space
# between every word, because the tokenizer is word-level and splits on whitespace.
TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'user' %}USER : "
    "{% if m['content'] is string %}{{ m['content'] }} "
    "{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<image> {% elif c['type'] == 'video' %}<video> "
    "{% elif c['type'] == 'text' %}{{ c['text'] }} {% endif %}"
    "{% endfor %}{% endif %}"
    "{% elif m['role'] == 'assistant' %}ASSISTANT : "
    "{% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for c in m['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}"
    "{% endif %} </s> "
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT : {% endif %}"
)

TINY_SPECIAL_TOKENS = ("<pad>", "<unk>", "<s>", "</s>", "<image>", "<video>")
_TEMPLATE_WORDS = ("USER", "ASSISTANT", ":")


def build_tiny_processor(words: Iterable[str], image_size: int = 48, patch_size: int = 8, video: bool = False):
    """Build a ``LlavaProcessor`` offline: a word-level tokenizer plus a CLIP image processor.

    With ``video=True`` it is a ``LlavaNextVideoProcessor`` instead (images and videos; a video of N
    frames expands to ``N * (image_size / patch_size / 2)**2`` ``<video>`` tokens after 2x2 pooling).

    Args:
        words: every word the data can contain; anything else becomes ``<unk>``.
        image_size: the side the image processor resizes and crops to.
        patch_size: the vision tower's patch size; an image expands to ``(image_size / patch_size)**2``
            ``<image>`` tokens (the CLS token is dropped by the ``default`` feature strategy).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import CLIPImageProcessor, LlavaProcessor, PreTrainedTokenizerFast

    vocab: dict[str, int] = {}
    for w in (*TINY_SPECIAL_TOKENS, *_TEMPLATE_WORDS, *sorted(set(words))):
        vocab.setdefault(w, len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        extra_special_tokens={"image_token": "<image>", "video_token": "<video>"},
    )
    tokenizer.chat_template = TINY_CHAT_TEMPLATE
    if video:
        from transformers import LlavaNextImageProcessor, LlavaNextVideoProcessor, LlavaNextVideoVideoProcessor

        square = {"height": image_size, "width": image_size}
        return LlavaNextVideoProcessor(
            video_processor=LlavaNextVideoVideoProcessor(
                size={"shortest_edge": image_size}, crop_size=square, do_center_crop=True
            ),
            image_processor=LlavaNextImageProcessor(
                size={"shortest_edge": image_size}, crop_size=square, image_grid_pinpoints=[[image_size, image_size]]
            ),
            tokenizer=tokenizer,
            chat_template=TINY_CHAT_TEMPLATE,
            patch_size=patch_size,
            vision_feature_select_strategy="default",
            video_token="<video>",
            image_token="<image>",
            num_additional_image_tokens=1,
        )
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        do_center_crop=True,
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        image_token="<image>",
        chat_template=TINY_CHAT_TEMPLATE,
    )


def build_tiny_llava(
    out_dir: str | os.PathLike,
    words: Iterable[str],
    image_size: int = 48,
    patch_size: int = 8,
    vision_width: int = 64,
    vision_layers: int = 2,
    text_width: int = 128,
    text_layers: int = 4,
    heads: int = 4,
    seed: int = 0,
    overwrite: bool = False,
    video: bool = False,
) -> Path:
    """Write a random-init LLaVA (or LLaVA-NeXT-Video) checkpoint and its processor to ``out_dir``.

    The directory is complete (model, config, tokenizer, processor, chat template) and loads with
    ``AutoModelForImageTextToText.from_pretrained`` and ``AutoProcessor.from_pretrained``. It is written
    to a temporary sibling and renamed, so an interrupted build never leaves a half-written model. If a
    build with the same settings is already there it is reused.

    Args:
        out_dir: destination directory.
        words: the data's vocabulary (see ``datamodules.worlds.shapes.vocabulary``).
        image_size: input resolution of the vision tower.
        patch_size: vision patch size.
        vision_width: hidden size of the CLIP vision tower.
        vision_layers: number of vision transformer layers.
        text_width: hidden size of the Llama language model.
        text_layers: number of language model layers.
        heads: attention heads in both towers.
        seed: seed of the random initialisation.
        overwrite: rebuild even if a matching build exists.
        video: build a ``LlavaNextVideoForConditionalGeneration`` (video-LLM: frames encoded by the
            same tower, 2x2-pooled) with a ``LlavaNextVideoProcessor``.

    Returns:
        The checkpoint directory.
    """
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaNextVideoConfig,
        LlavaNextVideoForConditionalGeneration,
    )

    out = Path(out_dir)
    words = sorted(set(words))
    settings = {
        "version": 2,
        "video": video,
        "image_size": image_size,
        "patch_size": patch_size,
        "vision_width": vision_width,
        "vision_layers": vision_layers,
        "text_width": text_width,
        "text_layers": text_layers,
        "heads": heads,
        "seed": seed,
        "words": words,
    }
    # the stamp may also record later work on the weights (tiny_vision, tiny_language), kept when reused
    if reusable_build(out, settings, overwrite):
        return out

    processor = build_tiny_processor(words, image_size=image_size, patch_size=patch_size, video=video)
    tokenizer = processor.tokenizer
    vocab_size = len(tokenizer)
    config_class, model_class = (
        (LlavaNextVideoConfig, LlavaNextVideoForConditionalGeneration)
        if video
        else (LlavaConfig, LlavaForConditionalGeneration)
    )
    extra = {"video_token_index": tokenizer.convert_tokens_to_ids("<video>"), "spatial_pool_stride": 2}
    extra = {**extra, "image_grid_pinpoints": [[image_size, image_size]]} if video else {}
    config = config_class(
        vision_config=CLIPVisionConfig(
            hidden_size=vision_width,
            intermediate_size=2 * vision_width,
            num_hidden_layers=vision_layers,
            num_attention_heads=heads,
            image_size=image_size,
            patch_size=patch_size,
        ),
        text_config=LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=text_width,
            intermediate_size=2 * text_width,
            num_hidden_layers=text_layers,
            num_attention_heads=heads,
            num_key_value_heads=heads,
            max_position_embeddings=1024,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            tie_word_embeddings=False,
        ),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        pad_token_id=tokenizer.pad_token_id,
        **extra,
    )
    save_tiny_build(out, seeded_model(model_class, config, seed), processor, settings)
    return out


def read_tiny_stamp(checkpoint: str | os.PathLike) -> dict:
    """The ``mmpo_tiny.json`` of a checkpoint written by :func:`build_tiny_llava`; a clear error otherwise."""
    stamp = Path(checkpoint) / "mmpo_tiny.json"
    if not stamp.is_file():
        raise FileNotFoundError(f"{stamp} not found: {checkpoint} is not a tiny LLaVA written by build_tiny_llava")
    return json.loads(stamp.read_text())


def reused_pretraining(stamp: dict, key: str, settings: dict, kept: tuple[str, ...]) -> dict | None:
    """The report of a pretraining already stamped under ``key`` with exactly ``settings``, else None."""
    done = stamp.get(key, {})
    if {k: done.get(k) for k in settings} != settings:
        return None
    return {**{k: done[k] for k in kept}, "steps": settings["steps"], "reused": True}


def save_tiny_weights(model, checkpoint: str | os.PathLike, stamp: dict) -> None:
    """Write ``model``'s weights and ``stamp`` into the tiny checkpoint, replacing it atomically.

    The processor, tokenizer and chat template files are carried over unchanged.
    """
    out = Path(checkpoint)
    with atomic_directory(out) as tmp:
        model.save_pretrained(tmp)
        for f in out.iterdir():
            if f.is_file() and not (tmp / f.name).exists():
                (tmp / f.name).write_bytes(f.read_bytes())
        (tmp / "mmpo_tiny.json").write_text(json.dumps(stamp, indent=1))


def warmup_cosine(steps: int, warmup_steps: int):
    """Learning-rate factor per step: linear warm-up over ``warmup_steps``, then cosine decay to zero at ``steps``."""
    import math

    return lambda s: min(1.0, (s + 1) / max(1, warmup_steps)) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))


def pretraining_loop(params, step_loss, steps: int, lr: float, warmup_steps: int, desc: str, progress: bool):
    """AdamW (no weight decay) on ``params`` for ``steps`` steps of ``step_loss()``, warm-up then cosine.

    Returns the last step's loss (a float; nan for zero steps).
    """
    from tqdm.auto import tqdm

    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(steps, warmup_steps))
    loss = torch.tensor(float("nan"))
    bar = tqdm(range(steps), desc=desc, disable=not progress, unit="step")
    for step in bar:
        loss = step_loss()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    return loss.item()
