"""What every tiny build does last: a model initialised from a seed, saved with its processor atomically."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from datamodules.core.atomic import atomic_directory

__all__ = ["reusable_build", "save_tiny_build", "seeded_model", "write_tiny_build"]


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
