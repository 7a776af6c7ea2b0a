"""KTO, paired BCO and unpaired BCO: hand values, extremes, gradient directions, BCO's running state, and
equality with TRL 1.16's ``KTOTrainer`` and DPO ``loss_type="bco_pair"`` on the same tensors.

Unpaired statistics are groups of K = 2: response 0 the labelled completion, response 1 the mismatched KL
completion; ``desirable`` (B,) holds the labels.
"""

from __future__ import annotations

import math
import os
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from helpers.config import instantiate, loss_parser
from helpers.pairs import policy_pair, reference_pair, t

from mmpo.losses import (
    BCOLoss,
    BCOPairLoss,
    CombinedLoss,
    DPOLoss,
    KTOLoss,
    PairLogps,
    ResponseStats,
    SFTLoss,
    kto_reference_point,
)
from mmpo.module import reward_metrics

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

# Four unpaired examples: log-ratios u of the completions, u' of the KL completions (mean 0.4), labels.
U = [2.0, -1.0, 0.5, -3.0]
U_KL = [1.0, -0.2, 0.6, 0.2]
DESIRABLE = [True, False, True, False]


def unpaired(u: list[float], u_kl: list[float], desirable: list[bool], requires_grad: bool = False):
    """Policy and reference statistics whose log-ratios are ``u`` (response 0) and ``u_kl`` (response 1)."""
    ref = torch.stack([t(*[-10.0 - i for i in range(len(u))]), t(*[-20.0 - i for i in range(len(u))])], dim=1)
    logps = (ref + torch.stack([t(*u), t(*u_kl)], dim=1)).requires_grad_(requires_grad)
    tokens = torch.full_like(ref, 3.0)
    policy = ResponseStats(logps, tokens, desirable=torch.tensor(desirable))
    return policy, ResponseStats(ref, tokens)


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


# --------------------------------------------------------------------------- KTO


def test_kto_reference_point_is_the_clipped_mean_and_detached():
    x = t(1.0, -0.2, 0.6, 0.2).requires_grad_()
    z0 = kto_reference_point(x)
    assert z0.item() == pytest.approx(0.4) and not z0.requires_grad
    assert kto_reference_point(t(1.0, -3.0, 0.5)).item() == 0.0  # mean −0.5, clipped at 0


def test_kto_hand_values_weights_rewards_and_metrics():
    policy, reference = unpaired(U, U_KL, DESIRABLE)
    out = KTOLoss(beta=0.5, desirable_weight=1.0, undesirable_weight=2.0)(policy, reference)
    # λ(1 − σ(β(u − z0))) for desirable, λ(1 − σ(β(z0 − u))) for undesirable, z0 = 0.4
    expected = t(0.3100255188723875, 0.6636244556636677, 0.48750260351578967, 0.3089305301670695)
    torch.testing.assert_close(out.losses, expected)
    assert out.losses[0].item() == pytest.approx(1 - sigmoid(0.5 * 1.6))
    torch.testing.assert_close(out.rewards, 0.5 * torch.stack([t(*U), t(*U_KL)], dim=1))
    m = out.metrics
    assert m["kl"].item() == pytest.approx(0.4)
    assert m["rewards/chosen"].item() == pytest.approx(0.5 * (2.0 + 0.5) / 2)
    assert m["rewards/rejected"].item() == pytest.approx(0.5 * (-1.0 - 3.0) / 2)
    assert m["rewards/margins"].item() == pytest.approx(1.625)
    assert m["logps/chosen"].item() == pytest.approx(((-10 + 2.0) + (-12 + 0.5)) / 2)
    assert m["logps/rejected"].item() == pytest.approx(((-11 - 1.0) + (-13 - 3.0)) / 2)
    # β(u − z0) on the label's side: 0.8 > 0 yes, −(−0.7) yes, 0.05 > 0 yes, 1.7 yes
    assert m["rewards/accuracies"].item() == 1.0


def test_kto_reference_point_clips_at_zero_and_a_batch_of_one_label():
    policy, reference = unpaired([1.0, 2.0], [-5.0, -1.0], [True, True])
    out = KTOLoss(beta=1.0)(policy, reference)
    assert out.metrics["kl"].item() == 0.0
    torch.testing.assert_close(out.losses, t(1 - sigmoid(1.0), 1 - sigmoid(2.0)))
    assert out.metrics["rewards/rejected"].item() == 0.0  # no undesirable example: 0 (documented)


def test_kto_gradients_raise_desirable_lower_undesirable_and_skip_the_kl_completion():
    policy, reference = unpaired(U, U_KL, DESIRABLE, requires_grad=True)
    KTOLoss(beta=0.5)(policy, reference).losses.sum().backward()
    grad = policy.logps.grad
    assert (grad[:, 0][torch.tensor(DESIRABLE)] < 0).all()  # descending raises desirable completions
    assert (grad[:, 0][~torch.tensor(DESIRABLE)] > 0).all()  # and lowers undesirable ones
    assert (grad[:, 1] == 0).all()  # z0 is detached


@pytest.mark.parametrize("loss", [KTOLoss(), BCOLoss(), BCOPairLoss()], ids=repr)
def test_extreme_logratios_stay_finite(loss):
    policy, reference = unpaired([1e4, -1e4, 1e4, -1e4], [1e4, -1e4, 0.0, 5e3], DESIRABLE, requires_grad=True)
    out = loss(policy, reference)
    assert torch.isfinite(out.losses).all() and torch.isfinite(out.rewards).all()
    assert all(torch.isfinite(v).all() for v in out.metrics.values())
    out.losses.sum().backward()
    assert torch.isfinite(policy.logps.grad).all()


def test_unpaired_losses_need_labels_and_a_reference():
    policy, reference = unpaired(U, U_KL, DESIRABLE)
    bare = ResponseStats(policy.logps, policy.tokens)
    for loss in (KTOLoss(), BCOLoss()):
        assert loss.requires_desirable_labels and loss.requires_reference
        with pytest.raises(ValueError, match="'desirable' labels"):
            loss(bare, reference)
        with pytest.raises(ValueError, match="reference"):
            loss(policy, None)
    with pytest.raises(ValueError, match="desirable_weight"):
        KTOLoss(desirable_weight=-1.0)


def test_kto_reference_point_uses_every_ranks_kl_completions():
    # the module installs a gather over ranks; here one that adds another rank's (M,) values
    policy, reference = unpaired(U, U_KL, DESIRABLE)
    loss = KTOLoss(beta=0.5)
    calls = []
    loss.set_gather(lambda v: calls.append(v.shape) or torch.cat([v, t(3.6, 3.6, 3.6, 3.6).to(v.dtype)]))
    out = loss(policy, reference)
    assert calls == [(4,)] and loss.gathers_per_call == 1
    assert out.metrics["kl"].item() == pytest.approx((0.4 * 4 + 3.6 * 4) / 8)


def test_unpaired_metrics_replace_the_pair_figures_in_reward_metrics():
    policy, reference = unpaired(U, U_KL, DESIRABLE)
    out = KTOLoss(beta=0.5)(policy, reference)
    logged = reward_metrics(out, policy)
    assert set(logged) == set(out.metrics)  # no pair figures (margins of completion vs KL completion)
    assert logged["rewards/chosen"].item() == pytest.approx(0.625)
    paired = reward_metrics(DPOLoss()(policy_pair(), reference_pair()), policy_pair())
    assert "logps/accuracies" in paired  # pair data keeps them


def test_unpaired_losses_from_yaml_and_combined_with_sft():
    parser = loss_parser()
    for cls, args in (
        (KTOLoss, {"beta": 0.2, "desirable_weight": 1.0, "undesirable_weight": 1.33}),
        (BCOLoss, {"beta": 0.05}),
        (BCOPairLoss, {"beta": 0.3}),
    ):
        cfg = parser.parse_object({"loss": {"class_path": f"mmpo.losses.{cls.__name__}", "init_args": args}})
        loss = instantiate(parser, cfg).loss
        assert type(loss) is cls and all(getattr(loss, k) == v for k, v in args.items())
    policy, reference = unpaired(U, U_KL, DESIRABLE)
    combined = CombinedLoss([KTOLoss(beta=0.5), SFTLoss()], [1.0, 0.5])
    kto = KTOLoss(beta=0.5)(policy, reference)
    torch.testing.assert_close(
        combined(policy, reference).losses, kto.losses + 0.5 * (-policy.logps[:, 0].detach() / 3.0)
    )


# --------------------------------------------------------------------------- BCO


def test_bco_pair_hand_values_and_gradient_direction():
    chosen, rejected = t(-3.0, -5.0).requires_grad_(), t(-4.0, -2.0).requires_grad_()
    ref = reference_pair()
    out = BCOPairLoss(beta=0.5)(PairLogps(chosen, rejected, t(2, 4), t(5, 1)), ref)
    # u_w = [0.5, −1], u_l = [−1, 0.5]: −log σ(β u_w) − log σ(−β u_l)
    torch.testing.assert_close(out.losses, t(1.0500164040589504, 1.8000164040589501))
    torch.testing.assert_close(out.chosen_rewards, t(0.25, -0.5))
    out.losses.sum().backward()
    assert (chosen.grad < 0).all() and (rejected.grad > 0).all()


def test_bco_hand_values_and_running_mean_over_steps():
    loss = BCOLoss(beta=0.5)
    assert loss.stateful and loss.delta == 0.0
    policy, reference = unpaired(U, U_KL, DESIRABLE)
    out = loss(policy, reference)
    # rewards r = [1, −0.5, 0.25, −1.5] enter the mean first: δ = −0.1875
    assert out.metrics["delta"].item() == pytest.approx(-0.1875) and loss.delta == pytest.approx(-0.1875)
    torch.testing.assert_close(
        out.losses, t(0.26618983663465434, 0.5490548622706681, 0.49813454751437525, 0.2383445081104411)
    )
    policy2, reference2 = unpaired([4.0, 0.0], [0.0, 0.0], [True, False])
    loss(policy2, reference2)
    assert loss.delta == pytest.approx((1.0 - 0.5 + 0.25 - 1.5 + 2.0 + 0.0) / 6)  # the mean of all six rewards
    loss.train(False)  # evaluation: δ is used, not updated
    ev = loss(policy, reference)
    assert loss.delta == pytest.approx(1.25 / 6) and ev.metrics["delta"].item() == pytest.approx(1.25 / 6)
    assert loss.state_dict() == {"mean": pytest.approx(1.25 / 6), "count": 6}


def test_bco_running_state_round_trips_and_resumes_identically():
    policy, reference = unpaired(U, U_KL, DESIRABLE)
    policy2, reference2 = unpaired([4.0, 0.0], [0.0, 0.0], [True, False])
    first = BCOLoss(beta=0.5)
    first(policy, reference)
    saved = first.state_dict()
    resumed = BCOLoss(beta=0.5)
    resumed.load_state_dict(saved)
    a, b = first(policy2, reference2), resumed(policy2, reference2)
    torch.testing.assert_close(a.losses, b.losses)
    assert first.state_dict() == resumed.state_dict() and first.state_dict()["count"] == 6
    fresh = BCOLoss(beta=0.5)(policy2, reference2)  # without the restored state δ differs
    assert not torch.allclose(fresh.losses, a.losses)
    with pytest.raises(ValueError, match="expected"):
        resumed.load_state_dict({"mean": 0.0})


def test_bco_gradient_direction_and_running_mean_over_ranks():
    policy, reference = unpaired(U, U_KL, DESIRABLE, requires_grad=True)
    loss = BCOLoss(beta=0.5)
    loss.set_gather(lambda v: torch.cat([v, torch.zeros(4, dtype=v.dtype)]))  # another rank's rewards: zeros
    loss(policy, reference).losses.sum().backward()
    assert loss.delta == pytest.approx(-0.75 / 8)
    grad = policy.logps.grad
    desirable = torch.tensor(DESIRABLE)
    assert (grad[desirable, 0] < 0).all() and (grad[~desirable, 0] > 0).all() and (grad[:, 1] == 0).all()


def test_a_rank_without_records_moves_delta_as_the_ranks_with_records_do():
    policy, reference = unpaired(U, U_KL, DESIRABLE)
    rewards = 0.5 * torch.tensor(U, dtype=torch.float64)
    busy, idle = BCOLoss(beta=0.5), BCOLoss(beta=0.5)
    busy.set_gather(lambda v: v)  # rank 0's rewards are all there are
    idle.set_gather(lambda v: torch.cat([v, rewards]))  # rank 1 has none and receives rank 0's
    busy(policy, reference)
    idle.idle("cpu")
    assert idle.delta == pytest.approx(busy.delta) and idle.state_dict()["count"] == 4
    frozen = BCOLoss(beta=0.5).train(False)
    frozen.set_gather(lambda v: torch.cat([v, rewards]))
    frozen.idle("cpu")  # evaluation: nothing moves
    assert frozen.state_dict() == {"mean": 0.0, "count": 0}


# --------------------------------------------------------------------------- against TRL 1.16


def _fake_model(logps: torch.Tensor):
    """A model whose per-token log-probs over one completion token are ``logps`` (N,), as TRL reads them."""

    def forward(**kwargs):
        n = kwargs["input_ids"].shape[0]
        zeros = torch.zeros(n, 1)
        return SimpleNamespace(log_probs=logps[:n, None], entropy=zeros, mean_logits=zeros, is_top1=zeros.bool())

    return forward


def _trl_stub(**attrs) -> SimpleNamespace:
    accelerator = SimpleNamespace(device="cpu", gather_for_metrics=lambda x: x, gather=lambda x: x)
    return SimpleNamespace(
        model=SimpleNamespace(training=True),
        accelerator=accelerator,
        aux_loss_enabled=False,
        precompute_ref_logps=True,
        _metrics=defaultdict(lambda: defaultdict(list)),
        _total_train_tokens=0,
        _tp_size=1,
        **attrs,
    )


def _one_token_batch(n: int) -> dict[str, torch.Tensor]:
    return {
        "input_ids": torch.ones(n, 2, dtype=torch.long),
        "attention_mask": torch.ones(n, 2, dtype=torch.long),
        "completion_mask": torch.tensor([[0, 1]] * n),
    }


@pytest.mark.parametrize(
    ("beta", "weights", "kl_shift"), [(0.1, (1.0, 1.0), 2.0), (0.5, (1.0, 2.0), 2.0), (0.1, (1.0, 1.0), -5.0)]
)
def test_kto_matches_trl_kto_trainer(beta, weights, kl_shift):
    """``KTOLoss`` equals TRL's ``KTOTrainer._compute_loss`` (loss, rewards, logps, kl) on the same log-probs."""
    kto = pytest.importorskip("trl.trainer.kto_trainer")
    gen = torch.Generator().manual_seed(0)
    b = 6
    policy_logps = -torch.rand(b, 2, generator=gen, dtype=torch.float64) * 20
    ref_logps = policy_logps + torch.randn(b, 2, generator=gen, dtype=torch.float64) * 3
    ref_logps[:, 1] -= kl_shift  # the mean KL log-ratio is about kl_shift: z0 > 0, or clipped at 0 below
    desirable = torch.tensor([True, False, False, True, True, False])
    stub = _trl_stub(
        beta=beta,
        loss_type="kto",
        calculate_KL=True,
        desirable_weight=weights[0],
        undesirable_weight=weights[1],
        _compute_kl_logps=lambda model, batch: policy_logps[:, 1],
    )
    batch = {**_one_token_batch(b), "label": desirable, "ref_logps": ref_logps[:, 0], "ref_KL_logps": ref_logps[:, 1]}
    trl_loss = kto.KTOTrainer._compute_loss(stub, _fake_model(policy_logps[:, 0]), batch, return_outputs=False)
    trl = {k: v[-1] for k, v in stub._metrics["train"].items()}

    policy = ResponseStats(policy_logps, torch.ones(b, 2), desirable=desirable)
    out = KTOLoss(beta, *weights)(policy, ResponseStats(ref_logps, torch.ones(b, 2)))
    torch.testing.assert_close(out.losses.mean(), trl_loss)
    assert out.metrics["kl"].item() == pytest.approx(trl["kl"])
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected"):
        assert out.metrics[name].item() == pytest.approx(trl[name]), name
    assert (trl["kl"] > 0) == (kl_shift > 0)  # both cases: z0 = the mean, and z0 clipped at 0


def test_bco_pair_matches_trl_dpo_bco_pair():
    """``BCOPairLoss`` equals TRL's DPO ``loss_type="bco_pair"`` (``DPOTrainer._compute_loss``)."""
    dpo = pytest.importorskip("trl.trainer.dpo_trainer")
    gen = torch.Generator().manual_seed(1)
    b, beta = 5, 0.3
    chosen, rejected = -torch.rand(b, generator=gen) * 30, -torch.rand(b, generator=gen) * 30
    ref_c, ref_r = chosen + torch.randn(b, generator=gen) * 4, rejected + torch.randn(b, generator=gen) * 4
    stub = _trl_stub(
        beta=beta,
        loss_types=["bco_pair"],
        loss_weights=[1.0],
        ld_alpha=None,
        f_divergence_type="reverse_kl",
        label_smoothing=0.0,
        use_weighting=False,
    )
    inputs = {**_one_token_batch(2 * b), "ref_chosen_logps": ref_c, "ref_rejected_logps": ref_r}
    trl_loss = dpo.DPOTrainer._compute_loss(stub, _fake_model(torch.cat([chosen, rejected])), inputs, False)
    trl = {k: v[-1] for k, v in stub._metrics["train"].items()}
    n = torch.ones(b)
    out = BCOPairLoss(beta)(PairLogps(chosen, rejected, n, n), PairLogps(ref_c, ref_r, n, n))
    torch.testing.assert_close(out.losses.mean(), trl_loss)
    assert out.chosen_rewards.mean().item() == pytest.approx(trl["rewards/chosen"], rel=1e-5)
    assert out.rejected_rewards.mean().item() == pytest.approx(trl["rewards/rejected"], rel=1e-5)
