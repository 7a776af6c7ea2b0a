"""Preference losses: pure functions on per-response statistics, wrapped by small typed classes.

Select one in YAML by ``class_path`` (e.g. ``mmpo.losses.DPOLoss``) with its ``init_args``;
see docs/losses.md for the table of formulas, defaults and papers.
"""

from mmpo.losses.asymmetric import AsymmetricDPOLoss, asymmetric_dpo_loss
from mmpo.losses.base import LossOutput, PairLogps, PreferenceLoss, ResponseStats, mean_token_logps
from mmpo.losses.combined import CombinedLoss
from mmpo.losses.dense import DenseDPOLoss, dense_dpo_loss
from mmpo.losses.label_noise import LCPOLoss, lcpo_loss, lcpo_posterior
from mmpo.losses.listwise import (
    LambdaRankLoss,
    PlackettLuceLoss,
    TreePreferenceLoss,
    dcg_pair_weights,
    lambda_rank_loss,
    plackett_luce_loss,
    tree_ranking_loss,
)
from mmpo.losses.multi_instance import MultiInstanceVDPOLoss, multi_instance_vdpo_loss
from mmpo.losses.odds_ratio import ORPOLoss, log_odds, orpo_loss
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
from mmpo.losses.scored import (
    MADPOLoss,
    MODPOLoss,
    SmPOLoss,
    SoftLabelDPOLoss,
    madpo_loss,
    madpo_weights,
    modpo_loss,
    smoothed_preference,
    smpo_loss,
    soft_label_dpo_loss,
)
from mmpo.losses.stepwise import D3POLoss, d3po_loss
from mmpo.losses.token_level import SparsePOLoss, TDPOLoss, activation_masks, sparse_po_loss, tdpo_loss
from mmpo.losses.triple import TriplePreferenceLoss, triple_preference_loss
from mmpo.losses.unpaired import (
    BCOLoss,
    BCOPairLoss,
    KTOLoss,
    bco_loss,
    bco_pair_loss,
    kto_loss,
    kto_reference_point,
    unpaired_metrics,
)

__all__ = [
    "ASFTLoss",
    "AsymmetricDPOLoss",
    "BCOLoss",
    "BCOPairLoss",
    "CombinedLoss",
    "DPOLoss",
    "D3POLoss",
    "DenseDPOLoss",
    "FDPOLoss",
    "HingeLoss",
    "IPOLoss",
    "KTOLoss",
    "LCPOLoss",
    "LDDPOLoss",
    "LNDPOLoss",
    "LambdaRankLoss",
    "LossOutput",
    "MADPOLoss",
    "MODPOLoss",
    "MultiInstanceVDPOLoss",
    "ORPOLoss",
    "PairLogps",
    "PlackettLuceLoss",
    "PreferenceLoss",
    "ResponseStats",
    "RobustDPOLoss",
    "SFTLoss",
    "SimPOLoss",
    "SmPOLoss",
    "SoftLabelDPOLoss",
    "SparsePOLoss",
    "TDPOLoss",
    "TreePreferenceLoss",
    "TriplePreferenceLoss",
    "activation_masks",
    "asft_loss",
    "asymmetric_dpo_loss",
    "bco_loss",
    "bco_pair_loss",
    "dcg_pair_weights",
    "d3po_loss",
    "dense_dpo_loss",
    "dpo_loss",
    "f_divergence_link",
    "fdpo_loss",
    "hinge_loss",
    "ipo_loss",
    "kto_loss",
    "kto_reference_point",
    "lambda_rank_loss",
    "lcpo_loss",
    "lcpo_posterior",
    "length_desensitized_logps",
    "ln_dpo_loss",
    "log_odds",
    "madpo_loss",
    "madpo_weights",
    "mean_token_logps",
    "modpo_loss",
    "multi_instance_vdpo_loss",
    "orpo_loss",
    "plackett_luce_loss",
    "robust_dpo_loss",
    "sft_loss",
    "simpo_loss",
    "smoothed_preference",
    "smpo_loss",
    "soft_label_dpo_loss",
    "sparse_po_loss",
    "tdpo_loss",
    "tree_ranking_loss",
    "triple_preference_loss",
    "unpaired_metrics",
]
