"""Move the reference to the policy: the reference then computes as the policy does at that moment.

Iterative methods train in rounds and take each round's result as the next round's reference
(Curry-DPO's curriculum stages, APO's rounds; :mod:`mmpo.iterative` holds their callbacks). What a
refresh does depends on where the reference comes from:

- ``adapter`` (the LoRA policy with its adapter off): a second, frozen adapter on the same model
  (:mod:`mmpo.reference.adapter_snapshot`) receives the trained adapter's weights, and the reference
  pass runs it instead of switching the adapter off. Memory: one more adapter.
- ``copy``: the frozen copy was taken from the policy as built, so it already holds the policy's frozen
  weights (with LoRA: the base and LoRA layers, as ``Backbone.frozen_copy`` deep-copies the unwrapped
  model with its adapter injected); the policy's trainable weights are copied into it.
- ``checkpoint`` (a separate model): its frozen weights are another checkpoint's, so the first refresh
  replaces it by a frozen copy of the policy; later refreshes copy the trainable weights as for ``copy``.
- ``cached`` and ``none``: refused, as the cached log-probs would be stale and ``none`` has no reference.

Weights are named as under ``backbone.unwrap(policy)`` (e.g. ``model.language_model.layers.0.self_attn.
q_proj.lora_A.default.weight``), the names a frozen copy has. Only trainable weights are moved: the
frozen ones never change, so the policy's trainable weights at refresh time fix the reference
completely, and they are all a checkpoint needs to rebuild it.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from mmpo.reference.adapter_snapshot import (
    SNAPSHOT_ADAPTER,
    add_snapshot_adapter,
    load_snapshot,
    snapshot_name,
    trained_adapter,
)
from mmpo.reference.strategies import CachedReference, DisabledAdapter, FrozenCopy, NoReference, SeparateCheckpoint

if TYPE_CHECKING:
    from mmpo.module import PreferenceModule

__all__ = ["check_refreshable", "is_snapshot_weight", "policy_weights", "reference_weights", "refresh_reference"]

# frozen models this module made from the policy: a separate checkpoint's model is replaced once, then reused
_POLICY_COPIES: weakref.WeakSet[nn.Module] = weakref.WeakSet()


def _unwrapped(module: PreferenceModule) -> tuple[nn.Module, str]:
    """The policy under its adapter wrapper, and that module's name inside the policy ("" for the policy)."""
    if module.policy is None:
        raise RuntimeError("the policy is not built yet (configure_model has not run)")
    base = module.backbone.unwrap(module.policy)
    prefix = next(name for name, m in module.policy.named_modules() if m is base)
    return base, f"{prefix}." if prefix else ""


def policy_weights(module: PreferenceModule) -> dict[str, Tensor]:
    """The policy's trainable weights, named as under ``backbone.unwrap(policy)``: the live tensors, no copy."""
    base, _ = _unwrapped(module)
    weights = {n: p for n, p in base.named_parameters() if p.requires_grad}
    outside = sum(p.requires_grad for p in module.policy.parameters()) - len(weights)
    if outside:
        raise ValueError(f"{outside} trainable weight(s) of the policy lie outside its unwrapped model")
    return weights


def check_refreshable(module: PreferenceModule) -> None:
    """Raise a ValueError when ``module``'s reference cannot be moved to the policy, saying what to use instead."""
    strategy = module.reference
    if isinstance(strategy, CachedReference):
        raise ValueError(
            "reference 'cached' holds log-probs computed once from the initial model; a refreshed reference "
            "would need them recomputed after every refresh. Use reference 'adapter' or 'copy' with refreshes"
        )
    if isinstance(strategy, NoReference):
        raise ValueError(f"{type(module.loss).__name__} uses no reference model: there is nothing to refresh")
    if isinstance(strategy, DisabledAdapter):
        if getattr(module, "candidates", None) is not None:
            raise ValueError(
                "candidate selection (PaMi-VDPO) scores with the adapter-disabled model, which a refresh would "
                "not follow: use reference 'copy' with refreshes"
            )
        if module.policy is not None:
            trained_adapter(module.policy)  # a model a second adapter fits on
        return
    if not isinstance(strategy, FrozenCopy | SeparateCheckpoint):
        raise ValueError(f"reference {type(strategy).__name__} cannot be refreshed (adapter, copy or checkpoint can)")


def refresh_reference(module: PreferenceModule, weights: Mapping[str, Tensor] | None = None) -> None:
    """Make the reference compute as the policy does now, or as the policy would with trainable ``weights``.

    Args:
        module: the :class:`~mmpo.module.PreferenceModule`, its policy built.
        weights: trainable weights named as :func:`policy_weights` names them (a snapshot taken earlier,
            e.g. from a checkpoint); None takes the policy's current ones. Every trainable weight is needed.

    Raises:
        ValueError: the strategy cannot be refreshed, or ``weights`` miss trainable weights or name others.
    """
    check_refreshable(module)
    current = policy_weights(module)
    weights = current if weights is None else weights
    if set(weights) != set(current):
        missing, extra = sorted(set(current) - set(weights)), sorted(set(weights) - set(current))
        raise ValueError(
            f"the reference snapshot does not match the policy's trainable weights: missing {missing[:3]} "
            f"({len(missing)} in all), unknown {extra[:3]} ({len(extra)} in all)"
        )
    strategy = module.reference
    if isinstance(strategy, DisabledAdapter):
        _, prefix = _unwrapped(module)
        add_snapshot_adapter(module.policy)
        load_snapshot(module.policy, weights, prefix)
        strategy.snapshot = True
        return
    if isinstance(strategy, SeparateCheckpoint) and strategy.model not in _POLICY_COPIES:
        strategy.model = None  # freed before the copy is made: one reference model in memory at a time
        strategy.model = module.backbone.frozen_copy(module.policy)
        _POLICY_COPIES.add(strategy.model)
    if strategy.model is None:
        raise RuntimeError(f"the {strategy.name} reference is not set up (configure_model has not run)")
    params = dict(strategy.model.named_parameters())
    with torch.no_grad():
        for name, value in weights.items():
            if name not in params:
                raise KeyError(f"the {strategy.name} reference has no weight {name!r}")
            params[name].copy_(value)


def reference_weights(module: PreferenceModule) -> dict[str, Tensor]:
    """The reference's values of the policy's trainable weights (CPU copies), what a refresh loaded into it.

    For a checkpoint: ``refresh_reference(module, reference_weights(module))`` rebuilds the reference in a
    resumed run. Before any refresh of the adapter or separate-checkpoint reference: an empty dict.
    """
    names = list(policy_weights(module))
    strategy = module.reference
    if isinstance(strategy, DisabledAdapter):
        if not strategy.snapshot:
            return {}
        _, prefix = _unwrapped(module)
        params = dict(module.policy.named_parameters())
        trained = trained_adapter(module.policy)
        return {n: params[prefix + snapshot_name(n, trained)].detach().cpu().clone() for n in names}
    check_refreshable(module)
    if isinstance(strategy, SeparateCheckpoint) and strategy.model not in _POLICY_COPIES:
        return {}  # still the other checkpoint's model: not a refreshed reference
    params = dict(strategy.model.named_parameters())
    return {n: params[n].detach().cpu().clone() for n in names}


def is_snapshot_weight(name: str) -> bool:
    """Whether a state-dict key belongs to the snapshot adapter (kept in the refresh state, not the weights)."""
    return f".{SNAPSHOT_ADAPTER}." in name
