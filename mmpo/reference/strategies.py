"""Reference strategies: where the reference model's statistics come from, as typed objects.

Pick one in YAML (``reference: {class_path: mmpo.reference.FrozenCopy}``) or by its short name
(``reference: copy``). Each strategy checks that it fits the loss and the backbone when the module
is built, sets itself up once the policy exists, and answers ``statistics(module, batch, split)``.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from datamodules.core.cache_source import ReferenceCacheData
from mmpo.backbones.protocol import Backbone
from mmpo.losses.base import PreferenceLoss, ResponseStats
from mmpo.reference.adapter_snapshot import snapshot_active
from mmpo.reference.cache import (
    ReferenceCache,
    compute_reference_cache,
    compute_response_cache,
    data_fingerprint,
    model_fingerprint,
)

if TYPE_CHECKING:
    from mmpo.module import PreferenceModule

__all__ = [
    "REFERENCE_NAMES",
    "CachedReference",
    "DisabledAdapter",
    "FrozenCopy",
    "NoReference",
    "ReferenceName",
    "ReferenceStrategy",
    "SeparateCheckpoint",
    "resolve_reference",
]

ReferenceName = Literal["auto", "adapter", "copy", "none", "cached"]
REFERENCE_NAMES = ("auto", "adapter", "copy", "none", "cached")


class ReferenceStrategy(ABC):
    """Base class of the reference strategies.

    Attributes:
        name: short name, logged and accepted in YAML for the strategies that take no arguments.
        reuses_policy_media: the reference is the policy's own model with its adapter disabled, so
            frozen media encoders give both passes the same features (computed once per step).
    """

    name: str = ""
    reuses_policy_media: bool = False

    def check(self, loss: PreferenceLoss, backbone: Backbone) -> None:
        """Raise a ValueError when this strategy cannot serve ``loss`` with ``backbone``."""
        if not loss.requires_reference:
            raise ValueError(f"{type(loss).__name__} uses no reference model: use reference 'none' (or 'auto')")

    def setup(self, module: PreferenceModule) -> None:
        """Called once the policy is built (``configure_model``); nothing to do by default."""
        return None

    def prepare(self, module: PreferenceModule, splits: tuple[str, ...]) -> None:
        """Called when a stage starts, with the splits it will read; nothing to do by default."""
        return None

    @abstractmethod
    def statistics(self, module: PreferenceModule, batch: Any, split: str) -> ResponseStats | None:
        """The reference's statistics of ``batch`` (no gradient), or None."""

    def reference_model(self, module: PreferenceModule) -> tuple[nn.Module, AbstractContextManager]:
        """The model that computes as the reference, and the context to run it in (under ``no_grad``).

        For passes beyond ``statistics`` (the per-token KL of ``mmpo.token_kl``).
        """
        raise ValueError(f"reference {self.name!r} runs no reference model")

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class NoReference(ReferenceStrategy):
    """No reference model, for reference-free losses (SimPO, ASFT, SFT)."""

    name = "none"

    def check(self, loss: PreferenceLoss, backbone: Backbone) -> None:
        if loss.requires_token_kl:
            raise ValueError(
                f"{type(loss).__name__} needs the reference model's next-token distributions (per-token KL): "
                "reference 'none' runs no reference; use adapter, copy or a separate checkpoint"
            )
        if loss.requires_reference:
            raise ValueError(f"{type(loss).__name__} needs a reference model; reference 'none' is not possible")

    def statistics(self, module: PreferenceModule, batch: Any, split: str) -> None:
        return None


class DisabledAdapter(ReferenceStrategy):
    """The policy with its LoRA adapter switched off: no second model in memory.

    After a refresh (:func:`mmpo.reference.refresh.refresh_reference`, Curry-DPO stages, APO rounds) the
    reference is a frozen snapshot adapter beside the trained one (``snapshot`` True), run instead.
    """

    name = "adapter"
    reuses_policy_media = True
    snapshot: bool = False

    def check(self, loss: PreferenceLoss, backbone: Backbone) -> None:
        super().check(loss, backbone)
        if not backbone.uses_lora:
            raise ValueError("reference 'adapter' needs a LoRA backbone (set backbone.lora)")

    def statistics(self, module: PreferenceModule, batch: Any, split: str) -> ResponseStats:
        with torch.no_grad(), self._switched(module):
            return module.backbone.statistics(module.policy, batch)

    def reference_model(self, module: PreferenceModule) -> tuple[nn.Module, AbstractContextManager]:
        return module.policy, self._switched(module)

    def _switched(self, module: PreferenceModule) -> AbstractContextManager:
        if self.snapshot:
            return snapshot_active(module.policy)
        return module.backbone.adapters_disabled(module.policy)


class _FrozenModel(ReferenceStrategy):
    """A frozen model beside the policy, kept off the module's state dict and moved to its device."""

    def __init__(self) -> None:
        self.model: nn.Module | None = None

    def statistics(self, module: PreferenceModule, batch: Any, split: str) -> ResponseStats:
        model, _ = self.reference_model(module)
        with torch.no_grad():
            return module.backbone.statistics(model, batch)

    def reference_model(self, module: PreferenceModule) -> tuple[nn.Module, AbstractContextManager]:
        if self.model is None:
            raise RuntimeError(f"the {self.name} reference is not set up (configure_model has not run)")
        if next(self.model.parameters()).device != module.device:
            self.model.to(module.device)
        return self.model, contextlib.nullcontext()


class FrozenCopy(_FrozenModel):
    """A frozen copy of the policy as built (before any training step)."""

    name = "copy"

    def setup(self, module: PreferenceModule) -> None:
        self.model = module.backbone.frozen_copy(module.policy)


class SeparateCheckpoint(_FrozenModel):
    """A frozen reference loaded from another checkpoint (e.g. the SFT model when the policy starts elsewhere).

    Args:
        model_name_or_path: hub id or local directory of the reference checkpoint.
        revision: its hub revision.
    """

    name = "checkpoint"

    def __init__(self, model_name_or_path: str, revision: str | None = None) -> None:
        super().__init__()
        self.model_name_or_path = model_name_or_path
        self.revision = revision

    def setup(self, module: PreferenceModule) -> None:
        self.model = module.backbone.load_reference(self.model_name_or_path, self.revision)

    def __repr__(self) -> str:
        return f"SeparateCheckpoint({self.model_name_or_path!r}, revision={self.revision!r})"


class CachedReference(ReferenceStrategy):
    """Reference log-probs computed once per split before the first step, stored on disk, read back.

    The reference is the adapter-disabled policy (LoRA) or the untrained policy (full fine-tuning).
    Files are named by a fingerprint of the model and of the data (see :mod:`mmpo.reference.cache`),
    so any change of either computes a new cache.

    Args:
        cache_dir: where the cache files live (default: ``<trainer.default_root_dir>/reference_cache``).
    """

    name = "cached"

    def __init__(self, cache_dir: str | None = None) -> None:
        self.cache_dir = cache_dir
        self._caches: dict[str, ReferenceCache] = {}

    def check(self, loss: PreferenceLoss, backbone: Backbone) -> None:
        super().check(loss, backbone)
        if loss.requires_token_kl:
            raise ValueError(
                f"{type(loss).__name__} needs the reference's full next-token distributions (per-token KL), which "
                "cached log-probs do not hold; use reference adapter, copy or a separate checkpoint"
            )

    def statistics(self, module: PreferenceModule, batch: Any, split: str) -> ResponseStats:
        if split not in self._caches:
            raise RuntimeError(f"no cached reference log-probs for the {split} split")
        if not module.backbone.token_statistics:  # one number per response (diffusion)
            logps = self._caches[split].response_logps(batch.ids, batch.group_size).to(module.device)
            return ResponseStats(logps=logps, tokens=torch.ones_like(logps))
        tokens = self._caches[split].token_logps(batch.ids, batch.response_mask, batch.host_lengths())
        return ResponseStats.from_rows(tokens, batch.response_mask, batch.group_size)

    def prepare(self, module: PreferenceModule, splits: tuple[str, ...]) -> None:
        trainer = module.trainer
        dm = trainer.datamodule
        if not isinstance(dm, ReferenceCacheData):
            raise ValueError(
                "reference 'cached' needs a datamodule with reference_cache_split(split) "
                f"(datamodules.core.cache_source.ReferenceCacheData); {type(dm).__name__} has none"
            )
        backbone = module.backbone
        root = Path(self.cache_dir or Path(trainer.default_root_dir) / "reference_cache")
        model_fp = model_fingerprint(backbone.model_name_or_path, backbone.revision, backbone.fingerprint_settings())
        for split in splits:
            if split in self._caches:
                continue
            source = dm.reference_cache_split(split)
            if source is None:
                continue
            problem = backbone.reference_cache_problem()
            if problem and not source.noise_free:
                raise ValueError(f"reference 'cached' cannot serve {type(backbone).__name__} here: {problem}")
            path = root / f"{split}-{model_fp}-{data_fingerprint(source.records, source.settings)}.safetensors"
            if not path.exists() and trainer.is_global_zero:
                if trainer.global_step > 0 and not backbone.uses_lora:
                    raise RuntimeError(f"{path} is missing and the policy has trained: it is no longer the reference")
                self._caches[split] = self._compute(module, source, split)
                self._caches[split].save(path)
                rank_zero_info(f"[mmpo] cached reference log-probs of {len(source.dataset)} {split} records in {path}")
            trainer.strategy.barrier()
            if split not in self._caches:
                self._caches[split] = ReferenceCache.load(path)

    @staticmethod
    def _compute(module: PreferenceModule, source: Any, split: str) -> ReferenceCache:
        backbone, policy = module.backbone, module.policy

        def reference(batch: Any) -> ResponseStats:
            if backbone.uses_lora:
                with backbone.adapters_disabled(policy):
                    return backbone.statistics(policy, batch)
            return backbone.statistics(policy, batch)  # before the first step the policy is the reference

        def token_logps(batch: Any) -> Tensor:
            stats = reference(batch)
            if stats.token_logps is None:
                raise ValueError(f"{type(backbone).__name__} gives no per-token statistics to cache")
            return stats.token_logps.transpose(0, 1).reshape(-1, stats.token_logps.shape[-1])  # (N, T) rows

        was_training = policy.training
        policy.eval()
        try:
            desc = f"reference ({split})"
            if not backbone.token_statistics:
                return compute_response_cache(
                    lambda batch: reference(batch).logps, source.dataset, source.collator, source.batch_size,
                    module.device, desc,
                )  # fmt: skip
            return compute_reference_cache(
                token_logps, source.dataset, source.collator, source.batch_size, module.device, desc
            )
        finally:
            policy.train(was_training)

    def __repr__(self) -> str:
        return f"CachedReference(cache_dir={self.cache_dir!r})"


_BY_NAME = {"adapter": DisabledAdapter, "copy": FrozenCopy, "none": NoReference}


def resolve_reference(
    spec: ReferenceName | ReferenceStrategy, loss: PreferenceLoss, backbone: Backbone, cache_dir: str | None = None
) -> ReferenceStrategy:
    """The strategy for a YAML value: a strategy object, or a short name.

    ``auto`` is the disabled adapter with LoRA, a frozen copy without, and none for reference-free
    losses; ``cache_dir`` is the directory of ``cached`` (the module's ``reference_cache_dir``).
    """
    if isinstance(spec, ReferenceStrategy):
        strategy = spec
    elif spec == "auto" and not loss.requires_reference:
        strategy = NoReference()
    elif spec == "auto":
        strategy = DisabledAdapter() if backbone.uses_lora else FrozenCopy()
    elif spec == "cached":
        strategy = CachedReference(cache_dir)
    elif spec in _BY_NAME:
        strategy = _BY_NAME[spec]()
    else:
        raise ValueError(f"reference must be one of {REFERENCE_NAMES} or a ReferenceStrategy, got {spec!r}")
    strategy.check(loss, backbone)
    return strategy
