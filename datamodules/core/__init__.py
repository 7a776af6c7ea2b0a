"""The core every data family shares: the batch contract, record loading, samplers, loaders, and what a
datamodule offers a reference cache."""

from datamodules.core.batch import SIDE_FIELDS, PreferenceBatch
from datamodules.core.cache_source import CacheableSplit, ReferenceCacheData
from datamodules.core.records import BadSampleError, PreferenceRecord, load_preference_records, parse_record
from datamodules.core.samplers import EpochShuffleSampler, ShardedEpochShuffleSampler
from datamodules.core.settings import CurriculumSettings, FrameSettings, LoaderSettings

__all__ = [
    "SIDE_FIELDS",
    "BadSampleError",
    "CacheableSplit",
    "CurriculumSettings",
    "EpochShuffleSampler",
    "FrameSettings",
    "LoaderSettings",
    "PreferenceBatch",
    "PreferenceRecord",
    "ReferenceCacheData",
    "ShardedEpochShuffleSampler",
    "load_preference_records",
    "parse_record",
]
