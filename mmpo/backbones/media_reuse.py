"""Encode each step's images and videos once for the policy and the reference.

When the vision tower and the projector are frozen and carry no adapter, the policy and the reference
(the same model with its LoRA adapter disabled) compute identical media features. Inside
:func:`reuse_media_features`, the inner model's ``get_image_features`` / ``get_video_features`` keep
their output for the inputs they have seen, so the reference pass reads the policy pass's features
instead of running the vision tower again.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

__all__ = ["media_features_shareable", "reuse_media_features"]

_ENCODERS = ("get_image_features", "get_video_features")
_MEDIA_MODULES = ("vision_tower", "visual", "vision_model", "image_encoder", "multi_modal_projector", "mm_projector")


def media_features_shareable(model: nn.Module) -> bool:
    """True when no parameter of the media encoders trains and none of them carries an adapter."""
    saw_media = False
    for name, p in model.named_parameters():
        if any(f"{m}." in name for m in _MEDIA_MODULES):
            saw_media = True
            if p.requires_grad or "lora_" in name:
                return False
    return saw_media


def _key(name: str, args: tuple, kwargs: dict) -> tuple:
    def part(v: Any) -> Any:
        if torch.is_tensor(v):
            return ("tensor", v.data_ptr(), tuple(v.shape), v.dtype)
        if isinstance(v, list | tuple):
            return tuple(part(x) for x in v)
        return repr(v)

    return (name, part(args), tuple(sorted((k, part(v)) for k, v in kwargs.items())))


@contextmanager
def reuse_media_features(inner: nn.Module) -> Iterator[None]:
    """Within the block, repeated media-encoder calls on the same tensors return the first result."""
    store: dict[tuple, Any] = {}
    patched = []
    for name in _ENCODERS:
        original = getattr(inner, name, None)
        if original is None:
            continue

        def cached(*args: Any, _original: Any = original, _name: str = name, **kwargs: Any) -> Any:
            key = _key(_name, args, kwargs)
            if key not in store:
                store[key] = _original(*args, **kwargs)
            return store[key]

        setattr(inner, name, cached)  # an instance attribute shadows the class's method
        patched.append(name)
    try:
        yield
    finally:
        for name in patched:
            delattr(inner, name)
