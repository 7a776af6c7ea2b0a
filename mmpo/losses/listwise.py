"""List losses: all K responses of a group, ordered best first, in one objective.

Notation: r_k = log πθ(y_k|x) − log π_ref(y_k|x), summed over response k's tokens; responses are
ordered best first (response 0 is the best). Where a list loss needs graded labels ψ it reads
``scores`` (B, K) (higher is better) when the data carries them, else it derives them from the
order: ψ_k = K − 1 − k, so every response beats every later one.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from mmpo.losses.base import LossOutput, PreferenceLoss, ResponseStats, check_positive, mean_token_logps

__all__ = [
    "LambdaRankLoss",
    "PlackettLuceLoss",
    "TreePreferenceLoss",
    "dcg_pair_weights",
    "lambda_rank_loss",
    "plackett_luce_loss",
    "tree_ranking_loss",
]

Positions = Literal["policy", "data"]


def plackett_luce_loss(logratios: Tensor, beta: float) -> Tensor:
    """DPO under the Plackett–Luce ranking model.

    Rafailov et al., "Direct Preference Optimization" (2023), Appendix A.3, Eq. 20: for a ranking
    τ(1) ≻ … ≻ τ(K), ``−Σ_{k=1}^{K} log [exp(β r_k) / Σ_{j=k}^{K} exp(β r_j)]`` with
    r = log πθ(y|x) − log π_ref(y|x). The last term is log 1 = 0; with K = 2 this is sigmoid DPO.

    Args:
        logratios: (B, K) summed policy − reference log-probs, responses ordered best first.
        beta: temperature β > 0.

    Returns:
        (B,) per-group loss.
    """
    z = beta * logratios  # (B, K)
    # log Σ_{j >= k} exp(z_j): a reversed cumulative logsumexp over the list
    tail = torch.logcumsumexp(z.flip(-1), dim=-1).flip(-1)  # (B, K)
    return (tail - z).sum(-1)


def _order_labels(like: Tensor) -> Tensor:
    """(B, K) graded labels ψ_k = K − 1 − k from the data's order (best first)."""
    b, k = like.shape
    return torch.arange(k - 1, -1, -1, device=like.device, dtype=like.dtype).expand(b, k)


def _preferred_pairs(labels: Tensor) -> Tensor:
    """(B, K, K) bool, true at [b, i, j] when response i is labelled strictly better than j."""
    return labels.unsqueeze(-1) > labels.unsqueeze(-2)


def dcg_pair_weights(labels: Tensor, positions: Tensor) -> Tensor:
    """LambdaLoss / LiPO-λ pair weights ``Δ_ij = |G_i − G_j| · |1/D(τ_i) − 1/D(τ_j)|``.

    Gains G = 2^ψ − 1 from the graded labels ψ; discounts D(τ) = log₂(1 + τ) of the 1-based rank
    positions τ (the base-2 logarithm of DCG; another base only rescales every Δ by a constant).

    Args:
        labels: (B, K) graded labels ψ, higher is better (kept small, e.g. ratings: 2^ψ overflows
            float32 past ψ ≈ 127).
        positions: (B, K) rank positions τ ≥ 1 (integer or float).

    Returns:
        (B, K, K) symmetric, non-negative weights with a zero diagonal.
    """
    gains = torch.exp2(labels) - 1.0  # (B, K)
    inv_discount = 1.0 / torch.log2(1.0 + positions.to(gains.dtype))  # (B, K)
    gain_gap = (gains.unsqueeze(-1) - gains.unsqueeze(-2)).abs()  # (B, K, K)
    discount_gap = (inv_discount.unsqueeze(-1) - inv_discount.unsqueeze(-2)).abs()  # (B, K, K)
    return gain_gap * discount_gap


def lambda_rank_loss(
    logratios: Tensor,
    beta: float,
    labels: Tensor | None = None,
    positions: Positions = "policy",
    normalize: bool = False,
) -> Tensor:
    """DCG-weighted pairwise logistic loss over a ranked list (LiPO-λ; RankDPO's objective).

    Liu et al., "LiPO: Listwise Preference Optimization through Learning-to-Rank" (2024), LiPO-λ,
    and Karthik et al., "Scalable Ranked Preference Optimization for Text-to-Image Generation"
    (RankDPO, 2024): ``Σ_{ψ_i > ψ_j} −Δ_ij log σ(β(r_i − r_j))`` with the weights of
    :func:`dcg_pair_weights`. For diffusion, r = −(e_θ − e_ref) turns RankDPO's
    ``−log σ(−β(s_i − s_j))`` (s = error difference, lower is better) into this form.

    Args:
        logratios: (B, K) summed policy − reference log-probs r, responses ordered best first.
        beta: temperature β > 0.
        labels: (B, K) graded labels ψ (the data's ``scores``); None derives ψ_k = K − 1 − k from
            the order, so G_k = 2^(K−1−k) − 1.
        positions: where the rank positions τ come from. "policy" (LambdaLoss, as LiPO-λ states
            it): the rank of β·r_k among the group's current rewards, best = 1, ties broken by
            list order; "data": the list order, τ_k = k + 1, so the weights are constants. No
            gradient flows through τ either way.
        normalize: False sums the weighted pair terms (the papers' form); True divides by Σ Δ_ij
            over the preferred pairs, a weighted mean of DPO terms (0 for a group of ties).

    Returns:
        (B,) per-group loss. With K = 2, ψ from the order and normalize=False it is
        ``(1 − 1/log₂3) · DPO``; with normalize=True it is DPO exactly.
    """
    z = beta * logratios  # (B, K)
    labels = _order_labels(z) if labels is None else labels.to(z.dtype)
    k = z.shape[-1]
    if positions == "policy":
        order = torch.argsort(z.detach(), dim=-1, descending=True, stable=True)  # (B, K) best first
        tau = torch.argsort(order, dim=-1) + 1  # (B, K) 1-based rank of each response
    elif positions == "data":
        tau = torch.arange(1, k + 1, device=z.device).expand_as(z)
    else:
        raise ValueError(f"positions must be 'policy' or 'data', got {positions!r}")
    weights = torch.where(_preferred_pairs(labels), dcg_pair_weights(labels, tau), 0.0)  # (B, K, K)
    pair_loss = -F.logsigmoid(z.unsqueeze(-1) - z.unsqueeze(-2))  # (B, K, K) [i, j]: i above j
    loss = (weights * pair_loss).sum((-2, -1))  # (B,)
    if normalize:
        loss = loss / weights.sum((-2, -1)).clamp(min=torch.finfo(loss.dtype).tiny)
    return loss


def tree_ranking_loss(rewards: Tensor, labels: Tensor | None = None) -> Tensor:
    """Pairwise logistic ranking of a preference list, as Tree Preference Optimization ranks it.

    Liao, Chu and Wang, "TPO: Aligning Large Language Models with Multi-branch & Multi-step
    Preference Trees" (2024, arXiv:2410.12854), the preference-list ranking: the mean over the
    K(K−1)/2 response pairs of ``−log σ(R_i − R_j)`` for every pair with ψ_i > ψ_j (a pair of tied
    labels adds 0). Written with the sign that lowers the loss when the better response's reward
    rises; the official code's ``lambda_rank_loss`` counts each pair twice and adds log 2 for the
    diagonal and ties (constants), then wraps the result in ``−log σ(β·…)``, which *maximises* the
    ranking loss. Pair weights are uniform, as in that code; the paper's adaptive step reward (the
    rewards' step weighting) is not part of this function.

    Args:
        rewards: (B, K) reward R_k of each response, each computed from that response's tokens
            alone; responses ordered best first.
        labels: (B, K) graded labels ψ (the data's ``scores``); None ranks by the list order.

    Returns:
        (B,) per-group loss; with K = 2 and ψ from the order, ``−log σ(R_0 − R_1)``.
    """
    labels = _order_labels(rewards) if labels is None else labels.to(rewards.dtype)
    k = rewards.shape[-1]
    pair_loss = -F.logsigmoid(rewards.unsqueeze(-1) - rewards.unsqueeze(-2))  # (B, K, K)
    ranked = torch.where(_preferred_pairs(labels), pair_loss, torch.zeros_like(pair_loss))
    return ranked.sum((-2, -1)) / (k * (k - 1) / 2)


class PlackettLuceLoss(PreferenceLoss):
    """Plackett–Luce DPO over K ranked responses (the data's order, best first); rewards β · logratio.

    Args:
        beta: temperature β > 0.
    """

    requires_reference = True
    max_group_size = None

    def __init__(self, beta: float = 0.1) -> None:
        check_positive("beta", beta)
        self.beta = beta

    def forward(self, policy: ResponseStats, reference: ResponseStats | None) -> LossOutput:
        logratios = policy.logps - reference.logps  # (B, K)
        return LossOutput(plackett_luce_loss(logratios, self.beta), self.beta * logratios)


class LambdaRankLoss(PreferenceLoss):
    """LiPO-λ / RankDPO: DCG-weighted pairwise DPO terms over K ranked responses; rewards β · logratio.

    Gains come from the data's ``scores`` when present (ψ = score, G = 2^ψ − 1), else from the list
    order (ψ_k = K − 1 − k). Scores are treated as graded relevance labels, e.g. ratings 0–10.

    Args:
        beta: temperature β > 0.
        positions: "policy" ranks responses by their current rewards for the discounts (LiPO-λ's
            LambdaLoss weights); "data" uses the list order (constant weights).
        normalize: divide each group's loss by its total pair weight (a weighted mean of DPO terms)
            instead of the papers' plain sum.
    """

    requires_reference = True
    max_group_size = None

    def __init__(self, beta: float = 0.1, positions: Positions = "policy", normalize: bool = False) -> None:
        check_positive("beta", beta)
        if positions not in ("policy", "data"):
            raise ValueError(f"positions must be 'policy' or 'data', got {positions!r}")
        self.beta = beta
        self.positions = positions
        self.normalize = normalize

    def forward(self, policy: ResponseStats, reference: ResponseStats | None) -> LossOutput:
        logratios = policy.logps - reference.logps  # (B, K)
        losses = lambda_rank_loss(logratios, self.beta, policy.scores, self.positions, self.normalize)
        return LossOutput(losses, self.beta * logratios)


class TreePreferenceLoss(PreferenceLoss):
    """Tree Preference Optimization's list ranking (arXiv:2410.12854) over K responses, best first.

    Each response's reward is β times its own log-ratio, per token by default
    (R_k = β · r_k / |y_k|; the official code averages token log-ratios per step, then over steps).
    Pairs are ranked by ``scores`` when present, else by the list order; every preferred pair
    weighs the same and the sum is divided by K(K−1)/2 (see :func:`tree_ranking_loss`).

    Not implemented: the paper's adaptive step reward, which weights each reasoning step by the
    cosine similarity of its hidden states to the same step of the best response. It needs step
    boundaries and hidden states that per-response statistics do not carry, so it could not be
    reproduced here; with uniform step weights and steps of equal length it reduces to the token
    mean used here. Rewards are the R_k the loss ranks.

    Args:
        beta: temperature β > 0.
        length_normalize: True ranks per-token mean log-ratios (with K = 2: LN-DPO); False ranks
            summed log-ratios (with K = 2: DPO). Token counts below 1 count as 1.
    """

    requires_reference = True
    max_group_size = None

    def __init__(self, beta: float = 0.1, length_normalize: bool = True) -> None:
        check_positive("beta", beta)
        self.beta = beta
        self.length_normalize = length_normalize

    def forward(self, policy: ResponseStats, reference: ResponseStats | None) -> LossOutput:
        logratios = policy.logps - reference.logps  # (B, K)
        if self.length_normalize:
            logratios = mean_token_logps(logratios, policy.tokens)
        rewards = self.beta * logratios
        return LossOutput(tree_ranking_loss(rewards, policy.scores), rewards)
