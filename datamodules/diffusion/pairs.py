"""Diffusion preference pairs in the Pick-a-Pic style: a caption, two images and which one is preferred.

A record (JSONL line, JSON or Parquet row)::

    {"id": "p1", "caption": "a red circle .", "image_0": "a.png", "image_1": "b.png", "label_0": 1.0}

``label_0`` is the probability that image_0 is preferred (Pick-a-Pic: 1 image_0, 0 image_1, 0.5 a
tie; soft values in between are kept as soft labels); ``label_1``, when given, must equal
``1 - label_0`` and may stand alone. Instead of a label a record may give ``"scores": [s0, s1]``
(higher is better); with both, they must not disagree. ``jpg_0`` / ``jpg_1`` are accepted as
aliases of ``image_0`` / ``image_1`` when they hold paths (Pick-a-Pic's Parquet files hold the
JPEG bytes there: write them out as files first). Image paths are relative to the data root.

Ties (label 0.5 or equal scores) are dropped by default, as Diffusion-DPO does; kept, the pair
carries label 0.5 for soft-label losses (SmPO). Every problem names the file and line of the record.
"""

from __future__ import annotations

import logging
import math
import os
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from einops import rearrange
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.transforms.functional import pil_to_tensor

from datamodules.core.records import BadSampleError, iter_raw_records, resolve_media_path
from datamodules.core.samplers import EpochShuffleSampler
from datamodules.diffusion.latent_cache import TEXT_PREFIX, LatentCache
from datamodules.vision_text.collator import load_image

__all__ = [
    "DiffusionPairRecord",
    "DiffusionPreferenceBatch",
    "DiffusionPreferenceCollator",
    "DiffusionPreferenceDataset",
    "EpochTaggedSampler",
    "load_diffusion_records",
    "pair_pixels",
    "parse_diffusion_record",
]

log = logging.getLogger(__name__)

_IMAGE_FIELDS = (("image_0", "jpg_0"), ("image_1", "jpg_1"))


@dataclass
class DiffusionPairRecord:
    """One validated pair.

    Attributes:
        id: record id (from the data, else ``<file>:<line>``).
        where: ``<file>:<line>`` (or ``<file>[row]``) for error messages.
        caption: the prompt both images were generated from.
        images: absolute paths of image_0 and image_1, in the data's order.
        winner: index (0 or 1) of the preferred image; 0 for a tie.
        label: preference strength of the winner, in [0.5, 1] (1 for a hard label, 0.5 for a tie).
        scores: (winner score, loser score) when the record gave scores.
    """

    id: str
    where: str
    caption: str
    images: tuple[str, str]
    winner: int
    label: float
    scores: tuple[float, float] | None = None

    @property
    def is_tie(self) -> bool:
        return self.label == 0.5


def _number(value: Any, name: str, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise BadSampleError(f"{where}: {name!r} must be a number, got {value!r}")
    try:
        return float(value)
    except OverflowError:  # an integer too large for a float
        return math.inf


def _label(value: Any, name: str, where: str) -> float:
    p = _number(value, name, where)
    if not 0.0 <= p <= 1.0:  # also refuses NaN
        raise BadSampleError(f"{where}: {name!r} must be in [0, 1] (1: image_0 preferred), got {value!r}")
    return p


def _preference(raw: dict[str, Any], where: str) -> tuple[float, tuple[float, float] | None]:
    """P(image_0 preferred) and the raw scores (s0, s1), if any."""
    p0 = _label(raw["label_0"], "label_0", where) if raw.get("label_0") is not None else None
    if raw.get("label_1") is not None:
        p1 = _label(raw["label_1"], "label_1", where)
        if p0 is None:
            p0 = 1.0 - p1
        elif abs(p0 + p1 - 1.0) > 1e-6:
            raise BadSampleError(f"{where}: 'label_0' ({p0:g}) and 'label_1' ({p1:g}) must sum to 1")
    scores = raw.get("scores")
    if scores is None:
        assert p0 is not None  # the caller checked that a label or scores is present
        return p0, None
    if not isinstance(scores, list | tuple) or len(scores) != 2:
        raise BadSampleError(f"{where}: 'scores' must be a list of 2 numbers [s0, s1], got {scores!r}")
    s0, s1 = (_number(s, f"scores[{i}]", where) for i, s in enumerate(scores))
    if not (math.isfinite(s0) and math.isfinite(s1)):
        raise BadSampleError(f"{where}: scores must be finite numbers, got {scores!r}")
    by_scores = 1.0 if s0 > s1 else 0.0 if s0 < s1 else 0.5
    if p0 is None:
        return by_scores, (s0, s1)
    if (p0 - 0.5) * (by_scores - 0.5) < 0:
        raise BadSampleError(f"{where}: label_0 = {p0:g} and scores {[s0, s1]} prefer different images")
    return p0, (s0, s1)


def _image(raw: dict[str, Any], names: tuple[str, str], where: str, root: Path) -> str:
    given = [n for n in names if raw.get(n) is not None]
    if len(given) > 1:
        raise BadSampleError(f"{where}: give {names[0]!r} or its alias {names[1]!r}, not both")
    value = raw[given[0]]
    if not isinstance(value, str):
        raise BadSampleError(
            f"{where}: {given[0]!r} must be an image path relative to the data root, got {type(value).__name__} "
            "(image bytes inside the data file are not read: write them out as files)"
        )
    return resolve_media_path(value, root, where)


def parse_diffusion_record(raw: dict[str, Any], where: str, data_root: Path) -> DiffusionPairRecord:
    """Validate one raw pair record and resolve its image paths.

    Raises:
        BadSampleError: naming ``where`` and the problem.
    """
    missing = [] if raw.get("caption") is not None else ["caption"]
    missing += [names[0] for names in _IMAGE_FIELDS if all(raw.get(n) is None for n in names)]
    if all(raw.get(k) is None for k in ("label_0", "label_1", "scores")):
        missing.append("label_0 (or scores)")
    if missing:
        raise BadSampleError(f"{where}: missing field(s) {', '.join(missing)}")
    caption = raw["caption"]
    if not isinstance(caption, str):
        raise BadSampleError(f"{where}: 'caption' must be a string, got {type(caption).__name__}")
    if not caption.strip():
        raise BadSampleError(f"{where}: 'caption' is empty")
    p0, scores = _preference(raw, where)
    images = (_image(raw, _IMAGE_FIELDS[0], where, data_root), _image(raw, _IMAGE_FIELDS[1], where, data_root))
    winner = 0 if p0 >= 0.5 else 1
    return DiffusionPairRecord(
        id=str(raw.get("id", where)),
        where=where,
        caption=caption,
        images=images,
        winner=winner,
        label=max(p0, 1.0 - p0),
        scores=None if scores is None else (scores[winner], scores[1 - winner]),
    )


def load_diffusion_records(
    path: str | os.PathLike,
    data_root: str | os.PathLike | None = None,
    on_bad_sample: str = "error",
    drop_ties: bool = True,
) -> tuple[list[DiffusionPairRecord], list[str]]:
    """Read and validate every pair of a .jsonl, .json or .parquet file.

    Args:
        path: the data file.
        data_root: directory image paths are relative to (default: the file's directory).
        on_bad_sample: ``"error"`` raises on the first bad record; ``"skip"`` drops it and reports it.
        drop_ties: drop pairs with label 0.5 or equal scores (not counted as problems; logged).

    Returns:
        The valid records and the list of problems (one message per skipped record).
    """
    if on_bad_sample not in ("error", "skip"):
        raise ValueError(f"on_bad_sample must be 'error' or 'skip', got {on_bad_sample!r}")
    root = Path(data_root) if data_root is not None else Path(path).parent
    records, problems, ties = [], [], 0
    for where, raw in iter_raw_records(path):
        try:
            if isinstance(raw, Exception):
                raise raw
            rec = parse_diffusion_record(raw, where, root)
        except BadSampleError as e:
            if on_bad_sample == "error":
                raise
            problems.append(str(e))
            continue
        if drop_ties and rec.is_tie:
            ties += 1
            continue
        records.append(rec)
    if ties:
        log.info("%s: dropped %d tied pair(s) (drop_ties=True)", path, ties)
    return records, problems


def pair_pixels(
    images: tuple[Image.Image, Image.Image], resolution: int, crop: tuple[float, float] = (0.5, 0.5), flip: bool = False
) -> Tensor:
    """Resize the shorter side to ``resolution`` (bilinear, antialiased), crop a square, flip, scale.

    Both images get the same crop, given as relative offsets ``(x, y)`` in [0, 1] of the free space
    (0.5, 0.5 is the centre crop), so two images of one size get the same pixels cut out.

    Returns:
        (2, 3, resolution, resolution) float in [-1, 1].
    """
    out = []
    for im in images:
        w, h = im.size
        if min(w, h) != resolution:
            s = resolution / min(w, h)
            w, h = max(resolution, round(w * s)), max(resolution, round(h * s))
            im = im.resize((w, h), Image.Resampling.BILINEAR)
        left, top = round(crop[0] * (w - resolution)), round(crop[1] * (h - resolution))
        im = im.crop((left, top, left + resolution, top + resolution))
        if flip:
            im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        out.append(pil_to_tensor(im).float() / 127.5 - 1.0)  # uint8 (3, R, R) -> [-1, 1]
    return torch.stack(out)


class EpochTaggedSampler(EpochShuffleSampler):
    """:class:`EpochShuffleSampler` yielding ``(index, epoch)``.

    DataLoader workers are copies of the dataset and never see ``set_epoch``; passing the epoch with
    each index makes a random augmentation a pure function of (seed, epoch, index), in any worker,
    after a resume, and under Lightning's ``DistributedSamplerWrapper`` (which forwards ``set_epoch``).
    """

    def __iter__(self):
        # lazily, like the parent: the epoch is read when the first index is asked for
        epoch = None
        for i in super().__iter__():
            epoch = self.current_epoch() if epoch is None else epoch
            yield i, epoch


class DiffusionPreferenceDataset(Dataset):
    """Pairs decoded on access (inside DataLoader workers), or read from a latent cache.

    Indexed by an int or by ``(index, epoch)`` (:class:`EpochTaggedSampler`); the random crop and
    flip of a pair are drawn from (seed, epoch, index) and shared by its two images. A sample is a
    dict with ``id``, ``caption``, ``label``, ``scores`` and either ``pixel_values`` (2, 3, R, R)
    or, with ``cache_dir``, ``latents`` (2, c, h, w) and the cached text tensors, winner first.
    With ``on_bad_sample="skip"`` an undecodable pair yields None, which the collator counts.

    Args:
        records: validated pairs.
        resolution: side of the square crop.
        random_crop: random instead of centre crop (training).
        random_flip: flip both images horizontally with probability 0.5 (training).
        seed: seed of the augmentation.
        on_bad_sample: ``error`` or ``skip``.
        cache_dir: read latents (and text embeddings) from this cache instead of decoding images;
            augmentation is then off (the cache holds the centre crop).
        cache_encoder_id: the encoder id the cache was built with (default: the only one in it).
    """

    def __init__(
        self,
        records: list[DiffusionPairRecord],
        resolution: int = 512,
        random_crop: bool = False,
        random_flip: bool = False,
        seed: int = 0,
        on_bad_sample: str = "error",
        cache_dir: str | os.PathLike | None = None,
        cache_encoder_id: str | None = None,
    ) -> None:
        self.records = records
        self.resolution = resolution
        self.random_crop = random_crop
        self.random_flip = random_flip
        self.seed = seed
        self.on_bad_sample = on_bad_sample
        self.cache = LatentCache(cache_dir, cache_encoder_id) if cache_dir is not None else None

    def __len__(self) -> int:
        return len(self.records)

    def augmentation(self, index: int, epoch: int) -> tuple[tuple[float, float], bool]:
        """Relative crop offsets and flip of a pair: a pure function of (seed, epoch, index)."""
        rng = random.Random(f"{self.seed}:{epoch}:{index}")  # str seeds hash with SHA-512: same in every process
        crop = (rng.random(), rng.random()) if self.random_crop else (0.5, 0.5)
        flip = self.random_flip and rng.random() < 0.5
        return crop, flip

    def pixels(self, index: int, crop: tuple[float, float] = (0.5, 0.5), flip: bool = False) -> Tensor:
        """(2, 3, R, R) in [-1, 1], image_0 then image_1 (data order). Raises BadSampleError."""
        rec = self.records[index]
        images = (load_image(rec.images[0], rec.where), load_image(rec.images[1], rec.where))
        return pair_pixels(images, self.resolution, crop, flip)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any] | None:
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        rec = self.records[index]
        sample: dict[str, Any] = {"id": rec.id, "caption": rec.caption, "label": rec.label, "scores": rec.scores}
        order = [rec.winner, 1 - rec.winner]
        try:
            if self.cache is None:
                sample["pixel_values"] = self.pixels(index, *self.augmentation(index, epoch))[order]
            else:
                entry = self.cache.load(
                    self.cache.key(rec.caption, rec.images, self.resolution, rec.where), rec.where, rec.id
                )
                sample["latents"] = entry.pop("latents")[order]
                sample["text"] = entry  # text_embeds (L, D) and text.<name>, or nothing
        except BadSampleError:
            if self.on_bad_sample == "skip":
                return None
            raise
        return sample


@dataclass
class DiffusionPreferenceBatch:
    """A batch of B groups of K = 2 images of one caption (preference pairs), winners first.

    Rows are response-major, as in :class:`~datamodules.core.batch.PreferenceBatch`: row ``k·B + b``
    holds image k of group b, so rows ``0..B-1`` hold the preferred images and rows ``B..2B-1`` the
    dispreferred ones of the same pairs in the same order. The caption conditions both rows of a pair:
    it is encoded once per group and repeated for its K rows. Like a ``PreferenceBatch`` it answers
    ``num_groups``, ``group_size``, ``skipped``, ``truncated`` and :meth:`side_info`, so the training
    module reads both kinds alike.

    Attributes:
        pixel_values: (2B, 3, R, R) float in [-1, 1]; None when read from a latent cache.
        captions: the B captions.
        label: (B,) float, preference strength of the winner in [0.5, 1]: 1 for a hard label, 0.5
            for a kept tie, in between for a soft label (SmPO-style losses).
        scores: (B, 2) (winner, loser) scores as given in the data, NaN rows for pairs given by a
            label only; None when no pair of the batch had scores.
        scores_complete: every pair of the batch gave scores (no NaN row), decided by the collator.
        ids: the B record ids.
        skipped: records dropped while building this batch (``on_bad_sample: skip``).
        latents: (2B, c, h, w) cached latents (same row order), when a cache is used.
        text_embeds: (B, L, D) cached text embeddings, when the cache holds them.
        text_extra: further cached text-encoder outputs by name, each (B, ...) (e.g. SDXL's pooled
            embeddings), when the cache's ``encode_text`` returned a mapping.
        noise_draw: the (t, ε) of each group, set by a diffusion backbone on its first pass over this
            batch object so that later passes (the reference's) denoise at the same noise; None from
            the collator. Copies made by :meth:`to` and :meth:`pin_memory` start without one.
    """

    pixel_values: Tensor | None
    captions: list[str]
    label: Tensor
    scores: Tensor | None = None
    scores_complete: bool = False
    ids: list[str] = field(default_factory=list)
    skipped: int = 0
    latents: Tensor | None = None
    text_embeds: Tensor | None = None
    text_extra: dict[str, Tensor] = field(default_factory=dict)
    noise_draw: Any = None

    @property
    def num_pairs(self) -> int:
        return self.label.shape[0]

    @property
    def num_groups(self) -> int:
        """B, the groups (pairs) of the batch."""
        return self.label.shape[0]

    @property
    def group_size(self) -> int:
        """K, images per group: 2 (winner, loser)."""
        return 2

    @property
    def truncated(self) -> int:
        """Responses shortened to fit: none, images are never cut (captions are cut by the text encoder)."""
        return 0

    def side_info(self) -> dict[str, Tensor]:
        """Side information for the loss, by :data:`~datamodules.core.batch.SIDE_FIELDS` name.

        ``soft_labels`` (B,) is ``label``, the probability that image 0 (the winner) is preferred;
        ``scores`` (B, K) is present when every pair of the batch has scores.
        """
        side = {"soft_labels": self.label}
        if self.scores is not None and self.scores_complete:  # known on the host: no device read per step
            side["scores"] = self.scores
        return side

    def _map(self, fn: Callable[[Tensor], Tensor]) -> DiffusionPreferenceBatch:
        def move(t: Tensor | None) -> Tensor | None:
            return None if t is None else fn(t)

        return DiffusionPreferenceBatch(
            pixel_values=move(self.pixel_values),
            captions=list(self.captions),
            label=fn(self.label),
            scores=move(self.scores),
            scores_complete=self.scores_complete,
            ids=list(self.ids),
            skipped=self.skipped,
            latents=move(self.latents),
            text_embeds=move(self.text_embeds),
            text_extra={k: fn(v) for k, v in self.text_extra.items()},
        )

    def to(self, device: torch.device | str, non_blocking: bool | None = None) -> DiffusionPreferenceBatch:
        """The batch on ``device``; ``non_blocking`` (default: when the batch is in page-locked
        memory) queues the copies instead of waiting for them."""
        if non_blocking is None:
            non_blocking = self.label.is_pinned()
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> DiffusionPreferenceBatch:
        """The batch in page-locked memory (the DataLoader calls this with ``pin_memory=True``)."""
        return self._map(lambda t: t.pin_memory())

    @classmethod
    def empty(cls, skipped: int = 0) -> DiffusionPreferenceBatch:
        """A batch with no pairs (every record of it was skipped)."""
        return cls(pixel_values=None, captions=[], label=torch.zeros(0), skipped=skipped)


def _stack(samples: list[dict[str, Any]], get: Any, what: str) -> Tensor:
    try:
        return torch.stack([get(s) for s in samples])
    except RuntimeError as e:
        ids = [s["id"] for s in samples]
        raise ValueError(
            f"cannot batch {what} of records {ids}: shapes differ ({e}); cache entries must share one shape "
            "(pad text embeddings to one length, encode images at one resolution)"
        ) from e


class DiffusionPreferenceCollator:
    """Turn samples of :class:`DiffusionPreferenceDataset` into a :class:`DiffusionPreferenceBatch`."""

    def __call__(self, samples: list[dict[str, Any] | None]) -> DiffusionPreferenceBatch:
        kept = [s for s in samples if s is not None]
        skipped = len(samples) - len(kept)
        if not kept:
            return DiffusionPreferenceBatch.empty(skipped=skipped)

        def winners_then_losers(t: Tensor) -> Tensor:  # (B, 2, ...) -> (2B, ...)
            return rearrange(t, "b two ... -> (two b) ...")

        pixel_values = latents = text_embeds = scores = None
        text_extra: dict[str, Tensor] = {}
        if "pixel_values" in kept[0]:
            pixel_values = winners_then_losers(torch.stack([s["pixel_values"] for s in kept]))
        else:
            latents = winners_then_losers(_stack(kept, lambda s: s["latents"], "latents"))
            names = {frozenset(s["text"]) for s in kept}
            if len(names) != 1:
                raise ValueError(f"cache entries of records {[s['id'] for s in kept]} hold different text tensors")
            for name in sorted(names.pop()):
                stacked = _stack(kept, lambda s, n=name: s["text"][n], name)
                if name == "text_embeds":
                    text_embeds = stacked
                else:
                    text_extra[name.removeprefix(TEXT_PREFIX)] = stacked
        if any(s["scores"] is not None for s in kept):
            nan = (math.nan, math.nan)
            scores = torch.tensor([s["scores"] if s["scores"] is not None else nan for s in kept], dtype=torch.float32)
        return DiffusionPreferenceBatch(
            pixel_values=pixel_values,
            captions=[s["caption"] for s in kept],
            label=torch.tensor([s["label"] for s in kept], dtype=torch.float32),
            scores=scores,
            scores_complete=all(s["scores"] is not None for s in kept),
            ids=[s["id"] for s in kept],
            skipped=skipped,
            latents=latents,
            text_embeds=text_embeds,
            text_extra=text_extra,
        )
