"""The Qwen2-VL model of ``mmpo pami-demo --family qwen2_vl``: a tiny video-LLM whose tokens see motion.

A LLaVA-NeXT-Video tower encodes each frame alone, so motion is only in how two tokens' contents differ across
frames, which the demo's tiny language model did not learn to read (docs/video.md). Qwen2-VL embeds two
consecutive frames in one patch (``temporal_patch_size`` 2) and attends within each pair of frames, so a token
can carry which way the object in it moves. :func:`pretrain_qwen_video_tower` teaches the tower that, on fresh
clips of the video world: three throw-away linear heads read, from each merged token (the features the
language model reads), the colour, the shape and the direction of motion of the object covering its cell.
"""

from __future__ import annotations

import random
from pathlib import Path

__all__ = ["QWEN_SIZES", "build_demo_qwen2_vl", "cell_labels", "pretrain_qwen_video_tower"]

# The language model of the LLaVA-NeXT-Video build (width 128, 4 layers) and a 2-block, 64-wide tower; 64 px
# frames (the world's, not resized) in 8 px patches merged 2 x 2: 16 tokens for each pair of frames, 64 a clip.
QWEN_SIZES = {
    "text": {
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        # multimodal rotary sections (temporal, height, width) of the 32-wide heads' 16 frequencies
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 6]},
    },
    "vision": {"patch_size": 8, "depth": 2, "embed_dim": 64, "mlp_ratio": 2},
    "frame_px": 64,
}


def build_demo_qwen2_vl(out_dir: Path, words, seed: int, patch_size: int = 8) -> Path:
    """The demo's tiny Qwen2-VL (`QWEN_SIZES`, the tower's patch side ``patch_size`` at 64 px frames)."""
    from mmpo.tiny.families import build_tiny_qwen2_vl

    sizes = {**QWEN_SIZES, "vision": {**QWEN_SIZES["vision"], "patch_size": patch_size}}
    return build_tiny_qwen2_vl(out_dir, words, seed=seed, sizes=sizes)


def cell_labels(objects, num_frames: int, size: int, grid: int):
    """What covers each merged token's cell: ``(num_frames // 2 * grid * grid, 3)`` long, in the tokens' order.

    A token sees frames ``2g`` and ``2g + 1`` and a ``size / grid`` px square cell. Its labels are the colour,
    shape and direction of the object whose box (over both frames) covers the largest part of the cell, a sixth
    of it at least, each as 1 + the index in ``COLORS``, ``SHAPES`` and ``DIRECTIONS``; 0 (background)
    otherwise. Objects appear at even frames in the demo's world, so one in a pair is in both of its frames.
    """
    import torch

    from datamodules.worlds.shapes import COLORS, SHAPES
    from datamodules.worlds.video import DIRECTIONS

    colors, shapes, directions = list(COLORS), list(SHAPES), list(DIRECTIONS)
    cell = size / grid
    labels = torch.zeros(num_frames // 2, grid, grid, 3, dtype=torch.long)
    for g in range(num_frames // 2):
        boxes = []
        for o in objects:
            if o.appears <= 2 * g:
                a, b = o.bbox_at(2 * g), o.bbox_at(2 * g + 1)
                boxes.append((o, (min(a[0], b[0]), min(a[1], b[1]), max(a[2], b[2]), max(a[3], b[3]))))
        for r in range(grid):
            for c in range(grid):
                best, most = None, cell * cell / 6
                for o, (x0, y0, x1, y1) in boxes:
                    width = min(x1, (c + 1) * cell) - max(x0, c * cell)
                    height = min(y1, (r + 1) * cell) - max(y0, r * cell)
                    if width > 0 and height > 0 and width * height >= most:
                        best, most = o, width * height
                if best is not None:
                    kinds = (colors.index(best.color), shapes.index(best.shape), directions.index(best.direction))
                    labels[g, r, c] = torch.tensor(kinds) + 1
    return labels.reshape(-1, 3)


def _clips(rng: random.Random, n: int, processor, grid: int) -> tuple:
    """``n`` fresh world clips through the video processor, and their tokens' `cell_labels`."""
    import torch

    from datamodules.worlds.video import render_clip, sample_clip
    from mmpo.recipes.pami_data import WORLD, clip_settings

    clips, labels = [], []
    for _ in range(n):
        objects = sample_clip(rng, **clip_settings())
        clips.append(render_clip(objects, WORLD["num_frames"], WORLD["size"]))
        labels.append(cell_labels(objects, WORLD["num_frames"], WORLD["size"], grid))
    enc = processor(videos=clips, do_sample_frames=False, return_tensors="pt")
    return enc["pixel_values_videos"], enc["video_grid_thw"], torch.cat(labels)


def pretrain_qwen_video_tower(
    checkpoint: Path, steps: int, seed: int, batch_size: int = 16, lr: float = 2e-3, progress: bool = True
) -> dict:
    """Teach the tiny Qwen2-VL's vision tower (merger included) what is in each token's cell and how it moves.

    A stand-in for the pretraining a real video-LLM's tower has: every step renders ``batch_size`` fresh clips
    and trains the tower with three linear heads on its merged tokens (cross-entropy on `cell_labels`' colour,
    shape and direction). Reused when stamped with the same settings.

    Returns:
        ``{"accuracy": {"color", "shape", "direction"}, "loss", "seconds", "steps", "reused"}``: the share of
        held-out object cells (1,000 clips' worth of 16 tokens) each head labels right.
    """
    import time

    import torch
    from torch import nn
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from datamodules.worlds.shapes import COLORS, SHAPES
    from datamodules.worlds.video import DIRECTIONS
    from mmpo.recipes.pami_data import WORLD
    from mmpo.tiny.llava import pretraining_loop, read_tiny_stamp, reused_pretraining, save_tiny_weights

    stamp = read_tiny_stamp(checkpoint)
    settings = {"steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed, "world": WORLD, "version": 1}
    kept = ("accuracy", "loss", "seconds")
    if (reused := reused_pretraining(stamp, "video_tower_pretraining", settings, kept)) is not None:
        return reused
    model = AutoModelForImageTextToText.from_pretrained(checkpoint, dtype=torch.float32)
    processor = AutoProcessor.from_pretrained(checkpoint).video_processor
    vision = model.config.vision_config
    tower = model.model.visual
    grid = WORLD["size"] // (vision.patch_size * vision.spatial_merge_size)
    torch.manual_seed(seed)
    width = model.config.text_config.hidden_size
    heads = nn.ModuleList(nn.Linear(width, 1 + len(names)) for names in (COLORS, SHAPES, DIRECTIONS))
    rng = random.Random(f"mmpo-pami-demo/qwen-tower/{seed}/train")

    def logits(pixels, grid_thw):
        tokens = tower(pixels, grid_thw=grid_thw).pooler_output  # (clips * pairs * grid², width)
        return [head(tokens) for head in heads]

    def step_loss():
        pixels, grid_thw, labels = _clips(rng, batch_size, processor, grid)
        return sum(nn.functional.cross_entropy(out, labels[:, i]) for i, out in enumerate(logits(pixels, grid_thw)))

    start = time.perf_counter()
    tower.train()
    params = [*tower.parameters(), *heads.parameters()]
    loss = pretraining_loop(params, step_loss, steps, lr, min(50, steps // 10), "video tower pretraining", progress)
    tower.eval()
    held_out = random.Random(f"mmpo-pami-demo/qwen-tower/{seed}/eval")
    right = torch.zeros(3)
    total = 0
    with torch.no_grad():
        for _ in range(4):
            pixels, grid_thw, labels = _clips(held_out, 250, processor, grid)
            objects = labels[:, 0] > 0
            for i, out in enumerate(logits(pixels, grid_thw)):
                right[i] += (out.argmax(-1) == labels[:, i])[objects].sum()
            total += int(objects.sum())
    accuracy = {name: round(float(right[i]) / total, 4) for i, name in enumerate(("color", "shape", "direction"))}
    report = {"accuracy": accuracy, "loss": loss, "seconds": round(time.perf_counter() - start, 1)}
    stamp["video_tower_pretraining"] = {**settings, **report}
    save_tiny_weights(model, checkpoint, stamp)
    return {**report, "steps": steps, "reused": False}
