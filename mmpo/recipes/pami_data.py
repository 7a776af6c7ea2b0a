"""Data and model of ``mmpo pami-demo``: the video world, yes/no training questions and a tiny video-LLM.

The demonstration's probes (:class:`mmpo.video_hallucination.VideoHallucinationEval`) ask yes/no questions
("does the red circle move left ?") about clips they render from their own seed. A model fine-tuned only on the
world's open questions has never answered yes or no, so the SFT set here also holds yes/no questions in the
probes' form, asked about *training* clips: they are made by :func:`datamodules.worlds.video_probes.make_video_probes`
under `TRAIN_PROBE_SEED` (probes of seed ``TRAIN_PROBE_SEED + world seed``), their clips written as mp4 next to
the world's, and the evaluation uses `EVAL_PROBE_SEED` (0), a different seed and so other clips; a test checks that
no evaluation clip is among them.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np

__all__ = [
    "EVAL_PROBE_SEED",
    "FAMILIES",
    "MODEL",
    "TRAIN_PROBE_SEED",
    "WORLD",
    "question_type",
    "prepare",
    "clip_question_example",
    "pretrain_video_language",
    "pretrain_video_tower",
    "write_yes_no_split",
]

# Short clips keep the CPU demo fast: 8 frames, at most two objects (order and relation need two). Written at
# 64 px: decord (the video reader) fails on 48 px frames (row alignment), so the processor resizes them instead.
WORLD = {"num_frames": 8, "size": 64, "max_objects": 2, "fps": 8, "speeds": [1, 3], "task_weights": None}
# The world's question kinds with the motion-free colour question ("what color is the circle ?") among them.
WITH_SHAPE_COLOR = {"caption": 1.0, "color": 1.0, "direction": 1.0, "order": 1.0, "shape_color": 1.0}
# Frames resized to 48 px in 8 px patches: 36 patches a frame, 2x2-pooled to 9 video tokens, 72 for the clip.
MODEL = {"image_size": 48, "patch_size": 8, "vision_width": 64, "text_width": 128, "text_layers": 4}
# The demo's model families: a tiny LLaVA-NeXT-Video (frames encoded one by one) or a tiny Qwen2-VL (two frames
# a token, mmpo.recipes.pami_qwen), and the vision tower pretraining steps each gets by default.
FAMILIES = {"llava_next_video": 300, "qwen2_vl": 2000}
# Held-out question kinds the prompt-awareness scores are reported for.
AWARENESS_KINDS = ("direction", "color", "shape_color")
# Probe seeds: the SFT yes/no questions come from TRAIN_PROBE_SEED + world seed, the evaluation from EVAL_PROBE_SEED.
TRAIN_PROBE_SEED = 1000
EVAL_PROBE_SEED = 0


def clip_settings() -> dict:
    """`WORLD`'s settings of a clip (frames, size, objects, speeds), as the world's clip samplers take them."""
    return {k: WORLD[k] for k in ("num_frames", "size", "max_objects", "speeds")}


def question_type(prompt: str) -> str:
    """``direction``, ``color``, ``shape_color``, ``order``, ``caption``, ``shape`` or ``relation``: what a prompt
    asks about.

    Covers the world's open questions and the probes' yes/no questions, so training batches and scores can be
    grouped by the kind of question whatever its form.
    """
    words = prompt.split()
    if "which" in words and "way" in words or (words[:1] == ["does"] and "move" in words):
        return "direction"
    if words[:2] == ["what", "color"] and "moves" not in words:
        return "shape_color"
    if words[:2] == ["what", "color"] or (words[:1] == ["is"] and "shape" not in words and "that" in words):
        return "color"
    if "appears" in words or "appear" in words:
        return "order"
    if words[:1] == ["is"] and "shape" in words:
        return "shape"
    if words[:1] == ["is"]:
        return "relation"
    return "caption"


def write_yes_no_split(data: Path, name: str, n: int, seed: int) -> list[dict]:
    """Write ``n`` probe pairs of ``seed`` as clips ``data/videos/<name>-*.mp4`` and 2n yes/no records.

    Each pair gives its basic question with the answer ``yes .`` and its hallucinated twin with ``no .`` (the
    other answer is the record's ``rejected``), both about the same clip; the clip's objects are kept in the
    record so the answers can be checked against the ground truth.
    """
    from datamodules.vision_text.video_io import write_video
    from datamodules.worlds.video_probes import make_video_probes

    probes = make_video_probes(n, seed, **clip_settings())
    (data / "videos").mkdir(parents=True, exist_ok=True)
    records = []
    for probe in probes:
        clip = f"videos/{name}-{probe.index:06d}.mp4"
        write_video(data / clip, probe.frames, fps=WORLD["fps"])
        objects = [o.to_dict() for o in probe.objects]
        for suffix, question, answer in (("b", probe.basic, "yes"), ("h", probe.hallucinated, "no")):
            other = "no" if answer == "yes" else "yes"
            records.append(
                {
                    "id": f"{name}-{probe.index:06d}-{suffix}",
                    "videos": [clip],
                    "prompt": question,
                    "chosen": f"{answer} .",
                    "rejected": f"{other} .",
                    "kind": f"yes/no {probe.kind}",
                    "objects": objects,
                }
            )
    return records


def scene_question_example(rng: random.Random) -> dict:
    """A text-only example for :func:`mmpo.tiny.language.pretrain_tiny_language_model`: a fresh clip's caption
    where the clip would be, then one of the SFT questions about it (an open world question or, half the time,
    a yes/no probe question answered ``yes .`` or ``no .``), so the language model learns to read the question
    and answer it from a description of the scene before SFT shows it clips."""
    from datamodules.worlds.video import caption_for, clip_from_objects

    question = _sft_question(rng)
    caption = caption_for(clip_from_objects(question["objects"]))
    return {"prompt": f"{caption} {question['prompt']}", "chosen": question["chosen"]}


def _sft_question(rng: random.Random) -> dict:
    """A fresh clip's ground truth and one SFT question about it: an open world question half the time, else a
    yes/no probe question of a random type answered ``yes .`` or ``no .``. ``{"prompt", "chosen", "kind",
    "objects"}`` (``objects`` as a record's)."""
    from datamodules.worlds.video import make_record
    from datamodules.worlds.video_probes import PROBE_TYPES, make_video_probes

    if rng.random() < 0.5:
        record = make_record(rng, task_weights=WORLD["task_weights"], **clip_settings())
        return {k: record[k] for k in ("prompt", "chosen", "kind", "objects")}
    kind = [rng.choice(PROBE_TYPES)]  # probe i of a call has type types[i % len(types)]: one probe, so choose it
    probe = make_video_probes(1, rng.randrange(1 << 30), kind, **clip_settings())[0]
    basic = rng.random() < 0.5
    question, answer = (probe.basic, "yes .") if basic else (probe.hallucinated, "no .")
    objects = [o.to_dict() for o in probe.objects]
    return {"prompt": question, "chosen": answer, "kind": f"yes/no {probe.kind}", "objects": objects}


def _write_jsonl(path: Path, records: list[dict]) -> Path:
    from datamodules.core.atomic import atomic_write_text

    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in records))
    return path


def prepare(
    workdir: Path,
    n_train: int,
    n_yes_no: int,
    n_val: int,
    seed: int,
    vision_steps: int,
    progress: bool = True,
    patch_size: int = MODEL["patch_size"],
    language_steps: int = 0,
    video_steps: int = 0,
    tower_positions: bool = False,
    family: str = "llava_next_video",
) -> dict:
    """Write the world, the SFT / preference / awareness splits and the pretrained tiny video-LLM.

    Files under ``workdir / "data"``: the world (``train.jsonl``, ``val.jsonl``), ``sft_train.jsonl`` (the
    world's training records then ``n_yes_no`` yes/no pairs of training clips, shuffled with ``seed``; the
    preference stages train on the same records' chosen answers) and ``awareness.jsonl`` (the world's held-out
    direction and colour questions, for the prompt-awareness scores). ``patch_size`` sets the tower's patches
    (its 2x2-pooled tokens are 16 px cells of the 48 px frames at 8, 8 px cells at 4). ``language_steps`` > 0
    first pretrains the language model on the world's questions as text (:func:`scene_question_example`);
    ``video_steps`` > 0 then trains the projector and the language model on fresh clips
    (:func:`pretrain_video_language`). ``tower_positions`` adds the position head to the tower's pretraining.
    ``family`` ``qwen2_vl`` builds the tiny Qwen2-VL of :mod:`mmpo.recipes.pami_qwen` instead (tokens of two
    frames, ``patch_size`` px patches of the 64 px frames) and pretrains its tower there.

    Returns:
        ``{"model": path, "vision", "language", "video": the pretraining reports (None when not run), "files": {...},
        "counts": {...}}``.
    """
    from datamodules.worlds.video import vocabulary, write_video_world
    from datamodules.worlds.video_probes import probe_vocabulary
    from mmpo.tiny.llava import build_tiny_llava

    if family not in FAMILIES:
        raise ValueError(f"family must be one of {', '.join(FAMILIES)}, got {family!r}")
    data = workdir / "data"
    world = write_video_world(data, n_train=n_train, n_val=n_val, seed=seed, overwrite=True, **WORLD)
    train = [json.loads(line) for line in Path(world["train"]).read_text().splitlines()]
    val = [json.loads(line) for line in Path(world["val"]).read_text().splitlines()]
    yes_no = write_yes_no_split(data, "yesno-train", n_yes_no, TRAIN_PROBE_SEED + seed)
    sft = train + yes_no
    random.Random(f"mmpo-pami-demo/sft/{seed}").shuffle(sft)
    files = {
        "sft": _write_jsonl(data / "sft_train.jsonl", sft),
        "val": Path(world["val"]),
        "awareness": _write_jsonl(data / "awareness.jsonl", [r for r in val if r["kind"] in AWARENESS_KINDS]),
    }
    words = [*vocabulary(), *probe_vocabulary()]
    if family == "qwen2_vl":
        from mmpo.recipes.pami_qwen import build_demo_qwen2_vl, pretrain_qwen_video_tower

        path = build_demo_qwen2_vl(workdir / "tiny-video-qwen2-vl", words, seed, patch_size)
        vision = pretrain_qwen_video_tower(path, steps=vision_steps, seed=seed, progress=progress)
    else:
        path = build_tiny_llava(
            workdir / "tiny-video-llava", words, seed=seed, video=True, **(MODEL | {"patch_size": patch_size})
        )
        vision = pretrain_video_tower(path, vision_steps, seed, progress=progress, positions=tower_positions)
    language = None
    if language_steps:
        from mmpo.tiny.language import pretrain_tiny_language_model

        language = pretrain_tiny_language_model(
            path, steps=language_steps, seed=seed, example=scene_question_example, progress=progress
        )
    video = pretrain_video_language(path, steps=video_steps, seed=seed, progress=progress) if video_steps else None
    counts = {"world_train": len(train), "yes_no_train": len(yes_no), "val": len(val)}
    return {"model": path, "vision": vision, "language": language, "video": video, "files": files, "counts": counts}


def _frame_batch(rng: random.Random, n: int, processor, grid: int) -> tuple:
    """Single frames of fresh world clips through the video processor, and what and where their objects are.

    Returns pixels (n, 3, H, W), presence of each (colour, shape) pair (n, P), and the colour filling each of the
    tower's ``grid`` x ``grid`` patches (n, grid * grid): 0 for background, 1 + the colour's index otherwise (a
    patch takes the colour covering most of it, if it covers a sixth of it or more).
    """
    import torch

    from datamodules.worlds.shapes import COLORS, SHAPES
    from datamodules.worlds.video import render_clip, sample_clip

    pairs = {(c, s): i for i, (c, s) in enumerate((c, s) for s in SHAPES for c in COLORS)}
    palette = np.array(list(COLORS.values()), dtype=np.uint8)  # (C, 3)
    size, count = WORLD["size"], WORLD["num_frames"]
    edges = np.linspace(0, size, grid + 1).round().astype(int)
    frames, present, patches = [], torch.zeros(n, len(pairs)), torch.zeros(n, grid * grid, dtype=torch.long)
    for i in range(n):
        objects = sample_clip(rng, **clip_settings())
        t = rng.randrange(count)
        frame = render_clip(objects, count, size)[t]  # (H, W, 3)
        frames.append(frame[None])
        for o in objects:
            if t >= o.appears:
                present[i, pairs[o.color, o.shape]] = 1.0
        hits = (frame[:, :, None, :] == palette).all(-1)  # (H, W, C): no anti-aliasing, colours are exact
        for r in range(grid):
            for c in range(grid):
                cell = hits[edges[r] : edges[r + 1], edges[c] : edges[c + 1]].sum(axis=(0, 1))  # (C,)
                if cell.max() * 6 >= cell.size and cell.max() * 6 >= (edges[1] - edges[0]) ** 2:
                    patches[i, r * grid + c] = 1 + int(cell.argmax())
    pixels = processor(videos=frames, return_tensors="pt")["pixel_values_videos"][:, 0]  # (n, 3, H, W)
    return pixels, present, patches


def pretrain_video_tower(
    checkpoint: Path,
    steps: int,
    seed: int,
    batch_size: int = 32,
    lr: float = 2e-3,
    progress: bool = True,
    positions: bool = False,
) -> dict:
    """Teach the tiny video-LLM's vision tower what and where objects are, on single frames of the world.

    A stand-in for the CLIP pretraining a real video-LLM starts from (as :mod:`mmpo.tiny.vision` does for the
    image LLaVA, whose image processor this video checkpoint does not have). Two throw-away linear heads: one
    on the patch features' mean predicts which (colour, shape) pairs are in the frame (binary cross-entropy),
    one on each patch's feature predicts the colour filling that patch or background (cross-entropy), so where
    each colour is, and with it motion across frames, is in the tokens the language model reads. With
    ``positions``, a third head regresses each patch's centre (x, y in [-1, 1]) from its feature (mean squared
    error), so where a token is in the frame is a linear read-out of it too. Reused when stamped with the same
    settings.

    Returns:
        ``{"accuracy", "patch_accuracy", "loss", "seconds", "steps", "reused"}``: held-out frames whose k
        best-scored pairs are their k objects, and the share of held-out object patches given their colour.
    """
    import time

    import torch
    from einops import reduce
    from torch import nn
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from datamodules.worlds.shapes import COLORS, SHAPES
    from mmpo.tiny.llava import pretraining_loop, read_tiny_stamp, reused_pretraining, save_tiny_weights

    stamp = read_tiny_stamp(checkpoint)
    settings = {"steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed, "world": WORLD, "version": 2}
    if positions:  # the stamp of a run without the head stays what it was
        settings["positions"] = True
    kept = ("accuracy", "patch_accuracy", "loss", "seconds")
    kept += ("position_error",) if positions else ()
    if (reused := reused_pretraining(stamp, "video_tower_pretraining", settings, kept)) is not None:
        return reused
    model = AutoModelForImageTextToText.from_pretrained(checkpoint, dtype=torch.float32)
    processor = AutoProcessor.from_pretrained(checkpoint).video_processor
    vision = model.config.vision_config
    tower, grid = model.model.vision_tower, vision.image_size // vision.patch_size
    torch.manual_seed(seed)
    what = nn.Linear(vision.hidden_size, len(COLORS) * len(SHAPES))
    where = nn.Linear(vision.hidden_size, 1 + len(COLORS))
    place = nn.Linear(vision.hidden_size, 2) if positions else None
    centres = (torch.arange(grid, dtype=torch.float32) + 0.5) / grid * 2 - 1
    xy = torch.stack(torch.meshgrid(centres, centres, indexing="xy"), dim=-1).reshape(grid * grid, 2)  # row-major
    rng = random.Random(f"mmpo-pami-demo/tower/{seed}/train")

    def heads(pixels):
        hidden = tower(pixel_values=pixels, output_hidden_states=True).hidden_states[-1][:, 1:]  # (n, grid², D)
        pooled = reduce(hidden, "n p d -> n d", "mean")
        xy_out = place(hidden) if positions else None  # (n, grid², 2)
        return what(pooled), where(hidden), xy_out  # (n, P), (n, grid², 1 + C)

    def step_loss():
        pixels, present, patches = _frame_batch(rng, batch_size, processor, grid)
        pair_logits, patch_logits, where_xy = heads(pixels)
        presence = nn.functional.binary_cross_entropy_with_logits(pair_logits, present)
        loss = presence + nn.functional.cross_entropy(patch_logits.flatten(0, 1), patches.flatten())
        return loss + nn.functional.mse_loss(where_xy, xy.expand_as(where_xy)) if positions else loss

    start = time.perf_counter()
    tower.train()
    params = [*tower.parameters(), *what.parameters(), *where.parameters(), *(place.parameters() if positions else [])]
    loss = pretraining_loop(params, step_loss, steps, lr, min(50, steps // 10), "video tower pretraining", progress)
    tower.eval()
    held_out = random.Random(f"mmpo-pami-demo/tower/{seed}/eval")
    pixels, present, patches = _frame_batch(held_out, 256, processor, grid)
    with torch.no_grad():
        pair_logits, patch_logits, where_xy = heads(pixels)
    ranked = pair_logits.argsort(dim=1, descending=True)
    k = present.sum(dim=1).long()
    truth = [set(row.nonzero().flatten().tolist()) for row in present]
    accuracy = sum(set(ranked[i, : k[i]].tolist()) == t for i, t in enumerate(truth)) / len(truth)
    objects = patches > 0
    patch_accuracy = (patch_logits.argmax(-1) == patches)[objects].float().mean().item()
    report = {"accuracy": accuracy, "patch_accuracy": round(patch_accuracy, 4), "loss": loss}
    if positions:  # mean distance of a patch's predicted centre from its own, in patches
        report["position_error"] = round(((where_xy - xy).norm(dim=-1).mean() * grid / 2).item(), 4)
    report["seconds"] = round(time.perf_counter() - start, 1)
    stamp["video_tower_pretraining"] = {**settings, **report}
    save_tiny_weights(model, checkpoint, stamp)
    return {**report, "steps": steps, "reused": False}


def clip_question_example(rng: random.Random) -> dict:
    """A fresh clip rendered in memory and one SFT question about it, for :func:`pretrain_video_language`.

    Half the time an open world question (direction, colour, order, caption), else a yes/no probe question
    answered ``yes .`` or ``no .``: the SFT set's mix. Returns ``{"frames": (T, H, W, 3) uint8, "prompt",
    "chosen", "kind", "objects"}`` (the clip's ground truth, as a record's ``objects``).
    """
    from datamodules.worlds.video import clip_from_objects, render_clip

    question = _sft_question(rng)
    frames = render_clip(clip_from_objects(question["objects"]), WORLD["num_frames"], WORLD["size"])
    return {"frames": frames, **question}


def _clip_batch(examples: list[dict], processor) -> dict:
    """Model inputs for clip examples: the prompt after the clip in one user turn, the answer then EOS,
    right-padded, labels on the answer only (the datamodules' layout). The processor's media (LLaVA-NeXT-Video's
    frames; Qwen2-VL's patches and ``video_grid_thw``) are concatenated, its token-aligned inputs (Qwen2-VL's
    ``mm_token_type_ids``) padded like the tokens."""
    import torch

    from datamodules.vision_text.collator import TOKEN_ALIGNED_MEDIA
    from mmpo.tiny.language import right_padded

    tokenizer = processor.tokenizer
    rows, targets, media, aligned = [], [], {}, {}
    for example in examples:
        messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": example["prompt"]}]}]
        text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        enc = processor(text=[text], videos=[example["frames"]], do_sample_frames=False, return_tensors="pt")
        prompt = enc.pop("input_ids")[0].tolist()
        enc.pop("attention_mask")
        answer = tokenizer(example["chosen"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        rows.append(prompt + answer)
        targets.append([-100] * len(prompt) + answer)
        for key, value in enc.items():
            if key in TOKEN_ALIGNED_MEDIA:
                aligned.setdefault(key, []).append(value[0].tolist() + [TOKEN_ALIGNED_MEDIA[key]] * len(answer))
            else:
                media.setdefault(key, []).append(value)
    ids, mask, labels = right_padded(rows, targets, tokenizer.pad_token_id)
    width = ids.shape[1]
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    batch |= {key: torch.cat(values) for key, values in media.items()}
    for key, values in aligned.items():
        batch[key] = torch.tensor([row + [TOKEN_ALIGNED_MEDIA[key]] * (width - len(row)) for row in values])
    return batch


def pretrain_video_language(
    checkpoint: Path,
    steps: int,
    seed: int,
    batch_size: int = 16,
    lr: float = 1e-3,
    eval_examples: int = 400,
    progress: bool = True,
) -> dict:
    """Train the tiny video-LLM's projector and language model on fresh clips, one SFT question each.

    A stand-in for the video-instruction pretraining of a real video-LLM: every step renders ``batch_size`` new
    clips in memory (:func:`clip_question_example`), so the model cannot learn the answers by heart and has to
    read them off the frames, which the SFT stage's 1,000 records do not make it do. The vision tower stays
    frozen. Reused when stamped with the same settings.

    Returns:
        ``{"accuracy": {kind: share}, "loss", "seconds", "steps", "reused"}``: held-out clips (their own seed)
        whose answer the model reproduces token for token (teacher-forced argmax), per question kind.
    """
    import time

    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from mmpo.backbones.vlm import in_vision_tower
    from mmpo.tiny.language import exact_answer_match
    from mmpo.tiny.llava import pretraining_loop, read_tiny_stamp, reused_pretraining, save_tiny_weights

    stamp = read_tiny_stamp(checkpoint)
    settings = {"steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed, "world": WORLD, "version": 1}
    if reused := reused_pretraining(stamp, "video_language_pretraining", settings, ("accuracy", "loss", "seconds")):
        return reused
    model = AutoModelForImageTextToText.from_pretrained(checkpoint, dtype=torch.float32)
    processor = AutoProcessor.from_pretrained(checkpoint)
    trained = [p for n, p in model.named_parameters() if not in_vision_tower(n)]
    for p in model.parameters():
        p.requires_grad_(False)
    for p in trained:
        p.requires_grad_(True)
    rng = random.Random(f"mmpo-pami-demo/video-language/{seed}/train")

    def step_loss():
        return model(**_clip_batch([clip_question_example(rng) for _ in range(batch_size)], processor)).loss

    start = time.perf_counter()
    model.train()
    loss = pretraining_loop(trained, step_loss, steps, lr, min(50, steps // 10), "video-language pretraining", progress)
    model.eval()
    held_out = random.Random(f"mmpo-pami-demo/video-language/{seed}/eval")
    examples = [clip_question_example(held_out) for _ in range(eval_examples)]
    exact = []
    for chunk in range(0, len(examples), 50):
        batch = _clip_batch(examples[chunk : chunk + 50], processor)
        exact += exact_answer_match(model, batch.pop("input_ids"), batch.pop("attention_mask"), **batch).tolist()
    by_kind: dict[str, list[bool]] = {}
    for example, hit in zip(examples, exact, strict=True):
        by_kind.setdefault(example["kind"], []).append(hit)
    accuracy = {kind: round(sum(hits) / len(hits), 4) for kind, hits in sorted(by_kind.items())}
    report = {"accuracy": accuracy, "loss": loss, "seconds": round(time.perf_counter() - start, 1)}
    stamp["video_language_pretraining"] = {**settings, **report}
    for p in model.parameters():
        p.requires_grad_(True)
    save_tiny_weights(model, checkpoint, stamp)
    return {**report, "steps": steps, "reused": False}
