"""``mmpo pami-demo --family qwen2_vl``: the tiny Qwen2-VL's tokens, their labels, its batches and the recipe."""

from __future__ import annotations

import json
import random

import pytest
import torch

from datamodules.worlds.shapes import COLORS, SHAPES
from datamodules.worlds.video import DIRECTIONS, MovingObject
from mmpo.recipes.pami_data import WORLD, clip_question_example
from mmpo.recipes.pami_qwen import cell_labels


def _label(color: str, shape: str, direction: str) -> list[int]:
    return [1 + list(COLORS).index(color), 1 + list(SHAPES).index(shape), 1 + list(DIRECTIONS).index(direction)]


def test_cell_labels_name_the_object_covering_each_cell_in_each_pair_of_frames():
    # a 14 px red circle moving right 1 px a frame from (4, 4): in frames 0-1 its box spans x 4..19, y 4..18;
    # a blue square appearing at frame 4 in the bottom-right corner, moving up.
    right = MovingObject("circle", "red", "right", appears=0, side=14, speed=1, start=(4, 4))
    late = MovingObject("square", "blue", "up", appears=4, side=14, speed=1, start=(44, 46))
    labels = cell_labels([right, late], num_frames=8, size=64, grid=4).reshape(4, 4, 4, 3)  # (pair, row, col, 3)
    assert labels[0, 0, 0].tolist() == _label("red", "circle", "right")
    # x 16..19, y 4..16 of frames 0-1 is 3 x 12 px of the next cell: under a sixth of its 256 px, so background
    assert labels[0, 0, 1].tolist() == [0, 0, 0]
    assert labels[0, 3, 3].tolist() == [0, 0, 0] and labels[1, 3, 3].tolist() == [0, 0, 0]  # not there yet
    assert labels[2, 3, 3].tolist() == _label("blue", "square", "up")  # frames 4-5: x 44..58, y 45..60
    # frames 6-7: the circle's box spans x 10..25, y 4..18, 9 x 12 px of the second cell of the first row
    assert labels[3, 0, 1].tolist() == _label("red", "circle", "right")
    assert (labels[..., 0] > 0).sum() == (labels[..., 2] > 0).sum()  # a cell has all three labels or none


@pytest.fixture(scope="module")
def demo_qwen(tmp_path_factory):
    from datamodules.worlds.video import vocabulary
    from datamodules.worlds.video_probes import probe_vocabulary
    from mmpo.recipes.pami_qwen import build_demo_qwen2_vl

    words = [*vocabulary(), *probe_vocabulary()]
    return build_demo_qwen2_vl(tmp_path_factory.mktemp("pami-qwen") / "model", words, seed=0)


def test_the_demo_qwen_sees_two_frames_a_token_and_16_tokens_a_pair(demo_qwen):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from mmpo.recipes.pami_data import _clip_batch

    processor = AutoProcessor.from_pretrained(demo_qwen)
    config = AutoModelForImageTextToText.from_pretrained(demo_qwen).config
    assert config.vision_config.temporal_patch_size == 2 and config.text_config.hidden_size == 128
    examples = [clip_question_example(random.Random(3)) for _ in range(3)]
    batch = _clip_batch(examples, processor)
    # 64 px frames (not resized) in 8 px patches merged 2 x 2: 4 pairs of frames x 4 x 4 tokens
    assert batch["video_grid_thw"].tolist() == [[WORLD["num_frames"] // 2, 8, 8]] * 3
    assert ((batch["input_ids"] == processor.video_token_id).sum(-1) == 64).all()
    # token-aligned inputs are padded with the tokens: Qwen2-VL's mm_token_type_ids mark the video tokens only
    types = batch["mm_token_type_ids"]
    assert types.shape == batch["input_ids"].shape
    assert ((types > 0) == (batch["input_ids"] == processor.video_token_id)).all()
    tokenizer = processor.tokenizer
    for i, e in enumerate(examples):
        answer = tokenizer(e["chosen"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        row = batch["labels"][i]
        assert row[row != -100].tolist() == answer


def test_tower_pretraining_learns_cells_and_is_reused(demo_qwen, tmp_path):
    import shutil

    from mmpo.recipes.pami_qwen import pretrain_qwen_video_tower

    model = tmp_path / "model"
    shutil.copytree(demo_qwen, model)
    before = (model / "model.safetensors").read_bytes()
    report = pretrain_qwen_video_tower(model, steps=3, seed=0, batch_size=2, progress=False)
    assert set(report["accuracy"]) == {"color", "shape", "direction"} and not report["reused"]
    assert all(0.0 <= v <= 1.0 for v in report["accuracy"].values()) and report["loss"] == report["loss"]
    assert (model / "model.safetensors").read_bytes() != before  # the tower was trained and saved
    stamp = json.loads((model / "mmpo_tiny.json").read_text())
    assert stamp["video_tower_pretraining"]["steps"] == 3
    again = pretrain_qwen_video_tower(model, steps=3, seed=0, batch_size=2, progress=False)
    assert again["reused"] and again["accuracy"] == report["accuracy"]


def test_the_tower_position_head_is_refused_for_qwen(capsys):
    from mmpo.recipes.pami_demo import main

    with pytest.raises(SystemExit):
        main(["--tower-positions"])  # the default family is Qwen2-VL
    assert "--tower-positions is a head of the LLaVA-NeXT-Video tower" in capsys.readouterr().err


def test_the_probe_seed_of_the_training_questions_is_refused(capsys):
    from mmpo.recipes.pami_data import TRAIN_PROBE_SEED
    from mmpo.recipes.pami_demo import main

    with pytest.raises(SystemExit):
        main(["--probe-seed", str(TRAIN_PROBE_SEED + 3), "--world-seed", "3"])
    assert "is the seed of the training yes/no questions" in capsys.readouterr().err


def test_the_demo_refuses_an_unknown_family(tmp_path):
    from mmpo.recipes.pami_data import prepare

    with pytest.raises(ValueError, match="family must be one of llava_next_video, qwen2_vl, got 'gpt'"):
        prepare(tmp_path, 4, 2, 4, 0, 1, family="gpt")
    assert not (tmp_path / "data").exists()  # refused before anything is written


@pytest.mark.slow
def test_the_qwen_demo_runs_end_to_end_at_the_smallest_sizes(tmp_path):
    from mmpo.recipes.pami_demo import CANDIDATES, main

    argv = ["--workdir", str(tmp_path), "--family", "qwen2_vl", "--seeds", "1", "--n-train", "32"]
    argv += ["--n-yes-no", "12", "--n-val", "24", "--vision-steps", "3", "--sft-epochs", "1", "--dpo-steps", "2"]
    argv += ["--batch-size", "2", "--probes", "6", "--language-steps", "2", "--video-steps", "2"]
    results = main([*argv, "--shape-color-questions", "--probe-seed", "5"])
    assert results["settings"]["family"] == "qwen2_vl" and results["settings"]["probe_seed"] == 5
    assert set(results["vision"]["accuracy"]) == {"color", "shape", "direction"}
    assert (tmp_path / "tiny-video-qwen2-vl" / "config.json").is_file()
    assert results["video_language"]["steps"] == 2
    open_keys = {f"open/{kind}" for kind in ("caption", "color", "direction", "order", "shape_color")}
    for figures in (results["before"], results["after"]["vdpo"][0], results["after"]["pami"][0]):
        assert all(0.0 <= v <= 1.0 for v in figures.values())
        assert open_keys <= figures.keys()  # the open questions are answered before and after each run
    for kind in ("direction", "color", "shape_color"):
        assert set(results["awareness"]["scores"][kind]) == set(CANDIDATES)
    assert torch.isfinite(torch.tensor(list(results["awareness"]["scores"]["direction"].values()))).all()
