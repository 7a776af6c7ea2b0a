"""LightningDataModule for ranked multi-response records, served as preference pairs."""

from __future__ import annotations

from typing import Any, ClassVar

from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, Dataset

from datamodules.core.settings import (
    CurriculumSettings,
    as_settings,
    migrate_flat_settings,
    settings_dict,
)
from datamodules.ranked.directional import DirectionSettings
from datamodules.ranked.lists import PairStrategy, RankedListDataset, RankedPreferenceDataset, load_ranked_records
from datamodules.vision_text.image_module import ImagePreferenceDataModule

__all__ = ["RankedPreferenceDataModule"]


class RankedPreferenceDataModule(ImagePreferenceDataModule):
    """Records with several scored (or ranked) responses per prompt, cut into pairs or served whole.

    Takes every argument of :class:`ImagePreferenceDataModule`, plus:

    Args:
        pair_strategy: ``best_vs_rest`` (Curry-DPO: the best against each other), ``best_vs_worst``,
            ``all_pairs`` or ``adjacent`` (neighbouring score levels).
        curriculum: easy-to-hard stages of the training pairs
            (:class:`~datamodules.core.settings.CurriculumSettings`: ``stages``, ``stage``,
            ``epochs_per_stage``; a mapping works too). The old flat ``curriculum_stages``,
            ``curriculum_stage`` and ``curriculum_epochs_per_stage`` still work, with a warning.
            ``epochs_per_stage`` needs ``trainer.reload_dataloaders_every_n_epochs: 1`` (a stage
            change is a new loader).
        serve_lists: serve each record whole, as one group of its K responses best first with their
            (B, K) scores, for list losses (``mmpo.losses.PlackettLuceLoss``); every record of a
            file needs the same K. ``pair_strategy`` and the curriculum do not apply.
        direction: directional preference alignment (DPA): records carry per-response reward vectors
            (``rewards``), each direction of :class:`~datamodules.ranked.directional.DirectionSettings`
            scores them vᵀr and serves the record once more, the direction written into its prompt.
            None (or no directions): records carry ``scores`` or a ``ranking``.
    """

    settings_groups: ClassVar[dict[str, type]] = {
        **ImagePreferenceDataModule.settings_groups,
        "curriculum": CurriculumSettings,
        "direction": DirectionSettings,
    }

    def __init__(
        self,
        *args: Any,
        pair_strategy: PairStrategy = "best_vs_rest",
        curriculum: CurriculumSettings | None = None,
        serve_lists: bool = False,
        direction: DirectionSettings | None = None,
        **kwargs: Any,
    ) -> None:
        owner = type(self).__name__
        kwargs = migrate_flat_settings(owner, {"curriculum": CurriculumSettings}, {"curriculum": curriculum, **kwargs})
        self.curriculum = as_settings(CurriculumSettings, kwargs.pop("curriculum"), "curriculum")
        if serve_lists and self.curriculum.active:
            raise ValueError("serve_lists serves whole lists: the pair curriculum (curriculum.*) does not apply")
        self.serve_lists = serve_lists
        self.pair_strategy = pair_strategy
        self.direction = as_settings(DirectionSettings, direction, "direction")
        super().__init__(*args, **kwargs)

    def hyperparameters(self) -> dict[str, Any]:
        extra = {
            "pair_strategy": self.pair_strategy,
            "curriculum": settings_dict(self.curriculum),
            "direction": settings_dict(self.direction),
        }
        return {**super().hyperparameters(), **extra, "serve_lists": self.serve_lists}

    def build_dataset(
        self, split: str, path: str, root: str
    ) -> tuple[RankedPreferenceDataset | RankedListDataset, list[str]]:
        expand = self.direction.expand if self.direction.active else None
        records, problems = load_ranked_records(path, root, self.on_bad_sample, self.image_placeholder, expand)
        if self.serve_lists:
            sizes = sorted({len(r.responses) for r in records})
            if len(sizes) > 1:
                raise ValueError(f"{path}: serve_lists needs one list size per file, found K in {sizes}")
            return RankedListDataset(records, self.on_bad_sample), problems
        dataset = RankedPreferenceDataset(records, self.pair_strategy, self.curriculum.stages, self.on_bad_sample)
        if split == "train" and self.curriculum.stage is not None:
            dataset.set_stage(self.curriculum.stage)
        return dataset, problems

    def scheduled_stage(self) -> int | None:
        """The curriculum stage of the trainer's current epoch (None without ``curriculum.epochs_per_stage``)."""
        c = self.curriculum
        if c.epochs_per_stage is None:
            return None
        trainer = getattr(self, "trainer", None)
        epoch = trainer.current_epoch if trainer is not None else 0
        return min(epoch // c.epochs_per_stage, c.stages - 1)

    def served_dataset(self, split: str) -> Dataset:
        # Scheduled stages are views: datasets["train"] keeps every pair (what a reference cache covers).
        dataset = super().served_dataset(split)
        stage = self.scheduled_stage()
        return dataset.stage(stage) if split == "train" and stage is not None else dataset

    def train_dataloader(self) -> DataLoader:
        trainer = getattr(self, "trainer", None)
        if self.curriculum.epochs_per_stage is not None and trainer is not None:
            if trainer.reload_dataloaders_every_n_epochs != 1:
                raise ValueError(
                    "curriculum.epochs_per_stage needs trainer.reload_dataloaders_every_n_epochs=1: each stage "
                    f"is a new training loader (it is {trainer.reload_dataloaders_every_n_epochs})"
                )
        loader = super().train_dataloader()
        if self.curriculum.epochs_per_stage is not None:
            stage, n = self.scheduled_stage(), self.curriculum.stages
            rank_zero_info(f"curriculum stage {stage} of {n} (0 = easiest): {len(loader.dataset)} training pairs")
        return loader
