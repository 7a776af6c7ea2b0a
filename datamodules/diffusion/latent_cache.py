"""The on-disk cache of VAE latents and text embeddings of diffusion preference pairs: keys, entries, reading.

One safetensors file per record, ``cache_dir/<key[:2]>/<key>.safetensors``. The key is a fingerprint
of everything the encoders saw: the caption, the bytes of every image file, the resolution and the
caller's ``encoder_id`` (e.g. ``"sd15-vae-mean+clip-l"``; change it whenever the encoders, their
weights or the way they are called change). Editing an image or a caption therefore gives a new key
and a fresh entry; an old entry is never read for new data. An entry holds::

    latents      (K, c, h, w)  encode_images(image_0, image_1, ...), in the data's order (not best first)
    text_embeds  (L, D)        encode_text(caption); absent when built without a text encoder
    text.<name>  (...)         further outputs when encode_text returns a mapping (SDXL's pooled embeds)

Only the deterministic part of the image transform is cached (resize + centre crop, no flip): a
random crop or flip cannot be applied to latents, so a cached dataset trains without augmentation.
Entries are written to a temporary file and renamed, so an interrupted build leaves no half-written
entry and a second build resumes where the first stopped. With ``on_bad_sample="skip"`` a record
whose images cannot be decoded gets a ``<key>.bad`` marker holding the reason instead of an entry.

Looking an entry up hashes the record's image files (reading them, not decoding them), so the
images must stay on disk next to the cache.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import Tensor

from datamodules.core.atomic import atomic_file, atomic_write_text
from datamodules.core.records import BadSampleError

__all__ = ["CACHE_VERSION", "TEXT_PREFIX", "LatentCache", "LatentCacheMissError"]

CACHE_VERSION = 1
# Entry names of encode_text's further outputs (``text.<name>``); ``text_embeds`` is stored as it is.
TEXT_PREFIX = "text."
_MANIFEST = "cache.json"


class LatentCacheMissError(LookupError):
    """A record has no entry in the latent cache (the message names the record and the cache)."""


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
        atomic_write_text(self.dir / _MANIFEST, text)

    def key(self, caption: str, images: Sequence[str], resolution: Any, where: str) -> str:
        """Fingerprint of an entry: caption, image bytes, resolution (with the frame count for clips), encoder
        id and cache version."""
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

    def write(self, key: str, tensors: Mapping[str, Tensor], record_id: str) -> None:
        from safetensors.torch import save_file

        meta = {"key": key, "id": record_id, "encoder_id": self.encoder_id, "version": str(CACHE_VERSION)}
        data = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        with atomic_file(self.path(key)) as tmp:
            save_file(data, str(tmp), metadata=meta)
        self._bad_path(key).unlink(missing_ok=True)

    def mark_bad(self, key: str, message: str) -> None:
        atomic_write_text(self._bad_path(key), message)

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
