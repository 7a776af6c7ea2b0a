"""Diffusion preference data: Pick-a-Pic-style pairs and ranked lists, batches, the datamodules and the latent cache."""

from datamodules.diffusion.cache import build_latent_cache
from datamodules.diffusion.latent_cache import LatentCache, LatentCacheMissError
from datamodules.diffusion.module import DiffusionPreferenceDataModule, write_diffusion_pairs
from datamodules.diffusion.pairs import DiffusionPairRecord, DiffusionPreferenceBatch, load_diffusion_records
from datamodules.diffusion.ranked import (
    DiffusionRankedDataModule,
    DiffusionRankedRecord,
    load_diffusion_ranked_records,
    write_diffusion_lists,
)
from datamodules.diffusion.trajectories import DiffusionTrajectoryDataModule, write_trajectory_pairs

__all__ = [
    "DiffusionPairRecord",
    "DiffusionPreferenceBatch",
    "DiffusionPreferenceDataModule",
    "DiffusionRankedDataModule",
    "DiffusionRankedRecord",
    "DiffusionTrajectoryDataModule",
    "LatentCache",
    "LatentCacheMissError",
    "build_latent_cache",
    "load_diffusion_ranked_records",
    "load_diffusion_records",
    "write_diffusion_lists",
    "write_diffusion_pairs",
    "write_trajectory_pairs",
]
