"""LightningDataModule for diffusion preference pairs, and a tiny synthetic pair generator."""

from __future__ import annotations

import json
import logging
import os
import random
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal

import lightning as L
from torch import Tensor
from torch.utils.data import DataLoader

from datamodules.core.atomic import atomic_file, atomic_write_text
from datamodules.core.cache_source import CacheableSplit
from datamodules.core.loaders import FirstBatchStatefulDataLoader, pins_memory
from datamodules.core.samplers import EpochShuffleSampler
from datamodules.core.settings import LoaderSettings, as_settings, migrate_flat_settings, settings_dict
from datamodules.diffusion.cache import CacheStats, build_latent_cache
from datamodules.diffusion.media import image_size
from datamodules.diffusion.pairs import (
    DiffusionPairRecord,
    DiffusionPreferenceCollator,
    DiffusionPreferenceDataset,
    EpochTaggedSampler,
    load_diffusion_records,
)
from datamodules.worlds.shapes import COLORS, ShapeObject, caption_for, render_scene, sample_scene

__all__ = ["DiffusionPreferenceDataModule", "write_diffusion_pairs"]

log = logging.getLogger(__name__)


class DiffusionPreferenceDataModule(L.LightningDataModule):
    """Pick-a-Pic-style pairs (caption, two images, a label or two scores) for Diffusion-DPO.

    Records are read from JSONL / JSON / Parquet (see :mod:`datamodules.diffusion.pairs`); batches are
    :class:`~datamodules.diffusion.batch.DiffusionPreferenceBatch`, winners first. Training pairs get a
    random crop (unless ``center_crop``) and flip shared by both images of a pair and drawn from
    (seed, epoch, index); validation and test pairs are centre-cropped and not flipped.

    With ``cache_dir`` the datasets return cached VAE latents and text embeddings instead of pixels.
    Fill the cache once with :meth:`build_cache` (or :func:`~datamodules.diffusion.cache.build_latent_cache`);
    the cache holds the centre crop, so random crop and flip are off while it is used.

    Args:
        train_file: training records.
        val_file: validation records (optional).
        test_file: test records (optional).
        data_root: directory image paths are relative to (default: each file's directory).
        resolution: side of the square training images in pixels (shorter side resized to it, then cropped), or
            ``[height, width]`` (scaled to cover both, then cropped), e.g. ``[32, 256]`` for film strips of eight
            32 px frames (set ``random_flip: false`` for those: a flip reverses the frames).
        center_crop: centre-crop training images instead of cropping at random.
        random_flip: flip training pairs horizontally with probability 0.5 (both images alike).
        loader: batch sizes, workers, shuffling and the seed of shuffling and augmentation
            (:class:`~datamodules.core.settings.LoaderSettings`; a mapping works too). The old flat
            arguments (``batch_size=...``) are still accepted, with a warning.
        on_bad_sample: ``error`` stops with a message naming file and record; ``skip`` drops and counts.
        drop_ties: drop pairs labelled 0.5 (or with equal scores), as Diffusion-DPO does; kept, they
            carry label 0.5 for soft-label losses.
        cache_dir: directory of cached latents and text embeddings (None decodes images every epoch).
        cache_encoder_id: the encoder id the cache was built with (default: the only one in ``cache_dir``).
        dual_captions: DCPO: every record gives ``caption_rejected``, the dispreferred image's own
            caption, and each image is conditioned on its caption (a record without one is a bad
            record). False conditions both images on ``caption`` and leaves ``caption_rejected`` unread.
        dimensions: keep only the pairs whose ``dimension`` is one of these (TLPO: one expert's
            dimension, or all of them for the gate); every record must then name its dimension (a
            record without one is a bad record). None keeps every pair.
        caption_dropout: share of training groups conditioned on the empty caption instead of theirs,
            drawn from (seed, epoch, index), so that the model also learns the unconditional prediction
            classifier-free guidance needs (the diffusers text-to-image scripts' ``proportion_empty_prompts``;
            InPO's script uses 0.2). Validation and test groups keep their captions. Not with ``dual_captions``.
        frames: video diffusion (Wan 2.1): every image path names a clip of this many frames, a video file
            (frames sampled evenly over it; a shorter video is a bad record) or a film strip of frames side by
            side (:mod:`datamodules.diffusion.clips`); ``resolution`` is then each frame's size, and batches hold
            clips (K·B, 3, F, H, W). Wan's VAE takes 4n + 1 frames (5, 9, ..., 81). None: images.
    """

    #: the settings groups this class takes, by argument name
    settings_groups: ClassVar[dict[str, type]] = {"loader": LoaderSettings}

    def __init__(
        self,
        train_file: str | None = None,
        val_file: str | None = None,
        test_file: str | None = None,
        data_root: str | None = None,
        resolution: int | list[int] = 512,
        center_crop: bool = False,
        random_flip: bool = True,
        loader: LoaderSettings | None = None,
        on_bad_sample: Literal["error", "skip"] = "error",
        drop_ties: bool = True,
        cache_dir: str | None = None,
        cache_encoder_id: str | None = None,
        dual_captions: bool = False,
        dimensions: list[str] | None = None,
        caption_dropout: float = 0.0,
        frames: int | None = None,
        **flat_settings: Any,
    ) -> None:
        super().__init__()
        groups = migrate_flat_settings(
            type(self).__name__, {"loader": LoaderSettings}, {"loader": loader, **flat_settings}
        )
        self.loader = as_settings(LoaderSettings, groups.pop("loader"), "loader")
        if groups:
            raise TypeError(f"{type(self).__name__}: unexpected argument(s) {sorted(groups)}")
        image_size(resolution)  # ValueError for a bad size
        self.files = {"train": train_file, "val": val_file, "test": test_file}
        self.data_root = data_root
        self.resolution = resolution
        self.center_crop = center_crop
        self.random_flip = random_flip
        self.on_bad_sample = on_bad_sample
        self.drop_ties = drop_ties
        self.cache_dir = cache_dir
        self.cache_encoder_id = cache_encoder_id
        self.dual_captions = dual_captions
        if dimensions is not None and not dimensions:
            raise ValueError("dimensions is empty: name at least one, or leave it null to keep every pair")
        self.dimensions = dimensions
        if not 0.0 <= caption_dropout < 1.0:
            raise ValueError(f"caption_dropout must be in [0, 1), got {caption_dropout}")
        if caption_dropout and dual_captions:
            raise ValueError("caption_dropout is not supported with dual_captions (which caption would be dropped?)")
        self.caption_dropout = caption_dropout
        if frames is not None and frames < 1:
            raise ValueError(f"frames must be >= 1, got {frames}")
        self.frames = frames
        self.datasets: dict[str, DiffusionPreferenceDataset] = {}
        self.problems: dict[str, list[str]] = {}
        if cache_dir is not None and (random_flip or not center_crop):
            log.warning("cache_dir is set: training uses the cached centre crop, without random crop or flip")
        self.save_hyperparameters(
            {
                "train_file": train_file,
                "val_file": val_file,
                "test_file": test_file,
                "data_root": data_root,
                "resolution": resolution,
                "center_crop": center_crop,
                "random_flip": random_flip,
                "loader": settings_dict(self.loader),
                "on_bad_sample": on_bad_sample,
                "drop_ties": drop_ties,
                "cache_dir": cache_dir,
                "cache_encoder_id": cache_encoder_id,
                "dual_captions": dual_captions,
                "dimensions": dimensions,
                "caption_dropout": caption_dropout,
                "frames": frames,
            }
        )

    def setup(self, stage: str | None = None) -> None:
        wanted = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("test",)}
        for split in wanted.get(stage, ("train", "val", "test")) if stage else ("train", "val", "test"):
            path = self.files[split]
            if path is None or split in self.datasets:
                continue
            root = self.data_root if self.data_root is not None else str(Path(path).parent)
            records, problems = self.read_records(path, root)
            if not records:
                what = type(self).record_kind
                raise ValueError(f"{path}: no usable {what} ({len(problems)} skipped, ties dropped: {self.drop_ties})")
            if problems:
                n = len(problems) + len(records)
                log.warning("%s: skipped %d bad record(s) of %d; first: %s", path, len(problems), n, problems[0])
            self.problems[split] = problems
            self.datasets[split] = self.make_dataset(records, split)

    def make_dataset(self, records: list[DiffusionPairRecord], split: str) -> DiffusionPreferenceDataset:
        """The dataset of one split's records (subclasses serve other items)."""
        augment = split == "train" and self.cache_dir is None
        return DiffusionPreferenceDataset(
            records,
            resolution=self.resolution,
            random_crop=augment and not self.center_crop,
            random_flip=augment and self.random_flip,
            seed=self.loader.seed,
            on_bad_sample=self.on_bad_sample,
            cache_dir=self.cache_dir,
            cache_encoder_id=self.cache_encoder_id,
            caption_dropout=self.caption_dropout if split == "train" else 0.0,
            frames=self.frames,
        )

    def reference_cache_split(self, split: str) -> CacheableSplit | None:
        """The split as ``reference: cached`` sees it (:class:`~datamodules.core.cache_source.ReferenceCacheData`).

        Raises:
            ValueError: the training split's pixels or captions change from epoch to epoch (random crop or
                flip, caption dropout), so the reference's statistics of a record would too.
        """
        if split not in self.datasets:
            return None
        dataset = self.datasets[split]
        changing = [name for name in ("random_crop", "random_flip") if getattr(dataset, name, False)]
        changing += ["caption_dropout"] if getattr(dataset, "caption_dropout", 0.0) else []
        if changing:
            raise ValueError(
                f"reference: cached needs the same inputs every epoch, but the {split} split has {changing}: set "
                "center_crop: true, random_flip: false and caption_dropout: 0 (a latent cache turns crops off too)"
            )
        collator, settings = DiffusionPreferenceCollator(), self.reference_cache_settings()
        return CacheableSplit(dataset, dataset.records, collator, self.loader.eval_size, settings)

    def reference_cache_settings(self) -> dict[str, Any]:
        """What besides the records changes a record's statistics (part of the reference cache's name)."""
        settings = {"resolution": self.resolution, "frames": self.frames, "dual_captions": self.dual_captions}
        return settings | {"latents": self.cache_encoder_id if self.cache_dir is not None else None}

    #: what a record is, for messages
    record_kind: ClassVar[str] = "pairs"

    def read_records(self, path: str, root: str) -> tuple[list[DiffusionPairRecord], list[str]]:
        """The valid records of one file and the problems of the skipped ones (subclasses read other records)."""
        return load_diffusion_records(
            path, root, self.on_bad_sample, self.drop_ties, self.dual_captions, self.dimensions
        )

    def build_cache(
        self,
        encode_images: Callable[[Tensor], Tensor],
        encode_text: Callable[[list[str]], Tensor | Mapping[str, Tensor]] | None = None,
        *,
        encoder_id: str,
        batch_size: int = 16,
        show_progress: bool = True,
    ) -> dict[str, CacheStats]:
        """Encode every configured split into ``cache_dir`` (entries already there are kept).

        Run it from one process (rank 0) before training; see
        :func:`~datamodules.diffusion.cache.build_latent_cache` for the callables.

        Returns:
            What was written, reused and skipped, per split.
        """
        if self.cache_dir is None:
            raise ValueError("build_cache needs cache_dir")
        if self.cache_encoder_id is not None and self.cache_encoder_id != encoder_id:
            raise ValueError(f"cache_encoder_id is {self.cache_encoder_id!r} but the cache is built for {encoder_id!r}")
        self.setup()
        stats = {}
        for split, dataset in self.datasets.items():
            stats[split] = build_latent_cache(
                dataset,
                encode_images,
                encode_text,
                self.cache_dir,
                batch_size,
                encoder_id=encoder_id,
                show_progress=show_progress,
            )
            dataset.cache.encoder_id = encoder_id  # read what was just built, whatever else the directory holds
        return stats

    def _loader(self, split: str, batch_size: int, train: bool) -> DataLoader:
        if split not in self.datasets:
            raise ValueError(f"no {split} data: set {split}_file")
        dataset = self.datasets[split]
        # Training indices carry the epoch so that augmentation in workers is a function of (seed, epoch, index).
        # The training loader is stateful (a mid-epoch checkpoint records its position) and its sampler reads
        # the trainer's epoch when the epoch starts, which a resumed run has restored.
        trainer = getattr(self, "trainer", None)
        epoch = (lambda: trainer.current_epoch) if trainer is not None and train else None
        sampler_cls = EpochTaggedSampler if train else EpochShuffleSampler
        loader_cls = FirstBatchStatefulDataLoader if train else DataLoader
        return loader_cls(
            dataset,
            batch_size=batch_size,
            sampler=sampler_cls(
                dataset, seed=self.loader.seed, shuffle=train and self.loader.shuffle, epoch_source=epoch
            ),
            num_workers=self.loader.num_workers,
            collate_fn=DiffusionPreferenceCollator(),
            persistent_workers=self.loader.num_workers > 0,
            pin_memory=pins_memory(self.loader.pin_memory, trainer),
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", self.loader.batch_size, True)

    def val_dataloader(self) -> DataLoader | list:
        if self.files["val"] is None:
            return []  # no validation set: Lightning skips validation
        return self._loader("val", self.loader.eval_size, False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", self.loader.eval_size, False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test", self.loader.eval_size, False)


def write_diffusion_pairs(
    root: str | os.PathLike,
    n: int = 64,
    seed: int = 0,
    image_size: int = 64,
    split: str = "train",
    tie_fraction: float = 0.0,
    score_fraction: float = 0.0,
    caption_rejected: bool = False,
) -> Path:
    """Write ``n`` synthetic pairs from the shapes world: ``root/<split>.jsonl`` and ``root/images/``.

    Each caption describes a scene; the preferred image renders it, the other renders the same shapes
    in colours the caption does not name. The preferred image is image_0 or image_1 at random. Records are a
    pure function of (seed, split, index); files are written to temporary names and moved into place.

    Args:
        root: output directory (created if missing).
        n: number of pairs.
        seed: generator seed.
        image_size: side of the square images in pixels.
        split: file name stem and image name prefix.
        tie_fraction: share of pairs labelled 0.5 (ties).
        score_fraction: share of (non-tie) pairs given ``scores`` instead of ``label_0``.
        caption_rejected: also write ``caption_rejected``, the caption of the dispreferred image's
            scene (DCPO's second caption); the records are otherwise the same.

    Returns:
        The JSONL file.
    """
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    colors = list(COLORS)
    lines = []
    for i in range(n):
        rng = random.Random(f"diffusion-pairs:{seed}:{split}:{i}")
        scene = sample_scene(rng, image_size=image_size)
        unused = [
            c for c in colors if c not in {o.color for o in scene}
        ]  # the loser shows none of the caption's colours
        wrong = [ShapeObject(o.shape, rng.choice(unused), o.bbox) for o in scene]
        winner = rng.randrange(2)
        names = []
        for k, objects in enumerate((scene, wrong) if winner == 0 else (wrong, scene)):
            name = f"images/{split}-{i:06d}-{k}.png"
            with atomic_file(root / name) as tmp:
                render_scene(objects, image_size).save(tmp, format="PNG")
            names.append(name)
        record: dict = {
            "id": f"{split}-{i:06d}",
            "caption": caption_for(scene),
            "image_0": names[0],
            "image_1": names[1],
        }
        if caption_rejected:  # no draw from rng: the other fields stay what they are without it
            record["caption_rejected"] = caption_for(wrong)
        if rng.random() < tie_fraction:
            record["label_0"] = 0.5
        elif rng.random() < score_fraction:
            good, bad = rng.uniform(0.6, 1.0), rng.uniform(0.0, 0.4)
            record["scores"] = [good, bad] if winner == 0 else [bad, good]
        else:
            record["label_0"] = 1.0 - winner
        lines.append(json.dumps(record) + "\n")
    out = root / f"{split}.jsonl"
    atomic_write_text(out, "".join(lines))
    return out
