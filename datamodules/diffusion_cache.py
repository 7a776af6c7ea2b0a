"""VAE latents and text embeddings of diffusion preference pairs, computed once and kept on disk.

One safetensors file per record, ``cache_dir/<key[:2]>/<key>.safetensors``. The key is a fingerprint
of everything the encoders saw: the caption, the bytes of both image files, the resolution and the
caller's ``encoder_id`` (e.g. ``"sd15-vae-mean+clip-l"``; change it whenever the encoders, their
weights or the way they are called change). Editing an image or a caption therefore gives a new key
and a fresh entry; an old entry is never read for new data. An entry holds::

    latents      (2, c, h, w)  encode_images(image_0, image_1), in the data's order (not winner first)
    text_embeds  (L, D)        encode_text(caption); absent when built without a text encoder
    text.<name>  (...)         further outputs when encode_text returns a mapping (SDXL's pooled embeds)

Only the deterministic part of the image transform is cached (resize + centre crop, no flip): a
random crop or flip cannot be applied to latents, so a cached dataset trains without augmentation.
Entries are written to a temporary file and renamed, so an interrupted build leaves no half-written
entry and a second build resumes where the first stopped. With ``on_bad_sample="skip"`` a record
whose images cannot be decoded gets a ``<key>.bad`` marker holding the reason instead of an entry.

Looking an entry up hashes the record's two image files (reading them, not decoding them), so the
images must stay on disk next to the cache.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from einops import rearrange
from torch import Tensor

from datamodules.records import BadSampleError

if TYPE_CHECKING:
    from datamodules.diffusion import DiffusionPreferenceDataset

__all__ = ["CACHE_VERSION", "CacheStats", "LatentCache", "LatentCacheMissError", "build_latent_cache"]

CACHE_VERSION = 1
_MANIFEST = "cache.json"
_TEXT_PREFIX = "text."


class LatentCacheMissError(LookupError):
    """A record has no entry in the latent cache (the message names the record and the cache)."""


@dataclass
class CacheStats:
    """What one :func:`build_latent_cache` call did, in records."""

    written: int = 0
    reused: int = 0
    skipped: int = 0


def _file_digest(path: str) -> bytes:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.digest()


class LatentCache:
    """Read and write the cache entries of one encoder in ``cache_dir``.

    Args:
        cache_dir: the cache directory (created on the first write).
        encoder_id: identity of the encoders. None reads it from ``cache.json``, which lists the
            encoders built into the directory; that works when there is exactly one.
    """

    def __init__(self, cache_dir: str | os.PathLike, encoder_id: str | None = None) -> None:
        self.dir = Path(cache_dir)
        self._encoder_id = encoder_id

    @property
    def encoder_id(self) -> str:
        if self._encoder_id is None:
            built = self.encoders()
            if len(built) != 1:
                what = f"entries of {len(built)} encoders {built}" if built else "no cache built yet"
                raise LatentCacheMissError(
                    f"latent cache {self.dir}: {what}; build it with build_latent_cache(..., encoder_id=...) "
                    "or name the encoder (cache_encoder_id)"
                )
            self._encoder_id = built[0]
        return self._encoder_id

    @encoder_id.setter
    def encoder_id(self, value: str) -> None:
        self._encoder_id = value

    def encoders(self) -> list[str]:
        """The encoder ids built into this directory (from ``cache.json``)."""
        try:
            return list(json.loads((self.dir / _MANIFEST).read_text(encoding="utf-8"))["encoder_ids"])
        except FileNotFoundError:
            return []

    def register(self) -> None:
        """Add this cache's encoder id to ``cache.json`` (run builds from one process, e.g. rank 0)."""
        built = self.encoders()
        if self.encoder_id in built:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        text = json.dumps({"version": CACHE_VERSION, "encoder_ids": built + [self.encoder_id]}, indent=2) + "\n"
        tmp = self.dir / f"{_MANIFEST}.{os.getpid()}.tmp"
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, self.dir / _MANIFEST)

    def key(self, caption: str, images: Sequence[str], resolution: int, where: str) -> str:
        """Fingerprint of an entry: caption, image bytes, resolution, encoder id and cache version."""
        h = hashlib.sha256(
            json.dumps(
                {"v": CACHE_VERSION, "encoder": self.encoder_id, "resolution": resolution, "caption": caption},
                sort_keys=True,
            ).encode()
        )
        for path in images:
            try:
                h.update(_file_digest(path))  # a digest per file: no ambiguity where one file ends
            except OSError as e:
                raise BadSampleError(f"{where}: cannot read image {path}: {e}") from e
        return h.hexdigest()[:32]

    def path(self, key: str) -> Path:
        return self.dir / key[:2] / f"{key}.safetensors"

    def _bad_path(self, key: str) -> Path:
        return self.dir / key[:2] / f"{key}.bad"

    def has(self, key: str, need_text: bool = False) -> bool:
        """Whether a complete entry exists (with text embeddings when ``need_text``)."""
        from safetensors import safe_open

        try:
            with safe_open(str(self.path(key)), framework="pt") as f:
                names, meta = set(f.keys()), f.metadata() or {}
        except Exception:  # missing, or not a safetensors file: rebuild it
            return False
        return meta.get("key") == key and "latents" in names and (not need_text or "text_embeds" in names)

    def is_bad(self, key: str) -> bool:
        return self._bad_path(key).is_file()

    def _atomic_write(self, target: Path, write: Callable[[Path], None]) -> None:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f"{target.name}.{os.getpid()}.tmp")
        try:
            write(tmp)
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)

    def write(self, key: str, tensors: Mapping[str, Tensor], record_id: str) -> None:
        from safetensors.torch import save_file

        meta = {"key": key, "id": record_id, "encoder_id": self.encoder_id, "version": str(CACHE_VERSION)}
        data = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        self._atomic_write(self.path(key), lambda tmp: save_file(data, str(tmp), metadata=meta))
        self._bad_path(key).unlink(missing_ok=True)

    def mark_bad(self, key: str, message: str) -> None:
        self._atomic_write(self._bad_path(key), lambda tmp: tmp.write_text(message, encoding="utf-8"))

    def load(self, key: str, where: str, record_id: str) -> dict[str, Tensor]:
        """The tensors of an entry.

        Raises:
            BadSampleError: the record's images could not be decoded when the cache was built.
            LatentCacheMissError: no entry (the cache was built for other data, resolution or encoder).
        """
        from safetensors.torch import load_file

        path = self.path(key)
        if not path.is_file():
            if self.is_bad(key):
                raise BadSampleError(self._bad_path(key).read_text(encoding="utf-8"))
            raise LatentCacheMissError(
                f"{where}: record {record_id!r} has no entry in the latent cache {self.dir} (encoder "
                f"{self.encoder_id!r}); build it with build_latent_cache or DiffusionPreferenceDataModule."
                "build_cache with the same data, resolution and encoder_id"
            )
        try:
            return load_file(str(path))
        except Exception as e:
            raise LatentCacheMissError(
                f"{where}: latent cache entry {path} of record {record_id!r} is unreadable ({e}); delete it and "
                "build the cache again"
            ) from e


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
        tensors[name if name == "text_embeds" else _TEXT_PREFIX + name] = value.detach().cpu()
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
            pixels.append(dataset.pixels(i))  # (2, C, H, W) image_0, image_1; centre crop, no flip
            todo.append((i, key))
        except BadSampleError as e:
            if dataset.on_bad_sample != "skip":
                raise
            cache.mark_bad(key, str(e))
            stats.skipped += 1
    if not todo:
        return
    n = len(todo)
    with torch.no_grad():
        latents = encode_images(rearrange(torch.stack(pixels), "n two c h w -> (n two) c h w"))
        if not isinstance(latents, Tensor) or latents.shape[0] != 2 * n:
            shape = tuple(latents.shape) if isinstance(latents, Tensor) else type(latents).__name__
            raise ValueError(
                f"encode_images got {2 * n} images and must return a Tensor with first axis {2 * n}, got {shape}"
            )
        latents = rearrange(latents.detach().cpu(), "(n two) ... -> n two ...", two=2)
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
        batch_size: pairs per encoder call (2 * batch_size images).
        encoder_id: identity of the encoders, part of every key (see the module docstring).
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
            key = cache.key(rec.caption, rec.images, dataset.resolution, rec.where)
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
