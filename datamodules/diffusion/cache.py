"""Filling the latent cache of a diffusion preference dataset: the encoders run once per record.

Entries, keys and reading are :mod:`datamodules.diffusion.latent_cache`; this module runs the caller's image and
text encoders over the records that have no valid entry yet and writes what they return. An interrupted
build resumes where it stopped, as entries are only ever renamed into place.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from datamodules.core.records import BadSampleError
from datamodules.diffusion.latent_cache import TEXT_PREFIX, LatentCache
from datamodules.diffusion.pairs import DiffusionPreferenceDataset

__all__ = ["CacheStats", "build_latent_cache"]


@dataclass
class CacheStats:
    """What one :func:`build_latent_cache` call did, in records."""

    written: int = 0
    reused: int = 0
    skipped: int = 0


def _text_outputs(out: Tensor | Mapping[str, Tensor], n: int) -> dict[str, Tensor]:
    """encode_text's result as entry tensors, first axis n."""
    if isinstance(out, Tensor):
        out = {"text_embeds": out}
    elif not isinstance(out, Mapping) or "text_embeds" not in out:
        raise TypeError("encode_text must return a Tensor (N, L, D) or a mapping with a 'text_embeds' Tensor")
    tensors = {}
    for name, value in out.items():
        if not isinstance(value, Tensor) or value.shape[:1] != (n,):
            shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise ValueError(f"encode_text output {name!r} must be a Tensor with first axis {n}, got {shape}")
        tensors[name if name == "text_embeds" else TEXT_PREFIX + name] = value.detach().cpu()
    return tensors


def _encode_and_write(
    dataset: DiffusionPreferenceDataset,
    cache: LatentCache,
    pending: list[tuple[int, str]],
    encode_images: Callable[[Tensor], Tensor],
    encode_text: Callable[[list[str]], Tensor | Mapping[str, Tensor]] | None,
    stats: CacheStats,
) -> None:
    pixels, todo = [], []
    for i, key in pending:
        try:
            pixels.append(dataset.pixels(i))  # (K, C, H, W) the record's images in data order; centre crop, no flip
            todo.append((i, key))
        except BadSampleError as e:
            if dataset.on_bad_sample != "skip":
                raise
            cache.mark_bad(key, str(e))
            stats.skipped += 1
    if not todo:
        return
    n, counts = len(todo), [p.shape[0] for p in pixels]  # K images per record (pairs: 2)
    total = sum(counts)
    with torch.no_grad():
        latents = encode_images(torch.cat(pixels))  # (ΣK, C, H, W) -> (ΣK, c, h, w)
        if not isinstance(latents, Tensor) or latents.shape[0] != total:
            shape = tuple(latents.shape) if isinstance(latents, Tensor) else type(latents).__name__
            raise ValueError(
                f"encode_images got {total} images and must return a Tensor with first axis {total}, got {shape}"
            )
        latents = latents.detach().cpu().split(counts)  # per record (K, c, h, w)
        captions = [dataset.records[i].caption for i, _ in todo]
        text = _text_outputs(encode_text(captions), n) if encode_text is not None else {}
    for j, (i, key) in enumerate(todo):
        # .clone(): a row of a batch tensor would otherwise save the whole batch's storage.
        entry = {"latents": latents[j].clone()} | {name: t[j].clone() for name, t in text.items()}
        cache.write(key, entry, dataset.records[i].id)
        stats.written += 1


def build_latent_cache(
    dataset: DiffusionPreferenceDataset,
    encode_images: Callable[[Tensor], Tensor],
    encode_text: Callable[[list[str]], Tensor | Mapping[str, Tensor]] | None,
    cache_dir: str | os.PathLike,
    batch_size: int = 16,
    *,
    encoder_id: str,
    show_progress: bool = True,
) -> CacheStats:
    """Encode every record of ``dataset`` that has no valid entry yet, and store it.

    The callables run under ``torch.no_grad()`` on CPU tensors; move them to your device and back
    inside (the result is moved to CPU anyway). Typical diffusers wrappers::

        encode_images = lambda x: vae.encode(x.to(dev, vae.dtype)).latent_dist.mean * vae.config.scaling_factor
        encode_text = lambda caps: text_encoder(tokenizer(caps, padding="max_length", truncation=True,
                                                          return_tensors="pt").input_ids.to(dev))[0]

    Args:
        dataset: the records to encode; images get the dataset's resolution and a centre crop.
        encode_images: (N, C, H, W) float in [-1, 1] -> latents (N, c, h, w), e.g. a VAE's mean (or
            sample) times its scaling factor. Stored in the dtype it returns.
        encode_text: captions (N) -> (N, L, D) embeddings padded to one length L, or a mapping with
            ``text_embeds`` and further (N, ...) tensors; None caches latents only.
        cache_dir: the cache directory.
        batch_size: records per encoder call (K · batch_size images, K = 2 for pairs).
        encoder_id: identity of the encoders, part of every key (see :mod:`datamodules.diffusion.latent_cache`).
        show_progress: show a tqdm progress bar.

    Returns:
        How many entries were written, reused (already valid) and skipped (undecodable images,
        ``on_bad_sample="skip"``).

    Raises:
        BadSampleError: an image cannot be decoded and the dataset's ``on_bad_sample`` is ``error``.
    """
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    cache = LatentCache(cache_dir, encoder_id)
    cache.register()
    stats, pending = CacheStats(), []
    with tqdm(total=len(dataset.records), desc="caching latents", unit="pair", disable=not show_progress) as bar:
        for i, rec in enumerate(dataset.records):
            key = cache.key(rec.caption, rec.images, dataset.geometry, rec.where)
            if cache.has(key, need_text=encode_text is not None):
                stats.reused += 1
                bar.update()
            elif dataset.on_bad_sample == "skip" and cache.is_bad(key):
                stats.skipped += 1
                bar.update()
            else:
                pending.append((i, key))
            if len(pending) == batch_size:
                _encode_and_write(dataset, cache, pending, encode_images, encode_text, stats)
                bar.update(len(pending))
                pending = []
        if pending:
            _encode_and_write(dataset, cache, pending, encode_images, encode_text, stats)
            bar.update(len(pending))
    return stats
