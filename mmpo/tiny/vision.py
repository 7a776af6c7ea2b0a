"""Pretrain the tiny LLaVA's vision tower on shapes-world scenes: a stand-in for CLIP's pretraining.

A real LLaVA starts from a CLIP tower that already sees; the tiny LLaVA of :mod:`mmpo.tiny.llava` starts
from random weights, and learning shapes through the language model's loss alone is slow (after 10 SFT
epochs on 3,000 scenes the tiny model named the right shape in a third of its captions). Here the tower
learns directly: every step renders fresh scenes, the tower's feature layer (the one LLaVA reads) is
averaged over patch tokens, and a linear head, thrown away afterwards, predicts which (colour, shape)
pairs are in the scene (one logit per pair, binary cross-entropy, so scenes of several objects work too).
The tower is written back into the checkpoint and the run is recorded in ``mmpo_tiny.json``, so a second
call with the same settings does nothing.

Example:
    >>> from mmpo.tiny.vision import pretrain_tiny_vision_tower
    >>> report = pretrain_tiny_vision_tower("runs/mia_dpo/tiny-llava", steps=2000)
    >>> report["accuracy"]  # held-out scenes of k objects whose k best-scored pairs are those objects
"""

from __future__ import annotations

import os
import random
import time
from pathlib import Path

import torch
from einops import reduce
from torch import Tensor, nn

from mmpo.tiny.llava import pretraining_loop, read_tiny_stamp, reused_pretraining, save_tiny_weights

__all__ = ["pretrain_tiny_vision_tower"]


def _scene_batch(rng: random.Random, n: int, image_size: int, max_objects: int, processor) -> tuple[Tensor, Tensor]:
    """``pixel_values`` (n, 3, H, W) through the checkpoint's own image processor, and targets (n, pairs)."""
    from datamodules.worlds.shapes import COLORS, SHAPES, render_scene, sample_scene

    pairs = [(c, s) for s in SHAPES for c in COLORS]
    scenes = [sample_scene(rng, max_objects, image_size) for _ in range(n)]
    pixels = processor([render_scene(s, image_size) for s in scenes], return_tensors="pt")["pixel_values"]
    targets = torch.zeros(n, len(pairs))
    for i, scene in enumerate(scenes):
        for obj in scene:
            targets[i, pairs.index((obj.color, obj.shape))] = 1.0
    return pixels, targets


def _features(tower: nn.Module, pixels: Tensor, layer: int) -> Tensor:
    hidden = tower(pixel_values=pixels, output_hidden_states=True).hidden_states[layer]  # (n, 1 + P, D)
    return reduce(hidden[:, 1:], "n p d -> n d", "mean")  # patch tokens only, as LLaVA's "default" strategy


def pretrain_tiny_vision_tower(
    checkpoint: str | os.PathLike,
    steps: int = 2000,
    batch_size: int = 32,
    lr: float = 2e-3,
    warmup_steps: int = 50,
    max_objects: int = 1,
    seed: int = 0,
    eval_scenes: int = 512,
    progress: bool = True,
) -> dict:
    """Train the vision tower of a tiny LLaVA checkpoint to recognise shapes-world objects; save it in place.

    Args:
        checkpoint: a directory written by :func:`mmpo.tiny.llava.build_tiny_llava` (image model).
        steps: optimiser steps; each renders ``batch_size`` new scenes.
        batch_size: scenes per step.
        lr: peak AdamW learning rate (linear warm-up, then cosine decay to zero).
        warmup_steps: steps of linear warm-up.
        max_objects: most objects per scene, as the world the model will be fine-tuned on.
        seed: seed of the scenes and of the head's initialisation.
        eval_scenes: held-out scenes (their own seed) scored after training.
        progress: show a progress bar.

    Returns:
        ``{"accuracy", "loss", "seconds", "steps", "reused"}``; ``accuracy`` is the share of held-out scenes
        of k objects whose k highest-scored (colour, shape) pairs are exactly those objects.
    """
    from transformers import AutoImageProcessor, AutoModelForImageTextToText

    from datamodules.worlds.shapes import COLORS, SHAPES

    out = Path(checkpoint)
    stamp = read_tiny_stamp(out)
    settings = {
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "warmup_steps": warmup_steps,
        "max_objects": max_objects,
        "seed": seed,
    }
    reused = reused_pretraining(stamp, "vision_pretraining", settings, ("accuracy", "loss", "seconds"))
    if reused is not None:
        return reused

    model = AutoModelForImageTextToText.from_pretrained(out, dtype=torch.float32)
    processor = AutoImageProcessor.from_pretrained(out)
    image_size = model.config.vision_config.image_size
    layer = model.config.vision_feature_layer
    if not isinstance(layer, int):
        raise ValueError(f"vision_feature_layer {layer!r}: only a single feature layer is supported")
    tower = model.model.vision_tower
    tower.train()
    torch.manual_seed(seed)
    head = nn.Linear(model.config.vision_config.hidden_size, len(COLORS) * len(SHAPES))
    rng = random.Random(f"mmpo-tiny-vision/{seed}/train")

    def step_loss() -> Tensor:
        pixels, targets = _scene_batch(rng, batch_size, image_size, max_objects, processor)
        return nn.functional.binary_cross_entropy_with_logits(head(_features(tower, pixels, layer)), targets)

    start = time.perf_counter()
    params = [*tower.parameters(), *head.parameters()]
    loss = pretraining_loop(params, step_loss, steps, lr, warmup_steps, "vision pretraining", progress)

    tower.eval()
    held_out = random.Random(f"mmpo-tiny-vision/{seed}/eval")
    pixels, targets = _scene_batch(held_out, eval_scenes, image_size, max_objects, processor)
    with torch.no_grad():
        logits = head(_features(tower, pixels, layer))
    # a scene counts as recognised when its k highest logits are its k objects
    ranked = logits.argsort(dim=1, descending=True)
    counts = targets.sum(dim=1).long()
    truth = [set(row.nonzero().flatten().tolist()) for row in targets]
    accuracy = sum(set(ranked[i, : counts[i]].tolist()) == t for i, t in enumerate(truth)) / len(targets)
    seconds = round(time.perf_counter() - start, 1)
    stamp["vision_pretraining"] = {**settings, "accuracy": accuracy, "loss": loss, "seconds": seconds}

    save_tiny_weights(model, out, stamp)
    return {"accuracy": accuracy, "loss": loss, "seconds": seconds, "steps": steps, "reused": False}
