"""Preference losses: pure functions on per-response statistics, wrapped by small typed classes.

Select one in YAML by ``class_path`` (e.g. ``mmpo.losses.DPOLoss``) with its ``init_args``;
see docs/losses.md for the table of formulas, defaults and papers.
"""

from mmpo.losses.base import LossOutput, PairLogps, PreferenceLoss, ResponseStats, mean_token_logps
from mmpo.losses.combined import CombinedLoss
from mmpo.losses.listwise import PlackettLuceLoss, plackett_luce_loss
from mmpo.losses.pairwise import (
    DPOLoss,
    FDPOLoss,
    HingeLoss,
    IPOLoss,
    LDDPOLoss,
    LNDPOLoss,
    RobustDPOLoss,
    dpo_loss,
    f_divergence_link,
    fdpo_loss,
    hinge_loss,
    ipo_loss,
    length_desensitized_logps,
    ln_dpo_loss,
    robust_dpo_loss,
)
from mmpo.losses.reference_free import ASFTLoss, SFTLoss, SimPOLoss, asft_loss, sft_loss, simpo_loss

__all__ = [
    "ASFTLoss",
    "CombinedLoss",
    "DPOLoss",
    "FDPOLoss",
    "HingeLoss",
    "IPOLoss",
    "LDDPOLoss",
    "LNDPOLoss",
    "LossOutput",
    "PairLogps",
    "PlackettLuceLoss",
    "ResponseStats",
    "PreferenceLoss",
    "RobustDPOLoss",
    "SFTLoss",
    "SimPOLoss",
    "asft_loss",
    "dpo_loss",
    "f_divergence_link",
    "fdpo_loss",
    "hinge_loss",
    "ipo_loss",
    "length_desensitized_logps",
    "ln_dpo_loss",
    "plackett_luce_loss",
    "mean_token_logps",
    "robust_dpo_loss",
    "sft_loss",
    "simpo_loss",
]
