"""MIA-DPO build-level selection: calibrated thresholds, the filter ablation, the yes/no balance, ratio statistics."""

from __future__ import annotations

import math

import pytest

from augment.mia.calibrate import (
    Candidate,
    answer_status,
    calibrated_thresholds,
    final_selection,
    ratio_auc,
    ratio_distribution,
    yes_no,
)
from augment.mia.select import SelectionConfig


def seq2(ratios, chosen="a red circle ."):
    return [Candidate("sequence", 2, r, chosen) for r in ratios]


def test_calibrated_threshold_is_the_quantile_per_format_and_count():
    candidates = [*seq2([0.1, 0.2, 0.3, 0.4]), Candidate("sequence", 3, 0.9), Candidate("grid", 4, math.nan)]
    # linear interpolation between order statistics: position q (n - 1) = 0.5 * 3 = 1.5 → (0.2 + 0.3) / 2
    assert calibrated_thresholds(candidates, 0.5) == {"sequence/2": pytest.approx(0.25), "sequence/3": 0.9}
    assert calibrated_thresholds(candidates, 0.25)["sequence/2"] == pytest.approx(0.175)  # 0.75 → 0.1 + 0.75 · 0.1
    assert calibrated_thresholds(candidates, 1.0)["sequence/2"] == pytest.approx(0.4)
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="attention_quantile"):
            calibrated_thresholds(candidates, bad)


def test_attention_filter_paper_thresholds_and_calibrated():
    candidates = seq2([0.3, 0.55, 0.85, math.nan])
    decisions, thresholds = final_selection(candidates, SelectionConfig())
    # paper: 0.8 for two images; NaN never passes
    assert [k for k, _ in decisions] == [True, True, False, False]
    assert decisions[2] == (False, "attention_above_threshold") and thresholds == {"sequence/2": 0.8}
    decisions, thresholds = final_selection(candidates, SelectionConfig(attention_quantile=0.5))
    assert thresholds == {"sequence/2": pytest.approx(0.55)}  # median of 0.3, 0.55, 0.85
    assert [k for k, _ in decisions] == [True, True, False, False]  # at or below the threshold is kept
    # a format and count without a paper threshold keeps nothing under the paper rule
    decisions, _ = final_selection([Candidate("sequence", 7, 0.1)], SelectionConfig())
    assert decisions == [(False, "attention_above_threshold")]


def test_no_filter_keeps_every_candidate():
    candidates = seq2([0.1, 0.9, math.nan])
    decisions, _ = final_selection(candidates, SelectionConfig(filter="none", attention_quantile=0.5))
    assert decisions == [(True, "")] * 3


def test_random_matched_has_the_attention_filtered_size_per_group_and_is_seeded():
    ratios = [i / 100 for i in range(100)]
    candidates = [*seq2(ratios), *(Candidate("sequence", 3, r) for r in ratios[:40])]
    config = SelectionConfig(attention_quantile=0.3, filter="random_matched")
    attention, _ = final_selection(candidates, SelectionConfig(attention_quantile=0.3))
    decisions, _ = final_selection(candidates, config, seed=7)
    for group in (slice(0, 100), slice(100, 140)):
        assert sum(k for k, _ in decisions[group]) == sum(k for k, _ in attention[group])
    assert sum(k for k, _ in attention[:100]) == 30  # 0.00 … 0.297: the 30 lowest
    assert {r for k, r in decisions if not k} == {"not_in_random_subset"}
    kept = [i for i, (k, _) in enumerate(decisions) if k]
    assert kept != [i for i, (k, _) in enumerate(attention) if k]  # a random subset, not the low-attention one
    assert final_selection(candidates, config, seed=7)[0] == decisions
    assert final_selection(candidates, config, seed=8)[0] != decisions


def test_yes_no_balance_subsamples_the_larger_side_per_group():
    candidates = [
        *seq2([0.1] * 6, "yes ."),
        *seq2([0.1] * 2, "no ."),
        *seq2([0.1] * 3, "a red circle ."),  # not a yes/no answer: untouched
        *(Candidate("sequence", 3, 0.1, "Yes, it is.") for _ in range(3)),  # no "no" in this group: all dropped
    ]
    config = SelectionConfig(filter="none", balance_yes_no=True)
    decisions, _ = final_selection(candidates, config, seed=1)
    kept = [k for k, _ in decisions]
    assert sum(kept[:6]) == 2 and kept[6:8] == [True, True] and kept[8:11] == [True] * 3
    assert kept[11:] == [False] * 3
    assert {r for k, r in decisions if not k} == {"yes_no_balance"}
    assert final_selection(candidates, config, seed=1)[0] == decisions
    # without the option the same candidates are all kept
    assert all(k for k, _ in final_selection(candidates, SelectionConfig(filter="none"))[0])


def test_balance_applies_after_the_filter():
    candidates = [*seq2([0.1, 0.2, 0.9], "yes ."), *seq2([0.95], "no .")]
    config = SelectionConfig(balance_yes_no=True)  # paper threshold 0.8: the "no" pair is filtered first
    decisions, _ = final_selection(candidates, config)
    assert decisions == [(False, "yes_no_balance")] * 2 + [(False, "attention_above_threshold")] * 2


def test_selection_config_checks_and_whole_build():
    assert not SelectionConfig().whole_build
    assert SelectionConfig(attention_quantile=0.5).whole_build
    assert SelectionConfig(filter="random_matched").whole_build
    assert SelectionConfig(balance_yes_no=True).whole_build
    with pytest.raises(ValueError, match="unknown filter"):
        SelectionConfig(filter="top_k")
    with pytest.raises(ValueError, match="attention_quantile"):
        SelectionConfig(attention_quantile=0.0)


def test_answer_status_and_yes_no():
    assert answer_status("A red circle.", "a red circle") == "right"
    assert answer_status("a blue circle .", "a red circle .") == "wrong"
    assert answer_status(" . ", "a red circle .") == "empty"
    assert (yes_no("Yes, there is."), yes_no("no ."), yes_no("a red circle"), yes_no("")) == (True, False, None, None)


def test_ratio_distribution_and_auc():
    decisions = [
        {"format": "sequence", "n_images": 2, "ratio": 0.2, "answer": "no .", "ground_truth": "yes ."},
        {"format": "sequence", "n_images": 2, "ratio": 0.6, "answer": "yes .", "ground_truth": "yes ."},
        {"format": "sequence", "n_images": 2, "ratio": None, "answer": "no .", "ground_truth": "yes ."},
        {"format": "sequence", "n_images": 2, "ratio": 0.4, "answer": "", "ground_truth": "yes ."},
        {"format": "grid", "n_images": 4, "ratio": 0.1, "answer": "no .", "ground_truth": "yes ."},
    ]
    assert ratio_distribution(decisions) == {
        "sequence/2": {"right": [0.6], "wrong": [0.2]},
        "grid/4": {"right": [], "wrong": [0.1]},
    }
    # wrong 0.1, 0.5, 0.5 against right 0.5, 0.9: pairs (w < r) = 2 + 1 + 1 = 4, ties 2 × 0.5 = 1 → 5 / 6
    assert ratio_auc([0.1, 0.5, 0.5], [0.5, 0.9]) == pytest.approx(5 / 6)
    assert ratio_auc([0.1], [0.9]) == 1.0 and ratio_auc([0.9], [0.1]) == 0.0
    assert ratio_auc([], [0.5]) is None


def test_ratio_histograms_draw_one_panel_per_format_and_count(tmp_path):
    from PIL import Image

    from mmpo.plot import PlotError, plot_ratio_histograms

    ratios = {
        "sequence/2": {"wrong": [0.2, 0.4, 0.45], "right": [0.5, 0.6]},
        "sequence/3": {"wrong": [0.1], "right": []},
        "grid/4": {"wrong": [], "right": [0.3]},
        "pic_in_pic/1": {"wrong": [0.7], "right": [0.8]},
    }
    lines = {"sequence/2": {"paper": 0.8, "q=0.5": 0.4}, "grid/4": {"paper": None}}
    out = plot_ratio_histograms(ratios, tmp_path / "h.png", lines, "test")
    with Image.open(out) as image:
        assert image.format == "PNG" and image.size == (1500, 720)  # 3 × 2 panels of 5 × 3.6 in at 100 dpi
    with pytest.raises(PlotError, match="no ratios"):
        plot_ratio_histograms({}, tmp_path / "empty.png")
