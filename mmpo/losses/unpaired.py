"""Losses for unpaired feedback (one response per prompt, labelled desirable or not): KTO and BCO.

An unpaired record is served as a group of K = 2 responses: response 0 is the record's completion and
response 1 a mismatched "KL completion" (another record's completion under this record's prompt), which
only KTO's reference point reads. The per-group label is the side field ``desirable`` (B,).

Paired BCO (``bco_pair``, TRL's DPO loss type of that name) reads ordinary preference pairs.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from mmpo.losses.base import LossOutput, PreferenceLoss, ResponseStats, check_positive

__all__ = [
    "BCOLoss",
    "BCOPairLoss",
    "KTOLoss",
    "bco_loss",
    "bco_pair_loss",
    "kto_loss",
    "kto_reference_point",
    "unpaired_metrics",
]


def kto_reference_point(kl_logratios: Tensor) -> Tensor:
    """KTO's reference point ``z0 = max(0, mean_j [log πθ(y'_j|x_j) − log π_ref(y'_j|x_j)])``, detached.

    Ethayarajh et al., "KTO: Model Alignment as Prospect Theoretic Optimization" (2024, arXiv:2402.01306),
    the reference point of the KTO objective (the equation TRL cites as Eq. 7): the KL term, estimated from
    mismatched pairs (x_j, y'_j) of the batch and clipped at 0, as TRL does; no gradient flows through it.

    Args:
        kl_logratios: (M,) summed policy − reference log-probs of the mismatched completions (over every
            rank of the step).

    Returns:
        () z0 ≥ 0, in log-ratio units (not multiplied by β).
    """
    return kl_logratios.detach().mean().clamp(min=0)


def kto_loss(
    logratios: Tensor,
    desirable: Tensor,
    z0: Tensor,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> Tensor:
    """KTO: ``λ_D (1 − σ(β(r − z0)))`` for desirable examples, ``λ_U (1 − σ(β(z0 − r)))`` for undesirable ones.

    Ethayarajh et al., "KTO: Model Alignment as Prospect Theoretic Optimization" (2024, arXiv:2402.01306),
    the KTO objective (the equation TRL cites as Eq. 7), with r = log πθ(y|x) − log π_ref(y|x). The loss
    is bounded in [0, λ] and its terms saturate, so extreme log-ratios give finite values and vanishing
    gradients.

    Args:
        logratios: (B,) summed policy − reference log-probs of the completions.
        desirable: (B,) bool (or 0/1) labels.
        z0: () the reference point (:func:`kto_reference_point`), detached.
        beta: β > 0.
        desirable_weight: λ_D ≥ 0.
        undesirable_weight: λ_U ≥ 0.

    Returns:
        (B,) per-example loss.
    """
    good = desirable.bool()
    centred = logratios - z0.to(logratios.dtype)
    value = torch.sigmoid(beta * torch.where(good, centred, -centred))
    weight = torch.where(good, desirable_weight, undesirable_weight).to(logratios.dtype)
    return weight * (1 - value)


def bco_pair_loss(logratio_chosen: Tensor, logratio_rejected: Tensor, beta: float) -> Tensor:
    """Paired BCO: ``−log σ(β u_w) − log σ(−β u_l)``.

    The pairwise form of Jung et al., "Binary Classifier Optimization for Large Language Model
    Alignment" (2024, arXiv:2404.04656): the chosen response is classified desirable and the rejected one undesirable by
    the implicit reward β·u. TRL 1.16's DPO ``loss_type="bco_pair"`` computes exactly this (without the
    reward shift δ of unpaired BCO; some older TRL releases subtracted a running reward mean here too).

    Args:
        logratio_chosen: (B,) summed policy − reference log-probs u_w of the chosen responses.
        logratio_rejected: (B,) the same (u_l) for the rejected responses.
        beta: β > 0.

    Returns:
        (B,) per-example loss.
    """
    return -F.logsigmoid(beta * logratio_chosen) - F.logsigmoid(-beta * logratio_rejected)


def bco_loss(rewards: Tensor, desirable: Tensor, delta: Tensor) -> Tensor:
    """Unpaired BCO: ``−log σ(r − δ)`` for desirable examples, ``−log σ(−(r − δ))`` for undesirable ones.

    Jung et al., "Binary Classifier Optimization for Large Language Model Alignment" (2024): the binary
    cross-entropy of a classifier whose logit is the implicit reward r = β·(log πθ − log π_ref), shifted by
    δ, the mean of the rewards seen so far (the paper's reward shift; TRL's former ``BCOTrainer`` kept it
    as a running mean updated with each training batch before the loss). The paper's optional
    underlying-distribution matching (density-ratio weights from a prompt classifier) is not included.

    Args:
        rewards: (B,) implicit rewards β·u.
        desirable: (B,) bool (or 0/1) labels.
        delta: () the reward shift δ, detached.

    Returns:
        (B,) per-example loss.
    """
    centred = rewards - delta.to(rewards.dtype)
    return -F.logsigmoid(torch.where(desirable.bool(), centred, -centred))


def unpaired_metrics(
    rewards: Tensor, logps: Tensor, desirable: Tensor, threshold: Tensor | float = 0.0
) -> dict[str, Tensor]:
    """TRL's figures for unpaired feedback: means over the desirable and the undesirable examples.

    ``rewards/chosen`` and ``logps/chosen`` average the desirable examples' rewards and summed log-probs,
    ``rewards/rejected`` and ``logps/rejected`` the undesirable ones'; ``rewards/margins`` is their
    difference. A class absent from the batch gives 0 for its figures (TRL leaves them out there).
    ``rewards/accuracies`` is the share of examples the implied classifier puts on their label's side of
    ``threshold`` (mmpo's figure; TRL's KTO logs none).

    Args:
        rewards: (B,) implicit rewards.
        logps: (B,) summed policy log-probs.
        desirable: (B,) labels.
        threshold: the decision point in reward units (β·z0 for KTO, δ for BCO).

    Returns:
        Scalars by name, detached.
    """
    good = desirable.bool()
    n_good = good.sum().clamp(min=1).to(rewards.dtype)
    n_bad = (~good).sum().clamp(min=1).to(rewards.dtype)
    zero = torch.zeros_like(rewards)
    chosen = torch.where(good, rewards, zero).sum() / n_good
    rejected = torch.where(good, zero, rewards).sum() / n_bad
    right = torch.where(good, rewards > threshold, rewards < threshold)
    return {
        "rewards/chosen": chosen.detach(),
        "rewards/rejected": rejected.detach(),
        "rewards/margins": (chosen - rejected).detach(),
        "rewards/accuracies": right.float().mean(),
        "logps/chosen": (torch.where(good, logps, zero).sum() / n_good).detach(),
        "logps/rejected": (torch.where(good, zero, logps).sum() / n_bad).detach(),
    }


class KTOLoss(PreferenceLoss):
    """KTO on unpaired data: response 0 is the labelled completion, response 1 the mismatched KL completion.

    The reference point z0 is the mean log-ratio of the batch's KL completions, gathered over every rank
    (so every rank uses the same z0, as TRL does), clipped at 0 and detached. Rewards are β·u of the
    completion (column 0) and of the KL completion (column 1). Logged figures, under TRL's names:
    ``rewards/chosen`` / ``rewards/rejected`` (mean reward of the desirable / undesirable examples),
    ``rewards/margins``, ``logps/chosen`` / ``logps/rejected``, ``kl`` (z0), and ``rewards/accuracies``
    (share with β(u − z0) on the label's side of 0). Defaults are TRL's.

    Args:
        beta: β > 0.
        desirable_weight: λ_D ≥ 0, the weight of desirable examples' losses.
        undesirable_weight: λ_U ≥ 0, the weight of undesirable ones'. The KTO paper suggests
            λ_D·n_D / (λ_U·n_U) in [1, 4/3] for n_D desirable and n_U undesirable examples.
    """

    requires_reference = True
    requires_desirable_labels = True
    gathers_per_call = 1

    def __init__(self, beta: float = 0.1, desirable_weight: float = 1.0, undesirable_weight: float = 1.0) -> None:
        check_positive("beta", beta)
        for name, value in (("desirable_weight", desirable_weight), ("undesirable_weight", undesirable_weight)):
            if not value >= 0:
                raise ValueError(f"{name} must be >= 0, got {value!r}")
        self.beta = beta
        self.desirable_weight = desirable_weight
        self.undesirable_weight = undesirable_weight

    def forward(self, policy: ResponseStats, reference: ResponseStats | None) -> LossOutput:
        logratios = policy.logps - reference.logps  # (B, 2): completion, KL completion
        z0 = kto_reference_point(self.gather(logratios[:, 1].detach()))
        desirable = policy.desirable
        losses = kto_loss(logratios[:, 0], desirable, z0, self.beta, self.desirable_weight, self.undesirable_weight)
        rewards = self.beta * logratios.detach()
        metrics = unpaired_metrics(rewards[:, 0], policy.chosen.detach(), desirable, self.beta * z0)
        return LossOutput(losses, rewards, {**metrics, "kl": z0})


class BCOPairLoss(PreferenceLoss):
    """Paired BCO (TRL's ``loss_type="bco_pair"``): the chosen response classified desirable, the rejected
    one undesirable, by the implicit reward β·u. Rewards are β·u_w and β·u_l.

    Args:
        beta: β > 0.
    """

    requires_reference = True

    def __init__(self, beta: float = 0.1) -> None:
        check_positive("beta", beta)
        self.beta = beta

    def forward(self, policy: ResponseStats, reference: ResponseStats | None) -> LossOutput:
        lc, lr = policy.chosen - reference.chosen, policy.rejected - reference.rejected
        return LossOutput.pair(bco_pair_loss(lc, lr, self.beta), self.beta * lc, self.beta * lr)


class BCOLoss(PreferenceLoss):
    """Unpaired BCO with its reward shift δ, the running mean of every training reward seen so far.

    Reads response 0 (the labelled completion) and ``desirable``; response 1 (the KL completion of the
    unpaired data) is not read. In a training step the batch's rewards, gathered over every rank, enter the
    running mean first and δ is then its value (TRL's former ``BCOTrainer`` order); evaluation steps use δ
    without updating it. δ starts at 0 with nothing seen. The mean and count are the loss's state, saved in
    and restored from Lightning checkpoints. Logged: ``rewards/chosen`` … ``logps/rejected`` as for KTO,
    ``rewards/accuracies`` (share of rewards on the label's side of δ) and ``delta``.

    Args:
        beta: β > 0 of the implicit reward.
    """

    requires_reference = True
    requires_desirable_labels = True
    stateful = True
    gathers_per_call = 1

    def __init__(self, beta: float = 0.1) -> None:
        check_positive("beta", beta)
        self.beta = beta
        self._mean = torch.zeros(())  # () float32, the running mean of the rewards
        self._count = torch.zeros((), dtype=torch.long)  # () rewards that entered it

    @property
    def delta(self) -> float:
        """The current reward shift δ (reads it back from the device)."""
        return float(self._mean)

    def state_dict(self) -> dict[str, Any]:
        return {"mean": float(self._mean), "count": int(self._count)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if set(state) != {"mean", "count"}:
            raise ValueError(f"BCOLoss state holds {sorted(state)}, expected ['count', 'mean']")
        self._mean = torch.tensor(float(state["mean"]))
        self._count = torch.tensor(int(state["count"]), dtype=torch.long)

    def _update(self, rewards: Tensor) -> None:
        """Add (M,) rewards to the running mean, on the device (no read back)."""
        n = rewards.shape[0]
        if n == 0:
            return
        mean, count = self._mean.to(rewards.device), self._count.to(rewards.device)
        total = count + n
        self._mean = mean + (rewards.float().mean() - mean) * (n / total.float())
        self._count = total

    def idle(self, device: torch.device | str) -> None:
        # a rank without records this step: take part in the reduction, and move δ as the others do
        everyone = self.gather(torch.empty(0, dtype=torch.float64, device=device))
        if self.training:
            self._update(everyone)

    def forward(self, policy: ResponseStats, reference: ResponseStats | None) -> LossOutput:
        logratios = policy.logps - reference.logps  # (B, 2): completion, (unread) KL completion
        rewards = self.beta * logratios[:, 0]
        everyone = self.gather(rewards.detach())
        if self.training:
            self._update(everyone)
        delta = self._mean.to(rewards.device)
        desirable = policy.desirable
        losses = bco_loss(rewards, desirable, delta)
        metrics = unpaired_metrics(rewards, policy.chosen.detach(), desirable, delta)
        return LossOutput(losses, self.beta * logratios.detach(), {**metrics, "delta": delta})
