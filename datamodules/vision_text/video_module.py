"""LightningDataModule for video (and mixed image/video) preference pairs, decoded with decord."""

from __future__ import annotations

from typing import Any, ClassVar

from datamodules.core.records import load_preference_records
from datamodules.core.settings import FrameSettings, as_settings, migrate_flat_settings, settings_dict
from datamodules.vision_text.collator import PreferenceDataset
from datamodules.vision_text.image_module import ImagePreferenceDataModule

__all__ = ["VideoPreferenceDataModule"]


class VideoPreferenceDataModule(ImagePreferenceDataModule):
    """Preference pairs over videos (``videos`` / ``rejected_videos`` fields), images allowed too.

    Videos are decoded with decord inside the DataLoader workers and passed to the processor as frame
    arrays (``processor(videos=...)``, e.g. LLaVA-NeXT-Video). Takes every argument of
    :class:`ImagePreferenceDataModule`, plus:

    Args:
        frames: which frames are decoded (:class:`~datamodules.core.settings.FrameSettings`:
            ``num_frames``, ``frame_sampling``, ``target_fps``; a mapping works too). With
            ``random_segment`` validation and test still use ``uniform``.
    """

    settings_groups: ClassVar[dict[str, type]] = {
        **ImagePreferenceDataModule.settings_groups,
        "frames": FrameSettings,
    }

    def __init__(self, *args: Any, frames: FrameSettings | None = None, **kwargs: Any) -> None:
        kwargs = migrate_flat_settings(type(self).__name__, {"frames": FrameSettings}, {"frames": frames, **kwargs})
        self.frames = as_settings(FrameSettings, kwargs.pop("frames"), "frames")
        super().__init__(*args, **kwargs)
        # workers must see each epoch's new random windows: no persistent copies of the dataset
        self.persistent_workers = self.frames.frame_sampling != "random_segment"

    def hyperparameters(self) -> dict[str, Any]:
        return {**super().hyperparameters(), "frames": settings_dict(self.frames)}

    def build_dataset(self, split: str, path: str, root: str) -> tuple[PreferenceDataset, list[str]]:
        records, problems = load_preference_records(path, root, self.on_bad_sample, self.image_placeholder)
        f = self.frames
        sampling = f.frame_sampling if split == "train" else ("uniform" if f.frame_sampling != "fps" else "fps")
        dataset = PreferenceDataset(
            records, self.on_bad_sample, f.num_frames, sampling, f.target_fps, seed=self.loader.seed,
            min_frames=f.min_frames, max_pixels=f.max_pixels,
        )  # fmt: skip
        return dataset, problems

    def cache_settings(self, split: str) -> dict[str, Any]:
        dataset = self.datasets[split]
        if dataset.frame_sampling == "random_segment":
            raise ValueError(
                f"frame_sampling='random_segment' draws new frame windows every epoch, so the {split} split's "
                "reference log-probs change and cannot be cached: use frame_sampling 'uniform' or 'fps', or a "
                "reference computed each step (reference: adapter or copy)"
            )
        sampling = {"num_frames": dataset.num_frames, "frame_sampling": dataset.frame_sampling}
        return {**super().cache_settings(split), **sampling, "target_fps": dataset.target_fps}
