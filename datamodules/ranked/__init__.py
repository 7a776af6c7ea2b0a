"""Ranked lists: K scored responses per prompt, served as pairs (with a Curry-DPO curriculum) or whole."""

from datamodules.ranked.lists import (
    RankedListDataset,
    RankedPair,
    RankedPreferenceDataset,
    RankedRecord,
    curriculum_order,
    expand_pairs,
    load_ranked_records,
)
from datamodules.ranked.module import RankedPreferenceDataModule

__all__ = [
    "RankedListDataset",
    "RankedPair",
    "RankedPreferenceDataModule",
    "RankedPreferenceDataset",
    "RankedRecord",
    "curriculum_order",
    "expand_pairs",
    "load_ranked_records",
]
