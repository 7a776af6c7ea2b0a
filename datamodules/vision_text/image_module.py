"""LightningDataModule for image (or text-only) preference pairs in TRL's vision format."""

from __future__ import annotations

import copy
import logging
import os
from typing import Any, ClassVar, Literal

import lightning as L
from torch.utils.data import DataLoader, Dataset

from datamodules.core.cache_source import CacheableSplit
from datamodules.core.loaders import FirstBatchStatefulDataLoader, pins_memory
from datamodules.core.records import default_root, load_preference_records
from datamodules.core.samplers import EpochShuffleSampler, ShardedEpochShuffleSampler
from datamodules.core.settings import (
    LoaderSettings,
    as_settings,
    migrate_flat_settings,
    settings_dict,
)
from datamodules.vision_text.collator import PreferenceDataset, VisionPreferenceCollator

__all__ = ["ImagePreferenceDataModule"]

log = logging.getLogger(__name__)


class ImagePreferenceDataModule(L.LightningDataModule):
    """Preference pairs with images, read from JSONL / JSON / Parquet files.

    Each record has ``prompt``, ``chosen``, ``rejected`` and ``images`` (paths relative to
    ``data_root``); see ``docs/data.md``. Images are decoded and processed in the DataLoader workers.

    Args:
        processor: hub id or local directory of the model's processor (``AutoProcessor``). Through
            ``mmpo fit`` it may be left out: it is then the backbone's ``model_name_or_path``, so a
            config names the checkpoint once.
        train_file: training records: a .jsonl / .json / .parquet file, a directory written by
            ``datasets``' ``save_to_disk``, or a hub dataset id (``owner/name``); the last two take
            ``:SPLIT`` when they hold several splits. Or a list of files read one after another
            (e.g. a built dataset and a replay of the source data), each with media relative to its
            own folder.
        val_file: validation records (optional; a file or a list, as ``train_file``).
        test_file: test records (optional).
        data_root: directory image paths are relative to (default: each file's directory).
        loader: batch sizes, workers, shuffling and seed (:class:`~datamodules.core.settings.LoaderSettings`;
            a mapping works too). The old flat arguments (``batch_size=...``) are still accepted, with
            a warning.
        max_length: maximum prompt + response tokens (None: no limit); prompts are never cut. With
            576 tokens per LLaVA-1.5 image, three images alone take 1,728.
        on_bad_sample: ``error`` stops with a message naming file and record; ``skip`` drops and counts.
        trust_remote_code: allow custom processor code from the hub (off by default).
        processor_kwargs: keyword arguments of ``AutoProcessor.from_pretrained``, e.g. Qwen2-VL's image
            token bounds ``{min_pixels: 200704, max_pixels: 1003520}``; they are part of the reference
            cache's fingerprint.
        image_placeholder: marks an image's position in plain-text prompts, whatever the model's own
            image token is (the processor's chat template inserts that).
        train_dataset: in-memory training data instead of ``train_file`` (a ``datasets.Dataset`` in
            TRL's vision format, images as PIL images or paths, or a list of dicts).
        val_dataset: in-memory validation data.
        test_dataset: in-memory test data.
    """

    #: the settings groups this class takes, by argument name (subclasses add theirs)
    settings_groups: ClassVar[dict[str, type]] = {"loader": LoaderSettings}

    def __init__(
        self,
        processor: str | None = None,
        train_file: str | list[str] | None = None,
        val_file: str | list[str] | None = None,
        test_file: str | list[str] | None = None,
        data_root: str | None = None,
        loader: LoaderSettings | None = None,
        max_length: int | None = None,
        on_bad_sample: Literal["error", "skip"] = "error",
        trust_remote_code: bool = False,
        processor_kwargs: dict[str, Any] | None = None,
        image_placeholder: str = "<image>",
        train_dataset: Any = None,
        val_dataset: Any = None,
        test_dataset: Any = None,
        **flat_settings: Any,
    ) -> None:
        super().__init__()
        groups = migrate_flat_settings(
            type(self).__name__, {"loader": LoaderSettings}, {"loader": loader, **flat_settings}
        )
        self.loader = as_settings(LoaderSettings, groups.pop("loader"), "loader")
        if groups:
            raise TypeError(f"{type(self).__name__}: unexpected argument(s) {sorted(groups)}")
        if on_bad_sample not in ("error", "skip"):
            raise ValueError(f"on_bad_sample must be 'error' or 'skip', got {on_bad_sample!r}")
        self.processor_name = processor
        self.files = {"train": train_file, "val": val_file, "test": test_file}
        self.in_memory = {"train": train_dataset, "val": val_dataset, "test": test_dataset}
        self.data_root = data_root
        self.max_length = max_length
        self.on_bad_sample = on_bad_sample
        self.trust_remote_code = trust_remote_code
        self.processor_kwargs = dict(processor_kwargs or {})
        self.image_placeholder = image_placeholder
        self.persistent_workers = True
        self.datasets: dict[str, PreferenceDataset] = {}
        self.problems: dict[str, list[str]] = {}
        self._processor = None
        # plain values only (checkpoints are read with weights_only=True); enough to rebuild the module
        self.save_hyperparameters(self.hyperparameters())

    def hyperparameters(self) -> dict[str, Any]:
        """The arguments that rebuild this datamodule, as plain values (settings groups as dicts);
        subclasses add theirs. In-memory datasets are not included."""
        return {
            "processor": self.processor_name,
            "train_file": self.files["train"],
            "val_file": self.files["val"],
            "test_file": self.files["test"],
            "data_root": self.data_root,
            "loader": settings_dict(self.loader),
            "max_length": self.max_length,
            "on_bad_sample": self.on_bad_sample,
            "trust_remote_code": self.trust_remote_code,
            "processor_kwargs": self.processor_kwargs,
            "image_placeholder": self.image_placeholder,
        }

    @property
    def processor(self) -> Any:
        if self._processor is None:
            from transformers import AutoProcessor

            if self.processor_name is None:
                raise ValueError(
                    f"{type(self).__name__}: no processor: pass processor=... (a hub id or a local directory); "
                    "mmpo fit fills it in from the backbone's model_name_or_path"
                )
            self._processor = AutoProcessor.from_pretrained(
                self.processor_name, trust_remote_code=self.trust_remote_code, **self.processor_kwargs
            )
        return self._processor

    def setup(self, stage: str | None = None) -> None:
        wanted = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("test",)}
        for split in wanted.get(stage, ("train", "val", "test")) if stage else ("train", "val", "test"):
            path = self.files[split] if self.files[split] is not None else self.in_memory[split]
            if path is None or split in self.datasets:
                continue
            dataset, problems = self._read_split(split, path)
            if len(dataset) == 0:
                raise ValueError(f"{path}: no usable records ({len(problems)} skipped)")
            if problems:
                log.warning(
                    "%s: skipped %d bad record(s) of %d; first: %s",
                    path,
                    len(problems),
                    len(problems) + len(dataset),
                    problems[0],
                )
            self.problems[split] = problems
            self.datasets[split] = dataset

    def _read_split(self, split: str, path: Any) -> tuple[Dataset, list[str]]:
        """One split from a file, in-memory data, or a list of files (each with its own media root)."""
        if not (isinstance(path, (list, tuple)) and path and all(isinstance(p, (str, os.PathLike)) for p in path)):
            return self.build_dataset(split, path, str(default_root(path, self.data_root)))
        parts = [self.build_dataset(split, p, str(default_root(p, self.data_root))) for p in path]
        first = parts[0][0]
        if type(first) is not PreferenceDataset or any(type(d) is not PreferenceDataset for d, _ in parts):
            raise ValueError(f"{type(self).__name__}: {split}_file takes one file here, got a list of {len(path)}")
        merged = copy.copy(first)  # same decoding settings, the records of every file in the order given
        merged.records = [r for d, _ in parts for r in d.records]
        return merged, [problem for _, found in parts for problem in found]

    def build_dataset(self, split: str, path: Any, root: str) -> tuple[Dataset, list[str]]:
        """Read one split's file into a dataset; subclasses override this for other record kinds."""
        records, problems = load_preference_records(path, root, self.on_bad_sample, self.image_placeholder)
        return PreferenceDataset(records, self.on_bad_sample), problems

    def collator(self) -> VisionPreferenceCollator:
        return VisionPreferenceCollator(self.processor, max_length=self.max_length, on_bad_sample=self.on_bad_sample)

    def cache_settings(self, split: str) -> dict[str, Any]:
        """What besides the records changes a log-prob of ``split``: the processor and its settings
        (image size, chat template, ...), ``max_length``, the placeholder. Subclasses add theirs."""
        to_json = getattr(self.processor, "to_json_string", None)
        return {
            "split": split,
            "processor": self.processor_name,
            **({"processor_kwargs": self.processor_kwargs} if self.processor_kwargs else {}),
            "processor_settings": to_json() if callable(to_json) else repr(self.processor),
            "max_length": self.max_length,
            "image_placeholder": self.image_placeholder,
        }

    def reference_cache_split(self, split: str) -> CacheableSplit | None:
        """The split as a reference cache sees it (see :class:`~datamodules.core.cache_source.ReferenceCacheData`)."""
        if split not in self.datasets:
            return None
        dataset = self.datasets[split]
        return CacheableSplit(
            dataset, dataset.records, self.collator(), self.loader.eval_size, self.cache_settings(split)
        )

    def served_dataset(self, split: str) -> Dataset:
        """The dataset a split's loader serves (subclasses may serve a view, e.g. a curriculum stage)."""
        if split not in self.datasets:
            raise ValueError(f"no {split} data: set {split}_file")
        return self.datasets[split]

    def _loader(self, split: str, batch_size: int, shuffle: bool) -> DataLoader:
        dataset = self.served_dataset(split)
        trainer = getattr(self, "trainer", None)
        epoch = (lambda: trainer.current_epoch) if trainer is not None else None
        if trainer is not None and trainer.world_size > 1:
            # each rank takes its share of the single-process order (see ShardedEpochShuffleSampler)
            sampler = ShardedEpochShuffleSampler(
                dataset, trainer.world_size, trainer.global_rank, self.loader.seed, shuffle, epoch_source=epoch
            )
        else:
            sampler = EpochShuffleSampler(dataset, seed=self.loader.seed, shuffle=shuffle, epoch_source=epoch)
        # the training loader is stateful: a checkpoint taken mid-epoch records its position, and a
        # resumed run continues from the next batch instead of restarting the epoch; it starts its
        # workers at the first batch, after Lightning has set the epoch (see FirstBatchStatefulDataLoader)
        loader_class = FirstBatchStatefulDataLoader if split == "train" else DataLoader
        return loader_class(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            num_workers=self.loader.num_workers,
            collate_fn=self.collator(),
            persistent_workers=self.loader.num_workers > 0 and self.persistent_workers,
            pin_memory=self._pins(trainer),
        )

    def _pins(self, trainer: Any) -> bool:
        return pins_memory(self.loader.pin_memory, trainer)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", self.loader.batch_size, self.loader.shuffle)

    def val_dataloader(self) -> DataLoader | list:
        if self.files["val"] is None and self.in_memory["val"] is None:
            return []  # no validation set: Lightning skips validation
        return self._loader("val", self.loader.eval_size, False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", self.loader.eval_size, False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test", self.loader.eval_size, False)
