"""DenseDPO: preferences labelled per temporal segment of two videos, one sigmoid per pair.

DenseDPO (Wu et al. 2025) compares two videos denoised from the same partially noised real video and labels
each temporal segment f with l_f ∈ {+1, 0, −1} (the first video better, neither, the second). With
``s_f = ‖target − Gθ‖²_f − ‖target − G_ref‖²_f`` per segment, its loss is

    −log σ(−β Σ_f l_f (s_f(x⁰) − s_f(x¹))),

one sigmoid per video pair. In mmpo's statistics a segment's log-ratio Δ_f = logp_θ,f − logp_ref,f is −s_f
(scaled by the backbone's normalisation, see ``DiffusionBackbone(segments=...)``), so the logit is
β Σ_f l_f (Δ_f(x⁰) − Δ_f(x¹)): with every l_f = +1 it is Diffusion-DPO's logit exactly. Only the paper's
description was read (no code): the segment length and the β convention are parameters of the data and
of this class; a segment labelled 0 contributes nothing.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from mmpo.losses.base import LossOutput, PreferenceLoss, ResponseStats, check_positive

__all__ = ["DenseDPOLoss", "dense_dpo_loss"]


def dense_dpo_loss(segment_logratios: Tensor, segment_labels: Tensor, beta: float) -> Tensor:
    """Per-pair DenseDPO loss.

    Args:
        segment_logratios: (B, 2, S) Δ_f = logp_θ,f − logp_ref,f of response 0 and response 1 per segment.
        segment_labels: (B, S) l_f: 1 where response 0 is preferred on segment f, −1 where response 1 is, 0 neither.
        beta: temperature β > 0.

    Returns:
        (B,) −log σ(β Σ_f l_f (Δ_f(0) − Δ_f(1))).
    """
    margin = segment_logratios[:, 0] - segment_logratios[:, 1]  # (B, S)
    return -F.logsigmoid(beta * (segment_labels.to(margin.dtype) * margin).sum(-1))


class DenseDPOLoss(PreferenceLoss):
    """DenseDPO on per-segment statistics (``token_logps`` (B, 2, S)) and ``segment_labels`` (B, S).

    Needs a backbone that reports per-segment statistics (``DiffusionBackbone(segments=S)``) and data with
    ``segment_labels``. Rewards are β · (summed) log-ratio per response, as Diffusion-DPO's, so the logged
    reward accuracy reads the pair's overall preference.

    Args:
        beta: temperature β > 0 (mmpo's convention, no 0.5 factor: see docs/diffusion.md).
    """

    requires_reference = True
    # the per-segment statistics come from the diffusion backbone's ``segments``, not from token log-probs a
    # language backbone would keep for this flag: forward checks them with a message that says so
    requires_token_logps = False

    def __init__(self, beta: float = 500.0) -> None:
        check_positive("beta", beta)
        self.beta = beta

    def forward(self, policy: ResponseStats, reference: ResponseStats | None) -> LossOutput:
        if policy.segment_labels is None:
            raise ValueError(
                "DenseDPOLoss needs segment_labels (B, S): give each record 'segment_labels' (1, 0 or -1 per "
                "temporal segment)"
            )
        if policy.token_logps is None or reference.token_logps is None:
            raise ValueError(
                "DenseDPOLoss needs per-segment statistics: set the backbone's segments (DiffusionBackbone(segments=S))"
            )
        ratios = policy.token_logps[:, :2] - reference.token_logps[:, :2]  # (B, 2, S)
        if ratios.shape[-1] != policy.segment_labels.shape[-1]:
            raise ValueError(
                f"the backbone reports {ratios.shape[-1]} segments but the records label "
                f"{policy.segment_labels.shape[-1]}"
            )
        losses = dense_dpo_loss(ratios, policy.segment_labels, self.beta)
        lc, lr = policy.chosen - reference.chosen, policy.rejected - reference.rejected
        return LossOutput.pair(losses, self.beta * lc, self.beta * lr)
