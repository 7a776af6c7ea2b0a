"""Token-level pair losses with a per-token KL over the full vocabulary: TDPO1/TDPO2 and SparsePO.

Notation: for response y, logratio_t = log πθ(y_t|x,y<t) − log π_ref(y_t|x,y<t),
KL_t = KL(π_ref(·|x,y<t) ‖ πθ(·|x,y<t)) summed over the vocabulary, and SeqKL(y) = Σ_t KL_t. The KL comes
from both models' hidden states (``mmpo.token_kl``), so these losses set ``requires_token_kl`` and
cannot train on cached reference log-probs. Rewards follow TRL's convention, β · (summed log-ratio); the
official TDPO and SparsePO code log β · (log-ratio ± KL) instead, which the ``kl/*`` metrics allow to
rebuild.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from mmpo.divergence import compute_dtype
from mmpo.losses.base import LossOutput, PreferenceLoss, ResponseStats, check_positive

__all__ = ["SparsePOLoss", "TDPOLoss", "activation_masks", "sparse_po_loss", "tdpo_loss"]

TDPOVariant = Literal["tdpo1", "tdpo2"]


def tdpo_loss(
    logratio_chosen: Tensor,
    logratio_rejected: Tensor,
    seq_kl_chosen: Tensor,
    seq_kl_rejected: Tensor,
    beta: float,
    alpha: float = 0.5,
    variant: TDPOVariant = "tdpo2",
) -> Tensor:
    """TDPO: DPO with the difference of the responses' sequential forward KL in the margin.

    Zeng, Liu, Ma, Yang, Zhang, Wang, "Token-level Direct Preference Optimization" (ICML 2024,
    arXiv:2404.11999): the TDPO1 and TDPO2 objectives as the official code's ``tdpo_loss`` computes them
    (the paper's equation numbers were not checked), with u = βΔ:

    - TDPO1: ``−log σ(β[Δ − (SeqKL_l − SeqKL_w)])``
    - TDPO2: ``−log σ(β[Δ − α(SeqKL_l − sg[SeqKL_w])])``: the chosen response's KL enters as a constant
      (stop-gradient), so the KL term lowers the rejected response's KL and never raises the chosen one's
      (TDPO1's term rewards a larger SeqKL_w).

    The official code's ``softmax().log()`` for the reference can give NaN; the KL here comes from
    log-softmax (``mmpo.token_kl``).

    Args:
        logratio_chosen: (B,) summed policy − reference log-probs of the chosen responses.
        logratio_rejected: (B,) the same for the rejected responses.
        seq_kl_chosen: (B,) SeqKL of the chosen responses (KL(π_ref ‖ πθ) summed over their tokens).
        seq_kl_rejected: (B,) the same for the rejected responses.
        beta: temperature β > 0.
        alpha: α ≥ 0, the weight of the KL term in TDPO2 (not read by TDPO1).
        variant: ``tdpo1`` or ``tdpo2``.

    Returns:
        (B,) per-example loss, finite for any finite inputs.
    """
    if variant == "tdpo1":
        kl_margin = seq_kl_rejected - seq_kl_chosen
    elif variant == "tdpo2":
        kl_margin = alpha * (seq_kl_rejected - seq_kl_chosen.detach())
    else:
        raise ValueError(f"variant must be 'tdpo1' or 'tdpo2', got {variant!r}")
    return -F.logsigmoid(beta * (logratio_chosen - logratio_rejected - kl_margin))


def sparse_po_loss(
    token_logratios: Tensor,
    token_kl: Tensor,
    reward_masks: Tensor,
    kl_masks: Tensor,
    beta: float,
    l1_reward: float = 0.0,
    l1_kl: float = 0.0,
) -> Tensor:
    """SparsePO: DPO on mask-weighted token log-ratios and mask-weighted token KL.

    Christopoulou et al., "SparsePO: Controlling Preference Alignment of LLMs via Sparse Token Masks"
    (2024, arXiv:2410.05102), the objective as the official code computes it: u = Σ_t m_u(t)·logratio_t,
    d = Σ_t m_d(t)·k_t with k_t = −KL_t, and ``−log σ(β[(u_w − u_l) − (d_w − d_l)]) + λ_u‖m_u‖₁ + λ_d‖m_d‖₁``
    (the L1 norms of both responses' masks). With masks of ones this is TDPO1.

    Args:
        token_logratios: (B, 2, T) per-token log-ratios of the chosen (0) and rejected (1) responses, 0
            outside the responses.
        token_kl: (B, 2, T) per-token KL(π_ref ‖ πθ), 0 outside the responses.
        reward_masks: (B, 2, T) m_u, 0 outside the responses.
        kl_masks: (B, 2, T) m_d, 0 outside the responses.
        beta: temperature β > 0.
        l1_reward: λ_u ≥ 0 (matters for learned masks only: a constant for masks without a gradient).
        l1_kl: λ_d ≥ 0 (likewise).

    Returns:
        (B,) per-example loss.
    """
    u = (reward_masks * token_logratios).sum(-1)  # (B, 2)
    d = -(kl_masks * token_kl).sum(-1)  # (B, 2)
    loss = -F.logsigmoid(beta * ((u[:, 0] - u[:, 1]) - (d[:, 0] - d[:, 1])))
    if l1_reward:
        loss = loss + l1_reward * reward_masks.abs().sum((-2, -1))
    if l1_kl:
        loss = loss + l1_kl * kl_masks.abs().sum((-2, -1))
    return loss


def activation_masks(activation: Tensor, mask: Tensor) -> Tensor:
    """SparsePO's activation-based token weights in [0, 1] from one activation value per token.

    The official code z-normalises the per-token mean activation over each response's tokens and then
    rescales it min–max to [0, 1]. A min–max rescaling undoes any affine map, so that equals min–max of
    the raw values, which is what is computed here (no std, no float16 round trip). A response whose
    values are all equal (one token, for one) has no spread to rescale: its tokens get weight 1 (the
    official code divides 0 by 0 there).

    Args:
        activation: (..., T) one value per token (``ResponseStats.token_activation``).
        mask: (..., T) bool or 0/1, true on the response tokens.

    Returns:
        (..., T) weights in [0, 1], 0 outside the responses; detached.
    """
    valid = mask.bool()
    a = activation.detach().to(compute_dtype(activation))  # float32 (float64 stays float64)
    low = a.masked_fill(~valid, float("inf")).amin(-1, keepdim=True)
    high = a.masked_fill(~valid, float("-inf")).amax(-1, keepdim=True)
    spread = high - low
    flat = ~(spread > 0)  # all equal, or no token at all (inf − inf)
    scaled = (a - low.masked_fill(flat, 0.0)) / spread.masked_fill(flat, 1.0)
    scaled = torch.where(flat, torch.ones_like(a), scaled)
    return (scaled * valid).to(activation.dtype)


def _token_fields(stats: ResponseStats, name: str) -> tuple[Tensor, Tensor]:
    if stats.token_logps is None or stats.mask is None:
        raise ValueError(f"{name} needs per-token log-probs and masks on both statistics")
    return stats.token_logps[:, :2], stats.mask[:, :2]


class TDPOLoss(PreferenceLoss):
    """TDPO1 / TDPO2 (Zeng et al., 2024), see :func:`tdpo_loss`. Official defaults: α = 0.5, β = 0.1.

    Needs a reference model it can run (``adapter``, ``copy`` or a separate checkpoint): the per-token KL
    is computed each step from both models' hidden states over the full vocabulary, ``kl_chunk_size``
    response positions at a time (``mmpo.token_kl``). Logs ``kl/chosen`` and ``kl/rejected`` (SeqKL).

    Args:
        beta: temperature β > 0.
        alpha: α ≥ 0, TDPO2's weight of the KL term.
        variant: ``tdpo2`` (the paper's recommended one) or ``tdpo1``.
        kl_chunk_size: response positions projected through both heads at once (memory, not maths).
    """

    requires_token_kl = True

    def __init__(
        self, beta: float = 0.1, alpha: float = 0.5, variant: TDPOVariant = "tdpo2", kl_chunk_size: int = 128
    ) -> None:
        check_positive("beta", beta)
        if not (alpha >= 0 and alpha != float("inf")):
            raise ValueError(f"alpha must be a finite number >= 0, got {alpha!r}")
        if variant not in ("tdpo1", "tdpo2"):
            raise ValueError(f"variant must be 'tdpo1' or 'tdpo2', got {variant!r}")
        if kl_chunk_size < 1:
            raise ValueError(f"kl_chunk_size must be >= 1, got {kl_chunk_size}")
        self.beta, self.alpha, self.variant, self.kl_chunk_size = beta, alpha, variant, kl_chunk_size

    def forward(self, policy: ResponseStats, reference: ResponseStats | None) -> LossOutput:
        ratio = policy.logps - reference.logps  # (B, 2)
        seq_kl = policy.token_kl[:, :2].sum(-1)  # (B, 2): masked positions hold 0
        losses = tdpo_loss(
            ratio[:, 0], ratio[:, 1], seq_kl[:, 0], seq_kl[:, 1], self.beta, self.alpha, self.variant
        )  # fmt: skip
        rewards = self.beta * ratio
        return LossOutput.pair(
            losses, rewards[:, 0], rewards[:, 1], **{"kl/chosen": seq_kl[:, 0], "kl/rejected": seq_kl[:, 1]}
        )


class SparsePOLoss(PreferenceLoss):
    """SparsePO (Christopoulou et al., 2024) with activation or learned masks, see :func:`sparse_po_loss`.

    ``masks="activation"``: the official "activation" kind (MaPO in its code) read from what the backbone
    exposes: for each response token, the mean over the hidden axis of the reference's *final* hidden
    state at the position that predicts it (``ResponseStats.token_activation``), rescaled min–max to
    [0, 1] over the response (:func:`activation_masks`). The official code averages the same mapping
    over every layer's MLP, attention and residual activations and the logits; using the last hidden
    state alone is this implementation's reading. One mask serves reward and KL, without a gradient, so
    the L1 penalties would be constants: they must be 0 here.

    ``masks="learned"``: the masks come from a small network over the reference's per-layer hidden
    states (``mmpo.token_masks.TokenMaskNetwork``, the official ``simple_all`` model), which the training
    module builds and trains with the policy (it is in the optimizer and the checkpoints); the loss reads
    them from ``ResponseStats.token_masks`` and adds λ_u‖m_u‖₁ + λ_d‖m_d‖₁. With one common mask on both
    terms (the official default) each λ is halved, as the official code does, so the common mask is not
    penalised twice.

    Args:
        beta: temperature β > 0 (official default 0.1).
        mask_reward: weight the log-ratios by the mask (else every token weighs 1).
        mask_kl: weight the KL by the mask (else every token weighs 1; with neither, this is TDPO1).
        kl_chunk_size: response positions projected through both heads at once (memory, not maths).
        masks: ``activation`` or ``learned``.
        l1_reward: λ_u ≥ 0, the L1 weight of the learned reward mask (summed over both responses' tokens;
            official default 0).
        l1_kl: λ_d ≥ 0, likewise for the KL mask.
        independent_masks: learned masks only: one network for the reward mask and one for the KL mask
            (official ``rw_kl_independent``), else one common mask (the default).
        mask_dropout: learned masks only: the network's dropout (official ``mask_dropout`` 0.01).
    """

    requires_token_kl = True
    requires_token_logps = True

    def __init__(
        self,
        beta: float = 0.1,
        mask_reward: bool = True,
        mask_kl: bool = True,
        kl_chunk_size: int = 128,
        masks: Literal["activation", "learned"] = "activation",
        l1_reward: float = 0.0,
        l1_kl: float = 0.0,
        independent_masks: bool = False,
        mask_dropout: float = 0.01,
    ) -> None:
        check_positive("beta", beta)
        if kl_chunk_size < 1:
            raise ValueError(f"kl_chunk_size must be >= 1, got {kl_chunk_size}")
        if masks not in ("activation", "learned"):
            raise ValueError(f"masks must be 'activation' or 'learned', got {masks!r}")
        for name, value in (("l1_reward", l1_reward), ("l1_kl", l1_kl)):
            if not (value >= 0 and value != float("inf")):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
            if value and masks != "learned":
                raise ValueError(
                    f"{name} penalises learned masks only (masks='learned'); activation masks are constants"
                )
        if masks == "learned" and not (mask_reward or mask_kl):
            raise ValueError("masks='learned' with mask_reward and mask_kl both off learns nothing: turn one on")
        self.beta, self.mask_reward, self.mask_kl, self.kl_chunk_size = beta, mask_reward, mask_kl, kl_chunk_size
        if not 0 <= mask_dropout < 1:
            raise ValueError(f"mask_dropout must be in [0, 1), got {mask_dropout}")
        self.masks, self.l1_reward, self.l1_kl = masks, l1_reward, l1_kl
        self.independent_masks, self.mask_dropout = independent_masks, mask_dropout

    @property
    def learned_token_masks(self) -> bool:
        """Whether the training module must build and train a token mask network for this loss."""
        return self.masks == "learned"

    def _weights(self, reference: ResponseStats, mask: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """(B, 2, T) reward and KL weights, 0 outside the responses."""
        name = type(self).__name__
        if self.masks == "learned":
            learned = reference.token_masks
            if learned is None:
                raise ValueError(
                    f"{name}(masks='learned') needs the learned token masks (token_masks on the reference statistics), "
                    "which the training module computes with its token mask network"
                )
            if learned.shape[:3] != (mask.shape[0], reference.group_size, mask.shape[-1]):
                raise ValueError(
                    f"{name}: token_masks {tuple(learned.shape)} do not fit the token layout {tuple(mask.shape)}"
                )
            learned = learned[:, :2].to(dtype) * mask[..., None].to(dtype)
            return learned[..., 0], learned[..., 1]
        if reference.token_activation is None:
            raise ValueError(f"{name} needs the reference's token_activation (mmpo.token_kl.token_kl_statistics)")
        weights = activation_masks(reference.token_activation[:, :2], mask).to(dtype)
        return weights, weights

    def forward(self, policy: ResponseStats, reference: ResponseStats | None) -> LossOutput:
        name = type(self).__name__
        pol_tokens, mask = _token_fields(policy, name)
        ref_tokens, ref_mask = _token_fields(reference, name)
        kl = policy.token_kl[:, :2]
        if not (pol_tokens.shape == ref_tokens.shape == kl.shape):
            raise ValueError(
                f"{name}: per-token policy {tuple(pol_tokens.shape)}, reference {tuple(ref_tokens.shape)} and KL "
                f"{tuple(kl.shape)} statistics must share one token layout"
            )
        valid = mask.to(pol_tokens.dtype)
        ones = valid
        if self.mask_reward or self.mask_kl:
            reward_weights, kl_weights = self._weights(reference, mask, pol_tokens.dtype)
        reward_masks = reward_weights if self.mask_reward else ones
        kl_masks = kl_weights if self.mask_kl else ones
        logratios = (pol_tokens - ref_tokens) * valid
        l1_reward = self.l1_reward if self.mask_reward else 0.0
        l1_kl = self.l1_kl if self.mask_kl else 0.0
        if self.masks == "learned" and self.mask_reward and self.mask_kl and not self.independent_masks:
            l1_reward, l1_kl = l1_reward / 2, l1_kl / 2  # one common mask, counted in both terms
        losses = sparse_po_loss(logratios, kl * valid, reward_masks, kl_masks, self.beta, l1_reward, l1_kl)
        rewards = self.beta * (reward_masks * logratios).sum(-1)  # (B, 2): β·u
        metrics = {"kl/chosen": kl[:, 0].sum(-1), "kl/rejected": kl[:, 1].sum(-1)}
        counts = valid.sum(-1).clamp(min=1.0)  # (B, 2)
        shown = {}
        if self.masks == "activation" and (self.mask_reward or self.mask_kl):
            shown["mask/mean"] = reward_weights  # one mask serves both terms
        if self.masks == "learned" and self.mask_reward:
            shown["mask/mean"] = reward_masks
        if self.masks == "learned" and self.mask_kl and (self.independent_masks or not self.mask_reward):
            shown["mask/kl_mean"] = kl_masks
        for key, weights in shown.items():
            metrics[key] = ((weights * valid).sum(-1) / counts).mean(-1)
        return LossOutput.pair(losses, rewards[:, 0], rewards[:, 1], **metrics)
