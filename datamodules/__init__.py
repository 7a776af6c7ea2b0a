"""Reusable preference-data modules: records, collators, LightningDataModules and synthetic worlds.

Nothing here imports ``mmpo``: other projects can use these datamodules on their own.
"""

from datamodules.batch import PreferenceBatch
from datamodules.collator import PreferenceDataset, VisionPreferenceCollator, load_image
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

__all__ = [
    "BadSampleError",
    "EpochShuffleSampler",
    "RankedPair",
    "RankedPreferenceDataModule",
    "RankedPreferenceDataset",
    "RankedRecord",
    "curriculum_order",
    "expand_pairs",
    "load_ranked_records",
    "ImagePreferenceDataModule",
    "PreferenceBatch",
    "PreferenceDataset",
    "PreferenceRecord",
    "ShapesWorld",
    "VisionPreferenceCollator",
    "load_image",
    "load_preference_records",
    "objects_in_text",
    "parse_record",
    "vocabulary",
    "write_shapes_world",
]
