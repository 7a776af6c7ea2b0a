"""Triple Preference Optimization: a gold response, a chosen and a rejected one, no reference model.

Group layout (K = 3): response 0 is the gold (reference) response, response 1 the chosen one and
response 2 the rejected one, so the group is still ordered best first.
"""

from __future__ import annotations

from typing import Literal

import torch.nn.functional as F
from torch import Tensor

from mmpo.losses.base import LossOutput, PreferenceLoss, ResponseStats, check_positive, mean_token_logps
from mmpo.losses.reference_free import sft_loss

__all__ = ["TriplePreferenceLoss", "triple_preference_loss"]

Variant = Literal["tpo", "tpo-l"]


def triple_preference_loss(
    logps_gold: Tensor,
    logps_chosen: Tensor,
    logps_rejected: Tensor,
    gold_tokens: Tensor,
    chosen_tokens: Tensor,
    rejected_tokens: Tensor,
    beta: float,
    alpha: float,
    length_normalize: bool = False,
    gamma: float = 0.0,
) -> Tensor:
    """TPO: ``−log σ(β[log πθ(y_w) − log πθ(y_l)] − γ) + α · NLL(y_gold)``.

    Saeidi, Verma, RRV and Baral, "Triple Preference Optimization: Achieving Better Alignment
    with Less Data in a Single Step Optimization" (2024, arXiv:2405.16681), as the official code
    and TRL's ``TPOTrainer`` compute it: the preference term compares summed policy log-probs
    (no reference model, γ = 0); TPO-L compares per-token mean log-probs with a target reward
    margin γ. NLL(y_gold) = −log πθ(y_gold)/|y_gold|, the per-token mean. Token counts below 1
    count as 1.

    Args:
        logps_gold: (B,) summed policy log-probs of the gold responses.
        logps_chosen: (B,) the same for the chosen responses.
        logps_rejected: (B,) the same for the rejected responses.
        gold_tokens: (B,) response-token counts of the gold responses.
        chosen_tokens: (B,) the same for the chosen responses (read when ``length_normalize``).
        rejected_tokens: (B,) the same for the rejected responses (read when ``length_normalize``).
        beta: temperature β > 0.
        alpha: weight α ≥ 0 of the gold response's NLL.
        length_normalize: compare per-token mean log-probs (TPO-L) instead of sums (TPO).
        gamma: target reward margin γ, in reward units (TRL's ``tpo_l_gamma``).

    Returns:
        (B,) per-example loss.
    """
    if length_normalize:
        logps_chosen = mean_token_logps(logps_chosen, chosen_tokens)
        logps_rejected = mean_token_logps(logps_rejected, rejected_tokens)
    preference = -F.logsigmoid(beta * (logps_chosen - logps_rejected) - gamma)
    return preference + alpha * sft_loss(logps_gold, gold_tokens)


class TriplePreferenceLoss(PreferenceLoss):
    """Triple Preference Optimization (TPO / TPO-L) on groups of three: gold, chosen, rejected.

    Reference-free. Rewards are β times the log-probs the preference term compares (summed for
    "tpo", per-token means for "tpo-l"), for all three responses; the usual reward metrics then
    read the gold response as "chosen". Defaults follow TRL's ``TPOConfig`` (β = 0.01, α = 1,
    γ = 0.5); published runs use β 0.01–0.2 and α 0.5–1.

    Args:
        beta: temperature β > 0.
        alpha: weight α ≥ 0 of the gold response's per-token NLL.
        variant: "tpo" compares summed log-probs; "tpo-l" per-token means with margin γ.
        gamma: TPO-L's target reward margin γ ≥ 0 (in reward units, not divided by β); "tpo"
            ignores it.
    """

    requires_reference = False
    max_group_size = 3

    def __init__(self, beta: float = 0.01, alpha: float = 1.0, variant: Variant = "tpo", gamma: float = 0.5) -> None:
        check_positive("beta", beta)
        if not alpha >= 0:
            raise ValueError(f"alpha must be >= 0, got {alpha!r}")
        if variant not in ("tpo", "tpo-l"):
            raise ValueError(f"variant must be 'tpo' or 'tpo-l', got {variant!r}")
        if not gamma >= 0:
            raise ValueError(f"gamma must be >= 0, got {gamma!r}")
        self.beta = beta
        self.alpha = alpha
        self.variant = variant
        self.gamma = gamma

    def forward(self, policy: ResponseStats, reference: ResponseStats | None) -> LossOutput:
        if policy.group_size != 3:
            raise ValueError(
                f"TriplePreferenceLoss needs groups of exactly 3 responses (gold, chosen, rejected), got "
                f"{policy.group_size}"
            )
        length_normalize = self.variant == "tpo-l"
        gamma = self.gamma if length_normalize else 0.0
        logps, tokens = policy.logps, policy.tokens
        losses = triple_preference_loss(
            logps[:, 0], logps[:, 1], logps[:, 2], tokens[:, 0], tokens[:, 1], tokens[:, 2],
            self.beta, self.alpha, length_normalize, gamma,
        )  # fmt: skip
        compared = mean_token_logps(logps, tokens) if length_normalize else logps  # (B, 3)
        return LossOutput(losses, self.beta * compared)
