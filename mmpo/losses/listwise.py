"""List losses: all K responses of a group, ordered best first, in one objective."""

from __future__ import annotations

import torch
from torch import Tensor

from mmpo.losses.base import LossOutput, PreferenceLoss, ResponseStats, check_positive

__all__ = ["PlackettLuceLoss", "plackett_luce_loss"]


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
