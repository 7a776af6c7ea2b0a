"""What every tiny build does last: a model initialised from a seed, saved with its processor atomically; and the
sizes and settings the tiny builds of :mod:`mmpo.tiny.families` share."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from datamodules.core.atomic import atomic_directory

__all__ = [
    "IMAGE_SIZE",
    "TEXT",
    "VISION_WIDTH",
    "reusable_build",
    "save_tiny_build",
    "seeded_model",
    "text_config",
    "token_ids",
    "vit_config",
    "write_family_build",
    "write_tiny_build",
]

PathLike = str | os.PathLike


def seeded_model(model_class: Any, config: Any, seed: int) -> Any:
    """``model_class(config)`` initialised from ``seed``, leaving the process's generator as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return model_class(config)


def save_tiny_build(out: str | os.PathLike, model: Any, processor: Any, stamp: dict[str, Any]) -> None:
    """Write ``model``, ``processor`` and the ``mmpo_tiny.json`` ``stamp`` to ``out`` in one rename; greedy
    generation stops at the tokenizer's EOS and pads with its pad token."""
    tokenizer = processor.tokenizer
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    with atomic_directory(Path(out)) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        (tmp / "mmpo_tiny.json").write_text(json.dumps(stamp, indent=1))


def reusable_build(out: str | os.PathLike, settings: dict[str, Any], overwrite: bool = False) -> bool:
    """Whether ``out`` already holds a build made with ``settings`` (its stamp may record more: later
    work on the weights)."""
    stamp = Path(out) / "mmpo_tiny.json"
    if overwrite or not stamp.exists():
        return False
    done = json.loads(stamp.read_text())
    return {k: done.get(k) for k in settings} == settings


def write_tiny_build(
    out: str | os.PathLike,
    settings: dict[str, Any],
    seed: int,
    make: Callable[[], tuple[Any, Any, Any]],
    *,
    overwrite: bool = False,
    after_init: Callable[[Any], None] | None = None,
) -> Path:
    """Build ``make() -> (config, model class, processor)`` unless :func:`reusable_build`, initialise the
    model from ``seed`` (``after_init(model)`` may change the fresh weights) and save it with its processor."""
    out = Path(out)
    if reusable_build(out, settings, overwrite):
        return out
    config, model_class, processor = make()
    model = seeded_model(model_class, config, seed)
    if after_init is not None:
        after_init(model)
    save_tiny_build(out, model, processor, settings)
    return out


# -- what the family builds share ---------------------------------------------------------------------------

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


def vit_config(**overrides: Any) -> dict[str, Any]:
    """A one-layer, 32-wide vision transformer on 32-pixel images in 8-pixel patches (4 x 4 patches)."""
    base = {"hidden_size": VISION_WIDTH, "intermediate_size": 2 * VISION_WIDTH, "num_hidden_layers": 1}
    return {**base, "num_attention_heads": 2, "image_size": IMAGE_SIZE, "patch_size": 8, **overrides}


def token_ids(tokenizer, *tokens: str) -> list[int]:
    """The ids of ``tokens`` in ``tokenizer``'s vocabulary."""
    return [tokenizer.convert_tokens_to_ids(t) for t in tokens]


def text_config(tokenizer, **overrides: Any) -> dict[str, Any]:
    """The language model's settings (``TEXT``) with the tokenizer's vocabulary size and special ids."""
    ids = {f"{role}_token_id": getattr(tokenizer, f"{role}_token_id") for role in ("pad", "bos", "eos")}
    return {**TEXT, "vocab_size": len(tokenizer), **ids, **overrides}


def write_family_build(
    out_dir: PathLike,
    family: str,
    words: Iterable[str],
    seed: int,
    overwrite: bool,
    make: Callable,
    after_init: Callable | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Build ``make(words) -> (config, model class, processor)``, initialise the model, save both atomically.

    ``after_init(model)`` may change the fresh weights. A directory already holding a build of the same
    family, words, seed and ``extra`` settings (e.g. other sizes) is reused.
    """
    words = sorted(set(words))
    settings = {"family": family, "version": 1, "seed": seed, "words": words, **(extra or {})}
    return write_tiny_build(out_dir, settings, seed, lambda: make(words), overwrite=overwrite, after_init=after_init)
