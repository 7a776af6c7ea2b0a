"""D3PO: DPO on one denoising step of two sampled trajectories, with the policy/reference ratio clipped.

D3PO (Yang et al., "Using Human Feedback to Fine-tune Diffusion Models without Any Reward Model", CVPR 2024)
treats each step of a trajectory as an action and trains the steps of a preferred and a dispreferred
trajectory (sampled from one prompt and one x_T) with DPO on the step's log-density ratio. The official
training script clips the ratio r = exp(logp_θ − logp_ref) to [1 − ε, 1 + ε] before the log, as PPO does:

    −log σ(β log clip(r_w) − β log clip(r_l)),

which equals −log σ(β (clip(Δ_w) − clip(Δ_l))) with Δ = logp_θ − logp_ref clipped to [log(1 − ε), log(1 + ε)]
(written in log space here, so a large Δ cannot overflow exp; outside the range the gradient is 0 either way).
The statistic is the step's log-density under each model (:mod:`mmpo.backbones.diffusion_trajectory`).
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor

from mmpo.losses.base import LossOutput, PreferenceLoss, ResponseStats, check_positive, check_range

__all__ = ["D3POLoss", "clipped_logratio", "d3po_loss"]


def d3po_loss(logratio_preferred: Tensor, logratio_dispreferred: Tensor, beta: float, clip: float) -> Tensor:
    """Per-pair D3PO loss.

    Args:
        logratio_preferred: (B,) Δ_w = logp_θ − logp_ref of the preferred trajectory's step.
        logratio_dispreferred: (B,) Δ_l of the dispreferred trajectory's step.
        beta: temperature β > 0 (the official default 0.1).
        clip: ε in (0, 1): each ratio is clipped to [1 − ε, 1 + ε] (the official default 0.1).

    Returns:
        (B,) −log σ(β (clip(Δ_w) − clip(Δ_l))).
    """
    margin = clipped_logratio(logratio_preferred, clip) - clipped_logratio(logratio_dispreferred, clip)
    return -F.logsigmoid(beta * margin)


def clipped_logratio(logratio: Tensor, clip: float) -> Tensor:
    """log clip(exp(Δ), 1 − ε, 1 + ε), computed in log space: Δ clamped to [log(1 − ε), log(1 + ε)]."""
    return logratio.clamp(math.log(1.0 - clip), math.log1p(clip))


class D3POLoss(PreferenceLoss):
    """D3PO on per-step statistics: the log-density of a recorded denoising step under the policy and the
    reference (``DiffusionTrajectoryDataModule`` data with ``DiffusionBackbone``). Rewards are β times the
    clipped log-ratios.

    Args:
        beta: temperature β > 0 (D3PO's script: 0.1).
        clip: ε in (0, 1), the ratio's clipping range (D3PO's script: 0.1).
    """

    requires_reference = True

    def __init__(self, beta: float = 0.1, clip: float = 0.1) -> None:
        check_positive("beta", beta)
        check_range("clip", clip, 0.0, 1.0, high_inclusive=False)
        if clip == 0.0:
            raise ValueError("clip must be > 0: a zero range clips every ratio to 1 and nothing trains")
        self.beta = beta
        self.clip = clip

    def forward(self, policy: ResponseStats, reference: ResponseStats | None) -> LossOutput:
        dw, dl = policy.chosen - reference.chosen, policy.rejected - reference.rejected
        losses = d3po_loss(dw, dl, self.beta, self.clip)
        rewards = (self.beta * clipped_logratio(d, self.clip) for d in (dw, dl))
        return LossOutput.pair(losses, *rewards)
