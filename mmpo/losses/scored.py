"""Pair losses steered by side information from the data: reward-model scores or soft labels.

MADPO, MODPO and SmPO read ``scores`` (B, 2), the scores of the chosen and the rejected response
from a reward model (another objective's reward, for MODPO); soft-label DPO reads ``soft_labels`` (B,).
The side information is data: no gradient flows into it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from mmpo.losses.base import LossOutput, PreferenceLoss, ResponseStats, check_positive, check_range
from mmpo.losses.pairwise import dpo_loss

__all__ = [
    "MADPOLoss",
    "MODPOLoss",
    "SmPOLoss",
    "SoftLabelDPOLoss",
    "madpo_loss",
    "madpo_weights",
    "modpo_loss",
    "smoothed_preference",
    "smpo_loss",
    "soft_label_dpo_loss",
]

# MADPO's experiments set τ = logit(0.999): margins past it mean the reward model is ≥ 99.9% sure.
MADPO_TAU = math.log(0.999 / 0.001)


def madpo_weights(margin: Tensor, c_max: float, c_min: float, lam: float, tau: float) -> Tensor:
    """MADPO's per-pair weight from a reward-model margin h (detached).

    ``c(|h|) = c_min + (c_max − c_min) / (1 + ((c_max − 1)/(1 − c_min)) · exp(λ(|h| − τ)))`` runs from
    about c_max for small margins (hard pairs) through 1 at |h| = τ down to c_min for large ones;
    ``w = σ(c·h)/σ(h)`` when h > −τ, else 1. Computed as exp(log σ(c·h) − log σ(h)), so very negative
    margins give no 0/0.

    Args:
        margin: (B,) h = score(chosen) − score(rejected).
        c_max: largest scale, > 1.
        c_min: smallest scale, in [0, 1).
        lam: steepness λ ≥ 0 of the transition (λ = 0 gives c = 1, w = 1).
        tau: margin τ ≥ 0 where c = 1.

    Returns:
        (B,) weights, detached.
    """
    h = margin.detach()
    k = (c_max - 1.0) / (1.0 - c_min)
    c = c_min + (c_max - c_min) / (1.0 + k * torch.exp(lam * (h.abs() - tau)))  # exp → inf gives c = c_min
    w = torch.exp(F.logsigmoid(c * h) - F.logsigmoid(h))
    return torch.where(h > -tau, w, torch.ones_like(w))


def madpo_loss(
    logratio_chosen: Tensor,
    logratio_rejected: Tensor,
    margin: Tensor,
    beta: float,
    c_max: float = 2.0,
    c_min: float = 0.5,
    lam: float = 1.0,
    tau: float = MADPO_TAU,
) -> Tensor:
    """MADPO: ``w(h) · −log σ(βΔ)`` with the margin-adaptive weight of :func:`madpo_weights`.

    "Margin Adaptive DPO: Leveraging Reward Model for Granular Control in Preference
    Optimization" (MADPO, 2025), as the official code computes it: DPO per pair, times a weight
    from the detached reward-model margin h that amplifies hard pairs and damps easy ones.

    Args:
        logratio_chosen: (B,) summed policy − reference log-probs of the chosen responses.
        logratio_rejected: (B,) the same for the rejected responses.
        margin: (B,) reward-model margin h = score(chosen) − score(rejected).
        beta: temperature β > 0.
        c_max: largest scale c_max > 1.
        c_min: smallest scale c_min in [0, 1).
        lam: steepness λ ≥ 0.
        tau: margin τ ≥ 0 at which c = 1; margins h ≤ −τ keep weight 1.

    Returns:
        (B,) per-example loss.
    """
    weights = madpo_weights(margin, c_max, c_min, lam, tau).to(logratio_chosen.dtype)
    return weights * dpo_loss(logratio_chosen, logratio_rejected, beta)


def modpo_loss(
    logratio_chosen: Tensor,
    logratio_rejected: Tensor,
    margin_chosen: Tensor,
    margin_rejected: Tensor,
    beta: float,
    weight: float,
) -> Tensor:
    """MODPO with one extra objective: ``−log σ(r_w − r_l)``, ``r = (β·u − (1 − w)·m) / w``.

    Zhou et al., "Beyond One-Preference-Fits-All Alignment: Multi-Objective Direct Preference
    Optimization" (2023), as the official code computes it with weights (w₀, w₁) = (w, 1 − w):
    r = (1/w₀)[β log(πθ/π_ref)(y) − w₁ m(y)], where m is the other objective's reward of the
    response (for example the implicit reward of a model trained on that objective).

    Args:
        logratio_chosen: (B,) summed policy − reference log-probs u of the chosen responses.
        logratio_rejected: (B,) the same for the rejected responses.
        margin_chosen: (B,) the other objective's reward m of the chosen responses.
        margin_rejected: (B,) the same for the rejected responses.
        beta: temperature β > 0.
        weight: weight w in (0, 1] of the preference objective; w = 1 is DPO.

    Returns:
        (B,) per-example loss.
    """
    return -F.logsigmoid(
        _modpo_rewards(logratio_chosen, margin_chosen, beta, weight)
        - _modpo_rewards(logratio_rejected, margin_rejected, beta, weight)
    )


def _modpo_rewards(logratio: Tensor, margin: Tensor, beta: float, weight: float) -> Tensor:
    return (beta * logratio - (1.0 - weight) * margin.to(logratio.dtype)) / weight


def soft_label_dpo_loss(logratio_chosen: Tensor, logratio_rejected: Tensor, soft_labels: Tensor, beta: float) -> Tensor:
    """DPO against a per-pair preference probability: ``−[p log σ(βΔ) + (1 − p) log σ(−βΔ)]``.

    The cross-entropy of the DPO preference model against a soft label p = P(y_w ≻ y_l): cDPO's
    smoothing (Mitchell, 2023) with a label per pair instead of a constant 1 − ε, the smoothed
    preference distribution of SmPO-Diffusion (Lu et al., 2025), where p comes from a reward
    model. p = 1 is DPO; p = 1/2 pulls Δ towards 0.

    Args:
        logratio_chosen: (B,) summed policy − reference log-probs of response 0.
        logratio_rejected: (B,) the same for response 1.
        soft_labels: (B,) p in [0, 1], the probability that response 0 is preferred.
        beta: temperature β > 0.

    Returns:
        (B,) per-example loss.
    """
    z = beta * (logratio_chosen - logratio_rejected)
    p = soft_labels.to(z.dtype)
    return -(p * F.logsigmoid(z) + (1.0 - p) * F.logsigmoid(-z))


def smoothed_preference(
    scores_chosen: Tensor, scores_rejected: Tensor, score_min: float | None = None, score_max: float | None = None
) -> Tensor:
    """SmPO's smoothed preference p = exp(n_w) / (exp(n_w) + exp(n_l)) = σ(n_w − n_l), detached.

    n = (s − score_min) / (score_max − score_min) when a range is given (the official code min-max
    normalises PickScore with the range it measured on Pick-a-Pic v2, 0.1154 to 0.2820), else n = s.

    Args:
        scores_chosen: (B,) reward scores s_w of the chosen responses.
        scores_rejected: (B,) the same for the rejected responses.
        score_min: lower end of the normalising range (both ends or neither).
        score_max: upper end, > score_min.

    Returns:
        (B,) p in (0, 1); 0.5 for equal scores, below 0.5 where the scores disagree with the label order.
    """
    sw, sl = scores_chosen.detach(), scores_rejected.detach()
    if score_min is not None:
        span = score_max - score_min
        sw, sl = (sw - score_min) / span, (sl - score_min) / span
    return torch.sigmoid(sw - sl)


def smpo_loss(
    logratio_chosen: Tensor,
    logratio_rejected: Tensor,
    preference: Tensor,
    beta: float,
    scale: float = 10.0,
) -> Tensor:
    """SmPO: DPO whose logit is scaled by the smoothed preference, ``−log σ(scale · (2p − 1) · βΔ)``.

    Lu et al., "Smoothed Preference Optimization via ReNoise Inversion for Aligning Diffusion Models
    with Varied Human Preferences" (SmPO-Diffusion, ICML 2025), as its official training script
    computes it: ``inside = −0.5 · β_dpo · (2p − 1) · 10 · (model_diff − ref_diff)`` on denoising
    errors, which is this with Δ = u_w − u_l (u = −error for a diffusion backbone), β = 0.5·β_dpo and
    scale = 10. A pair with p = 0.5 (equal scores) gives a constant loss log 2 and no gradient; p < 0.5
    turns the pair around.

    Args:
        logratio_chosen: (B,) policy − reference statistic of the chosen responses.
        logratio_rejected: (B,) the same for the rejected responses.
        preference: (B,) smoothed preference p of response 0 (:func:`smoothed_preference`).
        beta: temperature β > 0.
        scale: the official code's constant factor on (2p − 1) (10).

    Returns:
        (B,) per-example loss.
    """
    weight = (scale * (2.0 * preference - 1.0)).to(logratio_chosen.dtype)
    return -F.logsigmoid(weight * beta * (logratio_chosen - logratio_rejected))


def _logratios(policy: ResponseStats, reference: ResponseStats) -> tuple[Tensor, Tensor]:
    return policy.chosen - reference.chosen, policy.rejected - reference.rejected


class MADPOLoss(PreferenceLoss):
    """MADPO: DPO re-weighted per pair by the reward-model margin h = scores[:, 0] − scores[:, 1].

    Needs ``scores`` (B, 2): a reward model's scores of the chosen and the rejected response.
    Defaults follow the official code (β = 0.1, c_max = 2, c_min = 0.5, λ = 1); τ defaults to
    logit(0.999) ≈ 6.91, the value of the official experiments (the code's class default is 2).
    τ is in the reward model's units, so set it for the scores you use. Rewards are β · logratio;
    the metric ``madpo_weight`` is the per-pair weight.

    Args:
        beta: temperature β > 0.
        c_max: largest scale, for the hardest pairs; > 1.
        c_min: smallest scale, for the easiest pairs; in [0, 1).
        lam: steepness λ ≥ 0 of the transition between them.
        tau: margin τ ≥ 0 where the scale is 1; pairs with h ≤ −τ keep weight 1.
    """

    requires_reference = True
    requires_scores = True

    def __init__(
        self, beta: float = 0.1, c_max: float = 2.0, c_min: float = 0.5, lam: float = 1.0, tau: float = MADPO_TAU
    ) -> None:
        check_positive("beta", beta)
        if not (c_max > 1.0 and math.isfinite(c_max)):
            raise ValueError(f"c_max must be a finite number > 1, got {c_max!r}")
        check_range("c_min", c_min, 0.0, 1.0, high_inclusive=False)
        if not (lam >= 0 and math.isfinite(lam)):
            raise ValueError(f"lam must be a finite number >= 0, got {lam!r}")
        if not (tau >= 0 and math.isfinite(tau)):
            raise ValueError(f"tau must be a finite number >= 0, got {tau!r}")
        self.beta = beta
        self.c_max = c_max
        self.c_min = c_min
        self.lam = lam
        self.tau = tau

    def forward(self, policy: ResponseStats, reference: ResponseStats | None) -> LossOutput:
        lc, lr = _logratios(policy, reference)
        margin = policy.scores[:, 0] - policy.scores[:, 1]
        weights = madpo_weights(margin, self.c_max, self.c_min, self.lam, self.tau).to(lc.dtype)
        losses = weights * dpo_loss(lc, lr, self.beta)
        return LossOutput.pair(losses, self.beta * lc, self.beta * lr, madpo_weight=weights)


class MODPOLoss(PreferenceLoss):
    """MODPO with one extra objective, whose reward of each response is in ``scores``.

    Needs ``scores`` (B, 2): column 0 holds the other objective's reward m of the chosen response,
    column 1 that of the rejected one (e.g. a safety reward model's scores while the pairs are
    labelled for helpfulness). Rewards are the collective rewards r = (β·u − (1 − w)·m)/w the loss
    compares, as in the official code.

    Args:
        beta: temperature β > 0.
        weight: weight w in (0, 1] of the objective the pairs are labelled on; the extra objective
            weighs 1 − w. w = 1 is DPO.
    """

    requires_reference = True
    requires_scores = True

    def __init__(self, beta: float = 0.1, weight: float = 0.5) -> None:
        check_positive("beta", beta)
        if not 0.0 < weight <= 1.0:
            raise ValueError(f"weight must be in (0, 1], got {weight!r}")
        self.beta = beta
        self.weight = weight

    def forward(self, policy: ResponseStats, reference: ResponseStats | None) -> LossOutput:
        lc, lr = _logratios(policy, reference)
        m = policy.scores
        losses = modpo_loss(lc, lr, m[:, 0], m[:, 1], self.beta, self.weight)
        chosen = _modpo_rewards(lc, m[:, 0], self.beta, self.weight)
        rejected = _modpo_rewards(lr, m[:, 1], self.beta, self.weight)
        return LossOutput.pair(losses, chosen, rejected)


class SoftLabelDPOLoss(PreferenceLoss):
    """DPO against per-pair soft labels ``soft_labels`` (B,), P(response 0 ≻ response 1); rewards β · logratio.

    Raises a ValueError when the data carries no soft labels. Labels are used as given: keep them
    in [0, 1] (outside it the loss is unbounded below).

    Args:
        beta: temperature β > 0.
    """

    requires_reference = True

    def __init__(self, beta: float = 0.1) -> None:
        check_positive("beta", beta)
        self.beta = beta

    def forward(self, policy: ResponseStats, reference: ResponseStats | None) -> LossOutput:
        if policy.soft_labels is None:
            raise ValueError(
                "SoftLabelDPOLoss needs soft_labels (B,), the probability that response 0 is preferred; "
                "the data carries none (give a soft_label per record, or use DPOLoss with label_smoothing)"
            )
        lc, lr = _logratios(policy, reference)
        losses = soft_label_dpo_loss(lc, lr, policy.soft_labels, self.beta)
        return LossOutput.pair(losses, self.beta * lc, self.beta * lr)


class SmPOLoss(PreferenceLoss):
    """SmPO: the DPO logit scaled by ``scale · (2p − 1)``, p the smoothed preference from reward scores.

    Needs ``scores`` (B, 2): reward-model scores of the chosen and the rejected response (for
    diffusion pairs, the records' ``scores``). p = σ(n_w − n_l) with n the scores min-max normalised
    by ``score_range`` when given (:func:`smoothed_preference`). The official code's β convention
    carries a 0.5: its ``--beta_dpo 2000`` (SD 1.5) and ``5000`` (SDXL) are β = 1000 and 2500 here;
    ``scale`` is its constant 10. Rewards are β · logratio; the metric ``smpo_weight`` is
    scale · (2p − 1), the factor each pair's DPO logit gets.

    SmPO's other half, estimating x_t by ReNoise DDIM inversion of the image instead of drawing noise,
    is a property of the diffusion backbone's noise, not of this loss (see ``docs/diffusion.md``).

    Args:
        beta: temperature β > 0 (mmpo's convention, no 0.5 factor).
        scale: constant factor on (2p − 1), > 0; the official code's 10.
        score_range: ``[min, max]`` to normalise scores to [0, 1] before the softmax, or None to use
            them as given. The official code uses PickScore's [0.11543526500463486, 0.28201571106910706].
    """

    requires_reference = True
    requires_scores = True

    def __init__(self, beta: float = 2500.0, scale: float = 10.0, score_range: list[float] | None = None) -> None:
        check_positive("beta", beta)
        check_positive("scale", scale)
        if score_range is not None:
            low, high = (float(v) for v in score_range)
            if not (math.isfinite(low) and math.isfinite(high) and high > low):
                raise ValueError(f"score_range must be [min, max] with finite min < max, got {score_range!r}")
            score_range = [low, high]
        self.beta = beta
        self.scale = scale
        self.score_range = score_range

    def forward(self, policy: ResponseStats, reference: ResponseStats | None) -> LossOutput:
        lc, lr = _logratios(policy, reference)
        low, high = self.score_range or (None, None)
        p = smoothed_preference(policy.scores[:, 0], policy.scores[:, 1], low, high)
        losses = smpo_loss(lc, lr, p, self.beta, self.scale)
        weight = self.scale * (2.0 * p - 1.0)
        return LossOutput.pair(losses, self.beta * lc, self.beta * lr, smpo_weight=weight)
