"""ORPO: odds-ratio preference optimisation, reference-free, with the SFT term built in."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from mmpo.losses.base import LossOutput, PreferenceLoss, ResponseStats, mean_token_logps
from mmpo.losses.reference_free import MAX_MEAN_LOGP, log1mexp

__all__ = ["ORPOLoss", "log_odds", "orpo_loss"]


def log_odds(mean_logps: Tensor) -> Tensor:
    """``log(p / (1 − p))`` of p = exp(mean token log-prob), with log p clamped at log(1 − 1e−7).

    The clamp keeps the odds finite for an empty response (mean log-prob 0) or a response the
    model is certain of; ``log(1 − p)`` uses the two-branch :func:`~mmpo.losses.reference_free.log1mexp`.
    """
    logp = mean_logps.clamp(max=MAX_MEAN_LOGP)
    return logp - log1mexp(logp)


def orpo_loss(
    logps_chosen: Tensor,
    logps_rejected: Tensor,
    chosen_tokens: Tensor,
    rejected_tokens: Tensor,
    lam: float,
) -> Tensor:
    """ORPO: ``−log πθ(y_w)/|y_w| − λ · log σ(log odds(y_w) − log odds(y_l))``.

    Hong, Lee and Thorne, "ORPO: Monolithic Preference Optimization without Reference Model"
    (2024), Eqs. 4–7: odds(y) = P(y)/(1 − P(y)) with P(y) = exp(mean token log-prob), the
    geometric-mean token probability, as in the paper and TRL's ``odds_ratio_loss`` (which
    computes the log-odds with the same log1mexp). The SFT term is the per-token mean NLL of the
    chosen response. Token counts below 1 count as 1.

    Args:
        logps_chosen: (B,) summed policy log-probs of the chosen responses.
        logps_rejected: (B,) the same for the rejected responses.
        chosen_tokens: (B,) response-token counts |y_w|.
        rejected_tokens: (B,) response-token counts |y_l|.
        lam: weight λ ≥ 0 of the odds-ratio term (TRL's ``beta``).

    Returns:
        (B,) per-example loss.
    """
    mean_w = mean_token_logps(logps_chosen, chosen_tokens)
    mean_l = mean_token_logps(logps_rejected, rejected_tokens)
    return -mean_w - lam * F.logsigmoid(log_odds(mean_w) - log_odds(mean_l))


class ORPOLoss(PreferenceLoss):
    """ORPO, reference-free; rewards are λ · mean token log-prob (TRL's ``rewards/*``).

    Metrics (TRL's names): ``log_odds_ratio`` = log σ(log odds_w − log odds_l) and
    ``log_odds_chosen`` = log odds_w − log odds_l, per pair, plus the ``nll_loss`` term.

    Differences from TRL's ``ORPOTrainer``, which are about the SFT term only: TRL takes the
    cross-entropy over prompt and response tokens of the whole batch, mmpo the per-token mean NLL
    of each chosen response (response tokens only), then the mean over pairs. The odds-ratio term
    is the same (checked against TRL's own ``odds_ratio_loss`` in the tests).

    Args:
        lam: weight λ ≥ 0 of the odds-ratio term; 0.1 is TRL's default (its ``beta``).
    """

    requires_reference = False

    def __init__(self, lam: float = 0.1) -> None:
        if not lam >= 0:
            raise ValueError(f"lam must be >= 0, got {lam!r}")
        self.lam = lam

    def forward(self, policy: ResponseStats, reference: ResponseStats | None) -> LossOutput:
        p = policy
        mean_w = mean_token_logps(p.chosen, p.chosen_tokens)
        mean_l = mean_token_logps(p.rejected, p.rejected_tokens)
        gap = log_odds(mean_w) - log_odds(mean_l)
        losses = orpo_loss(p.chosen, p.rejected, p.chosen_tokens, p.rejected_tokens, self.lam)
        metrics = {"log_odds_ratio": F.logsigmoid(gap), "log_odds_chosen": gap, "nll_loss": -mean_w}
        return LossOutput.pair(losses, self.lam * mean_w, self.lam * mean_l, **metrics)
