"""LCPO (label-noise EM over DPO / SimPO margins) and the stateful-loss protocol it uses: hand values,
η's update in training steps only, stability, gradients, the reduction over ranks, checkpoints, YAML."""

from __future__ import annotations

import math

import pytest
import torch
from helpers.config import instantiate, loss_parser
from helpers.pairs import CT, F64, LC, LR, RT, policy_pair, reference_pair

from mmpo.losses import CombinedLoss, DPOLoss, LCPOLoss, PairLogps, SFTLoss, SimPOLoss, lcpo_posterior
from mmpo.rank_gather import gather_variable


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def hand_lcpo(h: float, eta: float) -> tuple[float, float]:
    """(loss, posterior) of one pair from the EM equations written out."""
    p = sigmoid(h)
    w = p * eta / (p * eta + (1 - p) * (1 - eta))
    return -(w * math.log(sigmoid(h)) + (1 - w) * math.log(sigmoid(-h))), w


def test_dpo_based_values_and_eta_update_follow_the_em_equations():
    beta, eta0, rate = 0.1, 0.8, 0.25
    loss = LCPOLoss(beta=beta, eta_init=eta0, eta_rate=rate)
    out = loss(policy_pair(), reference_pair())
    margins = [beta * (c - r) for c, r in zip(LC, LR, strict=True)]  # β·Δ = [0.15, −0.15]
    expected = [hand_lcpo(h, eta0) for h in margins]
    assert out.losses.tolist() == pytest.approx([e[0] for e in expected], rel=1e-12)
    assert float(out.metrics["lcpo/eta"]) == pytest.approx(eta0)  # the η this step used
    mean_w = sum(e[1] for e in expected) / 2
    assert out.metrics["lcpo/posterior"].item() == pytest.approx(mean_w, rel=1e-12)
    assert loss.eta == pytest.approx((1 - rate) * eta0 + rate * mean_w, rel=1e-12)
    torch.testing.assert_close(out.rewards, beta * torch.tensor([LC, LR], dtype=F64).t())


def test_eta_moves_only_in_training_steps():
    loss = LCPOLoss(eta_init=0.9, eta_rate=0.5)
    loss.train(False)
    loss(policy_pair(), reference_pair())
    assert loss.eta == 0.9
    loss.train(True)
    loss(policy_pair(), reference_pair())
    assert loss.eta != 0.9


def test_confident_labels_reduce_to_dpo_and_simpo():
    pol, ref = policy_pair(), reference_pair()
    near_one = 1 - 1e-12  # w = σ(h + logit η) ≈ 1 for these small margins
    lcpo = LCPOLoss(beta=0.1, eta_init=near_one, eta_rate=0.0)(pol, ref).losses
    torch.testing.assert_close(lcpo, DPOLoss(beta=0.1)(pol, ref).losses, rtol=1e-9, atol=1e-9)
    simpo = LCPOLoss(base="simpo", beta=2.0, gamma=0.5, eta_init=near_one, eta_rate=0.0)(pol, None).losses
    torch.testing.assert_close(simpo, SimPOLoss(beta=2.0, gamma=0.5)(pol, None).losses, rtol=1e-9, atol=1e-9)


def test_simpo_base_uses_mean_token_logps_and_needs_no_reference():
    loss = LCPOLoss(base="simpo", beta=2.0, gamma=0.5, eta_init=0.7, eta_rate=0.0)
    assert not loss.requires_reference and LCPOLoss().requires_reference
    out = loss(policy_pair(), None)
    pc, pr = [-3.0, -5.0], [-4.0, -2.0]
    margins = [2.0 * (c / nc - r / nr) - 0.5 for c, r, nc, nr in zip(pc, pr, CT, RT, strict=True)]
    assert out.losses.tolist() == pytest.approx([hand_lcpo(h, 0.7)[0] for h in margins], rel=1e-12)


def test_doubtful_pairs_pull_less_and_a_wrong_looking_label_pushes_back():
    """A pair the model strongly disagrees with gets w ≈ 0 and its gradient flips sign (towards the
    model's own preference); with η ≈ 1 the same pair is pulled towards its label as in DPO."""
    logps = torch.tensor([[-1.0, -1.0]], dtype=F64, requires_grad=True)
    ref = PairLogps(torch.tensor([-1.0], dtype=F64) + 30.0, torch.tensor([-1.0], dtype=F64), *[torch.ones(1)] * 2)
    pol = PairLogps(logps[:, 0], logps[:, 1], torch.ones(1), torch.ones(1))  # h = β(−30) = −3: disagreement
    doubtful = LCPOLoss(beta=0.1, eta_init=0.5, eta_rate=0.0)(pol, ref).losses.sum()
    (grad,) = torch.autograd.grad(doubtful, logps)
    assert grad[0, 0] > 0 and grad[0, 1] < 0  # descent lowers the labelled-chosen response: the label is doubted
    pol = PairLogps(logps[:, 0], logps[:, 1], torch.ones(1), torch.ones(1))
    trusting = LCPOLoss(beta=0.1, eta_init=1 - 1e-9, eta_rate=0.0)(pol, ref).losses.sum()
    (grad,) = torch.autograd.grad(trusting, logps)
    assert grad[0, 0] < 0 and grad[0, 1] > 0


def test_extreme_log_ratios_stay_finite():
    big = torch.tensor([1e4, -1e4], dtype=F64, requires_grad=True)
    zero = torch.zeros(2, dtype=F64)
    pol = PairLogps(big, -big, torch.ones(2), torch.ones(2))
    out = LCPOLoss(beta=1.0, eta_init=0.9)(pol, PairLogps(zero, zero, torch.ones(2), torch.ones(2)))
    assert torch.isfinite(out.losses).all()
    out.losses.sum().backward()
    assert torch.isfinite(big.grad).all()
    assert lcpo_posterior(torch.tensor([1e4, -1e4]), 0.9).tolist() == [1.0, 0.0]


def test_eta_is_reduced_over_ranks_with_the_gather_hook():
    loss = LCPOLoss(beta=0.1, eta_init=0.9, eta_rate=1.0)  # rate 1: η becomes the mean posterior of everyone
    other_rank = torch.tensor([0.0, 0.0, 0.0], dtype=F64)
    loss.set_gather(lambda v: torch.cat([v, other_rank]))
    out = loss(policy_pair(), reference_pair())
    assert loss.eta == pytest.approx(out.metrics["lcpo/posterior"].item() * 2 / 5, rel=1e-12)


def test_gather_variable_concatenates_ranks_of_different_lengths():
    ranks = [torch.tensor([1.0, 2.0, 3.0], dtype=F64), torch.tensor([]), torch.tensor([4.0])]

    def simulated(rank: int):
        calls = iter(range(2))

        def all_gather(t: torch.Tensor) -> torch.Tensor:
            if next(calls) == 0:  # the lengths
                return torch.tensor([[len(r)] for r in ranks])
            n = t.shape[0]
            return torch.stack([torch.cat([r, r.new_zeros(n - len(r))]) for r in ranks])

        return gather_variable(ranks[rank], all_gather)

    for rank in range(3):
        got = simulated(rank)
        assert got.tolist() == [1.0, 2.0, 3.0, 4.0] and got.dtype == ranks[rank].dtype


def test_state_round_trips_alone_and_inside_combined_loss():
    loss = LCPOLoss(eta_init=0.9, eta_rate=0.5)
    loss(policy_pair(), reference_pair())
    state = loss.state_dict()
    fresh = LCPOLoss(eta_init=0.9, eta_rate=0.5)
    fresh.load_state_dict(state)
    assert fresh.eta == loss.eta != 0.9
    combined = CombinedLoss([SFTLoss(), LCPOLoss(eta_rate=0.5)])
    assert combined.stateful and combined.gathers_per_call == 1 and not CombinedLoss([SFTLoss()]).stateful
    combined.train(False)
    assert all(not c.training for c in combined.losses)
    combined.load_state_dict({"1": state})
    assert combined.state_dict() == {"1": state}
    with pytest.raises(ValueError, match="expected"):
        combined.load_state_dict({"0": state})
    with pytest.raises(ValueError, match="keeps no state"):
        DPOLoss().load_state_dict({"eta": 0.5})


@pytest.mark.parametrize("bad", [{"eta_init": 1.0}, {"eta_init": 0.0}, {"eta_rate": 1.5}, {"base": "ipo"}])
def test_bad_settings_are_refused(bad):
    with pytest.raises(ValueError):
        LCPOLoss(**bad)


def test_selectable_from_yaml():
    parser = loss_parser()
    args = {"base": "simpo", "beta": 2.0, "gamma": 0.3, "eta_init": 0.8, "eta_rate": 0.05}
    cfg = parser.parse_object({"loss": {"class_path": "mmpo.losses.LCPOLoss", "init_args": args}})
    loss = instantiate(parser, cfg).loss
    assert isinstance(loss, LCPOLoss) and loss.eta == 0.8 and loss.gamma == 0.3


def test_module_checkpoints_and_restores_the_running_state(tiny_llava, first_batch):
    from mmpo.backbones import LoraSettings, VisionLanguageBackbone
    from mmpo.module import LOSS_STATE_KEY, PreferenceModule

    def module():
        m = PreferenceModule(VisionLanguageBackbone(str(tiny_llava), lora=LoraSettings(r=4)), LCPOLoss(eta_rate=0.5))
        m.configure_model()
        return m

    trained = module()
    trained._step(first_batch, "train")
    eta_after_training = trained.loss.eta
    trained._step(first_batch, "val")  # evaluation leaves η alone
    assert trained.loss.eta == eta_after_training != 0.9
    ckpt = {"state_dict": trained.state_dict()}
    trained.on_save_checkpoint(ckpt)
    assert ckpt[LOSS_STATE_KEY] == {"eta": eta_after_training}
    resumed = module()
    resumed.on_load_checkpoint(ckpt)
    assert resumed.loss.eta == eta_after_training
    old = {"state_dict": {}}
    with pytest.warns(UserWarning, match="no running state for LCPOLoss"):
        module().on_load_checkpoint(old)
