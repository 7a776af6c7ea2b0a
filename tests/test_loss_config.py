"""Every loss is selectable by ``class_path`` in YAML, with its arguments, and computes what it says."""

from __future__ import annotations

import pytest
import torch
from helpers.config import instantiate, loss_parser
from helpers.pairs import policy_pair, reference_pair

from mmpo.losses import (
    ASFTLoss,
    AsymmetricDPOLoss,
    CombinedLoss,
    DPOLoss,
    FDPOLoss,
    HingeLoss,
    IPOLoss,
    LambdaRankLoss,
    LDDPOLoss,
    LNDPOLoss,
    MADPOLoss,
    MODPOLoss,
    ORPOLoss,
    RobustDPOLoss,
    SFTLoss,
    SimPOLoss,
    SoftLabelDPOLoss,
    TreePreferenceLoss,
    TriplePreferenceLoss,
)


@pytest.mark.parametrize(
    ("cls", "init_args"),
    [
        (DPOLoss, {"beta": 0.2, "label_smoothing": 0.1}),
        (RobustDPOLoss, {"beta": 0.3, "label_smoothing": 0.2}),
        (IPOLoss, {"beta": 0.5}),
        (HingeLoss, {"beta": 0.7}),
        (SimPOLoss, {"beta": 2.5, "gamma": 1.25}),
        (FDPOLoss, {"beta": 0.1, "divergence": "alpha", "alpha": 0.3}),
        (ASFTLoss, {"beta": 1.0, "lam": 0.5}),
        (LDDPOLoss, {"beta": 0.1, "alpha": 0.25}),
        (LNDPOLoss, {"beta": 0.05}),
        (SFTLoss, {}),
        (LambdaRankLoss, {"beta": 0.2, "positions": "data", "normalize": True}),
        (TreePreferenceLoss, {"beta": 0.3, "length_normalize": False}),
        (TriplePreferenceLoss, {"beta": 0.05, "alpha": 0.5, "variant": "tpo-l", "gamma": 0.25}),
        (AsymmetricDPOLoss, {"beta_chosen": 0.2, "beta_rejected": 0.04, "nll_weight": 0.5}),
        (MADPOLoss, {"beta": 0.2, "c_max": 3.0, "c_min": 0.25, "lam": 2.0, "tau": 1.5}),
        (MODPOLoss, {"beta": 0.3, "weight": 0.7}),
        (SoftLabelDPOLoss, {"beta": 0.4}),
        (ORPOLoss, {"lam": 0.2}),
    ],
    ids=lambda v: v.__name__ if isinstance(v, type) else None,
)
def test_every_loss_selectable_by_class_path(cls, init_args):
    parser = loss_parser()
    cfg = parser.parse_object({"loss": {"class_path": f"mmpo.losses.{cls.__name__}", "init_args": init_args}})
    loss = instantiate(parser, cfg).loss
    assert type(loss) is cls
    for name, value in init_args.items():
        assert getattr(loss, name) == value


def test_combined_loss_selectable_from_yaml():
    yaml_text = """
loss:
  class_path: mmpo.losses.CombinedLoss
  init_args:
    losses:
      - class_path: mmpo.losses.DPOLoss
        init_args: {beta: 0.2}
      - class_path: mmpo.losses.SFTLoss
    weights: [1.0, 0.5]
"""
    parser = loss_parser()
    cfg = parser.parse_string(yaml_text)
    loss = instantiate(parser, cfg).loss
    assert isinstance(loss, CombinedLoss) and loss.weights == [1.0, 0.5]
    assert [type(c) for c in loss.losses] == [DPOLoss, SFTLoss] and loss.losses[0].beta == 0.2
    assert loss.requires_reference
    want = DPOLoss(beta=0.2)(policy_pair(), reference_pair()).losses + 0.5 * SFTLoss()(policy_pair(), None).losses
    torch.testing.assert_close(loss(policy_pair(), reference_pair()).losses, want)
