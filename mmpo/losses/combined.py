"""Weighted sums of preference losses (RPO, MPO-style mixtures)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import fields
from typing import Any

import torch
from torch import Tensor

from mmpo.losses.base import LossOutput, PreferenceLoss, ResponseStats

__all__ = ["CombinedLoss", "swap_pairs"]

# fields laid out (B, K, ...): response 0's and 1's columns trade places in a swapped pair
_PER_RESPONSE = (
    "logps",
    "tokens",
    "token_logps",
    "mask",
    "scores",
    "candidate_weights",
    "token_kl",
    "token_activation",
)


def swap_pairs(stats: ResponseStats, flip: Tensor) -> ResponseStats:
    """The statistics with responses 0 and 1 exchanged in the pairs where ``flip`` is true.

    Per-response fields (log-probs, token counts and log-probs, masks, scores, ...) swap their first two
    columns; a soft label p becomes 1 − p; per-group fields stay. Gradients flow through as before.

    Args:
        stats: statistics of B pairs (K = 2).
        flip: (B,) bool, the pairs to swap.
    """
    values = {}
    for f in fields(ResponseStats):
        v = getattr(stats, f.name)
        if v is not None and f.name in _PER_RESPONSE:
            where = flip.to(v.device).view(-1, *[1] * (v.dim() - 1))  # (B, 1, ...)
            v = torch.where(where, v[:, [1, 0]], v)
        elif v is not None and f.name == "soft_labels":
            v = torch.where(flip.to(v.device), 1.0 - v, v)
        values[f.name] = v
    return ResponseStats(**values)


class CombinedLoss(PreferenceLoss):
    """Weighted sum of the per-example losses of several preference losses.

    Examples: RPO is ``DPOLoss`` + λ·``SFTLoss``; MPO mixes a preference, a quality and a
    generation loss. Rewards come from the first component that needs a reference model (so they
    are the familiar β · logratio when DPO is in the mix), else from the first component. Each
    component checks its own inputs; the flags are true when any component needs them.

    Each component may follow its own labels: with ``orient_by``, component i reads column
    ``orient_by[i]`` of the data's ``orientations`` (B, D), one preference dimension per column, and
    sees each pair as the data gives it (1), swapped (−1: response 1 is the preferred one on that
    dimension) or not at all (0: its loss on that pair is 0). One pair can so be chosen/rejected one
    way for helpfulness and the other way for brevity. Rewards are reported in the data's order.

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
        orient_by: per component, the column of ``orientations`` that orients its pairs, or None to
            take the pairs as given; None (the default) for every component.
    """

    def __init__(
        self,
        losses: list[PreferenceLoss],
        weights: list[float] | None = None,
        orient_by: list[int | None] | None = None,
    ) -> None:
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
        orient_by = [None] * len(losses) if orient_by is None else list(orient_by)
        if len(orient_by) != len(losses):
            raise ValueError(f"CombinedLoss got {len(losses)} losses but {len(orient_by)} orient_by entries")
        if any(d is not None and not (isinstance(d, int) and d >= 0) for d in orient_by):
            raise ValueError(f"orient_by entries must be column indices >= 0 or None, got {orient_by}")
        self.losses = losses
        self.weights = weights
        self.orient_by = orient_by

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

    @property
    def requires_token_kl(self) -> bool:
        return any(loss.requires_token_kl for loss in self.losses)

    @property
    def requires_desirable_labels(self) -> bool:
        return any(loss.requires_desirable_labels for loss in self.losses)

    @property
    def stateful(self) -> bool:
        return any(loss.stateful for loss in self.losses)

    @property
    def gathers_per_call(self) -> int:
        return sum(loss.gathers_per_call for loss in self.losses)

    def idle(self, device: torch.device | str) -> None:
        for loss in self.losses:  # the order of the calls in forward
            loss.idle(device)

    def train(self, mode: bool = True) -> CombinedLoss:
        self.training = mode
        for loss in self.losses:
            loss.train(mode)
        return self

    def set_gather(self, fn: Callable[[Tensor], Tensor] | None) -> None:
        self._gather_fn = fn
        for loss in self.losses:
            loss.set_gather(fn)

    def state_dict(self) -> dict[str, Any]:
        """Each stateful component's state under its position in ``losses``."""
        return {str(i): loss.state_dict() for i, loss in enumerate(self.losses) if loss.stateful}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        expected = {str(i) for i, loss in enumerate(self.losses) if loss.stateful}
        if set(state) != expected:
            raise ValueError(f"CombinedLoss state holds components {sorted(state)}, expected {sorted(expected)}")
        for key, value in state.items():
            self.losses[int(key)].load_state_dict(value)

    def _oriented(
        self, loss: PreferenceLoss, column: int | None, policy: ResponseStats, reference: ResponseStats | None
    ) -> LossOutput:
        """One component's output, on the pairs as its preference dimension orients them."""
        if column is None:
            return loss(policy, reference)
        o = policy.orientations
        if o is None:
            raise ValueError("CombinedLoss orient_by needs per-dimension 'orientations' (B, D); the data carries none")
        if policy.group_size != 2:
            raise ValueError(f"CombinedLoss orient_by orients pairs, but the groups hold {policy.group_size} responses")
        if column >= o.shape[1]:
            raise ValueError(f"orient_by reads column {column} of orientations, which have {o.shape[1]} dimensions")
        flip = o[:, column] < 0  # (B,)
        ref = None if reference is None else swap_pairs(reference, flip)
        out = loss(swap_pairs(policy, flip), ref)
        keep = (o[:, column] != 0).to(out.losses.dtype)  # a tie on this dimension: no loss from this component
        rewards = torch.where(flip.to(out.rewards.device)[:, None], out.rewards[:, [1, 0]], out.rewards)
        return LossOutput(out.losses * keep, rewards, out.metrics)

    def forward(self, policy: ResponseStats, reference: ResponseStats | None) -> LossOutput:
        outputs = [
            self._oriented(loss, column, policy, reference)
            for loss, column in zip(self.losses, self.orient_by, strict=True)
        ]
        total = sum(w * out.losses for w, out in zip(self.weights, outputs, strict=True))
        source = next((i for i, loss in enumerate(self.losses) if loss.requires_reference), 0)
        metrics = {
            f"{type(loss).__name__}/{k}": v
            for loss, out in zip(self.losses, outputs, strict=True)
            for k, v in out.metrics.items()
        }
        return LossOutput(total, outputs[source].rewards, metrics)
