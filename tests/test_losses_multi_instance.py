"""PaMi-VDPO's multi-instance loss (MultiInstanceVDPOLoss): hand-computed values of every aggregation, M = 1
equal to DPO, gradient directions, zero-weight candidates and empty groups, stability, errors and YAML."""

from __future__ import annotations

import math

import pytest
import torch
from helpers.config import instantiate, loss_parser

from mmpo.losses import MultiInstanceVDPOLoss, ResponseStats, dpo_loss, multi_instance_vdpo_loss

F64 = torch.float64


def nls(x: float) -> float:
    """−log σ(x) in plain math."""
    return math.log1p(math.exp(-x)) if x >= 0 else -x + math.log1p(math.exp(x))


# Two groups: original clip first, then M = 3 candidate clips (same response). Log-ratios
# r = [[1.0, 0.5, −1.0, 2.0], [0.0, −0.5, 0.5, 1.0]]; with β = 0.5, z = β(r_0 − r_m):
# group 0: [0.25, 1.0, −0.5]; group 1: [0.25, −0.25, −0.5].
BETA = 0.5
POLICY = [[-4.0, -5.0, -7.0, -3.0], [-2.0, -3.0, -2.5, -1.0]]
REFERENCE = [[-5.0, -5.5, -6.0, -5.0], [-2.0, -2.5, -3.0, -2.0]]
Z = [[0.25, 1.0, -0.5], [0.25, -0.25, -0.5]]
# group 0: candidate 2 (the hardest, z = −0.5) has weight 0; group 1: every candidate down-weighted to 0.2
WEIGHTS = [[1.0, 0.5, 0.0], [0.2, 0.2, 0.2]]


def stats(policy=POLICY, reference=REFERENCE, weights=WEIGHTS, requires_grad=False):
    logps = torch.tensor(policy, dtype=F64, requires_grad=requires_grad)
    tokens = torch.full(logps.shape, 3.0, dtype=F64)
    side = None if weights is None else torch.tensor([[1.0] + w for w in weights], dtype=F64)
    return ResponseStats(logps, tokens, candidate_weights=side), ResponseStats(
        torch.tensor(reference, dtype=F64), tokens
    )


def softmin(z: list[float], a: list[float], tau: float) -> float:
    return -tau * math.log(sum(ai * math.exp(-zi / tau) for zi, ai in zip(z, a, strict=True)))


def expected(aggregate: str, normalize: bool, tau: float = 0.5) -> list[float]:
    # group 0: active candidates 0, 1 (weights 1, 0.5): relative [2/3, 1/3], scale 0.75 (1 normalised)
    # group 1: relative [1/3] * 3, scale 0.2 (1 normalised)
    s0, s1 = (1.0, 1.0) if normalize else (0.75, 0.2)
    a0, a1 = [2 / 3, 1 / 3], [1 / 3] * 3
    z0, z1 = Z[0][:2], Z[1]
    if aggregate == "mean":
        g0, g1 = (
            sum(a * nls(z) for a, z in zip(a0, z0, strict=True)),
            sum(a * nls(z) for a, z in zip(a1, z1, strict=True)),
        )
    elif aggregate == "hardest":
        g0, g1 = nls(0.25), nls(-0.5)  # group 0's z = −0.5 candidate has weight 0: not the hardest
    else:
        g0, g1 = nls(softmin(z0, a0, tau)), nls(softmin(z1, a1, tau))
    return [s0 * g0, s1 * g1]


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("aggregate", ["mean", "hardest", "softmin"])
def test_hand_computed_values(aggregate, normalize):
    loss = MultiInstanceVDPOLoss(beta=BETA, aggregate=aggregate, temperature=0.5, normalize_weights=normalize)
    out = loss(*stats())
    assert out.losses.tolist() == pytest.approx(expected(aggregate, normalize), rel=1e-12)
    # "mean" with absolute weights is Σ w·ℓ over the active candidates / their count
    if aggregate == "mean" and not normalize:
        assert out.losses[0].item() == pytest.approx((nls(0.25) + 0.5 * nls(1.0)) / 2, rel=1e-12)


def test_rewards_and_metrics():
    out = MultiInstanceVDPOLoss(beta=BETA)(*stats())
    r = torch.tensor(POLICY, dtype=F64) - torch.tensor(REFERENCE, dtype=F64)
    torch.testing.assert_close(out.rewards, BETA * r)
    # weighted rejected rewards: group 0 (2/3·0.25 + 1/3·(−0.5)), group 1 mean(−0.25, 0.25, 0.5)
    rejected = [2 / 3 * 0.25 + 1 / 3 * -0.5, (-0.25 + 0.25 + 0.5) / 3]
    assert out.metrics["weighted_rejected_reward"].item() == pytest.approx(sum(rejected) / 2, rel=1e-12)
    margins = [0.5 - rejected[0], 0.0 - rejected[1]]
    assert out.metrics["weighted_margin"].item() == pytest.approx(sum(margins) / 2, rel=1e-12)
    assert out.metrics["active_candidates"].tolist() == [2.0, 3.0]
    assert out.metrics["empty_groups"].tolist() == [0.0, 0.0]


@pytest.mark.parametrize("aggregate", ["mean", "hardest", "softmin"])
def test_one_candidate_of_weight_one_is_dpo_exactly(aggregate):
    g = torch.Generator().manual_seed(0)
    policy, reference = torch.randn(64, 2, generator=g) * 5, torch.randn(64, 2, generator=g) * 5
    n = torch.ones(64, 2)
    want = dpo_loss(policy[:, 0] - reference[:, 0], policy[:, 1] - reference[:, 1], beta=0.3)
    loss = MultiInstanceVDPOLoss(beta=0.3, aggregate=aggregate, temperature=0.7)
    for weights in (None, torch.ones(64, 2)):
        got = loss(ResponseStats(policy, n, candidate_weights=weights), ResponseStats(reference, n)).losses
        assert torch.equal(got, want)


@pytest.mark.parametrize("aggregate", ["mean", "hardest", "softmin"])
def test_gradient_directions_and_zero_weight_candidates_get_none(aggregate):
    policy, reference = stats(requires_grad=True)
    MultiInstanceVDPOLoss(beta=BETA, aggregate=aggregate)(policy, reference).losses.sum().backward()
    grad = policy.logps.grad
    assert (grad[:, 0] < 0).all()  # raising the original clip's log-prob lowers the loss
    assert grad[0, 3] == 0.0  # group 0's candidate of weight 0
    active = grad[:, 1:][torch.tensor(WEIGHTS) > 0]
    if aggregate == "hardest":  # only the hardest active candidate is pushed down
        assert grad[0, 1] > 0 and grad[0, 2] == 0 and grad[1, 3] > 0 and (grad[1, 1:3] == 0).all()
    else:
        assert (active > 0).all()  # raising a candidate clip's log-prob raises the loss
    # a gradient step on the policy lowers the loss
    loss = MultiInstanceVDPOLoss(beta=BETA, aggregate=aggregate)
    before = loss(*stats()).losses.sum()
    stepped = (torch.tensor(POLICY, dtype=F64) - 0.1 * grad).tolist()
    assert loss(*stats(policy=stepped)).losses.sum() < before


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("aggregate", ["mean", "hardest", "softmin"])
def test_zero_weight_candidates_change_nothing(aggregate, normalize):
    loss = MultiInstanceVDPOLoss(beta=BETA, aggregate=aggregate, temperature=0.5, normalize_weights=normalize)
    base = loss(*stats()).losses
    # a fourth candidate of weight 0 with an extreme log-ratio (it would be the hardest by far)
    policy = [row + [50.0] for row in POLICY]
    reference = [row + [-50.0] for row in REFERENCE]
    weights = [row + [0.0] for row in WEIGHTS]
    p, r = stats(policy, reference, weights, requires_grad=True)
    out = loss(p, r).losses
    torch.testing.assert_close(out, base, rtol=0, atol=0)
    out.sum().backward()
    assert (p.logps.grad[:, 4] == 0).all()


@pytest.mark.parametrize("aggregate", ["mean", "hardest", "softmin"])
def test_group_without_a_positive_weight_gives_zero_loss_and_gradient(aggregate):
    weights = [WEIGHTS[0], [0.0, 0.0, 0.0]]
    p, r = stats(weights=weights, requires_grad=True)
    out = MultiInstanceVDPOLoss(beta=BETA, aggregate=aggregate, temperature=0.5)(p, r)
    assert out.losses[1].item() == 0.0
    assert out.losses[0].item() == pytest.approx(expected(aggregate, False)[0], rel=1e-12)  # the other is unchanged
    out.losses.sum().backward()
    assert torch.isfinite(p.logps.grad).all() and (p.logps.grad[1] == 0).all()
    assert out.metrics["empty_groups"].tolist() == [0.0, 1.0]
    assert out.metrics["active_candidates"].tolist() == [2.0, 0.0]
    # the weighted reward metrics average over the non-empty group only
    assert out.metrics["weighted_rejected_reward"].item() == pytest.approx(2 / 3 * 0.25 + 1 / 3 * -0.5, rel=1e-12)
    # every group empty: zero loss, finite metrics
    none = MultiInstanceVDPOLoss(beta=BETA, aggregate=aggregate)(*stats(weights=[[0.0] * 3] * 2))
    assert none.losses.tolist() == [0.0, 0.0] and none.metrics["weighted_margin"].item() == 0.0


def test_softmin_tends_to_hardest_and_to_the_weighted_mean_of_z():
    logratios = torch.tensor(POLICY, dtype=F64) - torch.tensor(REFERENCE, dtype=F64)
    w = torch.tensor(WEIGHTS, dtype=F64)
    hardest = multi_instance_vdpo_loss(logratios, BETA, w, "hardest")
    cold = multi_instance_vdpo_loss(logratios, BETA, w, "softmin", temperature=1e-6)
    torch.testing.assert_close(cold, hardest, atol=1e-5, rtol=0)  # |softmin − min z| ≤ τ·log(1/a_min)
    hot = multi_instance_vdpo_loss(logratios, BETA, w, "softmin", temperature=1e4)
    mean_z = [2 / 3 * 0.25 + 1 / 3 * 1.0, (0.25 - 0.25 - 0.5) / 3]
    want = torch.tensor([0.75 * nls(mean_z[0]), 0.2 * nls(mean_z[1])], dtype=F64)
    torch.testing.assert_close(hot, want, atol=1e-4, rtol=0)  # −τ log E[e^(−z/τ)] = E[z] − Var(z)/(2τ) + …


@pytest.mark.parametrize("aggregate", ["mean", "hardest", "softmin"])
def test_extreme_log_ratios_stay_finite(aggregate):
    policy = torch.tensor([[2e4, -2e4, 0.0], [-2e4, 2e4, 1e4]], requires_grad=True)
    n = torch.ones(2, 3)
    out = MultiInstanceVDPOLoss(beta=1.0, aggregate=aggregate, temperature=1e-2)(
        ResponseStats(policy, n, candidate_weights=torch.tensor([[1.0, 1.0, 0.3], [1.0, 0.0, 1.0]])),
        ResponseStats(torch.zeros(2, 3), n),
    )
    out.losses.sum().backward()
    assert torch.isfinite(out.losses).all() and torch.isfinite(policy.grad).all()


def test_errors():
    with pytest.raises(ValueError, match="aggregate"):
        MultiInstanceVDPOLoss(aggregate="max")
    with pytest.raises(ValueError, match="temperature"):
        MultiInstanceVDPOLoss(temperature=0.0)
    with pytest.raises(ValueError, match="beta"):
        MultiInstanceVDPOLoss(beta=-1.0)
    with pytest.raises(ValueError, match="candidate_weights"):
        ResponseStats(torch.zeros(2, 3), torch.ones(2, 3), candidate_weights=torch.ones(2, 2))
    with pytest.raises(ValueError, match="weights must be"):
        multi_instance_vdpo_loss(torch.zeros(2, 3), 0.1, torch.ones(2, 3))
    with pytest.raises(ValueError, match="reference"):
        MultiInstanceVDPOLoss()(stats()[0], None)


def test_candidate_weights_ride_as_side_information():
    policy, _ = stats(weights=None)
    with_w = policy.with_side(candidate_weights=torch.ones(2, 4, dtype=F64))
    assert with_w.candidate_weights.shape == (2, 4) and policy.candidate_weights is None
    assert with_w.detach().candidate_weights is not None and with_w.to("cpu").candidate_weights is not None


def test_selectable_by_class_path():
    init_args = {"beta": 0.2, "aggregate": "softmin", "temperature": 0.25, "normalize_weights": True}
    parser = loss_parser()
    cfg = parser.parse_object({"loss": {"class_path": "mmpo.losses.MultiInstanceVDPOLoss", "init_args": init_args}})
    loss = instantiate(parser, cfg).loss
    assert type(loss) is MultiInstanceVDPOLoss
    assert all(getattr(loss, k) == v for k, v in init_args.items())
    assert loss.requires_reference and loss.max_group_size is None
