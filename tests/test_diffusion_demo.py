"""``mmpo diffusion-demo``: its prompt splits, its pairs and its VAE are what they claim; the recipe runs end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from datamodules.worlds.shapes import objects_in_text
from mmpo.recipes import diffusion_demo
from mmpo.recipes.diffusion_data import WORLD, prompt_splits, render_scenes, train_autoencoder


def test_prompt_splits_are_disjoint_deterministic_and_from_the_world():
    train, held_out = prompt_splits(0, 60, 30)
    assert len(train) == 60 and len(held_out) == 30
    assert len(set(train)) == 60 and not set(train) & set(held_out)
    assert (train, held_out) == prompt_splits(0, 60, 30)
    assert prompt_splits(1, 60, 30)[0] != train
    assert all(1 <= len(objects_in_text(c)) <= WORLD["max_objects"] for c in train + held_out)
    with pytest.raises(ValueError, match="fewer than"):
        prompt_splits(0, 600, 10)  # 576 captions exist


def test_the_autoencoder_trains_and_sets_its_scaling_factor():
    vae, report = train_autoencoder(seed=0, n_images=32, steps=3, batch_size=4)
    assert set(report) >= {"reconstruction_reward", "reconstruction_mse", "scaling_factor", "seconds"}
    assert 0.0 <= report["reconstruction_reward"] <= 1.0
    images, _ = render_scenes(0, "vae", 32)
    x = torch.tensor(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        means = vae.encode(x).latent_dist.mean
    assert vae.config.scaling_factor == pytest.approx(1.0 / means.std().item(), rel=1e-5)
    assert means.shape[-1] == WORLD["image_size"] // 4  # 8 x 8 latents, the tiny UNet's sample size


def test_the_demo_runs_end_to_end_and_its_pairs_are_ordered_by_reward(tmp_path):
    from datamodules.diffusion.pairs import load_diffusion_records

    args = ["--workdir", str(tmp_path), "--seeds", "1", "--vae-steps", "5", "--n-pretrain", "16"]
    args += ["--pretrain-steps", "2", "--pretrain-batch-size", "4", "--n-prompts", "6", "--n-eval", "3"]
    args += ["--dpo-steps", "2", "--batch-size", "2", "--min-gap", "0", "--sampling-steps", "2", "--eval-rows", "2"]
    args += ["--samples-per-prompt", "4"]
    results = diffusion_demo.main(args)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["before"] == results["before"] and len(saved["after"]) == 1
    for figures in (results["before"], *results["after"]):
        for split in ("held_out", "train"):
            assert set(figures[split]) == set(diffusion_demo.METRICS)
            assert 0.0 <= figures[split]["reward"] <= 1.0
    assert results["prompts"] == {"train": 6, "held_out": 3}
    # with min-gap 0 every two of a prompt's 4 samples make a pair, winner first
    pairs = tmp_path / "seed-0" / "pairs" / "pairs.jsonl"
    rows = [json.loads(line) for line in pairs.read_text().splitlines()]
    assert len(rows) == results["pairs"][0]["pairs"] == 6 * 6
    assert all(r["scores"][0] >= r["scores"][1] for r in rows)
    records, _ = load_diffusion_records(str(pairs), str(pairs.parent), drop_ties=False)
    assert len(records) == len(rows)
    assert (tmp_path / "seed-0" / "lora" / "pytorch_lora_weights.safetensors").is_file()
    assert (tmp_path / "seed-0" / "before_after.png").is_file()
    # a second run reuses the model and the pretrained UNet (their stamps match); --lora-rank 0 trains the whole
    # UNet against a frozen copy and is evaluated from the saved UNet
    again = diffusion_demo.main([*args, "--lora-rank", "0"])
    assert again["before"] == results["before"]
    assert (tmp_path / "seed-0" / "unet" / "config.json").is_file()
    assert (tmp_path / "seed-0" / "dpo-run" / "metrics.csv").is_file()  # what `mmpo plot` draws
