"""Ranked lists of K images per caption (RankDPO): records, loading, the datamodule and a synthetic generator.

A record (JSONL line, JSON or Parquet row) gives one caption and K >= 2 images with ``scores``
(higher is better) or a ``ranking`` (image indices, best first)::

    {"id": "r1", "caption": "a red circle .", "images": ["a.png", "b.png", "c.png"], "scores": [0.2, 0.9, 0.5]}
    {"id": "r2", "caption": "a blue square .", "images": ["d.png", "e.png", "f.png"], "ranking": [1, 2, 0]}

Image paths are relative to the data root. A ranking alone gives the graded labels ψ of its
positions, ``scores[ranking[p]] = K − 1 − p`` (best K − 1, worst 0): the labels
:class:`~mmpo.losses.LambdaRankLoss` derives from the list order when a batch has no scores, so a
ranking and no ranking at all train alike. With both, the scores are kept and the ranking must not
contradict them. Tied scores are allowed (a tied pair adds no term to the list losses); a list whose
scores are all equal is a tie, dropped by default like a tied pair.

Groups are served by :class:`~datamodules.diffusion.pairs.DiffusionPreferenceDataset` exactly as
pairs are, K images best first sharing one crop and flip, into a
:class:`~datamodules.diffusion.batch.DiffusionPreferenceBatch` of K·B rows with ``scores`` (B, K)
best first; the diffusion backbone gives every image of a group the group's one (t, ε), so the
statistics (B, K) feed ``LambdaRankLoss`` (RankDPO) and ``PlackettLuceLoss`` unchanged. Every group
of a batch must have the same K. Every problem names the file and line (or row) of the record.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from PIL import Image

from datamodules.core.atomic import atomic_file, atomic_write_text
from datamodules.core.records import BadSampleError, load_records, resolve_media_path
from datamodules.diffusion.module import DiffusionPreferenceDataModule
from datamodules.diffusion.pairs import caption_field
from datamodules.worlds.shapes import caption_for, render_scene, sample_scene

__all__ = [
    "DiffusionRankedDataModule",
    "DiffusionRankedRecord",
    "load_diffusion_ranked_records",
    "parse_diffusion_ranked_record",
    "write_diffusion_lists",
]

log = logging.getLogger(__name__)


@dataclass
class DiffusionRankedRecord:
    """One validated ranked list of K images of one caption.

    Attributes:
        id: record id (from the data, else ``<file>:<line>``).
        where: ``<file>:<line>`` (or ``<file>[row]``) for error messages.
        caption: the prompt every image was generated from.
        images: absolute paths of the K images, in the data's order.
        order: image indices best first (tied images keep the data's order).
        scores: the K scores best first (``scores[p]`` belongs to ``images[order[p]]``).
    """

    id: str
    where: str
    caption: str
    images: tuple[str, ...]
    order: list[int]
    scores: tuple[float, ...]

    #: preference strength read by soft-label losses: a ranking is a hard label
    label: ClassVar[float] = 1.0
    #: every image is conditioned on ``caption``
    image_captions: ClassVar[None] = None

    @property
    def is_tie(self) -> bool:
        """Every image scored alike: the list ranks nothing."""
        return len(set(self.scores)) == 1


def _numbers(value: Any, name: str, k: int, where: str) -> list[float]:
    if not isinstance(value, list) or not all(isinstance(s, int | float) and not isinstance(s, bool) for s in value):
        raise BadSampleError(f"{where}: {name!r} must be a list of {k} numbers (one per image), got {value!r}")
    if len(value) != k:
        raise BadSampleError(f"{where}: {name!r} has {len(value)} entries for {k} images")
    try:
        out = [float(s) for s in value]
    except OverflowError as e:  # an integer too large for a float
        raise BadSampleError(f"{where}: {name!r} must be finite numbers, got {value!r}") from e
    if not all(math.isfinite(s) for s in out):
        raise BadSampleError(f"{where}: {name!r} must be finite numbers, got {value!r}")
    return out


def _scores(raw: dict[str, Any], k: int, where: str) -> list[float]:
    """The K scores in data order, from ``scores`` or from a ``ranking`` (ψ = K − 1 − position)."""
    scores, ranking = raw.get("scores"), raw.get("ranking")
    if ranking is not None:
        if not isinstance(ranking, list) or not all(isinstance(r, int) and not isinstance(r, bool) for r in ranking):
            raise BadSampleError(f"{where}: 'ranking' must be a list of image indices (best first), got {ranking!r}")
        if sorted(ranking) != list(range(k)):
            raise BadSampleError(f"{where}: 'ranking' must be a permutation of 0..{k - 1} (best first), got {ranking}")
    if scores is None:
        out = [0.0] * k
        for position, i in enumerate(ranking):
            out[i] = float(k - 1 - position)
        return out
    out = _numbers(scores, "scores", k, where)
    if ranking is not None:
        for a, b in zip(ranking, ranking[1:], strict=False):
            if out[a] < out[b]:
                raise BadSampleError(
                    f"{where}: 'ranking' puts image {a} (score {out[a]:g}) above image {b} (score {out[b]:g}); "
                    "give one of them, or make them agree"
                )
    return out


def parse_diffusion_ranked_record(raw: dict[str, Any], where: str, data_root: Path) -> DiffusionRankedRecord:
    """Validate one raw ranked list and resolve its image paths.

    Raises:
        BadSampleError: naming ``where`` and the problem.
    """
    missing = [name for name in ("caption", "images") if raw.get(name) is None]
    if raw.get("scores") is None and raw.get("ranking") is None:
        missing.append("scores (or ranking)")
    if missing:
        raise BadSampleError(f"{where}: missing field(s) {', '.join(missing)}")
    caption = caption_field(raw, "caption", where)
    paths = raw["images"]
    if not isinstance(paths, list):
        raise BadSampleError(f"{where}: 'images' must be a list of image paths, got {type(paths).__name__}")
    if len(paths) < 2:
        raise BadSampleError(f"{where}: 'images' needs at least 2 images to rank, got {len(paths)}")
    for i, path in enumerate(paths):
        if not isinstance(path, str):
            raise BadSampleError(
                f"{where}: images[{i}] must be an image path relative to the data root, got {type(path).__name__}"
            )
    scores = _scores(raw, len(paths), where)
    images = tuple(resolve_media_path(path, data_root, where) for path in paths)
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    return DiffusionRankedRecord(
        id=str(raw.get("id", where)),
        where=where,
        caption=caption,
        images=images,
        order=order,
        scores=tuple(scores[i] for i in order),
    )


def load_diffusion_ranked_records(
    path: str | os.PathLike,
    data_root: str | os.PathLike | None = None,
    on_bad_sample: str = "error",
    drop_ties: bool = True,
) -> tuple[list[DiffusionRankedRecord], list[str]]:
    """Read and validate every ranked list of a .jsonl, .json or .parquet file.

    Args:
        path: the data file.
        data_root: directory image paths are relative to (default: the file's directory).
        on_bad_sample: ``"error"`` raises on the first bad record; ``"skip"`` drops it and reports it.
        drop_ties: drop lists whose scores are all equal (not counted as problems; logged).

    Returns:
        The valid records and the list of problems (one message per skipped record).
    """
    root = Path(data_root) if data_root is not None else Path(path).parent
    ties = 0

    def parse(raw: dict[str, Any], where: str) -> tuple[list[DiffusionRankedRecord], list[str]]:
        nonlocal ties
        rec = parse_diffusion_ranked_record(raw, where, root)
        if drop_ties and rec.is_tie:
            ties += 1
            return [], []
        return [rec], []

    records, problems = load_records(path, parse, on_bad_sample)
    if ties:
        log.info("%s: dropped %d list(s) with all scores equal (drop_ties=True)", path, ties)
    return records, problems


class DiffusionRankedDataModule(DiffusionPreferenceDataModule):
    """Ranked lists of K images per caption (RankDPO), served as groups of K best first.

    The same arguments, augmentation (one crop and flip per list), latent cache and loaders as
    :class:`~datamodules.diffusion.module.DiffusionPreferenceDataModule`; records are read by
    :func:`load_diffusion_ranked_records`. ``drop_ties`` drops lists whose scores are all equal;
    ``dual_captions`` (per-image captions) and ``dimensions`` are not supported for lists.
    """

    record_kind: ClassVar[str] = "ranked lists"

    def read_records(self, path: str, root: str) -> tuple[list[DiffusionRankedRecord], list[str]]:
        if self.dual_captions:
            raise ValueError("dual_captions (a caption per image, DCPO) is not supported for ranked lists")
        if self.dimensions is not None:
            raise ValueError("dimensions (TLPO's per-dimension pairs) is not supported for ranked lists")
        return load_diffusion_ranked_records(path, root, self.on_bad_sample, self.drop_ties)


def write_diffusion_lists(
    root: str | os.PathLike, n: int = 16, k: int = 4, seed: int = 0, image_size: int = 64, split: str = "train"
) -> Path:
    """Write ``n`` synthetic ranked lists of ``k`` images from the shapes world: ``root/<split>.jsonl``, ``images/``.

    Image j of a list renders the caption's scene blended with random noise of weight j / k, so the
    list's quality falls strictly with j; the images are written in a shuffled order with their
    scores ψ = k − 1 − j (graded labels, best k − 1). Records are a pure function of (seed, split,
    index); files are written to temporary names and moved into place.

    Returns:
        The JSONL file.
    """
    if k < 2:
        raise ValueError(f"a ranked list needs k >= 2 images, got {k}")
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        rng = random.Random(f"diffusion-lists:{seed}:{split}:{i}")
        scene = sample_scene(rng, image_size=image_size)
        clean = render_scene(scene, image_size)
        shown = list(range(k))
        rng.shuffle(shown)  # data order: shown[p] is the quality level of image p
        names = []
        for p, level in enumerate(shown):
            noise = Image.frombytes("RGB", (image_size, image_size), rng.randbytes(3 * image_size * image_size))
            name = f"images/{split}-list-{i:06d}-{p}.png"
            with atomic_file(root / name) as tmp:
                Image.blend(clean, noise, level / k).save(tmp, format="PNG")
            names.append(name)
        record = {
            "id": f"{split}-list-{i:06d}",
            "caption": caption_for(scene),
            "images": names,
            "scores": [float(k - 1 - level) for level in shown],
        }
        lines.append(json.dumps(record) + "\n")
    out = root / f"{split}.jsonl"
    atomic_write_text(out, "".join(lines))
    return out
