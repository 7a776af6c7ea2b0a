"""VideoHallucer-style yes/no probe pairs about clips of the synthetic video world.

VideoHallucer (Wang et al. 2024) asks every question twice: a *basic* question whose true answer is
"yes" and a *hallucinated* one, the same template with one detail changed, whose true answer is "no".
A model is right about the pair only when it answers both, so a model that always says "yes" (or
always "no") scores no pair at all. The probes here ask three of its question types about a clip of
`datamodules.worlds.video`, from the clip's ground truth:

- ``temporal``: direction of motion ("does the red circle move left ?" / the opposite direction) or
  order of appearance ("does the red circle appear before the blue square ?" / the two swapped, asked
  only about objects that appear at different frames);
- ``semantic``: a colour ("is the circle that moves left red ?" / a colour of no object in the clip) or
  a shape ("is the red shape that moves left a circle ?" / a shape of no object in the clip), asked
  only about an object the description names alone;
- ``relation``: relative position ("is the red circle left of the blue square ?" / "right of", or
  "above" / "below"), asked only when it holds in every frame where both objects are visible, so it
  does not depend on which frames a model samples.

Probe ``index`` of ``seed`` has type ``types[index % len(types)]`` (a balanced mix; repeat a type to
weigh it more) and its own generator seeded from (seed, index), in a namespace apart from the written
world's records. Its detail (direction or order, ...) is drawn with even odds and clips are drawn until
that question can be answered from the frames a model is shown (``shown_frames``: the object's motion
in two of them; for an order, the earlier object alone in one). The questions use words outside the
world's `vocabulary()` (``yes``, ``no``, ``appear``, ``before``, ``of``, ``above``, ``below``); these
are kept out of it so the world's files and the tiny models built from it stay as they are.
`probe_vocabulary()` lists every probe word: add it to a tokenizer that should read the probes.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from datamodules.worlds.shapes import COLORS, SHAPES, tokenize
from datamodules.worlds.video_clips import DEFAULT_SPEEDS, DIRECTIONS, MovingObject, render_clip, sample_clip

__all__ = [
    "PROBE_DETAILS",
    "PROBE_TYPES",
    "RELATION_WORDS",
    "VideoProbePair",
    "make_video_probes",
    "probe_vocabulary",
]

PROBE_TYPES: tuple[str, ...] = ("temporal", "semantic", "relation")
PROBE_DETAILS: dict[str, tuple[str, ...]] = {
    "temporal": ("direction", "order"),
    "semantic": ("color", "shape"),
    "relation": ("horizontal", "vertical"),
}
# "<a> <words> the <b>" is true when a's box lies wholly on that side of b's box (image y grows down).
RELATION_WORDS: dict[str, str] = {"left": "left of", "right": "right of", "up": "above", "down": "below"}

_MOVE = "does the {color} {shape} move {direction} ?"
_BEFORE = "does the {color} {shape} appear before the {color2} {shape2} ?"
_COLOR = "is the {shape} that moves {direction} {color} ?"
_SHAPE = "is the {color} shape that moves {direction} a {shape} ?"
_RELATION = "is the {color} {shape} {relation} the {color2} {shape2} ?"
_ANSWERS = ("yes .", "no .")
_MAX_CLIPS = 1000  # clips drawn for one probe before its question is declared impossible


@dataclass(frozen=True)
class VideoProbePair:
    """A basic question (true answer ``basic_answer``) and its hallucinated twin about one clip.

    Args:
        index: Position of the probe in its seed's sequence.
        kind: One of `PROBE_TYPES`.
        detail: What the question is about, one of ``PROBE_DETAILS[kind]``.
        basic: The question true of the clip.
        hallucinated: The same template with one detail changed, false of the clip.
        objects: The clip's ground truth, in order of appearance.
        frames: The rendered clip, ``(T, H, W, 3)`` uint8 (not compared by ``==``).
        basic_answer: Expected answer to ``basic``.
        hallucinated_answer: Expected answer to ``hallucinated``.
    """

    index: int
    kind: str
    detail: str
    basic: str
    hallucinated: str
    objects: tuple[MovingObject, ...]
    frames: np.ndarray = field(compare=False, repr=False)
    basic_answer: str = "yes"
    hallucinated_answer: str = "no"


def _opposite(direction: str) -> str:
    dx, dy = DIRECTIONS[direction]
    return next(d for d, v in DIRECTIONS.items() if v == (-dx, -dy))


def _unique(objects: Sequence[MovingObject], key: Callable[[MovingObject], tuple]) -> list[MovingObject]:
    """Objects that ``key`` (e.g. shape and direction) names alone in the clip."""
    counts = Counter(key(o) for o in objects)
    return [o for o in objects if counts[key(o)] == 1]


@dataclass(frozen=True)
class _Clip:
    """A clip's ground truth and the frames a model is shown of it (sorted indices)."""

    objects: Sequence[MovingObject]
    shown: Sequence[int]
    num_frames: int

    def moving(self) -> list[MovingObject]:
        """Objects visible in two shown frames or more: those whose motion a model can see."""
        return [o for o in self.objects if sum(t >= o.appears for t in self.shown) >= 2]

    def side(self, a: MovingObject, b: MovingObject, axis: int) -> str | None:
        """Where ``a`` lies from ``b`` along ``axis`` (0: x, 1: y) in every frame both are visible, if anywhere.

        Every frame of the clip, not only the shown ones, so the answer does not depend on frame sampling.
        """
        if self.shown[-1] < max(a.appears, b.appears):
            return None  # never seen together
        sides = set()
        for t in range(max(a.appears, b.appears), self.num_frames):
            box_a, box_b = a.bbox_at(t), b.bbox_at(t)
            if box_a[axis + 2] <= box_b[axis]:
                sides.add("left" if axis == 0 else "up")
            elif box_b[axis + 2] <= box_a[axis]:
                sides.add("right" if axis == 0 else "down")
            else:
                return None  # overlapping extents in this frame: neither side
        return sides.pop() if len(sides) == 1 else None


_Questions = tuple[str, str] | None


def _direction(clip: _Clip, rng: random.Random) -> _Questions:
    moving = clip.moving()
    if not moving:
        return None
    o = rng.choice(moving)
    return tuple(_MOVE.format(color=o.color, shape=o.shape, direction=d) for d in (o.direction, _opposite(o.direction)))


def _order(clip: _Clip, rng: random.Random) -> _Questions:
    # Some shown frame must hold the earlier object without the later one, and a later one both.
    pairs = [
        (a, b)
        for a in clip.objects
        for b in clip.objects
        if any(a.appears <= t < b.appears for t in clip.shown) and clip.shown[-1] >= b.appears
    ]
    if not pairs:
        return None
    a, b = rng.choice(pairs)
    return tuple(
        _BEFORE.format(color=x.color, shape=x.shape, color2=y.color, shape2=y.shape) for x, y in ((a, b), (b, a))
    )


def _detail(
    asked: str, named_by: str, values: Sequence[str], template: str
) -> Callable[[_Clip, random.Random], _Questions]:
    """Ask one moving object's ``asked`` attribute (colour or shape), naming it by its ``named_by`` attribute
    and its motion; the hallucinated twin asks a value no object of the clip has."""

    def ask(clip: _Clip, rng: random.Random) -> _Questions:
        moving = clip.moving()  # "the <shape> that moves <direction>" needs its motion seen
        referents = [o for o in _unique(clip.objects, lambda o: (getattr(o, named_by), o.direction)) if o in moving]
        absent = [v for v in values if v not in {getattr(o, asked) for o in clip.objects}]
        if not referents or not absent:
            return None
        o, wrong = rng.choice(referents), rng.choice(absent)
        fixed = {named_by: getattr(o, named_by), "direction": o.direction}
        return tuple(template.format(**fixed, **{asked: v}) for v in (getattr(o, asked), wrong))

    return ask


def _relation(axis: int) -> Callable[[_Clip, random.Random], _Questions]:
    def ask(clip: _Clip, rng: random.Random) -> _Questions:
        objects = clip.objects
        placed = [(a, b, side) for a in objects for b in objects if a is not b and (side := clip.side(a, b, axis))]
        if not placed:
            return None
        a, b, side = rng.choice(placed)
        return tuple(
            _RELATION.format(color=a.color, shape=a.shape, relation=RELATION_WORDS[s], color2=b.color, shape2=b.shape)
            for s in (side, _opposite(side))
        )

    return ask


_QUESTIONS = {
    "direction": _direction,
    "order": _order,
    "color": _detail("color", "shape", list(COLORS), _COLOR),
    "shape": _detail("shape", "color", list(SHAPES), _SHAPE),
    "horizontal": _relation(0),
    "vertical": _relation(1),
}


def make_video_probes(
    n: int,
    seed: int = 0,
    types: Sequence[str] = PROBE_TYPES,
    num_frames: int = 16,
    size: int = 64,
    max_objects: int = 3,
    shown_frames: Sequence[int] | None = None,
    speeds: tuple[int, int] = DEFAULT_SPEEDS,
) -> list[VideoProbePair]:
    """``n`` probe pairs, a pure function of the arguments; probe ``i`` does not depend on ``n``.

    Args:
        n: Number of probe pairs.
        seed: Probe seed.
        types: Probe ``i`` has type ``types[i % len(types)]``; names from `PROBE_TYPES`, repeats allowed.
        num_frames: Frames per rendered clip.
        size: Side of the square frames in pixels.
        max_objects: Most objects per clip (``relation`` and ``order`` questions need 2).
        shown_frames: Indices of the frames a model will see (e.g. `sample_frame_indices`); a question
            is asked only if those frames answer it: a direction needs the object in two of them, an
            order one with the earlier object alone. None: every frame.
        speeds: Least and most px per frame of the objects (`datamodules.worlds.video.sample_clip`).

    Raises:
        ValueError: An unknown type, or a question no clip of these settings allows.
    """
    types = list(types)
    unknown = sorted(set(types) - set(PROBE_TYPES))
    if not types or unknown:
        raise ValueError(f"probe types must be a non-empty list from {PROBE_TYPES}, got {types}")
    shown = sorted(set(range(num_frames) if shown_frames is None else shown_frames))
    if not shown or shown[0] < 0 or shown[-1] >= num_frames:
        raise ValueError(f"shown_frames must be indices of a {num_frames}-frame clip, got {shown_frames}")
    probes = []
    for index in range(n):
        kind = types[index % len(types)]
        # A string seed is hashed with SHA-512 by `random`, independent of PYTHONHASHSEED.
        rng = random.Random(f"mmpo-video-hallucination-probe/v1/{seed}/{index}")
        detail = rng.choice(PROBE_DETAILS[kind])
        for _ in range(_MAX_CLIPS):
            objects = sample_clip(rng, num_frames, size, max_objects, speeds)
            questions = _QUESTIONS[detail](_Clip(objects, shown, num_frames), rng)
            if questions is not None:
                break
        else:
            raise ValueError(
                f"no clip with max_objects={max_objects} and shown frames {shown} allows a {kind} ({detail}) question"
            )
        frames = render_clip(objects, num_frames, size)  # (T, H, W, 3)
        probes.append(VideoProbePair(index, kind, detail, *questions, tuple(objects), frames))
    return probes


def probe_vocabulary() -> list[str]:
    """Every token of any probe question or expected answer, sorted (a superset of the new words)."""
    texts = list(_ANSWERS)
    for shape in SHAPES:
        for color in COLORS:
            texts.append(_BEFORE.format(color=color, shape=shape, color2=color, shape2=shape))
            texts += [
                _RELATION.format(color=color, shape=shape, relation=r, color2=color, shape2=shape)
                for r in RELATION_WORDS.values()
            ]
            for direction in DIRECTIONS:
                texts.append(_MOVE.format(color=color, shape=shape, direction=direction))
                texts.append(_COLOR.format(shape=shape, direction=direction, color=color))
                texts.append(_SHAPE.format(color=color, direction=direction, shape=shape))
    return sorted({token for text in texts for token in tokenize(text)})
