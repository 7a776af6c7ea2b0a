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
    from datamodules.worlds.shapes import tokenize, vocabulary
    from mmpo.recipes.mia_demo import MIA_WORDS
    from mmpo.tiny.llava import build_tiny_llava

    words = set(vocabulary()) | set(MIA_WORDS)
    for phrasing in PIC_IN_PIC_PHRASINGS:
        words |= set(tokenize(phrasing))
    return build_tiny_llava(tmp_path / "tiny", words=sorted(words), image_size=32, patch_size=8, seed=0, **kwargs)


def test_labelled_list_example_is_the_sequence_prompt_with_captions_for_images():
    from mmpo.tiny.language import labelled_list_example

    rng = random.Random(3)
    seen, kinds = set(), set()
    for _ in range(200):
        example = labelled_list_example(rng, max_items=4)
        prompt, answer, items = example["prompt"], example["chosen"], example["items"]
        assert example["rejected"] != answer
        kinds.add(example["kind"])
        lines = prompt.split("\n")
        assert 1 <= items <= 4 and len(lines) == items + 1 and "<image>" not in prompt
        for i, line in enumerate(lines[:-1], start=1):
            assert line.startswith(f"Image{i}: a ") and line.endswith(" .")
        target = int(lines[-1].split(",")[0].removeprefix("In Image"))
        assert 1 <= target <= items
        question = lines[-1].split(", ", 1)[1]
        caption = lines[target - 1].split(": ", 1)[1]
        # the answer is about the item the question points at (one object per item: "a red circle .")
        _, colour, shape, _ = caption.split()
        if example["kind"] == "caption":
            assert question == "describe the image ." and answer == caption
        elif example["kind"] == "color":
            assert question == f"what color is the {shape} ?" and answer == f"the {shape} is {colour} ."
        else:
            named = question.removeprefix("is there ").removesuffix(" in the image ?")
            assert question.startswith("is there a ") and answer == ("yes ." if named + " ." == caption else "no .")
        seen.add(items)
    assert seen == {1, 2, 3, 4} and kinds == {"caption", "color", "presence"}


def _answer_nll(path, examples) -> float:
    """Mean NLL per answer token (EOS included) of the checkpoint on text-only lists, one list at a time."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    processor = AutoProcessor.from_pretrained(path)
    tokenizer = processor.tokenizer
    total, count = 0.0, 0
    for example in examples:
        messages = [{"role": "user", "content": [{"type": "text", "text": example["prompt"]}]}]
        text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        prompt = tokenizer(text, add_special_tokens=False)["input_ids"]
        answer = tokenizer(example["chosen"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([prompt + answer])).logits[0, len(prompt) - 1 : -1]
        total -= torch.log_softmax(logits.float(), -1).gather(-1, torch.tensor(answer)[:, None]).sum().item()
        count += len(answer)
    return total / count


def test_exact_match_counts_every_answer_token_and_ignores_the_prompt():
    from types import SimpleNamespace

    from mmpo.tiny.language import exact_answer_match

    # 3 rows of 5 positions, answer tokens at positions 2..4 (the prompt's labels are -100)
    labels = torch.tensor([[-100, -100, 3, 1, 4]] * 3)
    logits = torch.zeros(3, 5, 6)
    for row in range(3):
        for t in range(1, 4):  # position t predicts the token at t + 1
            logits[row, t, labels[row, t + 1]] = 1.0
    logits[1, 3, 2] = 5.0  # row 1: the last answer token (EOS) predicted wrong
    logits[2, 0, 5] = 5.0  # row 2: wrong only where the prompt is: not counted

    class Model:
        def __call__(self, input_ids, attention_mask):
            return SimpleNamespace(logits=logits)

    ids = torch.zeros(3, 5, dtype=torch.long)
    assert exact_answer_match(Model(), ids, torch.ones_like(ids), labels).tolist() == [True, False, True]


def test_pretraining_changes_only_the_language_model_and_is_reused(tmp_path):
    from mmpo.tiny.language import labelled_list_example, pretrain_tiny_language_model

    path = _tiny(tmp_path)
    before = _weights(path)
    rng = random.Random(123)
    held_out = [labelled_list_example(rng, max_items=4) for _ in range(16)]
    nll_before = _answer_nll(path, held_out)
    kwargs = {"steps": 10, "batch_size": 8, "warmup_steps": 2, "eval_lists": 16, "progress": False}
    report = pretrain_tiny_language_model(path, **kwargs)
    assert not report["reused"] and report["steps"] == 10
    # the language model learns: ten steps take the answers' NLL on unseen lists from about log(vocabulary)
    # (4.1 nats) to about 2.6, and the last training batch's loss is below the untrained one as well
    nll_after = _answer_nll(path, held_out)
    assert nll_after < 0.75 * nll_before and report["loss"] < nll_before
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
    from mmpo.tiny.vision import pretrain_tiny_vision_tower

    pretrain_tiny_vision_tower(path, steps=2, batch_size=4, warmup_steps=1, eval_scenes=4, progress=False)
    both = _weights(path)
    assert all(torch.equal(both[n], after[n]) for n in changed)
    stamp = json.loads((path / "mmpo_tiny.json").read_text())
    assert {"vision_pretraining", "language_pretraining"} <= stamp.keys()
    assert pretrain_tiny_language_model(path, **kwargs)["reused"]
