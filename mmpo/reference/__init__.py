"""Reference strategies (disabled adapter, frozen copy, separate checkpoint, cached on disk, none) and the
on-disk cache of reference log-probs."""

from mmpo.reference.cache import ReferenceCache, compute_reference_cache, data_fingerprint, model_fingerprint
from mmpo.reference.strategies import (
    CachedReference,
    DisabledAdapter,
    FrozenCopy,
    NoReference,
    ReferenceStrategy,
    SeparateCheckpoint,
    resolve_reference,
)

__all__ = [
    "CachedReference",
    "DisabledAdapter",
    "FrozenCopy",
    "NoReference",
    "ReferenceCache",
    "ReferenceStrategy",
    "SeparateCheckpoint",
    "compute_reference_cache",
    "data_fingerprint",
    "model_fingerprint",
    "resolve_reference",
]
