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

For DCPO (Dual Caption Preference Optimization) a record also gives ``"caption_rejected"``, the caption
of the dispreferred image (whichever of image_0 / image_1 the label says that is); the preferred image
keeps ``caption``. It is read only when the loader asks for dual captions.

A record may name the preference dimension it judges, ``"dimension": "lip_sync"`` (TLPO trains one
expert per dimension). A loader given ``dimensions`` keeps the pairs of those dimensions only, and then
every record must name one.
"""

from __future__ import annotations

import logging
import math
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from datamodules.core.records import BadSampleError, load_records, resolve_media_path
from datamodules.core.samplers import EpochShuffleSampler
from datamodules.diffusion.batch import DiffusionPreferenceBatch, DiffusionPreferenceCollator
from datamodules.diffusion.latent_cache import LatentCache
from datamodules.diffusion.media import load_clip_frames, load_condition, pair_pixels
from datamodules.vision_text.collator import load_image

__all__ = [
    "DiffusionPairRecord",
    "DiffusionPreferenceBatch",
    "DiffusionPreferenceCollator",
    "DiffusionPreferenceDataset",
    "EpochTaggedSampler",
    "caption_field",
    "load_diffusion_records",
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
        caption_rejected: the dispreferred image's own caption (DCPO), when read.
        dimension: the preference dimension the pair judges (TLPO), when the record names one.
        segment_labels: per temporal segment, 1 where the preferred image is better on it, −1 where the other
            is, 0 neither (DenseDPO), oriented preferred-first; None when the record gives none.
        condition: absolute path of the record's conditioning tensor (``.npy``, (c, h, w) at latent
            resolution), concatenated to the noisy latents as extra input channels; None without one.
    """

    id: str
    where: str
    caption: str
    images: tuple[str, str]
    winner: int
    label: float
    scores: tuple[float, float] | None = None
    caption_rejected: str | None = None
    dimension: str | None = None
    condition: str | None = None
    segment_labels: tuple[float, ...] | None = None

    @property
    def is_tie(self) -> bool:
        return self.label == 0.5

    @property
    def order(self) -> list[int]:
        """Image indices, preferred first."""
        return [self.winner, 1 - self.winner]

    @property
    def image_captions(self) -> tuple[str, ...] | None:
        """Each image's caption, preferred first (DCPO); None when both share ``caption``."""
        return None if self.caption_rejected is None else (self.caption, self.caption_rejected)


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


def _image(raw: dict[str, Any], names: tuple[str, ...], where: str, root: Path, kind: str = "image") -> str:
    given = [n for n in names if raw.get(n) is not None]
    if len(given) > 1:
        raise BadSampleError(f"{where}: give {names[0]!r} or its alias {names[1]!r}, not both")
    value = raw[given[0]]
    if not isinstance(value, str):
        raise BadSampleError(
            f"{where}: {given[0]!r} must be an {kind} path relative to the data root, got {type(value).__name__} "
            "(image bytes inside the data file are not read: write them out as files)"
        )
    return resolve_media_path(value, root, where)


def _segment_labels(raw: dict[str, Any], where: str) -> tuple[float, ...] | None:
    """The record's ``segment_labels`` (1, 0 or -1 per temporal segment, image_0 against image_1), or None."""
    value = raw.get("segment_labels")
    if value is None:
        return None
    ok = isinstance(value, list) and value
    if not (ok and all(isinstance(x, int) and not isinstance(x, bool) and x in (-1, 0, 1) for x in value)):
        raise BadSampleError(
            f"{where}: 'segment_labels' must be a non-empty list of 1, -1 or 0 (per temporal segment: image_0 "
            f"better, image_1 better, neither), got {value!r}"
        )
    return tuple(float(x) for x in value)


def _condition(raw: dict[str, Any], where: str, root: Path) -> str | None:
    """The record's ``condition`` path (a ``.npy`` file), resolved; None when the record has none."""
    value = raw.get("condition")
    if value is None:
        return None
    if not isinstance(value, str) or not value.endswith(".npy"):
        raise BadSampleError(f"{where}: 'condition' must be the path of a .npy file, got {value!r}")
    return resolve_media_path(value, root, where)


def caption_field(raw: dict[str, Any], name: str, where: str) -> str:
    """A caption of a record: a non-empty string.

    Raises:
        BadSampleError: naming ``where``, the field and the problem.
    """
    caption = raw[name]
    if not isinstance(caption, str):
        raise BadSampleError(f"{where}: {name!r} must be a string, got {type(caption).__name__}")
    if not caption.strip():
        raise BadSampleError(f"{where}: {name!r} is empty")
    return caption


def parse_diffusion_record(
    raw: dict[str, Any],
    where: str,
    data_root: Path,
    dual_captions: bool = False,
    image_fields: tuple[tuple[str, ...], tuple[str, ...]] = _IMAGE_FIELDS,
    kind: str = "image",
) -> DiffusionPairRecord:
    """Validate one raw pair record and resolve its image paths.

    Args:
        raw: the record.
        where: ``<file>:<line>`` for messages.
        data_root: directory image paths are relative to.
        dual_captions: read ``caption_rejected`` (required) for DCPO; False leaves it unread.
        image_fields: the field names of the two files (each with its aliases); D3PO's records name
            ``trajectory_0`` and ``trajectory_1``.
        kind: what the files are, for messages.

    Raises:
        BadSampleError: naming ``where`` and the problem.
    """
    missing = [] if raw.get("caption") is not None else ["caption"]
    if dual_captions and raw.get("caption_rejected") is None:
        missing.append("caption_rejected (dual_captions: the dispreferred image's caption)")
    missing += [names[0] for names in image_fields if all(raw.get(n) is None for n in names)]
    if all(raw.get(k) is None for k in ("label_0", "label_1", "scores", "segment_labels")):
        missing.append("label_0 (or scores, or segment_labels)")
    if missing:
        raise BadSampleError(f"{where}: missing field(s) {', '.join(missing)}")
    caption = caption_field(raw, "caption", where)
    caption_rejected = caption_field(raw, "caption_rejected", where) if dual_captions else None
    dimension = caption_field(raw, "dimension", where) if raw.get("dimension") is not None else None
    segments = _segment_labels(raw, where)
    if all(raw.get(k) is None for k in ("label_0", "label_1", "scores")):
        # DenseDPO data: image_0 leads unless the segments favour image_1; no segment preferred is a tie
        p0, scores = (0.5 if not any(segments) else 1.0 if sum(segments) >= 0 else 0.0), None
    else:
        p0, scores = _preference(raw, where)
    images = tuple(_image(raw, names, where, data_root, kind) for names in image_fields)
    condition = _condition(raw, where, data_root)
    winner = 0 if p0 >= 0.5 else 1
    return DiffusionPairRecord(
        id=str(raw.get("id", where)),
        where=where,
        caption=caption,
        images=images,
        winner=winner,
        label=max(p0, 1.0 - p0),
        scores=None if scores is None else (scores[winner], scores[1 - winner]),
        caption_rejected=caption_rejected,
        dimension=dimension,
        condition=condition,
        segment_labels=None if segments is None else tuple(s if winner == 0 else -s for s in segments),
    )


def load_diffusion_records(
    path: str | os.PathLike,
    data_root: str | os.PathLike | None = None,
    on_bad_sample: str = "error",
    drop_ties: bool = True,
    dual_captions: bool = False,
    dimensions: Sequence[str] | None = None,
) -> tuple[list[DiffusionPairRecord], list[str]]:
    """Read and validate every pair of a .jsonl, .json or .parquet file.

    Args:
        path: the data file.
        data_root: directory image paths are relative to (default: the file's directory).
        on_bad_sample: ``"error"`` raises on the first bad record; ``"skip"`` drops it and reports it.
        drop_ties: drop pairs with label 0.5 or equal scores (not counted as problems; logged).
        dual_captions: every record must give ``caption_rejected`` (DCPO); False leaves it unread.
        dimensions: keep only the pairs of these preference dimensions (TLPO); every record must then
            give ``dimension``. None keeps every pair, with or without one.

    Returns:
        The valid records and the list of problems (one message per skipped record).
    """
    root = Path(data_root) if data_root is not None else Path(path).parent
    ties = unread = other = 0

    def parse(raw: dict[str, Any], where: str) -> tuple[list[DiffusionPairRecord], list[str]]:
        nonlocal ties, unread, other
        rec = parse_diffusion_record(raw, where, root, dual_captions)
        unread += not dual_captions and raw.get("caption_rejected") is not None
        if dimensions is not None:
            if rec.dimension is None:
                raise BadSampleError(
                    f"{where}: missing field 'dimension' (the run keeps dimensions {list(dimensions)})"
                )
            if rec.dimension not in dimensions:
                other += 1
                return [], []
        if drop_ties and rec.is_tie:
            ties += 1
            return [], []
        return [rec], []

    records, problems = load_records(path, parse, on_bad_sample)
    if ties:
        log.info("%s: dropped %d tied pair(s) (drop_ties=True)", path, ties)
    if other:
        log.info("%s: dropped %d pair(s) of other dimensions than %s", path, other, list(dimensions or ()))
    if dimensions is not None and (absent := sorted(set(dimensions) - {r.dimension for r in records})):
        log.warning("%s: no pair of dimension(s) %s (dimensions: %s)", path, absent, list(dimensions))
    if unread:
        log.warning("%s: %d record(s) give caption_rejected, not used (dual_captions: false)", path, unread)
    return records, problems


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
    """Groups of images decoded on access (inside DataLoader workers), or read from a latent cache.

    A group is a pair (:class:`DiffusionPairRecord`) or a ranked list of K images
    (:class:`~datamodules.diffusion.ranked.DiffusionRankedRecord`): any record with ``id``, ``where``,
    ``caption``, ``images``, ``order`` (image indices, best first), ``label``, ``scores`` (best first)
    and ``image_captions``. Indexed by an int or by ``(index, epoch)`` (:class:`EpochTaggedSampler`);
    the random crop and flip of a group are drawn from (seed, epoch, index) and shared by its images.
    A sample is a dict with ``id``, ``caption``, ``label``, ``scores``, ``image_captions`` and either
    ``pixel_values`` (K, 3, H, W) (with ``frames``: clips (K, 3, F, H, W)) or, with ``cache_dir``, ``latents``
    (K, c, h, w) (clips: (K, c, f, h, w)) and the cached text tensors, best first, and ``condition``
    (c', h, w) when the record names a conditioning tensor (read from its file in either case). With
    per-image captions (DCPO) the cached text is not served: the backbone encodes each image's caption.
    With ``on_bad_sample="skip"`` an undecodable group yields None, which the collator counts.

    Args:
        records: validated pairs or ranked lists.
        resolution: side of the square crop, or ``[height, width]``.
        random_crop: random instead of centre crop (training).
        random_flip: flip both images horizontally with probability 0.5 (training).
        seed: seed of the augmentation.
        on_bad_sample: ``error`` or ``skip``.
        cache_dir: read latents (and text embeddings) from this cache instead of decoding images;
            augmentation is then off (the cache holds the centre crop).
        cache_encoder_id: the encoder id the cache was built with (default: the only one in it).
        caption_dropout: probability that a group is trained unconditionally (its caption replaced by the
            empty caption, for classifier-free guidance), drawn from (seed, epoch, index); the sample's
            ``caption_dropped`` says which, and the backbone conditions those groups on ``""``.
        frames: read every image path as a clip of this many frames (a video file or a film strip,
            :mod:`datamodules.diffusion.clips`); ``resolution`` is then each frame's size. None: images.
    """

    def __init__(
        self,
        records: list[DiffusionPairRecord],
        resolution: int | Sequence[int] = 512,
        random_crop: bool = False,
        random_flip: bool = False,
        seed: int = 0,
        on_bad_sample: str = "error",
        cache_dir: str | os.PathLike | None = None,
        cache_encoder_id: str | None = None,
        caption_dropout: float = 0.0,
        frames: int | None = None,
    ) -> None:
        if not 0.0 <= caption_dropout < 1.0:
            raise ValueError(f"caption_dropout must be in [0, 1), got {caption_dropout}")
        if frames is not None and frames < 1:
            raise ValueError(f"frames must be >= 1, got {frames}")
        self.frames = frames
        self.records = records
        self.caption_dropout = caption_dropout
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

    def caption_dropped(self, index: int, epoch: int) -> bool:
        """Whether the group trains unconditionally this epoch: a pure function of (seed, epoch, index)."""
        if self.caption_dropout == 0.0:
            return False
        return random.Random(f"{self.seed}:{epoch}:{index}:caption").random() < self.caption_dropout

    @property
    def geometry(self) -> int | Sequence[int] | dict[str, Any]:
        """What the pixels' shape depends on, for the latent cache's keys: the resolution (images), or the
        frame size and count (clips)."""
        return self.resolution if self.frames is None else {"resolution": self.resolution, "frames": self.frames}

    def pixels(self, index: int, crop: tuple[float, float] = (0.5, 0.5), flip: bool = False) -> Tensor:
        """(K, 3, H, W) in [-1, 1], the record's images in data order, or with ``frames`` its clips
        (K, 3, F, H, W). Raises BadSampleError."""
        rec = self.records[index]
        if self.frames is None:
            images = [load_image(path, rec.where) for path in rec.images]
            return pair_pixels(images, self.resolution, crop, flip)
        clips = [
            pair_pixels(load_clip_frames(path, self.frames, rec.where), self.resolution, crop, flip)
            for path in rec.images
        ]
        return torch.stack(clips).transpose(1, 2)  # K × (F, 3, H, W) -> (K, 3, F, H, W)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any] | None:
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        rec = self.records[index]
        sample: dict[str, Any] = {
            "id": rec.id, "caption": rec.caption, "label": rec.label, "scores": rec.scores,
            "image_captions": rec.image_captions, "caption_dropped": self.caption_dropped(index, epoch),
        }  # fmt: skip
        order = rec.order
        try:
            if self.cache is None:
                sample["pixel_values"] = self.pixels(index, *self.augmentation(index, epoch))[order]
            else:
                entry = self.cache.load(
                    self.cache.key(rec.caption, rec.images, self.geometry, rec.where), rec.where, rec.id
                )
                sample["latents"] = entry.pop("latents")[order]
                # text_embeds (L, D) and text.<name>, or nothing; per-image captions are encoded by the backbone
                sample["text"] = entry if rec.image_captions is None else {}
            if getattr(rec, "segment_labels", None) is not None:
                sample["segment_labels"] = rec.segment_labels
            condition = getattr(rec, "condition", None)
            if condition is not None:
                sample["condition"] = load_condition(condition, rec.where)
        except BadSampleError:
            if self.on_bad_sample == "skip":
                return None
            raise
        return sample
