"""Sequence-level pairwise losses that compare the policy with a reference model.

Notation: for one response, ``logratio = log πθ(y|x) − log π_ref(y|x)`` summed over response
tokens; Δ = logratio_chosen − logratio_rejected; σ is the logistic sigmoid. Every function below
is pure maths on (B,) tensors and returns the (B,) per-example loss. Terms of the form −log σ(z)
are written ``-logsigmoid(z)`` (= softplus(−z)), which stays finite for any finite z.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from mmpo.losses.base import LossOutput, PreferenceLoss, ResponseStats, check_positive, check_range, mean_token_logps

__all__ = [
    "DPOLoss",
    "FDPOLoss",
    "HingeLoss",
    "IPOLoss",
    "LDDPOLoss",
    "LNDPOLoss",
    "RobustDPOLoss",
    "dpo_loss",
    "f_divergence_link",
    "fdpo_loss",
    "hinge_loss",
    "ipo_loss",
    "length_desensitized_logps",
    "ln_dpo_loss",
    "robust_dpo_loss",
]

# Largest exponent f-DPO's links may take: exp(50) ≈ 5e21 is finite in float32 and bfloat16, so
# log-ratios of any size give finite losses (the gradient is zero past the clamp).
MAX_EXPONENT = 50.0

Divergence = Literal["reverse_kl", "forward_kl", "js", "alpha"]


# --------------------------------------------------------------------------- pure functions


def dpo_loss(logratio_chosen: Tensor, logratio_rejected: Tensor, beta: float, label_smoothing: float = 0.0) -> Tensor:
    """Sigmoid DPO, optionally conservative (cDPO).

    Rafailov et al., "Direct Preference Optimization: Your Language Model is Secretly a Reward
    Model" (2023), Eq. 7: ``−log σ(βΔ)``. With label smoothing ε (Mitchell's cDPO note, 2023) the
    label is trusted with probability 1−ε: ``−(1−ε) log σ(βΔ) − ε log σ(−βΔ)``.

    Args:
        logratio_chosen: (B,) summed policy − reference log-probs of the chosen responses.
        logratio_rejected: (B,) the same for the rejected responses.
        beta: temperature β > 0.
        label_smoothing: ε in [0, 0.5]; 0 gives plain DPO.

    Returns:
        (B,) per-example loss.
    """
    z = beta * (logratio_chosen - logratio_rejected)
    loss = -F.logsigmoid(z)
    if label_smoothing:
        loss = (1.0 - label_smoothing) * loss - label_smoothing * F.logsigmoid(-z)
    return loss


def robust_dpo_loss(logratio_chosen: Tensor, logratio_rejected: Tensor, beta: float, label_smoothing: float) -> Tensor:
    """Robust DPO (rDPO), unbiased under preference labels flipped with probability ε.

    Chowdhury, Kini and Natarajan, "Provably Robust DPO: Aligning Language Models with Noisy
    Feedback" (2024): ``[−(1−ε) log σ(βΔ) + ε log σ(−βΔ)] / (1−2ε)``.

    Args:
        logratio_chosen: (B,) summed policy − reference log-probs of the chosen responses.
        logratio_rejected: (B,) the same for the rejected responses.
        beta: temperature β > 0.
        label_smoothing: flip rate ε in [0, 0.5).

    Returns:
        (B,) per-example loss (it can be negative: it is an unbiased estimate, not a likelihood).
    """
    z = beta * (logratio_chosen - logratio_rejected)
    eps = label_smoothing
    return (-(1.0 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1.0 - 2.0 * eps)


def ipo_loss(
    logratio_chosen: Tensor,
    logratio_rejected: Tensor,
    chosen_tokens: Tensor,
    rejected_tokens: Tensor,
    beta: float,
) -> Tensor:
    """IPO: squared regression of the length-averaged log-ratio margin onto 1/(2β).

    Azar et al., "A General Theoretical Paradigm to Understand Learning from Human Preferences"
    (2023), the empirical IPO objective ``(Δ′ − 1/(2β))²`` with
    ``Δ′ = logratio_chosen/|y_w| − logratio_rejected/|y_l|`` (per-token averages, as in common
    implementations; token counts below 1 are treated as 1).

    Args:
        logratio_chosen: (B,) summed policy − reference log-probs of the chosen responses.
        logratio_rejected: (B,) the same for the rejected responses.
        chosen_tokens: (B,) response-token counts |y_w|.
        rejected_tokens: (B,) response-token counts |y_l|.
        beta: regularisation β > 0 (the target margin is 1/(2β)).

    Returns:
        (B,) per-example loss.
    """
    margin = mean_token_logps(logratio_chosen, chosen_tokens) - mean_token_logps(logratio_rejected, rejected_tokens)
    return (margin - 1.0 / (2.0 * beta)) ** 2


def hinge_loss(logratio_chosen: Tensor, logratio_rejected: Tensor, beta: float) -> Tensor:
    """Hinge loss on the log-ratio margin: ``relu(1 − βΔ)``.

    The calibration loss of Zhao et al., "SLiC-HF: Sequence Likelihood Calibration with Human
    Feedback" (2023), in the reference-normalised form of Liu et al., "Statistical Rejection
    Sampling Improves Preference Optimization" (RSO, 2023), where β = 1/margin.

    Args:
        logratio_chosen: (B,) summed policy − reference log-probs of the chosen responses.
        logratio_rejected: (B,) the same for the rejected responses.
        beta: inverse margin β > 0.

    Returns:
        (B,) per-example loss.
    """
    return F.relu(1.0 - beta * (logratio_chosen - logratio_rejected))


def ln_dpo_loss(
    logratio_chosen: Tensor,
    logratio_rejected: Tensor,
    chosen_tokens: Tensor,
    rejected_tokens: Tensor,
    beta: float,
) -> Tensor:
    """Length-normalised DPO: ``−log σ(β[logratio_w/|y_w| − logratio_l/|y_l|])``.

    Ahrabian et al., "The Hitchhiker's Guide to Human Alignment with *PO" (2024), LN-DPO; the
    same objective as TRL's ``sigmoid_norm``. Token counts below 1 are treated as 1.

    Args:
        logratio_chosen: (B,) summed policy − reference log-probs of the chosen responses.
        logratio_rejected: (B,) the same for the rejected responses.
        chosen_tokens: (B,) response-token counts |y_w|.
        rejected_tokens: (B,) response-token counts |y_l|.
        beta: temperature β > 0.

    Returns:
        (B,) per-example loss.
    """
    return dpo_loss(
        mean_token_logps(logratio_chosen, chosen_tokens), mean_token_logps(logratio_rejected, rejected_tokens), beta
    )


def _forward_kl_link(u: Tensor, alpha: float) -> Tensor:
    return -torch.exp((-u).clamp(max=MAX_EXPONENT))


def _alpha_link(u: Tensor, alpha: float) -> Tensor:
    # (1 − exp(−αu)) / α written with expm1 for accuracy near u = 0.
    return -torch.expm1((-alpha * u).clamp(max=MAX_EXPONENT)) / alpha


_LINKS: dict[str, Callable[[Tensor, float], Tensor]] = {
    "reverse_kl": lambda u, alpha: u,
    "forward_kl": _forward_kl_link,
    # log u′ − log(1 + u′) at u′ = exp(u), i.e. u − softplus(u) = log σ(u).
    "js": lambda u, alpha: F.logsigmoid(u),
    "alpha": _alpha_link,
}


def f_divergence_link(logratio: Tensor, divergence: Divergence, alpha: float = 0.5) -> Tensor:
    """f′(exp(u)) for the f-divergences of f-DPO, up to additive constants (which cancel in Δ).

    Wang et al., "Beyond Reverse KL: Generalizing Direct Preference Optimization with Diverse
    Divergence Constraints" (2023): reverse KL ``u``; forward KL ``−exp(−u)``; Jensen–Shannon
    ``u − log(1 + exp(u))``; α-divergence ``(1 − exp(−αu))/α`` (the paper's α ∈ (0, 1); TRL ≥ 0.29
    names 1 − α what the paper calls α). Exponents are clamped at ``MAX_EXPONENT``.

    Args:
        logratio: (B,) summed policy − reference log-probs u.
        divergence: one of "reverse_kl", "forward_kl", "js", "alpha".
        alpha: the α of the α-divergence (ignored by the others).

    Returns:
        (B,) transformed log-ratio.
    """
    return _LINKS[divergence](logratio, alpha)


def fdpo_loss(
    logratio_chosen: Tensor,
    logratio_rejected: Tensor,
    beta: float,
    divergence: Divergence = "reverse_kl",
    alpha: float = 0.5,
) -> Tensor:
    """f-DPO: ``−log σ(β[f′(exp u_w) − f′(exp u_l)])``; reverse KL is exactly DPO.

    Wang et al., "Beyond Reverse KL: Generalizing Direct Preference Optimization with Diverse
    Divergence Constraints" (2023); see :func:`f_divergence_link` for the links.

    Args:
        logratio_chosen: (B,) summed policy − reference log-probs of the chosen responses.
        logratio_rejected: (B,) the same for the rejected responses.
        beta: temperature β > 0.
        divergence: which f-divergence constrains the policy.
        alpha: α of the α-divergence, in (0, 1).

    Returns:
        (B,) per-example loss.
    """
    f_w = f_divergence_link(logratio_chosen, divergence, alpha)
    f_l = f_divergence_link(logratio_rejected, divergence, alpha)
    return -F.logsigmoid(beta * (f_w - f_l))


def length_desensitized_logps(
    summed: Tensor, token_logps: Tensor, mask: Tensor, keep_tokens: Tensor, alpha: float
) -> Tensor:
    """LD-DPO's desensitised sequence log-prob: tokens past the first ``keep_tokens`` weigh α.

    Liu et al., "Length Desensitization in Direct Preference Optimization" (2024):
    ``log π̂(y) = Σ_{t ≤ l_p} log π(y_t) + α Σ_{t > l_p} log π(y_t)`` with l_p = min(|y_w|, |y_l|),
    computed here as ``summed − (1 − α) · tail`` so α = 1 returns ``summed`` unchanged. Positions
    count response tokens (the mask), not columns, so masks may start anywhere in the row.

    Args:
        summed: (B,) summed log-probs; must equal the masked sum of ``token_logps``.
        token_logps: (B, T) per-token log-probs.
        mask: (B, T) bool or 0/1, true on response tokens.
        keep_tokens: (B,) l_p, the number of leading response tokens kept at full weight.
        alpha: weight α in [0, 1] of the tokens past l_p.

    Returns:
        (B,) desensitised log-probs.
    """
    mask = mask.bool()
    rank = mask.long().cumsum(-1) - 1  # (B, T) 0-based index of each token among the response tokens
    tail = mask & (rank >= keep_tokens.to(rank.dtype).unsqueeze(-1))  # (B, T)
    tail_sum = torch.where(tail, token_logps, torch.zeros_like(token_logps)).sum(-1)  # (B,)
    return summed - (1.0 - alpha) * tail_sum


# --------------------------------------------------------------------------- classes


def _logratios(policy: ResponseStats, reference: ResponseStats) -> tuple[Tensor, Tensor]:
    return policy.chosen - reference.chosen, policy.rejected - reference.rejected


def _output(losses: Tensor, beta: float, logratio_chosen: Tensor, logratio_rejected: Tensor) -> LossOutput:
    """Losses with the usual implicit rewards β · logratio."""
    return LossOutput.pair(losses, beta * logratio_chosen, beta * logratio_rejected)


class DPOLoss(PreferenceLoss):
    """Sigmoid DPO; ``label_smoothing`` > 0 gives conservative DPO (cDPO).

    Args:
        beta: temperature β > 0; larger keeps the policy closer to the reference.
        label_smoothing: cDPO's ε in [0, 0.5], the assumed probability that a label is flipped.
    """

    requires_reference = True

    def __init__(self, beta: float = 0.1, label_smoothing: float = 0.0) -> None:
        check_positive("beta", beta)
        check_range("label_smoothing", label_smoothing, 0.0, 0.5)
        self.beta = beta
        self.label_smoothing = label_smoothing

    def forward(self, policy: ResponseStats, reference: ResponseStats | None) -> LossOutput:
        lc, lr = _logratios(policy, reference)
        return _output(dpo_loss(lc, lr, self.beta, self.label_smoothing), self.beta, lc, lr)


class RobustDPOLoss(PreferenceLoss):
    """Robust DPO (rDPO), unbiased for labels flipped at rate ε.

    Args:
        beta: temperature β > 0.
        label_smoothing: flip rate ε in [0, 0.5).
    """

    requires_reference = True

    def __init__(self, beta: float = 0.1, label_smoothing: float = 0.1) -> None:
        check_positive("beta", beta)
        check_range("label_smoothing", label_smoothing, 0.0, 0.5, high_inclusive=False)
        self.beta = beta
        self.label_smoothing = label_smoothing

    def forward(self, policy: ResponseStats, reference: ResponseStats | None) -> LossOutput:
        lc, lr = _logratios(policy, reference)
        return _output(robust_dpo_loss(lc, lr, self.beta, self.label_smoothing), self.beta, lc, lr)


class IPOLoss(PreferenceLoss):
    """IPO on per-token averaged log-ratios; rewards are β · (summed) logratio.

    Args:
        beta: regularisation β > 0; the loss pulls the averaged margin towards 1/(2β).
    """

    requires_reference = True

    def __init__(self, beta: float = 0.1) -> None:
        check_positive("beta", beta)
        self.beta = beta

    def forward(self, policy: ResponseStats, reference: ResponseStats | None) -> LossOutput:
        lc, lr = _logratios(policy, reference)
        losses = ipo_loss(lc, lr, policy.chosen_tokens, policy.rejected_tokens, self.beta)
        return _output(losses, self.beta, lc, lr)


class HingeLoss(PreferenceLoss):
    """Hinge (SLiC / RSO) loss ``relu(1 − βΔ)``.

    Args:
        beta: inverse margin β > 0.
    """

    requires_reference = True

    def __init__(self, beta: float = 0.1) -> None:
        check_positive("beta", beta)
        self.beta = beta

    def forward(self, policy: ResponseStats, reference: ResponseStats | None) -> LossOutput:
        lc, lr = _logratios(policy, reference)
        return _output(hinge_loss(lc, lr, self.beta), self.beta, lc, lr)


class LNDPOLoss(PreferenceLoss):
    """Length-normalised DPO (LN-DPO, TRL's ``sigmoid_norm``); rewards are β · (summed) logratio.

    Args:
        beta: temperature β > 0, applied to per-token log-ratios.
    """

    requires_reference = True

    def __init__(self, beta: float = 0.1) -> None:
        check_positive("beta", beta)
        self.beta = beta

    def forward(self, policy: ResponseStats, reference: ResponseStats | None) -> LossOutput:
        lc, lr = _logratios(policy, reference)
        losses = ln_dpo_loss(lc, lr, policy.chosen_tokens, policy.rejected_tokens, self.beta)
        return _output(losses, self.beta, lc, lr)


class FDPOLoss(PreferenceLoss):
    """f-DPO: DPO under a choice of f-divergence; rewards are β · logratio.

    Args:
        beta: temperature β > 0.
        divergence: "reverse_kl" (plain DPO), "forward_kl", "js" (Jensen–Shannon) or "alpha".
        alpha: α of the α-divergence in the paper's convention, in (0, 1); only read when
            ``divergence="alpha"``. TRL ≥ 0.29 uses α_TRL = 1 − α (the two agree at 0.5).
    """

    requires_reference = True

    def __init__(self, beta: float = 0.1, divergence: Divergence = "reverse_kl", alpha: float = 0.5) -> None:
        check_positive("beta", beta)
        if divergence not in _LINKS:
            raise ValueError(f"divergence must be one of {sorted(_LINKS)}, got {divergence!r}")
        if divergence == "alpha" and not 0.0 < alpha < 1.0:
            raise ValueError(f"alpha must be in (0, 1) for the alpha-divergence, got {alpha!r}")
        self.beta = beta
        self.divergence = divergence
        self.alpha = alpha

    def forward(self, policy: ResponseStats, reference: ResponseStats | None) -> LossOutput:
        lc, lr = _logratios(policy, reference)
        return _output(fdpo_loss(lc, lr, self.beta, self.divergence, self.alpha), self.beta, lc, lr)


class LDDPOLoss(PreferenceLoss):
    """LD-DPO: DPO on length-desensitised log-probs (needs per-token log-probs and masks).

    For each pair, l_p = min(|y_w|, |y_l|) response tokens; policy and reference log-probs of the
    tokens past l_p are scaled by α before summing. α = 1 is exactly DPO. Rewards are β times the
    desensitised log-ratios, the quantity the loss compares. The reference's masks default to
    the policy's when absent (both score the same tokens).

    Args:
        beta: temperature β > 0.
        alpha: weight α in [0, 1] of the tokens past the shorter response's length.
    """

    requires_reference = True
    requires_token_logps = True

    def __init__(self, beta: float = 0.1, alpha: float = 0.5) -> None:
        check_positive("beta", beta)
        check_range("alpha", alpha, 0.0, 1.0)
        self.beta = beta
        self.alpha = alpha

    def forward(self, policy: ResponseStats, reference: ResponseStats | None) -> LossOutput:
        if policy.chosen_mask is None or policy.rejected_mask is None:
            raise ValueError("LDDPOLoss needs chosen_mask and rejected_mask on the policy ResponseStats.")
        if not reference.has_token_logps:
            raise ValueError("LDDPOLoss needs per-token log-probs on the reference ResponseStats too.")
        ref_chosen_mask = policy.chosen_mask if reference.chosen_mask is None else reference.chosen_mask
        ref_rejected_mask = policy.rejected_mask if reference.rejected_mask is None else reference.rejected_mask
        keep = torch.minimum(policy.chosen_mask.bool().sum(-1), policy.rejected_mask.bool().sum(-1))  # (B,) l_p

        def desensitise(p: ResponseStats, chosen_mask: Tensor, rejected_mask: Tensor) -> tuple[Tensor, Tensor]:
            c = length_desensitized_logps(p.chosen, p.chosen_token_logps, chosen_mask, keep, self.alpha)
            r = length_desensitized_logps(p.rejected, p.rejected_token_logps, rejected_mask, keep, self.alpha)
            return c, r

        pc, pr = desensitise(policy, policy.chosen_mask, policy.rejected_mask)
        rc, rr = desensitise(reference, ref_chosen_mask, ref_rejected_mask)
        lc, lr = pc - rc, pr - rr
        return _output(dpo_loss(lc, lr, self.beta), self.beta, lc, lr)
