"""Unpaired feedback: one completion per prompt, labelled desirable or not (KTO, BCO; TRL's unpaired format).

A record is ``{"id", "prompt", "images": [...], "completion": "...", "label": true|false}`` with the prompt
and media conventions of the paired records (:mod:`datamodules.core.records`). It is served as a group of
K = 2 responses: response 0 is the record's completion, response 1 a mismatched "KL completion", another
record's completion under this record's prompt and images, from which KTO estimates its reference point.
The label becomes the batch's ``desirable`` (B,) side field.

The KL completions are made in the collator, within each batch, as TRL's KTO collator makes them: the
completions rotated by one (record j gets record j−1's, record 0 the last one's), so a batch's mismatched
completions are the same set as its completions. A batch left with one record (the last of an epoch, or
after skipped records) takes the completion of the record before it in the file instead.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from datamodules.core.batch import PreferenceBatch
from datamodules.core.cache_source import CacheableSplit
from datamodules.core.records import (
    BadSampleError,
    default_root,
    load_records,
    parse_prompt_and_images,
    response_text,
)
from datamodules.vision_text.collator import PreferenceDataset, VisionPreferenceCollator
from datamodules.vision_text.image_module import ImagePreferenceDataModule

__all__ = [
    "UnpairedCollator",
    "UnpairedDataset",
    "UnpairedPreferenceDataModule",
    "UnpairedRecord",
    "load_unpaired_records",
    "parse_unpaired_record",
]


@dataclass
class UnpairedRecord:
    """One validated unpaired record.

    Attributes:
        id: record id (from the data, else ``<file>:<line>``).
        where: ``<file>:<line>`` (or ``<file>[row]``) for error messages.
        prompt: conversational messages; images appear as ``{"type": "image"}`` items in order.
        completion: the response text.
        desirable: the record's label (true: a desirable completion).
        images: absolute image paths (or in-memory images), in placeholder order.
        videos: always empty (images only for now); :class:`PreferenceDataset` reads it.
    """

    id: str
    where: str
    prompt: list[dict[str, Any]]
    completion: str
    desirable: bool
    images: list[Any]
    videos: list[Any] = field(default_factory=list)

    @property
    def shared_media(self) -> bool:
        """Both responses of the group (completion and KL completion) see the prompt's media."""
        return True

    @property
    def side(self) -> dict[str, Any]:
        """The side information the dataset puts on each item."""
        return {"desirable": self.desirable}


def parse_unpaired_record(
    raw: dict[str, Any], where: str, data_root: Path, image_token: str = "<image>"
) -> UnpairedRecord:
    """Validate one raw unpaired record and resolve its image paths.

    Raises:
        BadSampleError: a missing ``prompt``, ``completion`` or ``label``, an empty completion, a label that
            is not a JSON boolean, or a media problem; naming ``where``.
    """
    missing = [k for k in ("prompt", "completion", "label") if raw.get(k) is None]
    if missing:
        raise BadSampleError(f"{where}: missing field(s) {', '.join(missing)} (an unpaired record needs all three)")
    label = raw["label"]
    if not isinstance(label, bool):
        raise BadSampleError(f"{where}: 'label' must be true or false, got {label!r}")
    prompt, images = parse_prompt_and_images(raw, where, data_root, image_token)
    return UnpairedRecord(
        id=str(raw.get("id", where)),
        where=where,
        prompt=prompt,
        completion=response_text(raw["completion"], "completion", where),
        desirable=label,
        images=images,
    )


def load_unpaired_records(
    path: Any,
    data_root: str | os.PathLike | None = None,
    on_bad_sample: str = "error",
    image_token: str = "<image>",
) -> tuple[list[UnpairedRecord], list[str]]:
    """Read and validate every unpaired record of a file (or in-memory data).

    Args:
        path: a .jsonl, .json or .parquet file, a saved or hub dataset, or in-memory records.
        data_root: directory image paths are relative to (default: the file's directory).
        on_bad_sample: ``"error"`` raises on the first bad record; ``"skip"`` drops it and reports it.
        image_token: the placeholder that marks an image in plain-text prompts.

    Returns:
        The valid records and the list of problems (one message per skipped record).
    """
    root = default_root(path, data_root)

    def parse(raw: dict[str, Any], where: str) -> tuple[list[UnpairedRecord], list[str]]:
        return [parse_unpaired_record(raw, where, root, image_token)], []

    return load_records(path, parse, on_bad_sample)


class UnpairedDataset(PreferenceDataset):
    """Unpaired records whose images are decoded on access; each item also carries ``kl_fallback``.

    ``kl_fallback`` is the completion of the record before it in the file (the last record's for the
    first), the KL completion of a batch left with this record alone.

    Args:
        records: validated unpaired records, at least 2 (a KL completion comes from another record).
        on_bad_sample: ``"error"`` raises on an undecodable image; ``"skip"`` yields None for it.
    """

    def __init__(self, records: list[UnpairedRecord], on_bad_sample: str = "error") -> None:
        if len(records) < 2:
            where = records[0].where if records else "the data"
            raise ValueError(
                f"{where}: unpaired data needs at least 2 records (a KL completion is another record's "
                f"completion), got {len(records)}"
            )
        super().__init__(records, on_bad_sample)

    def __getitem__(self, i: int) -> dict[str, Any] | None:
        item = super().__getitem__(i)
        if item is not None:
            item["kl_fallback"] = self.records[i - 1].completion
        return item


class UnpairedCollator(VisionPreferenceCollator):
    """:class:`VisionPreferenceCollator` for unpaired items: each becomes a group (completion, KL completion).

    The KL completions are the batch's completions rotated by one, as TRL's KTO collator makes them:
    item j gets item j−1's (item 0 the last one's), under its own prompt and images. A batch of one item
    uses its ``kl_fallback``. Takes the arguments of :class:`VisionPreferenceCollator`.
    """

    def __call__(self, samples: list[dict[str, Any] | None]) -> PreferenceBatch:
        present = [s for s in samples if s is not None]
        completions = [s["record"].completion for s in present]
        grouped = iter(
            {**s, "responses": [completions[j], completions[j - 1] if len(present) > 1 else s["kl_fallback"]]}
            for j, s in enumerate(present)
        )
        return super().__call__([None if s is None else next(grouped) for s in samples])


class UnpairedPreferenceDataModule(ImagePreferenceDataModule):
    """Unpaired feedback with images (or text only): ``prompt``, ``images``, ``completion``, ``label``.

    Takes every argument of :class:`ImagePreferenceDataModule`. Each record is served as a group of two
    responses, its completion and a KL completion (see the module docstring), with the ``desirable``
    label; train with :class:`~mmpo.losses.KTOLoss` or :class:`~mmpo.losses.BCOLoss`. ``loader.batch_size``
    must be at least 2, as in TRL: KTO's reference point is estimated from the other records of a batch.
    The KL completions depend on which records share a batch, so ``reference: cached`` is refused; use
    the disabled adapter or a frozen copy.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.loader.batch_size < 2:
            raise ValueError(
                f"{type(self).__name__}: loader.batch_size must be >= 2 (got {self.loader.batch_size}): the KL "
                "completions of KTO's reference point come from the other records of a batch"
            )

    def build_dataset(self, split: str, path: Any, root: str) -> tuple[UnpairedDataset, list[str]]:
        records, problems = load_unpaired_records(path, root, self.on_bad_sample, self.image_placeholder)
        return UnpairedDataset(records, self.on_bad_sample), problems

    def collator(self) -> UnpairedCollator:
        return UnpairedCollator(self.processor, max_length=self.max_length, on_bad_sample=self.on_bad_sample)

    def reference_cache_split(self, split: str) -> CacheableSplit | None:
        raise ValueError(
            f"{type(self).__name__}: reference log-probs of unpaired data cannot be cached: each KL completion "
            "is another record of the same batch, which changes with the shuffle; use reference: adapter or copy"
        )
