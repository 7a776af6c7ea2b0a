"""Reusable preference-data modules: records, collators, LightningDataModules and synthetic worlds.

Nothing here imports ``mmpo``: other projects can use these datamodules on their own.
"""

from datamodules.core.batch import PreferenceBatch
from datamodules.core.records import BadSampleError, PreferenceRecord, load_preference_records, parse_record
from datamodules.core.samplers import EpochShuffleSampler
from datamodules.core.settings import CurriculumSettings, FrameSettings, LoaderSettings
from datamodules.diffusion.cache import build_latent_cache
from datamodules.diffusion.module import DiffusionPreferenceDataModule, write_diffusion_pairs
from datamodules.diffusion.pairs import DiffusionPairRecord, DiffusionPreferenceBatch, load_diffusion_records
from datamodules.diffusion.ranked import (
    DiffusionRankedDataModule,
    DiffusionRankedRecord,
    load_diffusion_ranked_records,
    write_diffusion_lists,
)
from datamodules.diffusion.trajectories import DiffusionTrajectoryDataModule, write_trajectory_pairs
from datamodules.ranked.lists import (
    RankedPair,
    RankedPreferenceDataset,
    RankedRecord,
    curriculum_order,
    expand_pairs,
    load_ranked_records,
)
from datamodules.ranked.module import RankedPreferenceDataModule
from datamodules.vision_text.collator import PreferenceDataset, VisionPreferenceCollator, load_image
from datamodules.vision_text.image_module import ImagePreferenceDataModule
from datamodules.vision_text.unpaired import UnpairedPreferenceDataModule, load_unpaired_records
from datamodules.vision_text.video_io import read_video, sample_frame_indices, write_video
from datamodules.vision_text.video_module import VideoPreferenceDataModule
from datamodules.vision_text.video_negatives import VideoNegativeSettings, VideoVDPODataModule
from datamodules.worlds.shapes import ShapesWorld, objects_in_text, vocabulary, write_shapes_world

__all__ = [
    "BadSampleError",
    "CurriculumSettings",
    "DiffusionPairRecord",
    "DiffusionPreferenceBatch",
    "DiffusionPreferenceDataModule",
    "DiffusionRankedDataModule",
    "DiffusionRankedRecord",
    "DiffusionTrajectoryDataModule",
    "EpochShuffleSampler",
    "FrameSettings",
    "ImagePreferenceDataModule",
    "LoaderSettings",
    "PreferenceBatch",
    "PreferenceDataset",
    "PreferenceRecord",
    "RankedPair",
    "RankedPreferenceDataModule",
    "RankedPreferenceDataset",
    "RankedRecord",
    "ShapesWorld",
    "UnpairedPreferenceDataModule",
    "VideoNegativeSettings",
    "VideoPreferenceDataModule",
    "VideoVDPODataModule",
    "VisionPreferenceCollator",
    "build_latent_cache",
    "curriculum_order",
    "expand_pairs",
    "load_diffusion_ranked_records",
    "load_diffusion_records",
    "load_image",
    "load_preference_records",
    "load_ranked_records",
    "load_unpaired_records",
    "objects_in_text",
    "parse_record",
    "read_video",
    "sample_frame_indices",
    "vocabulary",
    "write_diffusion_lists",
    "write_diffusion_pairs",
    "write_trajectory_pairs",
    "write_shapes_world",
    "write_video",
]
