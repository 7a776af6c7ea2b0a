"""Weighted sums of preference losses (RPO, MPO-style mixtures)."""

from __future__ import annotations

import math

from mmpo.losses.base import LossOutput, PreferenceLoss, ResponseStats

__all__ = ["CombinedLoss"]


class CombinedLoss(PreferenceLoss):
    """Weighted sum of the per-example losses of several preference losses.

    Examples: RPO is ``DPOLoss`` + λ·``SFTLoss``; MPO mixes a preference, a quality and a
    generation loss. Rewards come from the first component that needs a reference model (so they
    are the familiar β · logratio when DPO is in the mix), else from the first component. Each
    component checks its own inputs; the flags are true when any component needs them.

    In YAML the components are a list of ``{class_path, init_args}`` entries::

        loss:
          class_path: mmpo.losses.CombinedLoss
          init_args:
            losses:
              - class_path: mmpo.losses.DPOLoss
                init_args: {beta: 0.1}
              - class_path: mmpo.losses.SFTLoss
            weights: [1.0, 1.0]

    Args:
        losses: the component losses, at least one.
        weights: one non-negative weight per component; None weighs every component 1.
    """

    def __init__(self, losses: list[PreferenceLoss], weights: list[float] | None = None) -> None:
        losses = list(losses)
        if not losses:
            raise ValueError("CombinedLoss needs at least one loss")
        for loss in losses:
            if not isinstance(loss, PreferenceLoss):
                raise TypeError(f"CombinedLoss components must be PreferenceLoss instances, got {type(loss).__name__}")
        weights = [1.0] * len(losses) if weights is None else [float(w) for w in weights]
        if len(weights) != len(losses):
            raise ValueError(f"CombinedLoss got {len(losses)} losses but {len(weights)} weights")
        if any(not (math.isfinite(w) and w >= 0) for w in weights):
            raise ValueError(f"CombinedLoss weights must be finite and >= 0, got {weights}")
        self.losses = losses
        self.weights = weights

    @property
    def requires_reference(self) -> bool:
        return any(loss.requires_reference for loss in self.losses)

    @property
    def requires_token_logps(self) -> bool:
        return any(loss.requires_token_logps for loss in self.losses)

    @property
    def max_group_size(self) -> int | None:
        sizes = [loss.max_group_size for loss in self.losses if loss.max_group_size is not None]
        return min(sizes) if sizes else None

    @property
    def requires_scores(self) -> bool:
        return any(loss.requires_scores for loss in self.losses)

    def forward(self, policy: ResponseStats, reference: ResponseStats | None) -> LossOutput:
        outputs = [loss(policy, reference) for loss in self.losses]
        total = sum(w * out.losses for w, out in zip(self.weights, outputs, strict=True))
        source = next((i for i, loss in enumerate(self.losses) if loss.requires_reference), 0)
        metrics = {
            f"{type(loss).__name__}/{k}": v
            for loss, out in zip(self.losses, outputs, strict=True)
            for k, v in out.metrics.items()
        }
        return LossOutput(total, outputs[source].rewards, metrics)
