"""DPO with separate temperatures for the chosen and the rejected log-ratio (3D-properties)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from mmpo.losses.base import LossOutput, PreferenceLoss, ResponseStats, check_positive
from mmpo.losses.reference_free import sft_loss

__all__ = ["AsymmetricDPOLoss", "asymmetric_dpo_loss"]


def asymmetric_dpo_loss(
    logratio_chosen: Tensor, logratio_rejected: Tensor, beta_chosen: float, beta_rejected: float
) -> Tensor:
    """``−log σ(β⁺ · u_w − β⁻ · u_l)``: DPO with one temperature per side.

    [unconfirmed] After Yan et al., "3D-Properties: Identifying Challenges in DPO and Charting a
    Path Forward" (2024, arXiv:2406.07327), which proposes regularisations against the drastic drop
    of the rejected likelihood; among them (from summaries, not checked against the paper's
    equations or code) a smaller temperature β⁻ on the rejected log-ratio, whose gradient is
    β⁻ σ(−z), so the rejected likelihood is pushed down more slowly. β⁺ = β⁻ is DPO.

    Args:
        logratio_chosen: (B,) summed policy − reference log-probs u_w of the chosen responses.
        logratio_rejected: (B,) the same (u_l) for the rejected responses.
        beta_chosen: β⁺ > 0.
        beta_rejected: β⁻ > 0.

    Returns:
        (B,) per-example loss.
    """
    return -F.logsigmoid(beta_chosen * logratio_chosen - beta_rejected * logratio_rejected)


class AsymmetricDPOLoss(PreferenceLoss):
    """3D-properties DPO [unconfirmed]: β⁺/β⁻ per side plus an optional per-token NLL of the chosen.

    ``−log σ(β⁺ u_w − β⁻ u_l) + λ · (−log πθ(y_w)/|y_w|)``. The regularisations follow summaries
    of arXiv:2406.07327, not its equations or code; the defaults (β⁻ = β⁺/2, λ = 0) are mmpo's
    choice, not the paper's. β⁺ = β⁻ and λ = 0 give DPO exactly. Rewards are β⁺ · u_w and β⁻ · u_l,
    the two terms the sigmoid compares.

    Args:
        beta_chosen: β⁺ > 0, the temperature of the chosen log-ratio.
        beta_rejected: β⁻ > 0, the temperature of the rejected log-ratio; below β⁺ slows the fall of
            the rejected likelihood.
        nll_weight: λ ≥ 0, weight of the chosen response's per-token NLL (token counts below 1
            count as 1).
    """

    requires_reference = True

    def __init__(self, beta_chosen: float = 0.1, beta_rejected: float = 0.05, nll_weight: float = 0.0) -> None:
        check_positive("beta_chosen", beta_chosen)
        check_positive("beta_rejected", beta_rejected)
        if not nll_weight >= 0:
            raise ValueError(f"nll_weight must be >= 0, got {nll_weight!r}")
        self.beta_chosen = beta_chosen
        self.beta_rejected = beta_rejected
        self.nll_weight = nll_weight

    def forward(self, policy: ResponseStats, reference: ResponseStats | None) -> LossOutput:
        lc, lr = policy.chosen - reference.chosen, policy.rejected - reference.rejected
        losses = asymmetric_dpo_loss(lc, lr, self.beta_chosen, self.beta_rejected)
        if self.nll_weight:
            losses = losses + self.nll_weight * sft_loss(policy.chosen, policy.chosen_tokens)
        return LossOutput.pair(losses, self.beta_chosen * lc, self.beta_rejected * lr)
