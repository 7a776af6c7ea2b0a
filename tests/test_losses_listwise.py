"""List losses of the second wave (LambdaRankLoss, TreePreferenceLoss): hand-computed values, K = 2 against
the pair losses, signs, stability, errors and YAML selection."""

from __future__ import annotations

import math

import pytest
import torch
from helpers.config import loss_parser
from helpers.pairs import F64, policy_pair, reference_pair

from mmpo.losses import (
    DPOLoss,
    LambdaRankLoss,
    LNDPOLoss,
    PlackettLuceLoss,
    ResponseStats,
    TreePreferenceLoss,
    lambda_rank_loss,
)

LOG2_3 = math.log2(3.0)


def nls(x: float) -> float:
    """−log σ(x) in plain math."""
    return math.log1p(math.exp(-x)) if x >= 0 else -x + math.log1p(math.exp(x))


def inv_d(tau: int) -> float:
    """1 / log₂(1 + τ)."""
    return 1.0 / math.log2(1.0 + tau)


def lists(
    policy_logps: list[list[float]],
    reference_logps: list[list[float]],
    tokens: list[list[float]] | None = None,
    scores: list[list[float]] | None = None,
) -> tuple[ResponseStats, ResponseStats]:
    logps, ref = torch.tensor(policy_logps, dtype=F64), torch.tensor(reference_logps, dtype=F64)
    n = torch.ones_like(logps) if tokens is None else torch.tensor(tokens, dtype=F64)
    side = None if scores is None else torch.tensor(scores, dtype=F64)
    return ResponseStats(logps, n, scores=side), ResponseStats(ref, n.clone())


# Log-ratios r = [0.5, 1.0, −1.5] (response 1 currently outranks response 0) and [2.0, 0.0, 0.5].
POLICY = [[-1.0, -2.0, -4.0], [-1.0, -3.0, -2.0]]
REFERENCE = [[-1.5, -3.0, -2.5], [-3.0, -3.0, -2.5]]
R = [[0.5, 1.0, -1.5], [2.0, 0.0, 0.5]]


# --------------------------------------------------------------------------- LambdaRankLoss: values


def test_lambda_rank_values_with_list_order_and_data_positions():
    beta = 0.5
    # ψ = [2, 1, 0] → G = [3, 1, 0]; τ = [1, 2, 3].
    g = [3.0, 1.0, 0.0]
    expected = []
    for r in R:
        total = 0.0
        for i, j in [(0, 1), (0, 2), (1, 2)]:
            delta = abs(g[i] - g[j]) * abs(inv_d(i + 1) - inv_d(j + 1))
            total += delta * nls(beta * (r[i] - r[j]))
        expected.append(total)
    out = LambdaRankLoss(beta=beta, positions="data")(*lists(POLICY, REFERENCE))
    assert out.losses.tolist() == pytest.approx(expected, rel=1e-12)
    torch.testing.assert_close(out.rewards, beta * torch.tensor(R, dtype=F64))


def test_lambda_rank_policy_positions_follow_the_current_rewards():
    beta = 0.5
    g = [3.0, 1.0, 0.0]
    # Row 0: β·r = [0.25, 0.5, −0.75] ranks response 1 first → τ = [2, 1, 3].
    # Row 1: β·r = [1.0, 0.0, 0.25] → τ = [1, 3, 2].
    taus = [[2, 1, 3], [1, 3, 2]]
    expected = []
    for r, tau in zip(R, taus, strict=True):
        total = 0.0
        for i, j in [(0, 1), (0, 2), (1, 2)]:
            delta = abs(g[i] - g[j]) * abs(inv_d(tau[i]) - inv_d(tau[j]))
            total += delta * nls(beta * (r[i] - r[j]))
        expected.append(total)
    got = LambdaRankLoss(beta=beta)(*lists(POLICY, REFERENCE)).losses.tolist()
    assert got == pytest.approx(expected, rel=1e-12)
    data = LambdaRankLoss(beta=beta, positions="data")(*lists(POLICY, REFERENCE)).losses.tolist()
    assert got[0] != pytest.approx(data[0])  # the discounts really moved


def test_lambda_rank_gains_and_pairs_come_from_scores():
    """Scores [2, 0.5, 1]: response 2 is better than response 1 although it comes later in the list."""
    beta = 0.5
    s = [2.0, 0.5, 1.0]
    g = [2.0**v - 1.0 for v in s]
    r = R[0]
    pairs = [(0, 1), (0, 2), (2, 1)]  # (better, worse) by score
    expected = sum(abs(g[i] - g[j]) * abs(inv_d(i + 1) - inv_d(j + 1)) * nls(beta * (r[i] - r[j])) for i, j in pairs)
    policy, reference = lists(POLICY[:1], REFERENCE[:1], scores=[s])
    got = LambdaRankLoss(beta=beta, positions="data")(policy, reference).losses.item()
    assert got == pytest.approx(expected, rel=1e-12)


def test_lambda_rank_ties_drop_out_and_normalize_divides_by_the_weights():
    beta = 0.5
    s = [1.0, 1.0, 0.0]  # responses 0 and 1 tie
    g = [1.0, 1.0, 0.0]
    r = R[0]
    weights = {(0, 2): abs(g[0] - g[2]) * abs(inv_d(1) - inv_d(3)), (1, 2): abs(g[1] - g[2]) * abs(inv_d(2) - inv_d(3))}
    total = sum(w * nls(beta * (r[i] - r[j])) for (i, j), w in weights.items())
    policy, reference = lists(POLICY[:1], REFERENCE[:1], scores=[s])
    plain = LambdaRankLoss(beta=beta, positions="data")(policy, reference).losses.item()
    normalized = LambdaRankLoss(beta=beta, positions="data", normalize=True)(policy, reference).losses.item()
    assert plain == pytest.approx(total, rel=1e-12)
    assert normalized == pytest.approx(total / sum(weights.values()), rel=1e-12)
    # A group of ties has no preferred pair: loss 0, even normalised.
    tied, reference = lists(POLICY[:1], REFERENCE[:1], scores=[[1.0, 1.0, 1.0]])
    assert LambdaRankLoss(normalize=True)(tied, reference).losses.item() == 0.0


@pytest.mark.parametrize("positions", ["policy", "data"])
def test_lambda_rank_with_two_responses_is_scaled_dpo(positions):
    # Pair 1 has Δ < 0, so with "policy" positions the two responses swap ranks: same |1/D(1) − 1/D(2)|.
    dpo = DPOLoss(beta=0.3)(policy_pair(), reference_pair()).losses
    lam = LambdaRankLoss(beta=0.3, positions=positions)(policy_pair(), reference_pair()).losses
    torch.testing.assert_close(lam, (1.0 - 1.0 / LOG2_3) * dpo, rtol=1e-12, atol=0)
    normalized = LambdaRankLoss(beta=0.3, positions=positions, normalize=True)(policy_pair(), reference_pair())
    torch.testing.assert_close(normalized.losses, dpo, rtol=1e-12, atol=0)


def test_lambda_rank_function_rejects_unknown_positions():
    with pytest.raises(ValueError, match="positions"):
        lambda_rank_loss(torch.zeros(1, 3), 0.1, positions="model")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- TreePreferenceLoss: values


def test_tree_values_length_normalised_over_pairs():
    beta = 0.5
    tokens = [[2.0, 4.0, 1.0], [1.0, 2.0, 5.0]]
    expected = []
    for r, n in zip(R, tokens, strict=True):
        m = [ri / ni for ri, ni in zip(r, n, strict=True)]
        expected.append(sum(nls(beta * (m[i] - m[j])) for i, j in [(0, 1), (0, 2), (1, 2)]) / 3)
    out = TreePreferenceLoss(beta=beta)(*lists(POLICY, REFERENCE, tokens))
    assert out.losses.tolist() == pytest.approx(expected, rel=1e-12)
    want_rewards = [[beta * ri / ni for ri, ni in zip(r, n, strict=True)] for r, n in zip(R, tokens, strict=True)]
    torch.testing.assert_close(out.rewards, torch.tensor(want_rewards, dtype=F64))


def test_tree_ranks_by_scores_with_ties_adding_nothing():
    beta = 0.5
    r = R[0]
    # Scores [1, 3, 1]: response 1 is best; responses 0 and 2 tie. Summed log-ratios.
    expected = (nls(beta * (r[1] - r[0])) + nls(beta * (r[1] - r[2]))) / 3
    policy, reference = lists(POLICY[:1], REFERENCE[:1], scores=[[1.0, 3.0, 1.0]])
    got = TreePreferenceLoss(beta=beta, length_normalize=False)(policy, reference).losses.item()
    assert got == pytest.approx(expected, rel=1e-12)


def test_tree_with_two_responses_is_ln_dpo_or_dpo():
    policy, reference = policy_pair(), reference_pair()
    tree = TreePreferenceLoss(beta=0.2)(policy, reference).losses
    torch.testing.assert_close(tree, LNDPOLoss(beta=0.2)(policy, reference).losses, rtol=1e-12, atol=0)
    summed = TreePreferenceLoss(beta=0.2, length_normalize=False)(policy, reference).losses
    torch.testing.assert_close(summed, DPOLoss(beta=0.2)(policy, reference).losses, rtol=1e-12, atol=0)


def test_tree_reward_of_a_response_reads_its_own_tokens_only():
    policy, reference = lists(POLICY, REFERENCE, [[2.0, 4.0, 1.0], [1.0, 2.0, 5.0]])
    before = TreePreferenceLoss()(policy, reference).rewards
    changed = policy.logps.clone()
    changed[:, 2] -= 7.0
    tokens = policy.tokens.clone()
    tokens[:, 2] = 9.0
    after = TreePreferenceLoss()(ResponseStats(changed, tokens), reference).rewards
    assert torch.equal(after[:, :2], before[:, :2])
    assert not torch.equal(after[:, 2], before[:, 2])


# --------------------------------------------------------------------------- shared: stability, gradients, errors

LIST_LOSSES = [
    LambdaRankLoss(),
    LambdaRankLoss(positions="data", normalize=True),
    TreePreferenceLoss(),
    TreePreferenceLoss(length_normalize=False),
]


@pytest.mark.parametrize("with_scores", [False, True])
@pytest.mark.parametrize("loss", LIST_LOSSES, ids=repr)
def test_extreme_logratios_and_empty_responses_stay_finite(loss, with_scores):
    logps = torch.tensor([[1e4, -1e4, 0.0], [-1e4, 1e4, -1e4], [0.0, -5.0, 2e4]], requires_grad=True)
    tokens = torch.tensor([[1.0, 1.0, 0.0], [0.0, 1.0, 1.0], [0.0, 0.0, 0.0]])
    scores = torch.tensor([[3.0, 1.0, 0.0], [0.0, 2.0, 1.0], [1.0, 1.0, 0.0]]) if with_scores else None
    policy = ResponseStats(logps, tokens, scores=scores)
    reference = ResponseStats(-logps.detach(), tokens)  # log-ratios reach ±2e4 (4e4 in the last row)
    out = loss(policy, reference)
    assert torch.isfinite(out.losses).all(), out.losses
    out.losses.sum().backward()
    assert torch.isfinite(logps.grad).all(), logps.grad
    assert logps.grad.abs().sum() > 0


@pytest.mark.parametrize("k", [2, 3, 4])
@pytest.mark.parametrize("loss", [*LIST_LOSSES, PlackettLuceLoss()], ids=repr)
def test_sgd_step_lifts_the_best_response_and_lowers_the_worst(loss, k):
    torch.manual_seed(k)
    reference = ResponseStats(torch.randn(3, k, dtype=F64) - 5.0, torch.full((3, k), 2.0, dtype=F64))
    leaf = (torch.randn(3, k, dtype=F64) - 5.0).requires_grad_()
    loss(ResponseStats(leaf, reference.tokens), reference).losses.sum().backward()
    # The best response's log-prob must rise, the worst one's fall: the sign the official TPO code inverts.
    assert (leaf.grad[:, 0] < 0).all() and (leaf.grad[:, -1] > 0).all(), leaf.grad
    before = leaf.detach() - reference.logps
    with torch.no_grad():
        leaf -= 0.5 * leaf.grad
    after = leaf.detach() - reference.logps
    assert ((after[:, 0] - after[:, -1]) > (before[:, 0] - before[:, -1])).all()


@pytest.mark.parametrize("loss", LIST_LOSSES, ids=repr)
def test_list_losses_need_a_reference(loss):
    assert loss.requires_reference and loss.max_group_size is None and not loss.requires_scores
    policy, _ = lists(POLICY, REFERENCE)
    with pytest.raises(ValueError, match="reference"):
        loss(policy, None)


@pytest.mark.parametrize(
    "make",
    [
        lambda: LambdaRankLoss(beta=0.0),
        lambda: LambdaRankLoss(positions="model"),
        lambda: TreePreferenceLoss(beta=-1.0),
    ],
)
def test_invalid_list_configs_raise(make):
    with pytest.raises(ValueError):
        make()


def test_yaml_refuses_an_unknown_positions_value():
    from jsonargparse import ArgumentError

    with pytest.raises(ArgumentError):
        bad = {"class_path": "mmpo.losses.LambdaRankLoss", "init_args": {"positions": "x"}}
        loss_parser().parse_object({"loss": bad})
