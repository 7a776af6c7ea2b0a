"""Tests of augment.mia.select: hand-computed attention ratios, thresholds, drop reasons, masking, configs."""

from __future__ import annotations

import math
import re

import pytest
import torch
from jsonargparse import ArgumentParser

from augment.mia.select import (
    DEFAULT_THRESHOLDS,
    DROP_REASONS,
    SelectionConfig,
    SelectionSummary,
    attention_to_tokens,
    normalise_answer,
    perplexity,
    resolve_layer,
    select_rejected,
    stack_attention_rows,
    target_attention_ratio,
)

# A sequence prompt of 12 keys: text 0-1, image A at 2-5, image B at 6-9, text 10-11.
IMAGE_A, IMAGE_B = [2, 3, 4, 5], [6, 7, 8, 9]
# Per (head, generated token) row, the mean weight on A's and on B's keys. Heads × tokens = 2 × 3.
A_MEANS = [[0.05, 0.10, 0.15], [0.025, 0.075, 0.10]]
B_MEANS = [[0.025, 0.025, 0.0], [0.05, 0.025, 0.025]]
WIGGLE = 0.01  # within an image the keys get mean ± WIGGLE, so only the per-image mean is preserved


def sequence_attention() -> torch.Tensor:
    """(2 heads, 3 tokens, 12 keys) attention rows summing to 1; the text keys take the remainder."""
    attn = torch.zeros(2, 3, 12, dtype=torch.float64)
    signs = torch.tensor([1.0, -1.0, 1.0, -1.0], dtype=torch.float64)
    for h in range(2):
        for q in range(3):
            a, b = A_MEANS[h][q], B_MEANS[h][q]
            attn[h, q, IMAGE_A] = a + WIGGLE * signs
            attn[h, q, IMAGE_B] = b + WIGGLE * signs if b else 0.0
            attn[h, q, [0, 1, 10, 11]] = (1.0 - 4 * a - 4 * b) / 4
    return attn


# --------------------------------------------------------------------------- averaging and ratios


def test_attention_to_tokens_averages_heads_and_generated_tokens():
    attn = sequence_attention()
    over_keys = attention_to_tokens(attn)
    assert over_keys.shape == (12,)
    # key 2 is image A's first key: mean over the six rows of (a + 0.01); A's means sum to 0.5
    assert over_keys[2].item() == pytest.approx(0.5 / 6 + 0.01)
    assert over_keys[3].item() == pytest.approx(0.5 / 6 - 0.01)
    assert over_keys.sum().item() == pytest.approx(1.0)


def test_sequence_ratio_by_hand():
    over_keys = attention_to_tokens(sequence_attention())
    mean_a, mean_b = 0.5 / 6, 0.15 / 6  # sums of A_MEANS and B_MEANS over the six rows, over 6
    assert target_attention_ratio(over_keys, [IMAGE_A, IMAGE_B], target=0) == pytest.approx(mean_a / (mean_a + mean_b))
    assert target_attention_ratio(over_keys, [IMAGE_A, IMAGE_B], target=0) == pytest.approx(10 / 13)
    assert target_attention_ratio(over_keys, [IMAGE_A, IMAGE_B], target=1) == pytest.approx(3 / 13)
    # groups as tensors or bool masks give the same number
    mask_b = torch.zeros(12, dtype=torch.bool)
    mask_b[6:10] = True
    assert target_attention_ratio(over_keys, [torch.tensor(IMAGE_A), mask_b], 1) == pytest.approx(3 / 13)


def test_grid_uneven_tiles_use_means_not_sums():
    # a 5×5 patch map (keys from 3) cut 2×2 at rows/cols [0, 2, 5]: tiles of 4, 6, 6 and 9 tokens
    index = torch.arange(25).reshape(5, 5) + 3
    tiles = [index[r0:r1, c0:c1].flatten() for r0, r1 in ((0, 2), (2, 5)) for c0, c1 in ((0, 2), (2, 5))]
    assert [len(t) for t in tiles] == [4, 6, 6, 9]
    over_keys = torch.zeros(3 + 25)
    over_keys[3:] = 0.1
    over_keys[tiles[0]] = 0.3
    ratio = target_attention_ratio(over_keys, tiles, target=0)
    assert ratio == pytest.approx(0.3 / (0.3 + 0.1 + 0.1 + 0.1))  # 0.5
    assert ratio != pytest.approx((4 * 0.3) / (4 * 0.3 + 6 * 0.1 + 6 * 0.1 + 9 * 0.1))  # not the sum ratio
    assert select_rejected(ratio, 2.0, "a dog", "a cat", "grid", 4) == (True, "")  # 0.5 ≤ 0.5


def test_pic_in_pic_centre_versus_rest():
    centre = [8, 9, 12, 13]  # the central 2×2 of a 4×4 patch map whose keys start at 3
    rest = [k for k in range(3, 19) if k not in centre]
    over_keys = torch.zeros(3 + 16)
    over_keys[rest] = 0.05
    over_keys[centre] = 0.15
    ratio = target_attention_ratio(over_keys, [centre, rest], target=0)
    assert ratio == pytest.approx(0.15 / (0.15 + 0.05))  # 0.75
    assert select_rejected(ratio, 2.0, "red", "blue", "pic_in_pic", 1) == (True, "")
    over_keys[centre] = 0.5  # 0.5 / 0.55 ≈ 0.91 > 0.8
    ratio = target_attention_ratio(over_keys, [centre, rest], target=0)
    assert select_rejected(ratio, 2.0, "red", "blue", "pic_in_pic", 1) == (False, "attention_above_threshold")


# --------------------------------------------------------------------------- batching and masks


def test_batched_padding_of_generated_tokens_does_not_change_results():
    attn = sequence_attention()  # (2, 3, 12)
    short = attn[:, :2]  # a second answer with 2 generated tokens
    padded = torch.full((2, 3, 12), float("nan"), dtype=torch.float64)  # garbage in the padded row
    padded[:, :2] = short
    batch = torch.stack([attn, padded])  # (B=2, heads, Q=3, K)
    mask = torch.tensor([[True, True, True], [True, True, False]])
    out = attention_to_tokens(batch, mask)
    assert out.shape == (2, 12)
    torch.testing.assert_close(out[0], attention_to_tokens(attn))
    torch.testing.assert_close(out[1], attention_to_tokens(short))
    # the same rows given as indices, −1 for padding
    torch.testing.assert_close(attention_to_tokens(batch, torch.tensor([[0, 1, 2], [0, 1, -1]])), out)
    # a (Q,) mask on one sample selects rows too
    torch.testing.assert_close(attention_to_tokens(padded, torch.tensor([True, True, False])), out[1])
    assert target_attention_ratio(out[0], [IMAGE_A, IMAGE_B], 0) == pytest.approx(10 / 13)
    expected = target_attention_ratio(attention_to_tokens(short), [IMAGE_A, IMAGE_B], 0)
    assert target_attention_ratio(out[1], [IMAGE_A, IMAGE_B], 0) == pytest.approx(expected)


def test_bf16_attention_is_averaged_in_float32():
    attn = sequence_attention().to(torch.bfloat16)
    out = attention_to_tokens(attn)
    assert out.dtype == torch.float32
    # the mean of the bf16 weights taken exactly: averaging in bf16 would round it to 8 bits (errors of ~1e-4 here)
    exact = attn.double().mean(dim=(0, 1)).float()
    torch.testing.assert_close(out, exact, rtol=1e-6, atol=1e-7)


def test_stack_attention_rows_pads_each_step_on_the_right():
    g = torch.Generator().manual_seed(0)
    prompt = 4
    # the last query row of each generation step, as generate's hook keeps it: step s sees prompt + s keys
    rows = [torch.rand(2, 2, prompt + s, generator=g) for s in range(3)]
    out = stack_attention_rows(rows)
    assert out.shape == (2, 2, 3, prompt + 2)
    torch.testing.assert_close(out[:, :, 0, :prompt], rows[0])
    assert out[:, :, 0, prompt:].abs().sum().item() == 0.0
    torch.testing.assert_close(out[:, :, 2], rows[2])
    with pytest.raises(ValueError, match="no generation steps"):
        stack_attention_rows([])


# --------------------------------------------------------------------------- perplexity and layers


def test_perplexity_values():
    half = math.log(0.5)
    assert perplexity(torch.full((5,), half), torch.ones(5)).item() == pytest.approx(2.0)
    logps = torch.tensor([[half, math.log(0.25), -math.inf], [half, half, half]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    ppl = perplexity(logps, mask)
    assert ppl.tolist() == pytest.approx([2.0**1.5, 2.0])  # exp((ln 2 + 2 ln 2) / 2), padding ignored
    assert math.isnan(perplexity(torch.zeros(3), torch.zeros(3)).item())
    assert perplexity(torch.zeros(3), torch.ones(3)).item() == 1.0


def test_resolve_layer():
    assert resolve_layer(32) == 16
    assert resolve_layer(33) == 16
    assert resolve_layer(32, 3) == 3
    assert resolve_layer(32, -1) == 31
    assert SelectionConfig(layer=-2).resolve_layer(4) == 2
    assert SelectionConfig().resolve_layer(40) == 20
    with pytest.raises(ValueError):
        resolve_layer(32, 32)
    with pytest.raises(ValueError):
        resolve_layer(32, -33)


# --------------------------------------------------------------------------- selection


def test_threshold_boundary_is_kept():
    # means 0.375 and 0.125 are exact in binary: the ratio is exactly 0.75
    over_keys = torch.zeros(12)
    over_keys[IMAGE_A], over_keys[IMAGE_B] = 0.375, 0.125
    ratio = target_attention_ratio(over_keys, [IMAGE_A, IMAGE_B], 0)
    assert ratio == 0.75
    config = SelectionConfig(thresholds={"sequence": {2: 0.75}})
    assert select_rejected(ratio, 1.5, "two", "three", "sequence", 2, config) == (True, "")
    assert select_rejected(ratio + 1e-9, 1.5, "two", "three", "sequence", 2, config) == (
        False,
        "attention_above_threshold",
    )
    # the defaults: 0.8 for two images, 0.6 for five
    assert select_rejected(0.8, 1.5, "two", "three", "sequence", 2) == (True, "")
    assert select_rejected(0.61, 1.5, "two", "three", "sequence", 5)[1] == "attention_above_threshold"


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [
        ({"fmt": "collage"}, "unknown_format_or_count"),
        ({"fmt": "grid", "n_images": 5}, "unknown_format_or_count"),
        ({"fmt": "sequence", "n_images": 1}, "unknown_format_or_count"),
        ({"response": "  . "}, "empty_response"),
        ({"response": ""}, "empty_response"),
        ({"ground_truth": ""}, "empty_ground_truth"),
        ({"response": "  The CAT  sat. "}, "matches_ground_truth"),
        ({"ppl": 1.1}, "low_perplexity"),
        ({"ppl": 1.0}, "low_perplexity"),
        ({"ppl": float("nan")}, "low_perplexity"),
        ({"ratio": 0.9}, "attention_above_threshold"),
        ({"ratio": float("nan")}, "attention_above_threshold"),
    ],
)
def test_drop_reasons(kwargs, reason):
    args = {"ratio": 0.2, "ppl": 1.5, "response": "a dog ran", "ground_truth": "The cat sat."}
    args |= {"fmt": "sequence", "n_images": 3, "config": SelectionConfig()}
    args |= kwargs
    assert reason in DROP_REASONS
    assert select_rejected(**args) == (False, reason)


def test_keeps_a_hallucination_and_accepts_tensors():
    ok = select_rejected(torch.tensor(0.2), torch.tensor(1.5), "a dog ran", "The cat sat.", "sequence", 3)
    assert ok == (True, "")
    assert (
        select_rejected(0.2, 1.101, "a", "b", "sequence", 3, SelectionConfig(min_perplexity=1.2))[1] == "low_perplexity"
    )


def test_normalise_answer():
    assert normalise_answer("  The   Cat\tsat.\n") == "the cat sat"
    assert normalise_answer("Yes!?") == "yes"
    assert normalise_answer("50%") == "50%"
    assert normalise_answer("...") == ""


# --------------------------------------------------------------------------- config and summary


def test_config_overrides_merge_over_defaults():
    config = SelectionConfig(thresholds={"grid": {4: 0.55}})
    assert config.threshold("grid", 4) == 0.55
    assert config.threshold("grid", 2) == 0.7
    assert config.threshold("sequence", 3) == 0.7
    assert config.threshold("pic_in_pic", 1) == 0.8
    assert config.threshold("grid", 5) is None
    assert DEFAULT_THRESHOLDS["grid"][4] == 0.5  # the defaults are not mutated
    with pytest.raises(ValueError):
        SelectionConfig(thresholds={"mosaic": {2: 0.5}})
    with pytest.raises(ValueError):
        SelectionConfig(thresholds={"grid": {2: 1.5}})


def test_config_parses_with_jsonargparse():
    parser = ArgumentParser()
    parser.add_class_arguments(SelectionConfig, "sel")
    cfg = parser.parse_args(
        ["--sel.thresholds", '{"grid": {"4": 0.55}, "sequence": {"6": 0.5}}', "--sel.min_perplexity", "1.2"]
        + ["--sel.layer", "12"]
    )
    config = parser.instantiate(cfg).sel
    assert isinstance(config, SelectionConfig)
    assert config.threshold("grid", 4) == 0.55
    assert config.threshold("sequence", 6) == 0.5
    assert config.threshold("grid", 9) == 0.3
    assert (config.min_perplexity, config.layer) == (1.2, 12)
    defaults = parser.instantiate(parser.parse_args([])).sel
    assert defaults.thresholds == DEFAULT_THRESHOLDS
    assert (defaults.min_perplexity, defaults.layer, defaults.resolve_layer(32)) == (1.1, None, 16)


def test_summary_counts_and_table():
    summary = SelectionSummary()
    summary.add("sequence", *select_rejected(0.2, 1.5, "a", "b", "sequence", 2))
    summary.add("sequence", True)
    summary.add("sequence", *select_rejected(0.95, 1.5, "a", "b", "sequence", 2))
    summary.add("grid", False, "low_perplexity")
    summary.add("grid", False, "low_perplexity")
    summary.add("pic_in_pic", *select_rejected(0.2, 1.5, "a", "a.", "pic_in_pic", 1))
    data = summary.as_dict()
    assert (data["total"], data["kept"], data["dropped"]) == (6, 2, 4)
    assert data["by_reason"]["low_perplexity"] == 2
    assert data["by_reason"]["matches_ground_truth"] == 1
    assert data["by_reason"]["attention_above_threshold"] == 1
    assert data["by_reason"]["empty_response"] == 0
    assert data["per_format"]["sequence"] == {
        "total": 3,
        "kept": 2,
        "dropped": 1,
        "by_reason": {r: int(r == "attention_above_threshold") for r in DROP_REASONS},
    }
    assert data["per_format"]["grid"]["kept"] == 0
    lines = str(summary).splitlines()
    assert lines[0].split() == ["grid", "pic_in_pic", "sequence", "all"]
    cells = [re.split(r"\s{2,}", line.strip()) for line in lines[1:]]
    rows = {row[0]: row[1:] for row in cells}
    assert rows["total"] == ["2", "1", "3", "6"]
    assert rows["kept"] == ["0", "0", "2", "2"]
    assert rows["kept %"] == ["0.0", "0.0", "66.7", "33.3"]
    assert rows["low_perplexity"] == ["2", "0", "0", "2"]
    assert str(SelectionSummary()).splitlines()[1].split() == ["total", "0"]
