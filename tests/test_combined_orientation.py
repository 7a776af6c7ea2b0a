"""CombinedLoss components oriented by their own preference dimension (``orient_by``), and the pair swap
beneath it: each component against the same loss on hand-swapped pairs, ties, rewards, errors, data."""

from __future__ import annotations

import json

import pytest
import torch
from helpers.config import instantiate, loss_parser
from helpers.pairs import F64, policy_pair, reference_pair, t

from mmpo.losses import CombinedLoss, DPOLoss, PairLogps, SimPOLoss, SoftLabelDPOLoss
from mmpo.losses.combined import swap_pairs


def swapped(pair: PairLogps) -> PairLogps:
    return PairLogps(pair.rejected, pair.chosen, pair.rejected_tokens, pair.chosen_tokens)


def test_swap_pairs_trades_the_two_responses_where_asked_and_keeps_the_gradient():
    logps = torch.tensor([[-1.0, -2.0], [-3.0, -4.0]], dtype=F64, requires_grad=True)
    pair = PairLogps(logps[:, 0], logps[:, 1], t(1, 2), t(3, 4)).with_side(
        scores=t(5, 6, 7, 8).view(2, 2), soft_labels=t(0.9, 0.2), weights=t(1, 2)
    )
    out = swap_pairs(pair, torch.tensor([True, False]))
    assert out.logps.tolist() == [[-2.0, -1.0], [-3.0, -4.0]]
    assert out.tokens.tolist() == [[3.0, 1.0], [2.0, 4.0]]  # chosen tokens (1, 2), rejected (3, 4)
    assert out.scores.tolist() == [[6.0, 5.0], [7.0, 8.0]]
    assert out.soft_labels.tolist() == pytest.approx([0.1, 0.2])
    assert out.weights.tolist() == [1.0, 2.0]  # per group: unchanged
    out.logps[:, 0].sum().backward()  # the first column after the swap: response 1 of pair 0, response 0 of pair 1
    assert logps.grad.tolist() == [[0.0, 1.0], [1.0, 0.0]]


def test_each_component_follows_its_own_dimension():
    # pair 0: dimension 0 agrees with the data, dimension 1 prefers the rejected response;
    # pair 1: dimension 0 prefers the rejected response, dimension 1 has no preference (tie)
    o = torch.tensor([[1.0, -1.0], [-1.0, 0.0]], dtype=F64)
    pol, ref = policy_pair().with_side(orientations=o), reference_pair()
    loss = CombinedLoss([DPOLoss(beta=0.1), DPOLoss(beta=0.5)], weights=[1.0, 2.0], orient_by=[0, 1])
    out = loss(pol, ref)
    plain0 = DPOLoss(beta=0.1)(policy_pair(), ref).losses
    swap0 = DPOLoss(beta=0.1)(swapped(policy_pair()), swapped(ref)).losses
    swap1 = DPOLoss(beta=0.5)(swapped(policy_pair()), swapped(ref)).losses
    expected = torch.stack([plain0[0] + 2.0 * swap1[0], swap0[1] + 2.0 * 0.0])
    torch.testing.assert_close(out.losses, expected, rtol=1e-12, atol=0)
    # rewards in the data's order: the source is component 0 (the first with a reference)
    torch.testing.assert_close(out.rewards, DPOLoss(beta=0.1)(policy_pair(), ref).rewards)


def test_unoriented_components_and_all_ones_equal_the_plain_combination():
    pol, ref = policy_pair(), reference_pair()
    parts = [DPOLoss(beta=0.1), SimPOLoss()]
    plain = CombinedLoss(parts)(pol, ref).losses
    ones = pol.with_side(orientations=torch.ones(2, 1, dtype=F64))
    torch.testing.assert_close(CombinedLoss(parts, orient_by=[0, None])(ones, ref).losses, plain, rtol=0, atol=0)


def test_a_swapped_soft_label_is_its_complement():
    o = torch.tensor([[-1.0], [-1.0]], dtype=F64)
    pol = policy_pair().with_side(soft_labels=t(0.8, 0.3), orientations=o)
    got = CombinedLoss([SoftLabelDPOLoss(beta=0.2)], orient_by=[0])(pol, reference_pair()).losses
    direct = swapped(policy_pair()).with_side(soft_labels=t(0.2, 0.7))
    want = SoftLabelDPOLoss(beta=0.2)(direct, swapped(reference_pair())).losses
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)


def test_a_tie_gives_no_gradient_and_a_flip_reverses_it():
    logps = torch.tensor([[-1.0, -1.0], [-1.0, -1.0], [-1.0, -1.0]], dtype=F64, requires_grad=True)
    n = torch.ones(3, dtype=F64)
    pol = PairLogps(logps[:, 0], logps[:, 1], n, n).with_side(orientations=t(1, -1, 0).view(3, 1))
    ref = PairLogps(-n, -n, n, n)
    CombinedLoss([DPOLoss()], orient_by=[0])(pol, ref).losses.sum().backward()
    g = logps.grad
    assert g[0, 0] < 0 < g[0, 1]  # descent raises response 0
    assert g[1, 0] > 0 > g[1, 1]  # flipped: descent raises response 1
    assert g[2].abs().sum() == 0


@pytest.mark.parametrize(
    ("orient_by", "side", "message"),
    [
        ([0], {}, "needs per-dimension 'orientations'"),
        ([3], {"orientations": torch.ones(2, 2, dtype=F64)}, "column 3 of orientations, which have 2"),
    ],
)
def test_orientation_errors_say_what_is_missing(orient_by, side, message):
    with pytest.raises(ValueError, match=message):
        CombinedLoss([DPOLoss()], orient_by=orient_by)(policy_pair().with_side(**side), reference_pair())


def test_bad_orient_by_settings_are_refused():
    with pytest.raises(ValueError, match="2 losses but 1 orient_by"):
        CombinedLoss([DPOLoss(), SimPOLoss()], orient_by=[0])
    with pytest.raises(ValueError, match="column indices"):
        CombinedLoss([DPOLoss()], orient_by=[-1])


def test_orient_by_selectable_from_yaml():
    text = """
loss:
  class_path: mmpo.losses.CombinedLoss
  init_args:
    losses:
      - class_path: mmpo.losses.DPOLoss
      - class_path: mmpo.losses.DPOLoss
        init_args: {beta: 0.3}
    orient_by: [0, 1]
"""
    parser = loss_parser()
    loss = instantiate(parser, parser.parse_string(text)).loss
    assert loss.orient_by == [0, 1] and loss.losses[1].beta == 0.3


def test_records_of_one_batch_with_different_dimension_counts_are_refused(world, tiny_llava, tmp_path):
    from datamodules import ImagePreferenceDataModule

    rows = [json.loads(line) for line in (world / "train.jsonl").read_text().splitlines()[:2]]
    rows[0]["orientations"], rows[1]["orientations"] = [1, -1], [1]
    path = tmp_path / "ragged.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    dm = ImagePreferenceDataModule(
        str(tiny_llava), train_file=str(path), data_root=str(world), loader={"batch_size": 2, "shuffle": False}
    )
    dm.setup("fit")
    with pytest.raises(ValueError, match="'orientations' of different lengths"):
        next(iter(dm.train_dataloader()))
