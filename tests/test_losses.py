"""Tests of mmpo.losses: hand-computed values, invariants, stability, gradient directions, configs."""

from __future__ import annotations

import math

import pytest
import torch
from helpers.pairs import CT, F64, LC, LR, RT, policy_pair, reference_pair, t

from mmpo.losses import (
    ASFTLoss,
    CombinedLoss,
    DPOLoss,
    FDPOLoss,
    HingeLoss,
    IPOLoss,
    LDDPOLoss,
    LNDPOLoss,
    PairLogps,
    PreferenceLoss,
    RobustDPOLoss,
    SFTLoss,
    SimPOLoss,
)


def log_sigmoid(x: float) -> float:
    """log σ(x) in plain math, stable for the small arguments used here."""
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def values(loss: PreferenceLoss, reference: PairLogps | None = None) -> list[float]:
    return loss(policy_pair(), reference if reference is not None else reference_pair()).losses.tolist()


# --------------------------------------------------------------------------- hand-computed values


def test_dpo_values():
    beta = 0.1
    expected = [-log_sigmoid(beta * (c - r)) for c, r in zip(LC, LR, strict=True)]
    assert values(DPOLoss(beta=beta)) == pytest.approx(expected, rel=1e-12)


def test_cdpo_values():
    beta, eps = 0.1, 0.2
    expected = []
    for c, r in zip(LC, LR, strict=True):
        z = beta * (c - r)
        expected.append(-(1 - eps) * log_sigmoid(z) - eps * log_sigmoid(-z))
    assert values(DPOLoss(beta=beta, label_smoothing=eps)) == pytest.approx(expected, rel=1e-12)


def test_robust_dpo_values():
    beta, eps = 0.1, 0.1
    expected = []
    for c, r in zip(LC, LR, strict=True):
        z = beta * (c - r)
        expected.append((-(1 - eps) * log_sigmoid(z) + eps * log_sigmoid(-z)) / (1 - 2 * eps))
    assert values(RobustDPOLoss(beta=beta, label_smoothing=eps)) == pytest.approx(expected, rel=1e-12)


def test_ipo_values():
    beta = 0.1
    # Pair 0: 0.5/2 − (−1.0)/5 = 0.45; pair 1: −1.0/4 − 0.5/1 = −0.75; target 1/(2β) = 5.
    expected = [(0.45 - 5.0) ** 2, (-0.75 - 5.0) ** 2]
    assert values(IPOLoss(beta=beta)) == pytest.approx(expected, rel=1e-12)


def test_hinge_values():
    # relu(1 − 0.5 · 1.5) = 0.25 and relu(1 + 0.5 · 1.5) = 1.75.
    assert values(HingeLoss(beta=0.5)) == pytest.approx([0.25, 1.75], rel=1e-12)


def test_ln_dpo_values():
    beta = 0.1
    expected = [-log_sigmoid(beta * 0.45), -log_sigmoid(beta * -0.75)]
    assert values(LNDPOLoss(beta=beta)) == pytest.approx(expected, rel=1e-12)


def test_simpo_values():
    beta, gamma = 2.0, 0.5
    # Mean token log-probs: chosen [−3/2, −5/4], rejected [−4/5, −2/1].
    margins = [-1.5 - (-0.8), -1.25 - (-2.0)]
    expected = [-log_sigmoid(beta * m - gamma) for m in margins]
    out = SimPOLoss(beta=beta, gamma=gamma)(policy_pair(), None)
    assert out.losses.tolist() == pytest.approx(expected, rel=1e-12)
    assert out.chosen_rewards.tolist() == pytest.approx([beta * -1.5, beta * -1.25])
    assert out.rejected_rewards.tolist() == pytest.approx([beta * -0.8, beta * -2.0])


@pytest.mark.parametrize("divergence", ["reverse_kl", "forward_kl", "js", "alpha"])
def test_fdpo_values(divergence):
    beta, alpha = 0.1, 0.3
    link = {
        "reverse_kl": lambda u: u,
        "forward_kl": lambda u: -math.exp(-u),
        "js": lambda u: u - math.log(1 + math.exp(u)),
        "alpha": lambda u: (1 - math.exp(-alpha * u)) / alpha,
    }[divergence]
    expected = [-log_sigmoid(beta * (link(c) - link(r))) for c, r in zip(LC, LR, strict=True)]
    got = values(FDPOLoss(beta=beta, divergence=divergence, alpha=alpha))
    assert got == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("beta", [1.0, 2.0])
def test_asft_values(beta):
    lam = 0.7
    expected = []
    for logp_sum_w, n_w, logp_sum_l, n_l in [(-3.0, 2, -4.0, 5), (-5.0, 4, -2.0, 1)]:
        p_w, p_l = math.exp(logp_sum_w / n_w), math.exp(logp_sum_l / n_l)
        r_w, r_l = math.log(p_w) - math.log(1 - p_w), math.log(p_l) - math.log(1 - p_l)
        expected.append(-math.log(p_w) - lam * (log_sigmoid(beta * r_w) + log_sigmoid(-beta * r_l)))
        if beta == 1.0:  # σ(log-odds) = p, so the alignment term is log p_w + log(1 − p_l)
            assert expected[-1] == pytest.approx(-math.log(p_w) - lam * (math.log(p_w) + math.log(1 - p_l)))
    assert values(ASFTLoss(beta=beta, lam=lam), reference=None) == pytest.approx(expected, rel=1e-10)


def test_sft_values_and_rewards():
    out = SFTLoss()(PairLogps(t(-3.0, -2.0), t(-4.0, -1.0), t(2, 0), t(5, 1)), None)
    assert out.losses.tolist() == pytest.approx([1.5, 2.0])  # 0 tokens count as 1
    assert out.chosen_rewards.tolist() == pytest.approx([-1.5, -2.0])
    assert out.rejected_rewards.tolist() == pytest.approx([-0.8, -1.0])


def ld_pairs() -> tuple[PairLogps, PairLogps]:
    """Two pairs with per-token log-probs; row 0's chosen mask starts at column 1 (left padding)."""
    policy = PairLogps(
        chosen=t(-6.0, -2.0),
        rejected=t(-2.0, -7.0),
        chosen_tokens=t(3, 2),
        rejected_tokens=t(2, 4),
        chosen_token_logps=torch.tensor([[0, -1, -2, -3, 0], [-1, -1, 0, 0, 0]], dtype=F64),
        rejected_token_logps=torch.tensor([[-0.5, -1.5, 0, 0], [-0.5, -0.5, -2, -4]], dtype=F64),
        chosen_mask=torch.tensor([[0, 1, 1, 1, 0], [1, 1, 0, 0, 0]], dtype=torch.bool),
        rejected_mask=torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.bool),
    )
    reference = PairLogps(
        chosen=t(-4.5, -3.0),
        rejected=t(-2.0, -4.0),
        chosen_tokens=t(3, 2),
        rejected_tokens=t(2, 4),
        chosen_token_logps=torch.tensor([[0, -1.5, -1, -2, 0], [-2, -1, 0, 0, 0]], dtype=F64),
        rejected_token_logps=torch.tensor([[-1, -1, 0, 0], [-1, -1, -1, -1]], dtype=F64),
    )  # reference masks left out: the policy's are used
    return policy, reference


def test_ld_dpo_values():
    beta, alpha = 0.1, 0.5
    # l_p = [2, 2]. Row 0: policy chosen −1 −2 + α(−3) = −4.5, reference −1.5 −1 + α(−2) = −3.5; rejected
    # has no tail: −2 vs −2. Row 1: chosen has no tail: −2 vs −3; policy rejected −1 + α(−6) = −4,
    # reference −2 + α(−2) = −3.
    lc, lr = [-4.5 - -3.5, -2.0 - -3.0], [0.0, -4.0 - -3.0]
    expected = [-log_sigmoid(beta * (c - r)) for c, r in zip(lc, lr, strict=True)]
    out = LDDPOLoss(beta=beta, alpha=alpha)(*ld_pairs())
    assert out.losses.tolist() == pytest.approx(expected, rel=1e-12)
    assert out.chosen_rewards.tolist() == pytest.approx([beta * c for c in lc])


# --------------------------------------------------------------------------- invariants


def test_zero_label_smoothing_is_dpo():
    dpo = values(DPOLoss(beta=0.3))
    assert values(DPOLoss(beta=0.3, label_smoothing=0.0)) == dpo
    assert values(RobustDPOLoss(beta=0.3, label_smoothing=0.0)) == pytest.approx(dpo, rel=1e-12)


def test_fdpo_reverse_kl_is_dpo():
    assert values(FDPOLoss(beta=0.2)) == values(DPOLoss(beta=0.2))


def test_ld_dpo_alpha_one_is_dpo_exactly():
    policy, reference = ld_pairs()
    ld = LDDPOLoss(beta=0.1, alpha=1.0)(policy, reference)
    dpo = DPOLoss(beta=0.1)(policy, reference)
    assert torch.equal(ld.losses, dpo.losses)
    assert torch.equal(ld.chosen_rewards, dpo.chosen_rewards)


def test_ld_dpo_counts_positions_over_the_mask():
    """Moving every response one column to the right (more left padding) changes nothing."""
    policy, reference = ld_pairs()

    def pad(x: torch.Tensor | None) -> torch.Tensor | None:
        return None if x is None else torch.nn.functional.pad(x, (1, 0))

    def shift(p: PairLogps) -> PairLogps:
        return PairLogps(
            p.chosen,
            p.rejected,
            p.chosen_tokens,
            p.rejected_tokens,
            pad(p.chosen_token_logps),
            pad(p.rejected_token_logps),
            pad(p.chosen_mask),
            pad(p.rejected_mask),
        )

    loss = LDDPOLoss(alpha=0.3)
    assert torch.allclose(loss(policy, reference).losses, loss(shift(policy), shift(reference)).losses)


def test_ld_dpo_alpha_zero_truncates_to_shorter_length():
    policy, reference = ld_pairs()
    # α = 0: row 0 keeps chosen tokens −1 −2 (policy) and −1.5 −1 (reference): logratio −0.5.
    out = LDDPOLoss(beta=1.0, alpha=0.0)(policy, reference)
    assert out.chosen_rewards[0].item() == pytest.approx(-0.5)


@pytest.mark.parametrize("loss", [SimPOLoss(), ASFTLoss(), SFTLoss()], ids=repr)
def test_reference_free_losses_ignore_the_reference(loss):
    assert not loss.requires_reference
    without = loss(policy_pair(), None)
    weird = PairLogps(t(100.0, -100.0), t(-7.0, 3.0), t(9, 9), t(1, 1))
    with_ref = loss(policy_pair(), weird)
    assert torch.equal(without.losses, with_ref.losses)
    assert torch.equal(without.chosen_rewards, with_ref.chosen_rewards)


def test_ipo_uses_length_averaged_logratios():
    """Doubling every token count halves Δ′."""
    beta = 0.1
    policy, reference = policy_pair(), reference_pair()
    for p in (policy, reference):
        p.tokens = 2 * p.tokens
    got = IPOLoss(beta=beta)(policy, reference).losses.tolist()
    assert got == pytest.approx([(0.45 / 2 - 5.0) ** 2, (-0.75 / 2 - 5.0) ** 2], rel=1e-12)


def test_ln_dpo_with_equal_lengths_is_dpo_with_scaled_beta():
    policy, reference = policy_pair(), reference_pair()
    for k in (1.0, 4.0):
        policy.tokens = torch.full((2, 2), k, dtype=F64)
        ln = LNDPOLoss(beta=0.4)(policy, reference).losses
        assert torch.allclose(ln, DPOLoss(beta=0.4 / k)(policy, reference).losses)


REFERENCE_LOSSES = [
    DPOLoss(),
    RobustDPOLoss(),
    IPOLoss(),
    HingeLoss(),
    FDPOLoss(),
    LDDPOLoss(),
    LNDPOLoss(),
    CombinedLoss([SFTLoss(), DPOLoss()]),
]


@pytest.mark.parametrize("loss", REFERENCE_LOSSES, ids=repr)
def test_reference_required(loss):
    assert loss.requires_reference
    policy, _ = ld_pairs()
    with pytest.raises(ValueError, match="reference"):
        loss(policy, None)


def test_ld_dpo_requires_token_logps():
    with pytest.raises(ValueError, match="per-token"):
        LDDPOLoss()(policy_pair(), reference_pair())
    policy, reference = ld_pairs()
    with pytest.raises(ValueError, match="reference ResponseStats"):
        LDDPOLoss()(policy, reference_pair())


@pytest.mark.parametrize(
    "make",
    [
        lambda: DPOLoss(beta=0.0),
        lambda: DPOLoss(beta=-1.0),
        lambda: DPOLoss(beta=float("nan")),
        lambda: DPOLoss(label_smoothing=0.6),
        lambda: RobustDPOLoss(label_smoothing=0.5),
        lambda: IPOLoss(beta=0.0),
        lambda: HingeLoss(beta=-0.1),
        lambda: LNDPOLoss(beta=0.0),
        lambda: FDPOLoss(divergence="tv"),
        lambda: FDPOLoss(divergence="alpha", alpha=0.0),
        lambda: FDPOLoss(divergence="alpha", alpha=1.5),
        lambda: LDDPOLoss(alpha=1.5),
        lambda: LDDPOLoss(alpha=-0.1),
        lambda: SimPOLoss(beta=0.0),
        lambda: SimPOLoss(gamma=-1.0),
        lambda: ASFTLoss(lam=-1.0),
        lambda: CombinedLoss([]),
        lambda: CombinedLoss([DPOLoss()], weights=[1.0, 2.0]),
        lambda: CombinedLoss([DPOLoss(), SFTLoss()], weights=[1.0, -0.5]),
    ],
)
def test_invalid_config_raises(make):
    with pytest.raises(ValueError):
        make()


def test_rewards_are_detached_and_helpers():
    policy = PairLogps(t(-3.0, -5.0).requires_grad_(), t(-4.0, -2.0), t(*CT), t(*RT))
    out = DPOLoss()(policy, reference_pair())
    assert out.losses.requires_grad and not out.chosen_rewards.requires_grad
    detached = policy.detach()
    assert not detached.chosen.requires_grad and detached.chosen_token_logps is None
    tokens = PairLogps(t(-3.0), t(-4.0), t(1), t(1), t(-3.0)[None], t(-4.0)[None], t(1)[None].bool(), t(1)[None].bool())
    moved = tokens.to("meta")  # every tensor field moves, per-token log-probs and masks included
    assert all(getattr(moved, f).device.type == "meta" for f in ("logps", "tokens", "token_logps", "mask"))


# --------------------------------------------------------------------------- stability and gradients

ALL_LOSSES = [
    DPOLoss(),
    DPOLoss(label_smoothing=0.1),
    RobustDPOLoss(),
    IPOLoss(),
    HingeLoss(),
    LNDPOLoss(),
    FDPOLoss(divergence="reverse_kl"),
    FDPOLoss(divergence="forward_kl"),
    FDPOLoss(divergence="js"),
    FDPOLoss(divergence="alpha", alpha=0.3),
    LDDPOLoss(),
    SimPOLoss(),
    ASFTLoss(),
    SFTLoss(),
    CombinedLoss([DPOLoss(), SFTLoss()], weights=[1.0, 0.5]),
]


def token_level_pair(chosen_tok: list[list[float]], rejected_tok: list[list[float]], dtype=torch.float32):
    """PairLogps whose summed log-probs are derived from leaf per-token tensors (mask: nonzero entries)."""
    c_tok = torch.tensor(chosen_tok, dtype=dtype, requires_grad=True)
    r_tok = torch.tensor(rejected_tok, dtype=dtype, requires_grad=True)
    c_mask, r_mask = c_tok.detach() != 0, r_tok.detach() != 0
    pair = PairLogps(
        chosen=(c_tok * c_mask).sum(-1),
        rejected=(r_tok * r_mask).sum(-1),
        chosen_tokens=c_mask.sum(-1),
        rejected_tokens=r_mask.sum(-1),
        chosen_token_logps=c_tok * c_mask,
        rejected_token_logps=r_tok * r_mask,
        chosen_mask=c_mask,
        rejected_mask=r_mask,
    )
    return pair, (c_tok, r_tok)


@pytest.mark.parametrize("reference_scale", [0.0, -1.0])
@pytest.mark.parametrize("loss", ALL_LOSSES, ids=repr)
def test_extreme_logratios_and_token_counts_stay_finite(loss, reference_scale):
    # Rows: ±1e4 one-token responses both ways, an empty chosen response, an empty rejected one.
    chosen = [[1e4, 0.0], [-1e4, 0.0], [0.0, 0.0], [-5e3, -5e3]]
    rejected = [[-1e4, 0.0], [1e4, 0.0], [-1e4, 0.0], [0.0, 0.0]]
    policy, leaves = token_level_pair(chosen, rejected)
    # reference_scale −1 mirrors the policy, so log-ratios reach ±2e4; 0 gives a zero reference.
    reference, _ = token_level_pair(
        [[reference_scale * v for v in row] for row in chosen], [[reference_scale * v for v in row] for row in rejected]
    )
    # Keep the reference masks equal to the policy's (its zero entries would otherwise read as padding).
    reference.mask, reference.tokens = policy.mask, policy.tokens
    out = loss(policy, reference.detach())
    assert out.losses.shape == (4,)
    assert torch.isfinite(out.losses).all(), out.losses
    assert torch.isfinite(out.chosen_rewards).all() and torch.isfinite(out.rejected_rewards).all()
    out.losses.mean().backward()
    grads = [leaf.grad for leaf in leaves if leaf.grad is not None]  # SFT never touches the rejected side
    assert grads and all(torch.isfinite(g).all() for g in grads), grads


@pytest.mark.parametrize("loss", ALL_LOSSES, ids=repr)
def test_sgd_step_raises_the_logratio_margin(loss):
    reference, _ = token_level_pair([[-2.0, -3.5], [-1.0, -2.0]], [[-3.0, -2.8], [-0.5, -0.7]], F64)
    reference = reference.detach()
    if loss.requires_token_logps:
        policy, leaves = token_level_pair([[-2.0, -3.0], [-1.5, -1.5]], [[-3.0, -3.0], [-0.4, -0.4]], F64)
    else:
        leaves = (t(-5.0, -3.0).requires_grad_(), t(-6.0, -0.8).requires_grad_())
        policy = PairLogps(leaves[0], leaves[1], t(2, 2), t(2, 2))

    def margin(p: PairLogps) -> torch.Tensor:
        return (p.chosen - reference.chosen) - (p.rejected - reference.rejected)

    before = margin(policy).detach()
    loss(policy, reference).losses.sum().backward()
    with torch.no_grad():
        for leaf in leaves:
            if leaf.grad is not None:
                leaf -= 0.1 * leaf.grad
    if loss.requires_token_logps:
        c_tok, r_tok = leaves
        policy = PairLogps(c_tok.sum(-1), r_tok.sum(-1), t(2, 2), t(2, 2))
    else:  # the statistics hold copies of the leaves: read the updated values again
        policy = PairLogps(leaves[0], leaves[1], t(2, 2), t(2, 2))
    after = margin(policy).detach()
    assert (after > before).all(), (before, after)


# --------------------------------------------------------------------------- CombinedLoss


def test_combined_dpo_plus_half_sft_equals_the_parts():
    policy, reference = policy_pair(), reference_pair()
    combined = CombinedLoss([DPOLoss(beta=0.1), SFTLoss()], weights=[1.0, 0.5])(policy, reference)
    dpo, sft = DPOLoss(beta=0.1)(policy, reference), SFTLoss()(policy, None)
    assert torch.allclose(combined.losses, dpo.losses + 0.5 * sft.losses)
    assert torch.equal(combined.chosen_rewards, dpo.chosen_rewards)
    assert torch.equal(combined.rejected_rewards, dpo.rejected_rewards)


def test_combined_flags_and_reward_source():
    assert not CombinedLoss([SimPOLoss(), SFTLoss()]).requires_reference
    assert not CombinedLoss([SimPOLoss(), DPOLoss()]).requires_token_logps
    assert CombinedLoss([SimPOLoss(), LDDPOLoss()]).requires_token_logps
    mixed = CombinedLoss([SFTLoss(), IPOLoss(beta=0.5)])
    assert mixed.requires_reference
    out = mixed(policy_pair(), reference_pair())
    assert torch.equal(out.chosen_rewards, IPOLoss(beta=0.5)(policy_pair(), reference_pair()).chosen_rewards)
    ref_free = CombinedLoss([SimPOLoss(beta=3.0), SFTLoss()])(policy_pair(), None)
    assert torch.equal(ref_free.chosen_rewards, SimPOLoss(beta=3.0)(policy_pair(), None).chosen_rewards)
    parts = SimPOLoss(beta=3.0)(policy_pair(), None).losses + SFTLoss()(policy_pair(), None).losses
    assert torch.equal(ref_free.losses, parts)
