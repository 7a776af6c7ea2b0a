"""Diffusion preference pairs (Pick-a-Pic style): records, batches, the datamodule and the latent cache."""

from datamodules.diffusion.cache import build_latent_cache
from datamodules.diffusion.latent_cache import LatentCache, LatentCacheMissError
from datamodules.diffusion.module import DiffusionPreferenceDataModule, write_diffusion_pairs
from datamodules.diffusion.pairs import DiffusionPairRecord, DiffusionPreferenceBatch, load_diffusion_records

__all__ = [
    "DiffusionPairRecord",
    "DiffusionPreferenceBatch",
    "DiffusionPreferenceDataModule",
    "LatentCache",
    "LatentCacheMissError",
    "build_latent_cache",
    "load_diffusion_records",
    "write_diffusion_pairs",
]
