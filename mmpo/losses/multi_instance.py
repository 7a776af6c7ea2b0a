"""Multi-instance video DPO: one original clip against a set of augmented candidate clips, the response fixed.

PaMi-VDPO (video preference optimisation without annotation) keeps the response y and contrasts
the original clip v (chosen) with augmented clips ṽ (rejected). A group holds the same text under
different media: response 0 = (v, y), responses 1..M = (ṽ_m, y), the candidates chosen by the
close-to-far selection (:mod:`augment.video.pami`). Per candidate the VDPO logit is

    z_m = β[(log πθ(y|v) − log π_ref(y|v)) − (log πθ(y|ṽ_m) − log π_ref(y|ṽ_m))],

the DPO logit of the pair (v, ṽ_m) (Rafailov et al. 2023, Eq. 7, with the media in place of the
response). Only the paper's abstract was read: its multi-instance form is **unconfirmed**, so the
aggregation over the candidates is a parameter.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from mmpo.losses.base import LossOutput, PreferenceLoss, ResponseStats, check_positive

__all__ = ["MultiInstanceVDPOLoss", "multi_instance_vdpo_loss"]

Aggregate = Literal["mean", "hardest", "softmin"]
AGGREGATES = ("mean", "hardest", "softmin")


def _group_weights(weights: Tensor, normalize_weights: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Relative weights (B, M) summing to 1 over a group's positive weights, each group's scale (B,), and
    the mask of positive weights (B, M)."""
    w = weights.detach().clamp(min=0.0)  # selection weights carry no gradient; negatives count as 0
    active = w > 0  # (B, M)
    count = active.sum(-1)  # (B,)
    total = w.sum(-1)  # (B,)
    relative = w / total.clamp(min=torch.finfo(w.dtype).tiny).unsqueeze(-1)  # (B, M); 0 for an empty group
    if normalize_weights:
        scale = (count > 0).to(w.dtype)
    else:
        scale = total / count.clamp(min=1).to(w.dtype)  # mean positive weight; 0 for an empty group
    return relative, scale, active


def multi_instance_vdpo_loss(
    logratios: Tensor,
    beta: float,
    weights: Tensor | None = None,
    aggregate: Aggregate = "mean",
    temperature: float = 1.0,
    normalize_weights: bool = False,
) -> Tensor:
    """PaMi-VDPO's multi-instance loss over one original clip and M weighted candidate clips.

    z_m = β(r_0 − r_m) per candidate, r = log πθ(y|media) − log π_ref(y|media) summed over the
    response tokens; a_m = w_m / Σ_j w_j the relative weights over the candidates with w_m > 0, and
    s the group's scale (the mean positive weight; 1 with ``normalize_weights``). Then:

    * "mean": s · Σ_m a_m · (−log σ(z_m)), a weighted mean of VDPO terms;
    * "hardest": s · (−log σ(min z_m)), the minimum over the candidates with w_m > 0 (ties: the
      first); the weights' sizes only scale the group;
    * "softmin": s · (−log σ(−τ log Σ_m a_m exp(−z_m/τ))), a weighted soft minimum of z: the
      hardest candidate as τ → 0, the weighted mean of z as τ → ∞.

    With M = 1 and weight 1 every aggregation is the DPO loss ``−log σ(z)`` exactly. A group with no
    positive weight has loss 0. Candidates with weight 0 change nothing, neither the value nor the
    gradient.

    Args:
        logratios: (B, 1 + M) summed policy − reference log-probs; column 0 the original clip,
            columns 1..M the candidate clips, the response the same.
        beta: temperature β > 0.
        weights: (B, M) non-negative candidate weights (negatives count as 0; no gradient flows
            into them); None weighs every candidate 1.
        aggregate: "mean", "hardest" or "softmin".
        temperature: τ > 0 of "softmin", in the units of z.
        normalize_weights: False scales each group by the mean of its positive weights (weights are
            absolute: a group whose candidates are all down-weighted to 0.2 gives 0.2 of its loss);
            True uses only their ratios within the group (any group with a positive weight gives a
            full loss).

    Returns:
        (B,) per-group loss.
    """
    if aggregate not in AGGREGATES:
        raise ValueError(f"aggregate must be one of {AGGREGATES}, got {aggregate!r}")
    # β·(r_0 − r_m), written as dpo_loss writes it so that M = 1 reproduces it bit for bit
    z = beta * (logratios[:, :1] - logratios[:, 1:])  # (B, M)
    if weights is None:
        weights = torch.ones_like(z)
    if weights.shape != z.shape:
        raise ValueError(f"weights must be (B, M) = {tuple(z.shape)}, got {tuple(weights.shape)}")
    relative, scale, active = _group_weights(weights.to(z.dtype), normalize_weights)
    nonempty = active.any(-1)  # (B,)
    if aggregate == "mean":
        per_group = (relative * -F.logsigmoid(z)).sum(-1)  # (B,)
    else:
        inf = torch.full_like(z, float("inf"))
        if aggregate == "hardest":
            hardest = torch.where(active, z, inf).argmin(-1, keepdim=True)  # (B, 1); an empty group gets 0
            soft_min = z.gather(-1, hardest).squeeze(-1)  # (B,)
        else:
            check_positive("temperature", temperature)
            z_min = torch.where(active, z, inf).amin(-1)  # (B,)
            z_min = torch.where(nonempty, z_min, torch.zeros_like(z_min))
            # shifted by the minimum: every exponent ≤ 0, and M = 1 gives z_min − τ·log 1 = z exactly
            gap = torch.where(active, z - z_min.unsqueeze(-1), torch.zeros_like(z))  # (B, M)
            mass = (relative * torch.exp(-gap / temperature)).sum(-1)  # (B,) in (0, 1]
            # an empty group has mass 0: log(1) instead, so no 0·inf reaches the gradient
            mass = torch.where(nonempty, mass, torch.ones_like(mass))
            soft_min = z_min - temperature * torch.log(mass)
        per_group = -F.logsigmoid(soft_min)
    return scale * per_group


class MultiInstanceVDPOLoss(PreferenceLoss):
    """PaMi-VDPO's multi-instance VDPO loss: the original clip against M candidate clips, the response fixed.

    Group layout: response 0 = (original clip, y), responses 1..M = (candidate clip m, y). The
    candidates' weights come from ``candidate_weights`` (B, K) on the policy statistics (column 0 is
    not read; ``CandidateSelection.group_weights()`` builds the whole (B, 1 + M) tensor); without
    them every candidate weighs 1. See :func:`multi_instance_vdpo_loss` for the formulas.

    The paper's multi-instance form is unconfirmed; the default "mean" (a weighted mean of the
    candidates' VDPO terms) is mmpo's choice.

    Rewards: β·r of every response, so the logged ``rewards/rejected`` is the plain mean over the
    candidates. Metrics: ``weighted_rejected_reward`` and ``weighted_margin`` (weighted by the
    candidate weights, over the groups with a positive weight), ``active_candidates`` (candidates
    with a positive weight per group) and ``empty_groups`` (the share of groups without one: their
    loss is 0, and the batch mean still counts them).

    Args:
        beta: temperature β > 0.
        aggregate: how the candidates' logits combine: "mean", "hardest" or "softmin".
        temperature: τ > 0 of "softmin", in the units of β·(log-ratio difference).
        normalize_weights: False scales each group's loss by the mean of its positive candidate
            weights (down-weighted groups count less); True keeps only the weights' ratios.
    """

    requires_reference = True
    max_group_size = None

    def __init__(
        self,
        beta: float = 0.1,
        aggregate: Aggregate = "mean",
        temperature: float = 1.0,
        normalize_weights: bool = False,
    ) -> None:
        check_positive("beta", beta)
        check_positive("temperature", temperature)
        if aggregate not in AGGREGATES:
            raise ValueError(f"aggregate must be one of {AGGREGATES}, got {aggregate!r}")
        self.beta = beta
        self.aggregate = aggregate
        self.temperature = temperature
        self.normalize_weights = normalize_weights

    def forward(self, policy: ResponseStats, reference: ResponseStats | None) -> LossOutput:
        logratios = policy.logps - reference.logps  # (B, K), K = 1 + M
        weights = None if policy.candidate_weights is None else policy.candidate_weights[:, 1:]  # (B, M)
        losses = multi_instance_vdpo_loss(
            logratios, self.beta, weights, self.aggregate, self.temperature, self.normalize_weights
        )
        rewards = self.beta * logratios  # (B, K)
        relative, _, active = _group_weights(
            torch.ones_like(rewards[:, 1:]) if weights is None else weights.to(rewards.dtype), True
        )
        nonempty = active.any(-1).to(rewards.dtype)  # (B,)
        weighted_rejected = (relative * rewards[:, 1:]).sum(-1)  # (B,)
        n = nonempty.sum().clamp(min=1.0)
        metrics = {
            "weighted_rejected_reward": (weighted_rejected * nonempty).sum() / n,
            "weighted_margin": ((rewards[:, 0] - weighted_rejected) * nonempty).sum() / n,
            "active_candidates": active.sum(-1).to(rewards.dtype),
            "empty_groups": 1.0 - nonempty,
        }
        return LossOutput(losses, rewards, metrics)
