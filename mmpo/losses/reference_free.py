"""Losses that need only the policy's log-probs: SimPO, ASFT and the SFT (NLL) term.

They accept a reference argument like every loss and ignore it, so they can be mixed with
reference-based losses in :class:`~mmpo.losses.CombinedLoss`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from mmpo.losses.base import LossOutput, PreferenceLoss, ResponseStats, check_positive, mean_token_logps

__all__ = ["ASFTLoss", "SFTLoss", "SimPOLoss", "asft_loss", "log1mexp", "sft_loss", "simpo_loss"]

# ASFT clamps the geometric-mean token probability p at 1 − 1e−7, i.e. log p at log1p(−1e−7).
MAX_MEAN_LOGP = math.log1p(-1e-7)


def simpo_loss(
    logps_chosen: Tensor,
    logps_rejected: Tensor,
    chosen_tokens: Tensor,
    rejected_tokens: Tensor,
    beta: float,
    gamma: float,
) -> Tensor:
    """SimPO: ``−log σ(β/|y_w| · log πθ(y_w) − β/|y_l| · log πθ(y_l) − γ)``.

    Meng, Xia and Chen, "SimPO: Simple Preference Optimization with a Reference-Free Reward"
    (2024): the implicit reward is β times the per-token average log-prob and γ is a target
    reward margin. Token counts below 1 are treated as 1.

    Args:
        logps_chosen: (B,) summed policy log-probs of the chosen responses.
        logps_rejected: (B,) the same for the rejected responses.
        chosen_tokens: (B,) response-token counts |y_w|.
        rejected_tokens: (B,) response-token counts |y_l|.
        beta: reward scale β > 0.
        gamma: target reward margin γ (in reward units, not divided by β).

    Returns:
        (B,) per-example loss.
    """
    margin = mean_token_logps(logps_chosen, chosen_tokens) - mean_token_logps(logps_rejected, rejected_tokens)
    return -F.logsigmoid(beta * margin - gamma)


def log1mexp(x: Tensor) -> Tensor:
    """``log(1 − exp(x))`` for x < 0, accurate at both ends (Mächler's two-branch form).

    Near 0 it uses ``log(−expm1(x))``, far below it ``log1p(−exp(x))``; each branch is finite
    wherever x < 0, so ``torch.where`` gives finite gradients too.
    """
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def asft_loss(
    logps_chosen: Tensor,
    logps_rejected: Tensor,
    chosen_tokens: Tensor,
    rejected_tokens: Tensor,
    beta: float = 1.0,
    lam: float = 1.0,
) -> Tensor:
    """ASFT: ``−log p(y_w) − λ[log σ(β r_w) + log σ(−β r_l)]`` with ``r = log p − log(1 − p)``.

    Wang, Sun, Hua and Fang, "ASFT: Aligned Supervised Fine-Tuning through Absolute Likelihood"
    (2024). Here p(y) = exp(mean token log-prob) is the geometric-mean token probability, clamped
    at 1 − 1e−7; the NLL term −log p(y_w) is therefore the per-token mean NLL of the chosen
    response. β scales the log-odds inside the sigmoids; at β = 1 σ(r) = p, so the alignment term
    is ``log p(y_w) + log(1 − p(y_l))``.

    Args:
        logps_chosen: (B,) summed policy log-probs of the chosen responses.
        logps_rejected: (B,) the same for the rejected responses.
        chosen_tokens: (B,) response-token counts |y_w| (below 1 treated as 1).
        rejected_tokens: (B,) response-token counts |y_l|.
        beta: scale β > 0 of the log-odds.
        lam: weight λ ≥ 0 of the alignment term.

    Returns:
        (B,) per-example loss.
    """
    logp_w = mean_token_logps(logps_chosen, chosen_tokens).clamp(max=MAX_MEAN_LOGP)
    logp_l = mean_token_logps(logps_rejected, rejected_tokens).clamp(max=MAX_MEAN_LOGP)
    odds_w = logp_w - log1mexp(logp_w)
    odds_l = logp_l - log1mexp(logp_l)
    return -logp_w - lam * (F.logsigmoid(beta * odds_w) + F.logsigmoid(-beta * odds_l))


def sft_loss(logps_chosen: Tensor, chosen_tokens: Tensor) -> Tensor:
    """Per-token negative log-likelihood of the chosen response: ``−log πθ(y_w) / |y_w|``.

    The NLL term of RPO (Pang et al., "Iterative Reasoning Preference Optimization", 2024) and
    the generation loss of MPO (Wang et al., "Enhancing the Reasoning Ability of Multimodal Large
    Language Models via Mixed Preference Optimization", 2024). Token counts below 1 are treated as 1.

    Args:
        logps_chosen: (B,) summed policy log-probs of the chosen responses.
        chosen_tokens: (B,) response-token counts |y_w|.

    Returns:
        (B,) per-example loss.
    """
    return -mean_token_logps(logps_chosen, chosen_tokens)


class SimPOLoss(PreferenceLoss):
    """SimPO, reference-free; rewards are β · mean token log-prob.

    The official defaults are β = 2 and γ/β = 0.25, i.e. γ = 0.5 here (this class takes γ itself,
    not the ratio); released models use β 2–10 and γ/β 0.1–0.8.

    Args:
        beta: reward scale β > 0.
        gamma: target reward margin γ ≥ 0.
    """

    requires_reference = False

    def __init__(self, beta: float = 2.0, gamma: float = 0.5) -> None:
        check_positive("beta", beta)
        if not gamma >= 0:
            raise ValueError(f"gamma must be >= 0, got {gamma!r}")
        self.beta = beta
        self.gamma = gamma

    def forward(self, policy: ResponseStats, reference: ResponseStats | None) -> LossOutput:
        p = policy
        losses = simpo_loss(p.chosen, p.rejected, p.chosen_tokens, p.rejected_tokens, self.beta, self.gamma)
        return _mean_logp_output(losses, p, self.beta)


class ASFTLoss(PreferenceLoss):
    """ASFT, reference-free; rewards are β · mean token log-prob.

    Args:
        beta: scale β > 0 of the log-odds r = log p − log(1 − p); 1 gives the paper's form.
        lam: weight λ ≥ 0 of the alignment term against the per-token NLL of the chosen response.
    """

    requires_reference = False

    def __init__(self, beta: float = 1.0, lam: float = 1.0) -> None:
        check_positive("beta", beta)
        if not lam >= 0:
            raise ValueError(f"lam must be >= 0, got {lam!r}")
        self.beta = beta
        self.lam = lam

    def forward(self, policy: ResponseStats, reference: ResponseStats | None) -> LossOutput:
        p = policy
        losses = asft_loss(p.chosen, p.rejected, p.chosen_tokens, p.rejected_tokens, self.beta, self.lam)
        return _mean_logp_output(losses, p, self.beta)


class SFTLoss(PreferenceLoss):
    """Per-token NLL of the chosen response; the rejected response only enters the rewards.

    Rewards are the mean token log-probs of the chosen and rejected responses (no β), so the
    usual reward metrics still say whether the policy prefers the chosen response. Mix it with a
    preference loss through :class:`~mmpo.losses.CombinedLoss` (e.g. RPO = DPO + λ·SFT).
    """

    requires_reference = False

    def __init__(self) -> None:
        pass

    def forward(self, policy: ResponseStats, reference: ResponseStats | None) -> LossOutput:
        return _mean_logp_output(sft_loss(policy.chosen, policy.chosen_tokens), policy, 1.0)


def _mean_logp_output(losses: Tensor, policy: ResponseStats, scale: float) -> LossOutput:
    chosen = mean_token_logps(policy.chosen, policy.chosen_tokens)
    rejected = mean_token_logps(policy.rejected, policy.rejected_tokens)
    return LossOutput.pair(losses, scale * chosen, scale * rejected)
