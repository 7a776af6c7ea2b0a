"""A deterministic synthetic "shapes world" for preference optimisation of vision-language models.

Each example is a small RGB image of coloured shapes on a light-grey background, its ground-truth
object list and caption, and a preference pair: the *chosen* response is true to the image, the
*rejected* one hallucinates (an absent object, a wrong colour, the wrong yes/no). The world is
written as PNG + JSONL in TRL's vision preference format, so the ordinary datamodule reads it,
and the in-memory API (`ShapesWorld`, `sample_scene`, `render_scene`, `objects_in_text`) serves
hallucination metrics (CHAIR-style captions, POPE-style presence questions) and other builders.

The language is small and regular: lower-case words, punctuation as separate tokens, every token
listed by `vocabulary()`. Everything is a pure function of an explicit `random.Random`; each record
has its own generator seeded from (seed, split, index), so a record does not depend on how many
others were generated, and the same seed gives byte-identical files.

    python -m datamodules.worlds.shapes --out DIR --n-train 400 --n-val 100 --seed 0
"""

from __future__ import annotations

import os
import random
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from datamodules.core.atomic import atomic_file
from datamodules.worlds.writer import world_cli, write_world

__all__ = [
    "BACKGROUND",
    "COLORS",
    "DEFAULT_TASK_WEIGHTS",
    "KINDS",
    "SHAPES",
    "WORLD_VERSION",
    "ShapeObject",
    "ShapesWorld",
    "caption_for",
    "main",
    "make_record",
    "objects_in_text",
    "render_scene",
    "sample_scene",
    "scene_from_objects",
    "tokenize",
    "vocabulary",
    "wrong_color",
    "write_shapes_world",
]

WORLD_VERSION = 1
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond")
# Every colour word starts with a consonant, so the article is always "a".
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "purple": (140, 60, 180),
    "black": (20, 20, 20),
}
BACKGROUND: tuple[int, int, int] = (200, 200, 200)
KINDS: tuple[str, ...] = ("caption", "color", "presence")
DEFAULT_TASK_WEIGHTS: dict[str, float] = {"caption": 0.4, "color": 0.3, "presence": 0.3}

_TOKEN_RE = re.compile(r"\w+|[^\w\s]")
_CAPTION_PROMPT = "describe the image ."
_COLOR_PROMPT = "what color is the {shape} ?"
_COLOR_ANSWER = "the {shape} is {color} ."
_PRESENCE_PROMPT = "is there a {color} {shape} in the image ?"
_YES, _NO = "yes .", "no ."
_MARGIN = 2  # px kept free at the border and between objects


@dataclass(frozen=True)
class ShapeObject:
    """One object of a scene.

    Args:
        shape: A word from `SHAPES`.
        color: A key of `COLORS`.
        bbox: Pixel box ``(x0, y0, x1, y1)``, half-open: the shape covers columns ``x0 .. x1 - 1``.
    """

    shape: str
    color: str
    bbox: tuple[int, int, int, int]

    def to_dict(self) -> dict:
        return {"shape": self.shape, "color": self.color, "bbox": list(self.bbox)}


def tokenize(text: str) -> list[str]:
    """Split text into words and punctuation tokens (regex ``\\w+|[^\\w\\s]``)."""
    return _TOKEN_RE.findall(text)


def sample_scene(rng: random.Random, max_objects: int = 3, image_size: int = 64) -> list[ShapeObject]:
    """Sample 1..max_objects objects with distinct (shape, colour) and non-overlapping boxes.

    Box sides are 1/4 to 3/8 of the image (16 to 24 px at 64), boxes keep a 2 px gap from each other
    and the border. If an object cannot be placed after 100 tries the scene keeps fewer objects.
    Objects are returned sorted left to right, the order the caption names them in.
    """
    pairs = [(s, c) for s in SHAPES for c in COLORS]
    n = rng.randint(1, max(1, min(max_objects, len(pairs))))
    chosen_pairs = rng.sample(pairs, n)
    lo, hi = max(4, round(image_size / 4)), max(4, round(image_size * 3 / 8))
    boxes: list[tuple[int, int, int, int]] = []
    objects: list[ShapeObject] = []
    for shape, color in chosen_pairs:
        for _ in range(100):
            side = rng.randint(lo, hi)
            x0 = rng.randint(_MARGIN, image_size - _MARGIN - side)
            y0 = rng.randint(_MARGIN, image_size - _MARGIN - side)
            box = (x0, y0, x0 + side, y0 + side)
            if all(_apart(box, other) for other in boxes):
                boxes.append(box)
                objects.append(ShapeObject(shape, color, box))
                break
    return sorted(objects, key=lambda o: (o.bbox[0], o.bbox[1]))


def _apart(a: tuple[int, ...], b: tuple[int, ...]) -> bool:
    return a[2] + _MARGIN <= b[0] or b[2] + _MARGIN <= a[0] or a[3] + _MARGIN <= b[1] or b[3] + _MARGIN <= a[1]


def scene_from_objects(objects: Sequence[Mapping]) -> list[ShapeObject]:
    """Rebuild a scene from a record's ``objects`` field."""
    return [ShapeObject(o["shape"], o["color"], tuple(o["bbox"])) for o in objects]


def render_scene(scene: Sequence[ShapeObject], image_size: int = 64) -> Image.Image:
    """Draw the scene (no anti-aliasing, so every shape pixel has exactly its colour's RGB)."""
    image = Image.new("RGB", (image_size, image_size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for obj in scene:
        x0, y0, x1, y1 = obj.bbox
        x1, y1 = x1 - 1, y1 - 1  # PIL boxes are inclusive
        fill = COLORS[obj.color]
        if obj.shape == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=fill)
        elif obj.shape == "square":
            draw.rectangle((x0, y0, x1, y1), fill=fill)
        elif obj.shape == "triangle":
            draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
        elif obj.shape == "diamond":
            xm, ym = (x0 + x1) / 2, (y0 + y1) / 2
            draw.polygon([(xm, y0), (x1, ym), (xm, y1), (x0, ym)], fill=fill)
        else:
            raise ValueError(f"unknown shape {obj.shape!r}")
    return image


def _describe(pairs: Sequence[tuple[str, str]]) -> str:
    """``[(shape, colour), ...]`` -> "a red circle , a blue square and a green triangle ."."""
    phrases = [f"a {color} {shape}" for shape, color in pairs]
    if len(phrases) == 1:
        return f"{phrases[0]} ."
    return f"{' , '.join(phrases[:-1])} and {phrases[-1]} ."


def caption_for(scene: Sequence[ShapeObject]) -> str:
    """The ground-truth caption: every object, left to right, e.g. "a red circle and a blue square ."."""
    return _describe([(o.shape, o.color) for o in scene])


def objects_in_text(text: str) -> set[tuple[str, str]]:
    """The (colour, shape) pairs a text mentions as "<colour> <shape>" (for CHAIR-style scoring).

    Answers of the form "the circle is red ." name a shape and a colour but no pair, and give an
    empty set; use `tokenize` for those.
    """
    tokens = tokenize(text.lower())
    return {(a, b) for a, b in zip(tokens, tokens[1:], strict=False) if a in COLORS and b in SHAPES}


def _caption_task(scene: Sequence[ShapeObject], rng: random.Random) -> tuple[str, str, str]:
    truth = [(o.shape, o.color) for o in scene]
    absent = [(s, c) for s in SHAPES for c in COLORS if (s, c) not in truth]
    # Hallucinations: insert an absent object, or turn one object into an absent one by changing its
    # colour or its shape. Either way the rejected caption names an object that is not in the image.
    swaps = [(i, a) for i, (s, c) in enumerate(truth) for a in absent if a[0] == s or a[1] == c]
    if not swaps or rng.random() < 0.5:
        position = rng.randint(0, len(truth))
        rejected = truth[:position] + [rng.choice(absent)] + truth[position:]
    else:
        i, replacement = rng.choice(swaps)
        rejected = truth[:i] + [replacement] + truth[i + 1 :]
    return _CAPTION_PROMPT, _describe(truth), _describe(rejected)


def wrong_color(color: str, scene_colors: Sequence[str], rng: random.Random) -> str:
    """A colour other than ``color``: half the time one of ``scene_colors`` (another object's, an attribute
    binding error), else any other colour of `COLORS`."""
    seen = [c for c in dict.fromkeys(scene_colors) if c != color]
    return rng.choice(seen) if seen and rng.random() < 0.5 else rng.choice([c for c in COLORS if c != color])


def _color_task(scene: Sequence[ShapeObject], rng: random.Random) -> tuple[str, str, str]:
    counts = Counter(o.shape for o in scene)
    unique = [o for o in scene if counts[o.shape] == 1]
    if not unique:
        raise ValueError("color task needs a shape that occurs once in the scene")
    obj = rng.choice(unique)
    color = wrong_color(obj.color, [o.color for o in scene], rng)
    prompt = _COLOR_PROMPT.format(shape=obj.shape)
    chosen = _COLOR_ANSWER.format(shape=obj.shape, color=obj.color)
    return prompt, chosen, _COLOR_ANSWER.format(shape=obj.shape, color=color)


def _presence_task(scene: Sequence[ShapeObject], rng: random.Random) -> tuple[str, str, str]:
    truth = [(o.shape, o.color) for o in scene]
    if rng.random() < 0.5:
        shape, color = rng.choice(truth)
        answer, wrong = _YES, _NO
    else:
        absent = [(s, c) for s in SHAPES for c in COLORS if (s, c) not in truth]
        # Half of the absent questions are near misses that share a shape or a colour with the image.
        near = [(s, c) for s, c in absent if any(s == ts or c == tc for ts, tc in truth)]
        shape, color = rng.choice(near) if near and rng.random() < 0.5 else rng.choice(absent)
        answer, wrong = _NO, _YES
    return _PRESENCE_PROMPT.format(color=color, shape=shape), answer, wrong


_TASKS = {"caption": _caption_task, "color": _color_task, "presence": _presence_task}


def _feasible(kind: str, scene: Sequence[ShapeObject]) -> bool:
    return kind != "color" or any(n == 1 for n in Counter(o.shape for o in scene).values())


def make_record(
    rng: random.Random,
    *,
    kind: str | None = None,
    scene: Sequence[ShapeObject] | None = None,
    task_weights: Mapping[str, float] | None = None,
    max_objects: int = 3,
    image_size: int = 64,
) -> dict:
    """Sample one preference example (without ``id`` and ``images``, which the writer adds).

    Args:
        rng: The only source of randomness.
        kind: One of `KINDS`; drawn with ``task_weights`` when None.
        scene: Ground truth to ask about; sampled when None (resampled until the task is possible).
        task_weights: Relative weight per kind; kinds left out get weight 0. Defaults to
            `DEFAULT_TASK_WEIGHTS`.
        max_objects: Most objects in a sampled scene.
        image_size: Side of the square image in pixels.

    Returns:
        ``{"prompt", "chosen", "rejected", "kind", "objects", "caption"}``.
    """
    if kind is None:
        weights = _normalise_weights(task_weights)
        kind = rng.choices(KINDS, weights=[weights[k] for k in KINDS])[0]
    if kind not in _TASKS:
        raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS}")
    if scene is None:
        scene = sample_scene(rng, max_objects, image_size)
        while not _feasible(kind, scene):
            scene = sample_scene(rng, max_objects, image_size)
    prompt, chosen, rejected = _TASKS[kind](scene, rng)
    return {
        "prompt": prompt,
        "chosen": chosen,
        "rejected": rejected,
        "kind": kind,
        "objects": [o.to_dict() for o in scene],
        "caption": caption_for(scene),
    }


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


def vocabulary() -> list[str]:
    """Every token that can appear in any prompt or response of the world, sorted."""
    texts = [_CAPTION_PROMPT, _YES, _NO, _describe([(SHAPES[0], c) for c in COLORS])]
    for shape in SHAPES:
        for color in COLORS:
            texts += [
                _COLOR_PROMPT.format(shape=shape),
                _COLOR_ANSWER.format(shape=shape, color=color),
                _PRESENCE_PROMPT.format(color=color, shape=shape),
            ]
    return sorted({token for text in texts for token in tokenize(text)})


@dataclass(frozen=True)
class ShapesWorld:
    """A seeded world: record ``(split, index)`` is a pure function of the settings.

    Args:
        seed: World seed.
        image_size: Side of the square images in pixels.
        max_objects: Most objects per scene.
        task_weights: Relative weight per kind (see `make_record`).
    """

    seed: int = 0
    image_size: int = 64
    max_objects: int = 3
    task_weights: Mapping[str, float] | None = None

    def rng(self, split: str, index: int) -> random.Random:
        # A string seed is hashed with SHA-512 by `random`, independent of PYTHONHASHSEED.
        return random.Random(f"mmpo-shapes-world/v{WORLD_VERSION}/{self.seed}/{split}/{index}")

    def record(self, split: str, index: int) -> dict:
        """Record ``index`` of ``split`` in the on-disk format (``images`` relative to the root)."""
        record_id = f"{split}-{index:06d}"
        body = make_record(
            self.rng(split, index),
            task_weights=self.task_weights,
            max_objects=self.max_objects,
            image_size=self.image_size,
        )
        return {"id": record_id, "images": [f"images/{record_id}.png"], **body}

    def image(self, record: Mapping) -> Image.Image:
        """Render a record's image from its ``objects``."""
        return render_scene(scene_from_objects(record["objects"]), self.image_size)


def write_shapes_world(
    root: str | os.PathLike,
    n_train: int = 400,
    n_val: int = 100,
    seed: int = 0,
    image_size: int = 64,
    max_objects: int = 3,
    task_weights: Mapping[str, float] | None = None,
    overwrite: bool = False,
) -> dict:
    """Write ``root/images/*.png``, ``root/train.jsonl``, ``root/val.jsonl`` and ``root/world.json``.

    Idempotent: if ``world.json`` records the same settings (and the files are there) nothing is
    regenerated. Every file is written to a temporary name and moved into place, and ``world.json``
    is written last (and removed first), so an interrupted run never looks complete.

    Args:
        root: Dataset directory (created if missing).
        n_train: Number of training records.
        n_val: Number of validation records.
        seed: World seed.
        image_size: Side of the square images in pixels.
        max_objects: Most objects per scene.
        task_weights: Relative weight per kind; defaults to `DEFAULT_TASK_WEIGHTS`.
        overwrite: Replace a world generated with different settings instead of raising.

    Returns:
        Summary: ``root``, ``train`` and ``val`` paths, counts, per-split kind counts, vocabulary size
        and ``generated`` (False when an existing world was reused).

    Raises:
        FileExistsError: ``root`` holds a world with other settings and ``overwrite`` is False.
    """
    root = Path(root)
    settings = {
        "version": WORLD_VERSION,
        "seed": seed,
        "n_train": n_train,
        "n_val": n_val,
        "image_size": image_size,
        "max_objects": max_objects,
        "task_weights": _normalise_weights(task_weights),
    }
    world = ShapesWorld(seed, image_size, max_objects, settings["task_weights"])

    def write_image(record: dict, path: Path) -> None:
        with atomic_file(path) as tmp:
            world.image(record).save(tmp, format="PNG")

    info = {
        "shapes": list(SHAPES),
        "colors": {name: list(rgb) for name, rgb in COLORS.items()},
        "background": list(BACKGROUND),
        "vocabulary": vocabulary(),
    }
    return write_world(
        root,
        settings,
        name="shapes world",
        media_dir="images",
        suffix=".png",
        make_record=world.record,
        write_media=write_image,
        kinds=KINDS,
        info=info,
        overwrite=overwrite,
    )


def main(argv: Sequence[str] | None = None) -> dict:
    """Command line: write a shapes world and print its summary as JSON."""
    return world_cli(
        argv, "python -m datamodules.worlds.shapes", __doc__.split("\n")[0], write_shapes_world, {"image-size": 64}
    )


if __name__ == "__main__":
    main()
