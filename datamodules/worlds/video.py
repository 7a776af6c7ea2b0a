"""A deterministic synthetic video world: coloured shapes moving across a plain background.

Each example is a short clip (default 16 frames of 64x64 at 8 fps) of one to three shapes from the
shapes world (`SHAPES`, `COLORS`, `BACKGROUND`, drawn by `render_scene`), each moving at a constant
speed left, right, up or down, entering at its own frame and staying fully in view without touching
another object; the clips are drawn and rendered by `datamodules.worlds.video_clips` (re-exported here).
The ground truth of every object (shape, colour, direction, the frame it appears at, its size, speed and
starting box) is stored with a preference pair about the clip:

- ``direction``: "which way does the red circle move ?"; the rejected answer names another direction.
- ``color``: "what color is the circle that moves left ?"; the rejected answer names another colour.
- ``order``: "which shape appears first ?"; the rejected answer names an object that appears later.
- ``caption``: "describe the video ."; the rejected caption hallucinates an object.
- ``shape_color``: "what color is the circle ?" about a shape the clip holds once, answered without a word
  about motion; the rejected answer names another colour. Not drawn by default (`DEFAULT_TASK_WEIGHTS`):
  a question whose answer a reversed or shuffled clip leaves true, for measuring what a temporal negative
  changes (``mmpo pami-demo``).

Clips are written as mp4 (`datamodules.vision_text.video_io.write_video`, needs PyAV) with JSONL records in the image
preference format, ``videos`` in place of ``images``. Lower-case words, punctuation as separate
tokens, every token listed by `vocabulary()`. Each record has its own generator seeded from
(seed, split, index), so the same seed gives identical JSONL and identical clips.

    python -m datamodules.worlds.video --out DIR --n-train 400 --n-val 100 --seed 0
"""

from __future__ import annotations

import os
import random
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from datamodules.vision_text.video_io import write_video
from datamodules.worlds.shapes import BACKGROUND, COLORS, SHAPES, tokenize, wrong_color
from datamodules.worlds.video_clips import (
    DEFAULT_SPEEDS,
    DIRECTIONS,
    MovingObject,
    clip_from_objects,
    render_clip,
    sample_clip,
)
from datamodules.worlds.writer import world_cli, write_world

__all__ = [
    "DEFAULT_SPEEDS",
    "DEFAULT_TASK_WEIGHTS",
    "DIRECTIONS",
    "KINDS",
    "VIDEO_WORLD_VERSION",
    "MovingObject",
    "VideoWorld",
    "caption_for",
    "clip_from_objects",
    "main",
    "make_record",
    "render_clip",
    "sample_clip",
    "vocabulary",
    "write_video_world",
]

VIDEO_WORLD_VERSION = 1
_OPPOSITE = {"left": "right", "right": "left", "up": "down", "down": "up"}
KINDS: tuple[str, ...] = ("caption", "color", "direction", "order", "shape_color")
DEFAULT_TASK_WEIGHTS: dict[str, float] = {"caption": 0.25, "color": 0.25, "direction": 0.25, "order": 0.25}

_CAPTION_PROMPT = "describe the video ."
_DIRECTION_PROMPT = "which way does the {color} {shape} move ?"
_DIRECTION_ANSWER = "the {color} {shape} moves {direction} ."
_COLOR_PROMPT = "what color is the {shape} that moves {direction} ?"
_COLOR_ANSWER = "the {shape} that moves {direction} is {color} ."
_ORDER_PROMPT = "which shape appears first ?"
_ORDER_ANSWER = "the {color} {shape} appears first ."
_SHAPE_COLOR_PROMPT = "what color is the {shape} ?"
_SHAPE_COLOR_ANSWER = "the {shape} is {color} ."


def _describe(items: Sequence[tuple[str, str, str]]) -> str:
    """``[(colour, shape, direction), ...]`` -> "a red circle moves left and a blue square moves up ."."""
    phrases = [f"a {color} {shape} moves {direction}" for color, shape, direction in items]
    if len(phrases) == 1:
        return f"{phrases[0]} ."
    return f"{' , '.join(phrases[:-1])} and {phrases[-1]} ."


def caption_for(objects: Sequence[MovingObject]) -> str:
    """The ground-truth caption: every object in order of appearance with its direction."""
    return _describe([(o.color, o.shape, o.direction) for o in objects])


def _caption_task(objects: Sequence[MovingObject], rng: random.Random) -> tuple[str, str, str]:
    truth = [(o.color, o.shape, o.direction) for o in objects]
    present = {(c, s) for c, s, _ in truth}
    absent = [(c, s) for s in SHAPES for c in COLORS if (c, s) not in present]
    # Hallucinations: insert an absent object, or turn one object into an absent one by changing its
    # colour or its shape (keeping its motion). Either way the rejected caption names an object that
    # is not in the clip.
    swaps = [(i, a) for i, (c, s, _) in enumerate(truth) for a in absent if a[0] == c or a[1] == s]
    if not swaps or rng.random() < 0.5:
        color, shape = rng.choice(absent)
        position = rng.randint(0, len(truth))
        rejected = truth[:position] + [(color, shape, rng.choice(list(DIRECTIONS)))] + truth[position:]
    else:
        i, (color, shape) = rng.choice(swaps)
        rejected = truth[:i] + [(color, shape, truth[i][2])] + truth[i + 1 :]
    return _CAPTION_PROMPT, _describe(truth), _describe(rejected)


def _direction_task(objects: Sequence[MovingObject], rng: random.Random) -> tuple[str, str, str]:
    obj = rng.choice(objects)
    others = [d for d in DIRECTIONS if d not in (obj.direction, _OPPOSITE[obj.direction])]
    # Half the time the opposite direction (a reversed clip), else a perpendicular one.
    wrong = _OPPOSITE[obj.direction] if rng.random() < 0.5 else rng.choice(others)
    prompt = _DIRECTION_PROMPT.format(color=obj.color, shape=obj.shape)
    answer = _DIRECTION_ANSWER.format(color=obj.color, shape=obj.shape, direction=obj.direction)
    return prompt, answer, _DIRECTION_ANSWER.format(color=obj.color, shape=obj.shape, direction=wrong)


def _color_referents(objects: Sequence[MovingObject]) -> list[MovingObject]:
    """Objects named unambiguously by "the <shape> that moves <direction>"."""
    counts = Counter((o.shape, o.direction) for o in objects)
    return [o for o in objects if counts[o.shape, o.direction] == 1]


def _color_task(objects: Sequence[MovingObject], rng: random.Random) -> tuple[str, str, str]:
    referents = _color_referents(objects)
    if not referents:
        raise ValueError("color task needs a (shape, direction) that occurs once in the clip")
    obj = rng.choice(referents)
    color = wrong_color(obj.color, [o.color for o in objects], rng)
    prompt = _COLOR_PROMPT.format(shape=obj.shape, direction=obj.direction)
    answer = _COLOR_ANSWER.format(shape=obj.shape, direction=obj.direction, color=obj.color)
    return prompt, answer, _COLOR_ANSWER.format(shape=obj.shape, direction=obj.direction, color=color)


def _shape_color_task(objects: Sequence[MovingObject], rng: random.Random) -> tuple[str, str, str]:
    counts = Counter(o.shape for o in objects)
    referents = [o for o in objects if counts[o.shape] == 1]
    if not referents:
        raise ValueError("shape_color task needs a shape that occurs once in the clip")
    obj = rng.choice(referents)
    color = wrong_color(obj.color, [o.color for o in objects], rng)
    answer = _SHAPE_COLOR_ANSWER.format(shape=obj.shape, color=obj.color)
    return _SHAPE_COLOR_PROMPT.format(shape=obj.shape), answer, _SHAPE_COLOR_ANSWER.format(shape=obj.shape, color=color)


def _order_task(objects: Sequence[MovingObject], rng: random.Random) -> tuple[str, str, str]:
    if len(objects) < 2 or len({o.appears for o in objects}) != len(objects):
        raise ValueError("order task needs two or more objects appearing at distinct frames")
    first = min(objects, key=lambda o: o.appears)
    later = rng.choice([o for o in objects if o is not first])
    answer = _ORDER_ANSWER.format(color=first.color, shape=first.shape)
    return _ORDER_PROMPT, answer, _ORDER_ANSWER.format(color=later.color, shape=later.shape)


_TASKS = {
    "caption": _caption_task,
    "color": _color_task,
    "direction": _direction_task,
    "order": _order_task,
    "shape_color": _shape_color_task,
}


def _feasible(kind: str, objects: Sequence[MovingObject]) -> bool:
    if kind == "order":
        return len(objects) >= 2
    if kind == "shape_color":
        return 1 in Counter(o.shape for o in objects).values()
    return kind != "color" or bool(_color_referents(objects))


def _normalise_weights(task_weights: Mapping[str, float] | None) -> dict[str, float]:
    if task_weights is None:
        return dict(DEFAULT_TASK_WEIGHTS)
    unknown = set(task_weights) - set(KINDS)
    if unknown:
        raise ValueError(f"unknown task kinds {sorted(unknown)}; expected some of {KINDS}")
    weights = {k: float(task_weights.get(k, 0.0)) for k in KINDS}
    if any(w < 0 for w in weights.values()) or sum(weights.values()) <= 0:
        raise ValueError(f"task weights must be non-negative with a positive sum, got {dict(task_weights)}")
    return weights


def make_record(
    rng: random.Random,
    *,
    kind: str | None = None,
    objects: Sequence[MovingObject] | None = None,
    task_weights: Mapping[str, float] | None = None,
    num_frames: int = 16,
    size: int = 64,
    max_objects: int = 3,
    speeds: tuple[int, int] = DEFAULT_SPEEDS,
) -> dict:
    """Sample one preference example (without ``id`` and ``videos``, which the writer adds).

    Args:
        rng: The only source of randomness.
        kind: One of `KINDS`; drawn with ``task_weights`` when None.
        objects: Ground truth to ask about; sampled when None (resampled until the task is possible).
        task_weights: Relative weight per kind; kinds left out get weight 0. Defaults to
            `DEFAULT_TASK_WEIGHTS`.
        num_frames: Frames per clip.
        size: Side of the square frames in pixels.
        max_objects: Most objects per clip (at least 2 for the ``order`` task).
        speeds: Least and most px per frame (`sample_clip`).

    Returns:
        ``{"prompt", "chosen", "rejected", "kind", "objects", "caption"}``.
    """
    if kind is None:
        weights = _normalise_weights(task_weights)
        kind = rng.choices(KINDS, weights=[weights.get(k, 0.0) for k in KINDS])[0]
    if kind not in _TASKS:
        raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS}")
    if objects is None:
        if kind == "order" and max_objects < 2:
            raise ValueError("the order task needs max_objects >= 2")
        objects = sample_clip(rng, num_frames, size, max_objects, speeds)
        while not _feasible(kind, objects):
            objects = sample_clip(rng, num_frames, size, max_objects, speeds)
    prompt, chosen, rejected = _TASKS[kind](objects, rng)
    return {
        "prompt": prompt,
        "chosen": chosen,
        "rejected": rejected,
        "kind": kind,
        "objects": [o.to_dict() for o in objects],
        "caption": caption_for(objects),
    }


def vocabulary() -> list[str]:
    """Every token that can appear in any prompt or response of the world, sorted."""
    texts = [_CAPTION_PROMPT, _ORDER_PROMPT, _describe([(c, SHAPES[0], "left") for c in COLORS])]
    for shape in SHAPES:
        for color in COLORS:
            texts.append(_ORDER_ANSWER.format(color=color, shape=shape))
            texts.append(_SHAPE_COLOR_PROMPT.format(shape=shape))
            texts.append(_SHAPE_COLOR_ANSWER.format(shape=shape, color=color))
            texts.append(_DIRECTION_PROMPT.format(color=color, shape=shape))
            for direction in DIRECTIONS:
                texts.append(_DIRECTION_ANSWER.format(color=color, shape=shape, direction=direction))
                texts.append(_COLOR_PROMPT.format(shape=shape, direction=direction))
                texts.append(_COLOR_ANSWER.format(shape=shape, direction=direction, color=color))
    return sorted({token for text in texts for token in tokenize(text)})


@dataclass(frozen=True)
class VideoWorld:
    """A seeded video world: record ``(split, index)`` is a pure function of the settings.

    Args:
        seed: World seed.
        num_frames: Frames per clip.
        size: Side of the square frames in pixels (even, for yuv420p).
        fps: Frame rate of the written clips.
        max_objects: Most objects per clip.
        task_weights: Relative weight per kind (see `make_record`).
        speeds: Least and most px per frame (`sample_clip`).
    """

    seed: int = 0
    num_frames: int = 16
    size: int = 64
    fps: int = 8
    max_objects: int = 3
    task_weights: Mapping[str, float] | None = None
    speeds: tuple[int, int] = DEFAULT_SPEEDS

    def rng(self, split: str, index: int) -> random.Random:
        # A string seed is hashed with SHA-512 by `random`, independent of PYTHONHASHSEED.
        return random.Random(f"mmpo-video-world/v{VIDEO_WORLD_VERSION}/{self.seed}/{split}/{index}")

    def record(self, split: str, index: int) -> dict:
        """Record ``index`` of ``split`` in the on-disk format (``videos`` relative to the root)."""
        record_id = f"{split}-{index:06d}"
        body = make_record(
            self.rng(split, index),
            task_weights=self.task_weights,
            num_frames=self.num_frames,
            size=self.size,
            max_objects=self.max_objects,
            speeds=self.speeds,
        )
        return {"id": record_id, "videos": [f"videos/{record_id}.mp4"], **body}

    def frames(self, record: Mapping) -> np.ndarray:
        """Render a record's clip from its ``objects``: ``(num_frames, size, size, 3)`` uint8."""
        return render_clip(clip_from_objects(record["objects"]), self.num_frames, self.size)


def write_video_world(
    root: str | os.PathLike,
    n_train: int = 400,
    n_val: int = 100,
    seed: int = 0,
    num_frames: int = 16,
    size: int = 64,
    fps: int = 8,
    max_objects: int = 3,
    task_weights: Mapping[str, float] | None = None,
    overwrite: bool = False,
    speeds: tuple[int, int] = DEFAULT_SPEEDS,
) -> dict:
    """Write ``root/videos/*.mp4``, ``root/train.jsonl``, ``root/val.jsonl`` and ``root/world.json``.

    Idempotent: if ``world.json`` records the same settings (and the files are there) nothing is
    regenerated. Every file is written to a temporary name and moved into place, and ``world.json``
    is written last (and removed first), so an interrupted run never looks complete.

    Args:
        root: Dataset directory (created if missing).
        n_train: Number of training records.
        n_val: Number of validation records.
        seed: World seed.
        num_frames: Frames per clip.
        size: Side of the square frames in pixels (even).
        fps: Frame rate of the clips.
        max_objects: Most objects per clip.
        task_weights: Relative weight per kind; defaults to `DEFAULT_TASK_WEIGHTS`.
        overwrite: Replace a world generated with different settings instead of raising.
        speeds: Least and most px per frame (`sample_clip`); recorded in ``world.json`` when not the default.

    Returns:
        Summary: ``root``, ``train`` and ``val`` paths, counts, per-split kind counts, vocabulary size
        and ``generated`` (False when an existing world was reused).

    Raises:
        FileExistsError: ``root`` holds a world with other settings and ``overwrite`` is False.
    """
    root = Path(root)
    settings = {
        "version": VIDEO_WORLD_VERSION,
        "seed": seed,
        "n_train": n_train,
        "n_val": n_val,
        "num_frames": num_frames,
        "size": size,
        "fps": fps,
        "max_objects": max_objects,
        "task_weights": _normalise_weights(task_weights),
    }
    speeds = (int(speeds[0]), int(speeds[1]))
    if speeds != DEFAULT_SPEEDS:  # worlds written before speeds were a setting keep their settings
        settings["speeds"] = list(speeds)
    world = VideoWorld(seed, num_frames, size, fps, max_objects, settings["task_weights"], speeds)
    info = {
        "shapes": list(SHAPES),
        "colors": {name: list(rgb) for name, rgb in COLORS.items()},
        "background": list(BACKGROUND),
        "directions": list(DIRECTIONS),
        "vocabulary": vocabulary(),
    }
    return write_world(
        root,
        settings,
        name="video world",
        media_dir="videos",
        suffix=".mp4",
        make_record=world.record,
        write_media=lambda record, path: write_video(path, world.frames(record), fps=fps),  # atomic
        kinds=KINDS,
        info=info,
        overwrite=overwrite,
    )


def main(argv: Sequence[str] | None = None) -> dict:
    """Command line: write a video world and print its summary as JSON."""
    return world_cli(
        argv,
        "python -m datamodules.worlds.video",
        __doc__.split("\n")[0],
        write_video_world,
        {"num-frames": 16, "size": 64, "fps": 8},
    )


if __name__ == "__main__":
    main()
