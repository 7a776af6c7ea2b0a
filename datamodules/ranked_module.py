"""LightningDataModule for ranked multi-response records, served as preference pairs."""

from __future__ import annotations

from typing import Literal

from datamodules.image_preference import ImagePreferenceDataModule
from datamodules.ranked import PairStrategy, RankedPreferenceDataset, load_ranked_records

__all__ = ["RankedPreferenceDataModule"]


class RankedPreferenceDataModule(ImagePreferenceDataModule):
    """Records with several scored (or ranked) responses per prompt, cut into pairs.

    Takes every argument of :class:`ImagePreferenceDataModule`, plus:

    Args:
        pair_strategy: ``best_vs_rest`` (Curry-DPO: the best against each other), ``best_vs_worst``,
            ``all_pairs`` or ``adjacent`` (neighbouring score levels).
        curriculum_stages: split training pairs into this many easy-to-hard stages (largest score gap
            first, Curry-DPO); None trains on every pair.
        curriculum_stage: which stage the training split serves (0 = easiest); None for all pairs.
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
        )
        self.pair_strategy = pair_strategy
        self.curriculum_stages = curriculum_stages
        self.curriculum_stage = curriculum_stage

    def build_dataset(self, split: str, path: str, root: str) -> tuple[RankedPreferenceDataset, list[str]]:
        records, problems = load_ranked_records(path, root, self.on_bad_sample, self.image_placeholder)
        dataset = RankedPreferenceDataset(records, self.pair_strategy, self.curriculum_stages, self.on_bad_sample)
        if split == "train" and self.curriculum_stage is not None:
            dataset.set_stage(self.curriculum_stage)
        return dataset, problems
