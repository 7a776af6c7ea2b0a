"""Language pretraining of the tiny LLaVA: text only, the language model learns, reruns are free."""

from __future__ import annotations

import json
import random

import torch


def _weights(path):
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(path)
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _tiny(tmp_path, **kwargs):
    from augment.mia.prompts import PIC_IN_PIC_PHRASINGS
    from datamodules.shapes_world import tokenize, vocabulary
    from mmpo.backbones.tiny import build_tiny_llava
    from mmpo.mia_demo import MIA_WORDS

    words = set(vocabulary()) | set(MIA_WORDS)
    for phrasing in PIC_IN_PIC_PHRASINGS:
        words |= set(tokenize(phrasing))
    return build_tiny_llava(tmp_path / "tiny", words=sorted(words), image_size=32, patch_size=8, seed=0, **kwargs)


def test_labelled_list_example_is_the_sequence_prompt_with_captions_for_images():
    from mmpo.backbones.tiny_language import labelled_list_example

    rng = random.Random(3)
    seen = set()
    for _ in range(200):
        example = labelled_list_example(rng, max_items=4)
        prompt, answer, items = example["prompt"], example["chosen"], example["items"]
        assert example["rejected"] != answer and example["kind"] in ("caption", "color", "presence")
        lines = prompt.split("\n")
        assert 1 <= items <= 4 and len(lines) == items + 1 and "<image>" not in prompt
        for i, line in enumerate(lines[:-1], start=1):
            assert line.startswith(f"Image{i}: a ") and line.endswith(" .")
        target = int(lines[-1].split(",")[0].removeprefix("In Image"))
        assert 1 <= target <= items
        question = lines[-1].split(", ", 1)[1]
        caption = lines[target - 1].split(": ", 1)[1]
        if question == "describe the image .":
            assert answer == caption
        elif question.startswith("is there a "):
            named = question.removeprefix("is there ").removesuffix(" in the image ?")
            assert answer == ("yes ." if named + " ." == caption else "no .")
        seen.add(items)
    assert seen == {1, 2, 3, 4}


def test_pretraining_changes_only_the_language_model_and_is_reused(tmp_path):
    from mmpo.backbones.tiny_language import pretrain_tiny_language_model

    path = _tiny(tmp_path)
    before = _weights(path)
    kwargs = {"steps": 10, "batch_size": 8, "warmup_steps": 2, "eval_lists": 16, "progress": False}
    report = pretrain_tiny_language_model(path, **kwargs)
    assert not report["reused"] and 0.0 <= report["accuracy"] <= 1.0 and report["steps"] == 10
    after = _weights(path)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed and not any(".vision_tower." in n or "multi_modal_projector" in n for n in changed)
    assert any("language_model.layers.0" in n for n in changed) and "lm_head.weight" in changed

    stamp = json.loads((path / "mmpo_tiny.json").read_text())
    assert stamp["language_pretraining"]["steps"] == 10 and stamp["language_pretraining"]["max_items"] == 4
    again = pretrain_tiny_language_model(path, **kwargs)
    assert again["reused"] and again["accuracy"] == report["accuracy"]
    assert again["accuracy_by_items"] == report["accuracy_by_items"]

    # vision pretraining afterwards keeps the language pretraining's weights and stamp, and vice versa
    from mmpo.backbones.tiny_vision import pretrain_tiny_vision_tower

    pretrain_tiny_vision_tower(path, steps=2, batch_size=4, warmup_steps=1, eval_scenes=4, progress=False)
    both = _weights(path)
    assert all(torch.equal(both[n], after[n]) for n in changed)
    stamp = json.loads((path / "mmpo_tiny.json").read_text())
    assert {"vision_pretraining", "language_pretraining"} <= stamp.keys()
    assert pretrain_tiny_language_model(path, **kwargs)["reused"]
