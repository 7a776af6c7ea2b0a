"""LightningDataModule for video (and mixed image/video) preference pairs, decoded with decord."""

from __future__ import annotations

from typing import Any, Literal

from datamodules.core.records import load_preference_records
from datamodules.vision_text.collator import PreferenceDataset
from datamodules.vision_text.image_module import ImagePreferenceDataModule

__all__ = ["VideoPreferenceDataModule"]


class VideoPreferenceDataModule(ImagePreferenceDataModule):
    """Preference pairs over videos (``videos`` / ``rejected_videos`` fields), images allowed too.

    Videos are decoded with decord inside the DataLoader workers and passed to the processor as frame
    arrays (``processor(videos=...)``, e.g. LLaVA-NeXT-Video). Takes every argument of
    :class:`ImagePreferenceDataModule`, plus:

    Args:
        num_frames: frames sampled per video.
        frame_sampling: ``uniform`` (spread over the whole video), ``fps`` (one frame every
            1/target_fps seconds from the start, at most ``num_frames``), or ``random_segment`` (a
            random window per record and epoch, for training; validation and test always use
            ``uniform``).
        target_fps: frame rate of the ``fps`` strategy.
    """

    def __init__(
        self,
        processor: str,
        train_file: str | list[str] | None = None,
        val_file: str | list[str] | None = None,
        test_file: str | list[str] | None = None,
        data_root: str | None = None,
        batch_size: int = 2,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        max_length: int | None = None,
        on_bad_sample: Literal["error", "skip"] = "error",
        shuffle: bool = True,
        seed: int = 0,
        trust_remote_code: bool = False,
        image_placeholder: str = "<image>",
        num_frames: int = 8,
        frame_sampling: Literal["uniform", "fps", "random_segment"] = "uniform",
        target_fps: float | None = None,
        pin_memory: bool | None = None,
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
        if frame_sampling == "fps" and not target_fps:
            raise ValueError("frame_sampling='fps' needs target_fps")
        self.num_frames = num_frames
        self.frame_sampling = frame_sampling
        self.target_fps = target_fps
        # workers must see each epoch's new random windows: no persistent copies of the dataset
        self.persistent_workers = frame_sampling != "random_segment"

    def build_dataset(self, split: str, path: str, root: str) -> tuple[PreferenceDataset, list[str]]:
        records, problems = load_preference_records(path, root, self.on_bad_sample, self.image_placeholder)
        sampling = self.frame_sampling if split == "train" else ("uniform" if self.frame_sampling != "fps" else "fps")
        dataset = PreferenceDataset(
            records, self.on_bad_sample, self.num_frames, sampling, self.target_fps, seed=self.seed
        )
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
