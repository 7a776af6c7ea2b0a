"""Clips of the synthetic video world: coloured shapes moving in straight lines across a plain background.

A clip is a list of `MovingObject` (shape, colour, direction, the frame it appears at, its size, speed and
starting box); `sample_clip` draws one from a `random.Random`, `render_clip` draws its frames with the shapes
world's `render_scene`. The questions asked about clips and the world written to disk are in
`datamodules.worlds.video`, which re-exports everything here.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from datamodules.worlds.shapes import COLORS, SHAPES, ShapeObject, render_scene

__all__ = ["DEFAULT_SPEEDS", "DIRECTIONS", "MovingObject", "clip_from_objects", "render_clip", "sample_clip"]

DIRECTIONS: dict[str, tuple[int, int]] = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
DEFAULT_SPEEDS = (1, 3)  # px per frame, least and most
_MARGIN = 2  # px kept free at the border and between objects


@dataclass(frozen=True)
class MovingObject:
    """One object of a clip, moving in a straight line at constant speed.

    Args:
        shape: A word from `SHAPES`.
        color: A key of `COLORS`.
        direction: A key of `DIRECTIONS`.
        appears: First frame the object is visible in; it stays visible to the end of the clip.
        side: Side of its square box in pixels.
        speed: Pixels moved per frame.
        start: Top-left corner ``(x0, y0)`` of its box at frame ``appears``.
    """

    shape: str
    color: str
    direction: str
    appears: int
    side: int
    speed: int
    start: tuple[int, int]

    def bbox_at(self, frame: int) -> tuple[int, int, int, int] | None:
        """Half-open box ``(x0, y0, x1, y1)`` at ``frame``, or None before the object appears."""
        if frame < self.appears:
            return None
        dx, dy = DIRECTIONS[self.direction]
        step = self.speed * (frame - self.appears)
        x0, y0 = self.start[0] + dx * step, self.start[1] + dy * step
        return (x0, y0, x0 + self.side, y0 + self.side)

    def to_dict(self) -> dict:
        return {**asdict(self), "start": list(self.start)}


def clip_from_objects(objects: Sequence[Mapping]) -> list[MovingObject]:
    """Rebuild a clip's objects from a record's ``objects`` field."""
    keys = ("shape", "color", "direction", "appears", "side", "speed")
    return [MovingObject(*(o[k] for k in keys), start=tuple(o["start"])) for o in objects]


def _apart(a: tuple[int, ...], b: tuple[int, ...]) -> bool:
    return a[2] + _MARGIN <= b[0] or b[2] + _MARGIN <= a[0] or a[3] + _MARGIN <= b[1] or b[3] + _MARGIN <= a[1]


def _place(
    rng: random.Random, obj: MovingObject, num_frames: int, size: int, speeds: tuple[int, int] = DEFAULT_SPEEDS
) -> MovingObject:
    """Draw a speed and a start that keep the object's whole path inside the frame."""
    travel_room = size - 2 * _MARGIN - obj.side
    moves = max(1, num_frames - 1 - obj.appears)
    slowest, fastest = speeds
    speed = rng.randint(slowest, max(slowest, min(fastest, travel_room // moves)))
    travel = speed * (num_frames - 1 - obj.appears)
    dx, dy = DIRECTIONS[obj.direction]
    lo, hi = _MARGIN, size - _MARGIN - obj.side  # range of a box corner coordinate
    along = rng.randint(lo + travel, hi) if dx + dy < 0 else rng.randint(lo, hi - travel)
    across = rng.randint(lo, hi)
    start = (along, across) if dx else (across, along)
    return MovingObject(obj.shape, obj.color, obj.direction, obj.appears, obj.side, speed, start)


def sample_clip(
    rng: random.Random,
    num_frames: int = 16,
    size: int = 64,
    max_objects: int = 3,
    speeds: tuple[int, int] = DEFAULT_SPEEDS,
) -> list[MovingObject]:
    """Sample 1..max_objects moving objects with distinct (shape, colour) and distinct appearance frames.

    Box sides are 3/16 to 1/4 of the frame (12 to 16 px at 64), speeds ``speeds`` (least, most) px per frame,
    1 to 3 by default, the most capped by the room the object has to move in. The first
    object appears at frame 0; the others at distinct multiples of ``num_frames // 4`` up to half the
    clip, so sparse frame sampling still sees who came first. Boxes keep a 2 px gap from the border
    and, in every frame where both are visible, from each other. An object that cannot be placed
    after 100 tries is left out. Objects are returned in order of appearance.

    Raises:
        ValueError: The frame is too small for an object to move at the least speed for the whole clip, or
            ``speeds`` is not 1 <= least <= most.
    """
    lo, hi = max(4, round(size * 3 / 16)), max(4, round(size / 4))
    slowest, fastest = speeds
    if not 1 <= slowest <= fastest:
        raise ValueError(f"speeds must be (least, most) px per frame with 1 <= least <= most, got {tuple(speeds)}")
    if size - 2 * _MARGIN - hi < slowest * (num_frames - 1):
        raise ValueError(f"a {size}px frame leaves no room to move {slowest} px per frame for {num_frames} frames")
    step = max(1, num_frames // 4)
    late_slots = list(range(step, num_frames // 2 + 1, step))
    pairs = [(s, c) for s in SHAPES for c in COLORS]
    n = rng.randint(1, max(1, min(max_objects, len(late_slots) + 1)))
    appears = [0, *sorted(rng.sample(late_slots, n - 1))]
    placed: list[MovingObject] = []
    for (shape, color), first in zip(rng.sample(pairs, n), appears, strict=True):
        for _ in range(100):
            draft = MovingObject(shape, color, rng.choice(list(DIRECTIONS)), first, rng.randint(lo, hi), 1, (0, 0))
            obj = _place(rng, draft, num_frames, size, speeds)
            frames = range(obj.appears, num_frames)  # `placed` objects appeared earlier: both visible here
            if all(_apart(obj.bbox_at(t), other.bbox_at(t)) for other in placed for t in frames):
                placed.append(obj)
                break
    return placed


def render_clip(objects: Sequence[MovingObject], num_frames: int = 16, size: int = 64) -> np.ndarray:
    """Draw the clip: ``(num_frames, size, size, 3)`` uint8, each frame by `render_scene`."""
    frames = np.empty((num_frames, size, size, 3), dtype=np.uint8)
    for t in range(num_frames):
        scene = [ShapeObject(o.shape, o.color, o.bbox_at(t)) for o in objects if t >= o.appears]
        frames[t] = np.asarray(render_scene(scene, size))
    return frames
