"""The figures logged for a batch, under TRL's names, from a loss's output and the policy's statistics."""

from __future__ import annotations

import torch
from torch import Tensor

from mmpo.losses import LossOutput, ResponseStats

__all__ = ["reward_metrics"]


def reward_metrics(out: LossOutput, policy: ResponseStats) -> dict[str, Tensor]:
    """The logged figures of a batch, under TRL's names, from the loss output and the policy statistics.

    For pairs (K = 2) response 0 is "chosen" and response 1 "rejected". For K > 2, "rejected" is the
    mean over responses 1..K-1, a margin is response 0's reward minus that mean, an accuracy counts
    groups whose response 0 beats every other, and ``rewards/ranking_accuracy`` is the share of
    response pairs (i < j) whose rewards keep the data's order. A loss's own metrics replace the figures
    of the same name. Unpaired feedback (``policy.desirable`` set: response 1 is a mismatched completion
    for KTO's reference point, not a rejected response) gets no pair figures: only the loss's own, which
    KTO and BCO report under TRL's names (means over the desirable and the undesirable examples).
    """
    own = {k: v.float().mean() for k, v in out.metrics.items()}
    if policy.desirable is not None:
        return own
    if policy.group_size == 2:
        margins = out.chosen_rewards - out.rejected_rewards
        metrics = {
            "rewards/chosen": out.chosen_rewards.mean(),
            "rewards/rejected": out.rejected_rewards.mean(),
            "rewards/margins": margins.mean(),
            "rewards/accuracies": (margins > 0).float().mean(),
            "logps/chosen": policy.chosen.detach().mean(),
            "logps/rejected": policy.rejected.detach().mean(),
            "logps/accuracies": (policy.chosen > policy.rejected).float().mean(),
        }
    else:
        rewards, logps = out.rewards, policy.logps.detach()
        rest, logps_rest = rewards[:, 1:], logps[:, 1:]
        k = rewards.shape[1]
        upper = torch.triu(torch.ones(k, k, dtype=torch.bool, device=rewards.device), diagonal=1)
        ordered = (rewards[:, :, None] > rewards[:, None, :])[:, upper]  # (B, K(K-1)/2), i < j
        metrics = {
            "rewards/chosen": rewards[:, 0].mean(),
            "rewards/rejected": rest.mean(),
            "rewards/margins": (rewards[:, 0] - rest.mean(1)).mean(),
            "rewards/accuracies": (rewards[:, 0] > rest.amax(1)).float().mean(),
            "rewards/ranking_accuracy": ordered.float().mean(),
            "logps/chosen": logps[:, 0].mean(),
            "logps/rejected": logps_rest.mean(),
            "logps/accuracies": (logps[:, 0] > logps_rest.amax(1)).float().mean(),
        }
    return {**metrics, **own}
