"""Pretrain the tiny LLaVA's language model on text: a stand-in for the language pretraining of a real LLM.

A real LLaVA's language model has read the web before it meets an image: it can already follow "In Image2,
..." to the item labelled ``Image2`` in a list, and MIA-DPO's multi-image data relies on that. The tiny
LLaVA of :mod:`mmpo.tiny.llava` starts from random weights, and on ~2k multi-image preference pairs
alone its language model never learns which image a question points at (``docs/negatives.md``). Here it
learns the skill from text only: each example is a labelled list of shapes-world captions standing where
the images would be, in the words of MIA-DPO's sequence prompt, and a question about one item::

    USER : Image1: a red circle .
    Image2: a blue square .
    In Image2, describe the image . ASSISTANT : a blue square . </s>

with the world's caption, colour and yes/no presence questions (the loss is on the answer only). The
vision tower and the projector are untouched and no image is ever shown, so the model still learns to see
and to answer about images only from single images in SFT. The weights are written back into the
checkpoint and the run is recorded in ``mmpo_tiny.json``, so a second call with the same settings does
nothing.

Example:
    >>> from mmpo.tiny.language import pretrain_tiny_language_model
    >>> report = pretrain_tiny_language_model("runs/mia_dpo/tiny-llava", steps=800)
    >>> report["accuracy"]  # held-out lists whose answer is reproduced exactly (teacher-forced argmax)
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import Tensor

from mmpo.tiny.llava import pretraining_loop, read_tiny_stamp, reused_pretraining, save_tiny_weights

__all__ = ["exact_answer_match", "labelled_list_example", "pretrain_tiny_language_model", "right_padded"]

_IGNORE = -100


def labelled_list_example(
    rng: random.Random, max_items: int, max_objects: int = 1, task_weights: Mapping[str, float] | None = None
) -> dict:
    """One text example: ``{"prompt", "chosen", "rejected", "kind", "items"}``.

    The prompt is MIA-DPO's sequence prompt (``augment.mia.prompts.sequence_prompt``) with each ``<image>``
    replaced by the caption of a sampled shapes-world scene; the question and the two answers are those of
    the target item's record (a caption, colour or presence task), so it is also a text-only preference
    record the datamodules read.
    """
    from augment.mia.prompts import IMAGE_PLACEHOLDER, sequence_prompt
    from datamodules.worlds.shapes import make_record

    items = rng.randint(1, max_items)
    records = [make_record(rng, task_weights=task_weights, max_objects=max_objects) for _ in range(items)]
    index = rng.randrange(items)
    target = records[index]
    prompt = sequence_prompt(target["prompt"], items, index)
    for record in records:
        prompt = prompt.replace(IMAGE_PLACEHOLDER, record["caption"], 1)
    return {"prompt": prompt, "items": items, **{k: target[k] for k in ("chosen", "rejected", "kind")}}


def _batch(examples: list[dict], processor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``input_ids``, ``attention_mask`` and ``labels`` (prompt masked), right-padded, and the item counts.

    Prompts go through the checkpoint's chat template and answers end with EOS, as the datamodules do.
    """
    tokenizer = processor.tokenizer
    rows, targets = [], []
    for example in examples:
        messages = [{"role": "user", "content": [{"type": "text", "text": example["prompt"]}]}]
        text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        p = tokenizer(text, add_special_tokens=False)["input_ids"]
        a = tokenizer(example["chosen"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        rows.append(p + a)
        targets.append([_IGNORE] * len(p) + a)
    ids, mask, labels = right_padded(rows, targets, tokenizer.pad_token_id)
    return ids, mask, labels, torch.tensor([e.get("items", 1) for e in examples])


def right_padded(rows: list[list[int]], targets: list[list[int]], pad_id: int) -> tuple[Tensor, Tensor, Tensor]:
    """Token rows and their labels (``-100`` where no loss) as right-padded (B, T) ``input_ids``,
    ``attention_mask`` and ``labels``."""
    length = max(map(len, rows))
    ids = torch.full((len(rows), length), pad_id)
    labels = torch.full((len(rows), length), _IGNORE)
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    for i, (row, target) in enumerate(zip(rows, targets, strict=True)):
        ids[i, : len(row)] = torch.tensor(row)
        labels[i, : len(row)] = torch.tensor(target)
        mask[i, : len(row)] = 1
    return ids, mask, labels


def exact_answer_match(model, ids: Tensor, mask: Tensor, labels: Tensor, **media: Tensor) -> Tensor:
    """Whether a causal language model reproduces each row's answer token for token (teacher-forced argmax).

    The accuracy :func:`pretrain_tiny_language_model` reports, usable to score any checkpoint on labelled rows.

    Args:
        model: a causal LM (or image-text-to-text model) called as ``model(input_ids=..., attention_mask=...)``.
        ids: (B, T) token ids, prompt then answer (EOS included), right-padded.
        mask: (B, T) attention mask.
        labels: (B, T) the ids where the answer is and ``-100`` elsewhere (prompt, padding), as for a
            transformers loss: position ``t`` is predicted from the positions before it.
        media: further model inputs of the rows (e.g. ``pixel_values_videos``).

    Returns:
        (B,) bool: True where the argmax of the next-token distribution is the label at every answer position.
    """
    with torch.no_grad():
        predicted = model(input_ids=ids, attention_mask=mask, **media).logits[:, :-1].argmax(-1)
    target = labels[:, 1:]
    return ((predicted == target) | (target == _IGNORE)).all(dim=1)


def pretrain_tiny_language_model(
    checkpoint: str | os.PathLike,
    steps: int = 800,
    batch_size: int = 64,
    lr: float = 2e-3,
    warmup_steps: int = 50,
    max_items: int = 4,
    max_objects: int = 1,
    task_weights: Mapping[str, float] | None = None,
    seed: int = 0,
    eval_lists: int = 512,
    progress: bool = True,
    example: Callable[[random.Random], dict] | None = None,
) -> dict:
    """Train the language model of a tiny LLaVA on labelled caption lists (text only); save it in place.

    Args:
        checkpoint: a directory written by :func:`mmpo.tiny.llava.build_tiny_llava` (image model).
        steps: optimiser steps; each samples ``batch_size`` new lists.
        batch_size: lists per step.
        lr: peak AdamW learning rate (linear warm-up, then cosine decay to zero).
        warmup_steps: steps of linear warm-up.
        max_items: most items per list (1..``max_items``, uniformly).
        max_objects: most objects per scene, as the world the model will be fine-tuned on.
        task_weights: relative weight of the world's question kinds (``caption``, ``color``, ``presence``);
            the world's defaults when None.
        seed: seed of the lists.
        eval_lists: held-out lists (their own seed) scored after training.
        progress: show a progress bar.
        example: another source of text examples, ``example(rng) -> {"prompt", "chosen"[, "items"]}`` (e.g. a
            video world's questions with the scene described in words); then ``max_items``, ``max_objects`` and
            ``task_weights`` are not read, and its ``__name__`` is part of the stamp.

    Returns:
        ``{"accuracy", "accuracy_by_items", "loss", "seconds", "steps", "reused"}``: the share of held-out
        lists whose answer the model reproduces token for token, overall and per list length.
    """
    from transformers import AutoModelForImageTextToText, AutoProcessor

    out = Path(checkpoint)
    stamp = read_tiny_stamp(out)
    settings = {
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "warmup_steps": warmup_steps,
        "max_items": max_items,
        "max_objects": max_objects,
        "task_weights": dict(task_weights) if task_weights is not None else None,
        "seed": seed,
    }
    if example is not None:
        settings["example"] = example.__name__
    reused = reused_pretraining(
        stamp, "language_pretraining", settings, ("accuracy", "accuracy_by_items", "loss", "seconds")
    )
    if reused is not None:
        return reused

    model = AutoModelForImageTextToText.from_pretrained(out, dtype=torch.float32)
    processor = AutoProcessor.from_pretrained(out)
    language = [p for n, p in model.named_parameters() if "vision_tower" not in n and "multi_modal_projector" not in n]
    for p in model.parameters():
        p.requires_grad_(False)
    for p in language:
        p.requires_grad_(True)
    rng = random.Random(f"mmpo-tiny-language/{seed}/train")
    sample = (max_items, max_objects, task_weights)
    if example is None:

        def example(r: random.Random) -> dict:
            return labelled_list_example(r, *sample)

    def step_loss() -> Tensor:
        ids, mask, labels, _ = _batch([example(rng) for _ in range(batch_size)], processor)
        return model(input_ids=ids, attention_mask=mask, labels=labels).loss

    model.train()
    start = time.perf_counter()
    loss = pretraining_loop(language, step_loss, steps, lr, warmup_steps, "language pretraining", progress)

    model.eval()
    held_out = random.Random(f"mmpo-tiny-language/{seed}/eval")
    examples = [example(held_out) for _ in range(eval_lists)]
    ids, mask, labels, items = _batch(examples, processor)
    chunks = zip(ids.split(128), mask.split(128), labels.split(128), strict=True)
    exact = torch.cat([exact_answer_match(model, *chunk) for chunk in chunks])
    accuracy = exact.float().mean().item()
    by_items = {str(k): round(exact[items == k].float().mean().item(), 4) for k in sorted(set(items.tolist()))}
    seconds = round(time.perf_counter() - start, 1)
    report = {"accuracy": accuracy, "accuracy_by_items": by_items, "loss": loss, "seconds": seconds}
    stamp["language_pretraining"] = {**settings, **report}
    for p in model.parameters():
        p.requires_grad_(True)
    save_tiny_weights(model, out, stamp)
    return {**report, "steps": steps, "reused": False}
