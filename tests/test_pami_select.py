"""PaMi-VDPO close-to-far selection, checked by hand on small score tables: the schedule, early/middle/late
choices, thresholds, samples whose candidates are all identical, ties and errors."""

from __future__ import annotations

import math

import pytest
import torch

from augment.video.pami import CloseToFar, close_to_far_target, select_candidates

# One sample, K = 6. Ranked by score (ascending): idx5 0.0, idx1 0.0005, idx2 0.05, idx4 0.10, idx3 0.20,
# idx0 0.30. With min_distinct 0.02 the eligible ones are idx2, idx4, idx3, idx0 (ranks 2..5); with
# identical_threshold 1e-3, idx5 and idx1 are judged identical.
SCORES = torch.tensor([[0.30, 0.0005, 0.05, 0.20, 0.10, 0.0]])


def pick(target, m, scores=SCORES, min_distinct=0.02, threshold=1e-3, identical_weight=0.0):
    return select_candidates(scores, target, m, min_distinct, threshold, identical_weight)


def test_schedule_linear_cosine_and_plateau():
    assert close_to_far_target(0.0) == 0.0
    assert close_to_far_target(0.125) == pytest.approx(0.25)  # ramp over the first half by default
    assert close_to_far_target(0.5) == 1.0 and close_to_far_target(0.9) == 1.0
    assert close_to_far_target(0.125, ramp="cosine") == pytest.approx((1 - math.cos(math.pi / 4)) / 2)
    assert close_to_far_target(0.3, start=0.2, end=0.6, ramp_fraction=1.0) == pytest.approx(0.32)
    # far-to-close is a configuration too
    assert close_to_far_target(1.0, start=1.0, end=0.0) == 0.0


def test_early_keeps_the_closest_eligible_candidates():
    sel = pick(0.0, 2)
    assert sel.indices.tolist() == [[2, 4]]  # 0.05, 0.10: not idx5/idx1, which are below min_distinct
    torch.testing.assert_close(sel.scores, torch.tensor([[0.05, 0.10]]))
    assert sel.weights.tolist() == [[1.0, 1.0]]


def test_late_keeps_the_most_distinct_candidates():
    sel = pick(1.0, 2)
    assert sel.indices.tolist() == [[3, 0]]  # 0.20, 0.30, closest first
    assert pick(1.0, 1).indices.tolist() == [[0]]


def test_middle_centres_the_window_on_the_target_rank():
    # eligible ranks 2..5; q = 0.5 → centre rank 2 + 0.5·3 = 3.5
    assert pick(0.5, 2).indices.tolist() == [[4, 3]]  # ranks 3, 4 (start = ⌊3.5 − 0.5 + 0.5⌋ = 3)
    assert pick(0.5, 1).indices.tolist() == [[3]]  # rank ⌊3.5 + 0.5⌋ = 4
    assert pick(0.5, 3).indices.tolist() == [[4, 3, 0]]  # ranks 3..5
    assert pick(1 / 3, 1).indices.tolist() == [[4]]  # centre rank 3
    # through the configured schedule: a quarter of the way through a 0.5 ramp is q = 0.5
    schedule = CloseToFar(min_distinct=0.02)
    assert schedule(SCORES, 0.25, 2).indices.tolist() == [[4, 3]]
    assert schedule(SCORES, 0.25, 2).target == 0.5


def test_too_few_eligible_fill_with_the_most_distinct_of_the_rest():
    sel = pick(0.0, 5)  # 4 eligible, M = 5: the top 5 ranks
    assert sel.indices.tolist() == [[1, 2, 4, 3, 0]]
    assert sel.weights.tolist() == [[0.0, 1.0, 1.0, 1.0, 1.0]]  # idx1 (0.0005) is judged identical
    assert sel.selected_identical.tolist() == [[True, False, False, False, False]]
    assert sel.num_identical.tolist() == [2] and not sel.all_identical.item()


def test_thresholds_decide_eligibility_and_identity():
    # raising min_distinct to 0.15 leaves idx3, idx0 eligible: early picks them, though idx2/idx4 are closer
    assert pick(0.0, 2, min_distinct=0.15).indices.tolist() == [[3, 0]]
    # a score exactly at a threshold counts as distinct and eligible (≥)
    sel = pick(0.0, 1, min_distinct=0.05, threshold=0.05)
    assert sel.indices.tolist() == [[2]] and sel.weights.tolist() == [[1.0]]
    # a soft down-weight instead of dropping
    assert pick(0.0, 6, identical_weight=0.25).weights.tolist() == [[0.25, 0.25, 1.0, 1.0, 1.0, 1.0]]


def test_all_identical_sample_has_all_weights_at_identical_weight():
    scores = torch.tensor([[0.0, 0.0005, 0.0], [0.4, 0.3, 0.2]])  # sample 0: nothing reaches 1e-3
    sel = pick(0.0, 2, scores=scores, min_distinct=1e-3)
    # sample 0: none eligible → the most distinct two (stable ranks idx0, idx2, idx1 → ranks 1, 2)
    assert sel.indices.tolist() == [[2, 1], [2, 1]]
    assert sel.weights.tolist() == [[0.0, 0.0], [1.0, 1.0]]
    assert sel.all_identical.tolist() == [True, False] and sel.num_identical.tolist() == [3, 0]
    soft = pick(0.0, 2, scores=scores, min_distinct=1e-3, identical_weight=0.5)
    assert soft.weights.tolist() == [[0.5, 0.5], [1.0, 1.0]]
    assert sel.group_weights().tolist() == [[1.0, 0.0, 0.0], [1.0, 1.0, 1.0]]
    summary = sel.summary()
    assert summary["all_identical_share"].item() == 0.5
    assert summary["identical_share"].item() == pytest.approx(0.5)
    assert summary["selected_score"].item() == pytest.approx((0.0 + 0.0005 + 0.2 + 0.3) / 4)


def test_rows_are_independent_and_nan_scores_count_as_identical():
    scores = torch.cat([SCORES, torch.tensor([[math.nan, 0.9, 0.8, 0.7, 0.6, 0.5]])])
    sel = pick(0.0, 2, scores=scores)
    assert sel.indices.tolist() == [[2, 4], [5, 4]]
    late = pick(1.0, 6, scores=scores)
    assert late.indices[1].tolist() == [0, 5, 4, 3, 2, 1] and late.weights[1, 0].item() == 0.0


def test_ties_break_by_candidate_index_and_selection_is_deterministic():
    ties = torch.full((2, 4), 0.1)
    assert pick(0.0, 2, scores=ties).indices.tolist() == [[0, 1], [0, 1]]
    assert pick(1.0, 2, scores=ties).indices.tolist() == [[2, 3], [2, 3]]
    scores = torch.rand(8, 7, generator=torch.Generator().manual_seed(0)).round(decimals=1)  # many ties
    runs = [pick(0.4, 3, scores=scores, min_distinct=0.3) for _ in range(3)]
    assert all(torch.equal(r.indices, runs[0].indices) and torch.equal(r.weights, runs[0].weights) for r in runs)


def test_errors():
    with pytest.raises(ValueError, match="num_keep"):
        pick(0.0, 7)  # M > K
    with pytest.raises(ValueError, match="num_keep"):
        pick(0.0, 0)
    with pytest.raises(ValueError, match=r"scores must be \(B, K\)"):
        pick(0.0, 1, scores=SCORES[0])
    schedule = CloseToFar()
    for progress in (-0.01, 1.01, math.nan):
        with pytest.raises(ValueError, match="progress"):
            schedule(SCORES, progress, 2)
    with pytest.raises(ValueError, match="ramp_fraction"):
        CloseToFar(ramp_fraction=0.0)
    with pytest.raises(ValueError, match="ramp"):
        CloseToFar(ramp="step")
    with pytest.raises(ValueError, match="min_distinct"):
        CloseToFar(identical_threshold=0.1, min_distinct=0.05)
    with pytest.raises(ValueError, match="identical_weight"):
        CloseToFar(identical_weight=1.5)
    with pytest.raises(ValueError, match="start"):
        CloseToFar(start=-0.5)
