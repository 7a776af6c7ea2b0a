"""Reusable preference-data modules: records, collators, LightningDataModules and synthetic worlds.

Nothing here imports ``mmpo``: other projects can use these datamodules on their own.
"""

from datamodules.batch import PreferenceBatch
from datamodules.collator import PreferenceDataset, VisionPreferenceCollator, load_image
from datamodules.diffusion import DiffusionPairRecord, DiffusionPreferenceBatch, load_diffusion_records
from datamodules.diffusion_cache import build_latent_cache
from datamodules.diffusion_module import DiffusionPreferenceDataModule, write_diffusion_pairs
from datamodules.image_preference import ImagePreferenceDataModule
from datamodules.ranked import (
    RankedPair,
    RankedPreferenceDataset,
    RankedRecord,
    curriculum_order,
    expand_pairs,
    load_ranked_records,
)
from datamodules.ranked_module import RankedPreferenceDataModule
from datamodules.records import BadSampleError, PreferenceRecord, load_preference_records, parse_record
from datamodules.samplers import EpochShuffleSampler
from datamodules.shapes_world import ShapesWorld, objects_in_text, vocabulary, write_shapes_world
from datamodules.video import read_video, sample_frame_indices, write_video
from datamodules.video_module import VideoPreferenceDataModule

__all__ = [
    "BadSampleError",
    "DiffusionPairRecord",
    "DiffusionPreferenceBatch",
    "DiffusionPreferenceDataModule",
    "EpochShuffleSampler",
    "ImagePreferenceDataModule",
    "PreferenceBatch",
    "PreferenceDataset",
    "PreferenceRecord",
    "RankedPair",
    "RankedPreferenceDataModule",
    "RankedPreferenceDataset",
    "RankedRecord",
    "ShapesWorld",
    "VideoPreferenceDataModule",
    "VisionPreferenceCollator",
    "build_latent_cache",
    "curriculum_order",
    "expand_pairs",
    "load_diffusion_records",
    "load_image",
    "load_preference_records",
    "load_ranked_records",
    "objects_in_text",
    "parse_record",
    "read_video",
    "sample_frame_indices",
    "vocabulary",
    "write_diffusion_pairs",
    "write_shapes_world",
    "write_video",
]
