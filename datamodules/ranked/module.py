"""LightningDataModule for ranked multi-response records, served as preference pairs."""

from __future__ import annotations

from typing import Literal

from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, Dataset

from datamodules.ranked.lists import PairStrategy, RankedListDataset, RankedPreferenceDataset, load_ranked_records
from datamodules.vision_text.image_module import ImagePreferenceDataModule

__all__ = ["RankedPreferenceDataModule"]


class RankedPreferenceDataModule(ImagePreferenceDataModule):
    """Records with several scored (or ranked) responses per prompt, cut into pairs or served whole.

    Takes every argument of :class:`ImagePreferenceDataModule`, plus:

    Args:
        pair_strategy: ``best_vs_rest`` (Curry-DPO: the best against each other), ``best_vs_worst``,
            ``all_pairs`` or ``adjacent`` (neighbouring score levels).
        curriculum_stages: split training pairs into this many easy-to-hard stages (largest score gap
            first, Curry-DPO); None trains on every pair.
        curriculum_stage: which stage the training split serves (0 = easiest); None for all pairs.
        curriculum_epochs_per_stage: walk the stages in one run instead, this many epochs each: epoch e
            serves stage ``min(e // curriculum_epochs_per_stage, curriculum_stages - 1)``. The stage is
            a function of the trainer's epoch, which checkpoints restore, so a resumed run serves the
            stage (and the order) an uninterrupted one does. Needs
            ``trainer.reload_dataloaders_every_n_epochs: 1`` (a stage change is a new loader).
        serve_lists: serve each record whole, as one group of its K responses best first with their
            (B, K) scores, for list losses (``mmpo.losses.PlackettLuceLoss``); every record of a
            file needs the same K. ``pair_strategy`` and the curriculum do not apply.
    """

    def __init__(
        self,
        processor: str,
        train_file: str | None = None,
        val_file: str | None = None,
        test_file: str | None = None,
        data_root: str | None = None,
        batch_size: int = 4,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        max_length: int | None = None,
        on_bad_sample: Literal["error", "skip"] = "error",
        shuffle: bool = True,
        seed: int = 0,
        trust_remote_code: bool = False,
        image_placeholder: str = "<image>",
        pair_strategy: PairStrategy = "best_vs_rest",
        curriculum_stages: int | None = None,
        curriculum_stage: int | None = None,
        curriculum_epochs_per_stage: int | None = None,
        pin_memory: bool | None = None,
        serve_lists: bool = False,
    ) -> None:
        super().__init__(
            processor,
            train_file,
            val_file,
            test_file,
            data_root,
            batch_size,
            eval_batch_size,
            num_workers,
            max_length,
            on_bad_sample,
            shuffle,
            seed,
            trust_remote_code,
            image_placeholder,
            pin_memory=pin_memory,
        )
        if curriculum_epochs_per_stage is not None:
            if curriculum_epochs_per_stage < 1:
                raise ValueError(f"curriculum_epochs_per_stage must be >= 1, got {curriculum_epochs_per_stage}")
            if curriculum_stages is None:
                raise ValueError("curriculum_epochs_per_stage needs curriculum_stages")
            if curriculum_stage is not None:
                raise ValueError("give curriculum_stage (one fixed stage) or curriculum_epochs_per_stage, not both")
        if serve_lists and (curriculum_stages is not None or curriculum_stage is not None):
            raise ValueError("serve_lists serves whole lists: the pair curriculum (curriculum_*) does not apply")
        self.serve_lists = serve_lists
        self.pair_strategy = pair_strategy
        self.curriculum_stages = curriculum_stages
        self.curriculum_stage = curriculum_stage
        self.curriculum_epochs_per_stage = curriculum_epochs_per_stage

    def build_dataset(
        self, split: str, path: str, root: str
    ) -> tuple[RankedPreferenceDataset | RankedListDataset, list[str]]:
        records, problems = load_ranked_records(path, root, self.on_bad_sample, self.image_placeholder)
        if self.serve_lists:
            sizes = sorted({len(r.responses) for r in records})
            if len(sizes) > 1:
                raise ValueError(f"{path}: serve_lists needs one list size per file, found K in {sizes}")
            return RankedListDataset(records, self.on_bad_sample), problems
        dataset = RankedPreferenceDataset(records, self.pair_strategy, self.curriculum_stages, self.on_bad_sample)
        if split == "train" and self.curriculum_stage is not None:
            dataset.set_stage(self.curriculum_stage)
        return dataset, problems

    def scheduled_stage(self) -> int | None:
        """The curriculum stage of the trainer's current epoch (None without ``curriculum_epochs_per_stage``)."""
        if self.curriculum_epochs_per_stage is None:
            return None
        trainer = getattr(self, "trainer", None)
        epoch = trainer.current_epoch if trainer is not None else 0
        return min(epoch // self.curriculum_epochs_per_stage, self.curriculum_stages - 1)

    def served_dataset(self, split: str) -> Dataset:
        # Scheduled stages are views: datasets["train"] keeps every pair (what a reference cache covers).
        dataset = super().served_dataset(split)
        stage = self.scheduled_stage()
        return dataset.stage(stage) if split == "train" and stage is not None else dataset

    def train_dataloader(self) -> DataLoader:
        trainer = getattr(self, "trainer", None)
        if self.curriculum_epochs_per_stage is not None and trainer is not None:
            if trainer.reload_dataloaders_every_n_epochs != 1:
                raise ValueError(
                    "curriculum_epochs_per_stage needs trainer.reload_dataloaders_every_n_epochs=1: each stage "
                    f"is a new training loader (it is {trainer.reload_dataloaders_every_n_epochs})"
                )
        loader = super().train_dataloader()
        if self.curriculum_epochs_per_stage is not None:
            stage, n = self.scheduled_stage(), self.curriculum_stages
            rank_zero_info(f"curriculum stage {stage} of {n} (0 = easiest): {len(loader.dataset)} training pairs")
        return loader
