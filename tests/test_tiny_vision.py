"""Vision pretraining of the tiny LLaVA: the tower learns, nothing else changes, reruns are free."""

from __future__ import annotations

import json
import math

import torch


def _weights(path):
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(path)
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_pretraining_changes_only_the_tower_and_is_reused(tmp_path):
    from transformers import AutoProcessor

    from datamodules.worlds.shapes import vocabulary
    from mmpo.tiny.llava import build_tiny_llava
    from mmpo.tiny.vision import pretrain_tiny_vision_tower

    path = build_tiny_llava(tmp_path / "tiny", words=vocabulary(), image_size=32, patch_size=8, seed=0)
    before = _weights(path)
    word_ids = AutoProcessor.from_pretrained(path).tokenizer.convert_tokens_to_ids(vocabulary())
    report = pretrain_tiny_vision_tower(path, steps=12, batch_size=8, warmup_steps=2, eval_scenes=16, progress=False)
    assert not report["reused"] and report["steps"] == 12
    # Binary cross-entropy over the 24 (colour, shape) pairs of one-object scenes: a head that knows nothing
    # (zero logits) scores log 2 = 0.693, one that knows only that 1 pair in 24 is present scores the
    # entropy H(1/24) = 0.173. Twelve steps learn at least most of that base rate.
    assert report["loss"] < 0.5 * math.log(2)
    after = _weights(path)
    assert before.keys() == after.keys()
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    tower = {n for n in before if ".vision_tower." in n}
    assert changed and changed <= tower  # the language model and the projector are untouched
    assert any("encoder.layers.0" in n for n in changed) and any("patch_embedding" in n for n in changed)

    stamp = json.loads((path / "mmpo_tiny.json").read_text())
    assert stamp["vision_pretraining"]["steps"] == 12 and stamp["vision_pretraining"]["accuracy"] == report["accuracy"]
    again = pretrain_tiny_vision_tower(path, steps=12, batch_size=8, warmup_steps=2, eval_scenes=16, progress=False)
    assert again["reused"] and again["accuracy"] == report["accuracy"]

    # rebuilding with the same settings keeps the pretrained tower; the processor still loads, with the
    # tokenizer the model was built with (every word its own known id, as before)
    build_tiny_llava(path, words=vocabulary(), image_size=32, patch_size=8, seed=0)
    kept = _weights(path)
    assert all(torch.equal(kept[n], after[n]) for n in after)
    tokenizer = AutoProcessor.from_pretrained(path).tokenizer
    assert tokenizer.convert_tokens_to_ids(vocabulary()) == word_ids
    assert len(set(word_ids)) == len(word_ids) and tokenizer.unk_token_id not in word_ids


def test_pretraining_learns_to_recognise_scenes(tmp_path):
    from datamodules.worlds.shapes import render_scene, sample_scene, vocabulary
    from mmpo.tiny.llava import build_tiny_llava
    from mmpo.tiny.vision import pretrain_tiny_vision_tower

    path = build_tiny_llava(tmp_path / "tiny", words=vocabulary(), image_size=32, patch_size=8, seed=0)
    report = pretrain_tiny_vision_tower(path, steps=400, batch_size=32, lr=3e-3, eval_scenes=128, progress=False)
    # 24 (colour, shape) pairs: guessing is right 1 time in 24; colours come first, shapes later
    assert report["accuracy"] > 0.3, report

    # the features LLaVA reads (the mean of the last layer's patch tokens) separate colours after pretraining:
    # scenes of one object of the same colour are closer than scenes of different colours
    import random

    from transformers import AutoImageProcessor, AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(path)
    rng = random.Random(5)
    scenes = [sample_scene(rng, 1, 32) for _ in range(64)]
    pixels = AutoImageProcessor.from_pretrained(path)([render_scene(s, 32) for s in scenes], return_tensors="pt")
    with torch.no_grad():
        hidden = model.model.vision_tower(pixel_values=pixels["pixel_values"]).last_hidden_state  # (64, 1 + P, D)
    f = torch.nn.functional.normalize(hidden[:, 1:].mean(1), dim=-1)
    colours = [scene[0].color for scene in scenes]
    same = torch.tensor([[a == b for b in colours] for a in colours])
    sim = f @ f.T
    off = ~torch.eye(64, dtype=torch.bool)
    assert sim[same & off].mean() > sim[~same].mean() + 0.2  # about 0.98 against 0.55


def test_pretraining_refuses_a_directory_that_is_not_a_tiny_llava(tmp_path):
    import pytest

    from mmpo.tiny.vision import pretrain_tiny_vision_tower

    with pytest.raises(FileNotFoundError, match="mmpo_tiny.json"):
        pretrain_tiny_vision_tower(tmp_path)
