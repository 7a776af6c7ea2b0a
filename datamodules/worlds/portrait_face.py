"""Drawn faces of the talking-portrait world: identities, one frame's rendering, landmarks.

A face is a few flat-coloured ellipses (hair cap, head, eye whites and irises or closed lids, lips and the
dark inside of the open mouth) in face coordinates (pixels, origin at the head centre, y down), rotated by the
head's roll, moved to its position, drawn at 4x and box-downsampled (anti-aliased), so the mouth's dark area
varies continuously with its opening rather than in whole pixels. See `datamodules.worlds.portrait`.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image, ImageDraw

__all__ = [
    "BACKGROUND",
    "EYE_WHITE",
    "MAX_OPEN",
    "MOUTH_COLOR",
    "Identity",
    "face_landmarks",
    "render_face",
]

BACKGROUND: tuple[int, int, int] = (150, 196, 206)  # far from every skin and hair colour
MOUTH_COLOR: tuple[int, int, int] = (60, 15, 25)  # inside of the open mouth: darker than every skin
EYE_WHITE: tuple[int, int, int] = (245, 245, 245)
_SKINS = ((241, 204, 178), (224, 172, 138), (198, 140, 104), (160, 110, 80), (128, 86, 62))
_HAIRS = ((40, 30, 25), (95, 60, 30), (170, 125, 60), (215, 180, 95), (125, 45, 30), (80, 80, 85))
_IRISES = ((70, 45, 30), (50, 90, 160), (60, 120, 70), (110, 90, 50))
_SUPERSAMPLE = 4
MAX_OPEN = 0.17  # widest mouth opening, in face heights
_EYE_Y, _MOUTH_Y = -0.15, 0.24  # eye and mouth centres below the head centre, in face heights


@dataclass(frozen=True)
class Identity:
    """How one person looks.

    Args:
        name: ``id-NNN``.
        skin: Face colour (RGB); the lips are a darker, redder shade of it.
        hair: Hair colour (a cap over the top of the head).
        iris: Eye colour.
        face_frac: Face height as a fraction of the frame side.
        width_ratio: Face width over face height.
        eye_dx: Eye centres' distance from the midline, as a fraction of the face's half-width.
        mouth_w: Mouth half-width as a fraction of the face's half-width.
    """

    name: str
    skin: tuple[int, int, int]
    hair: tuple[int, int, int]
    iris: tuple[int, int, int]
    face_frac: float
    width_ratio: float
    eye_dx: float
    mouth_w: float

    @classmethod
    def sample(cls, rng: random.Random, name: str) -> Identity:
        skin = tuple(int(np.clip(c + rng.randint(-8, 8), 0, 255)) for c in rng.choice(_SKINS))
        return cls(
            name,
            skin,
            rng.choice(_HAIRS),
            rng.choice(_IRISES),
            face_frac=round(rng.uniform(0.62, 0.72), 4),
            width_ratio=round(rng.uniform(0.72, 0.9), 4),
            eye_dx=round(rng.uniform(0.38, 0.5), 4),
            mouth_w=round(rng.uniform(0.3, 0.45), 4),
        )

    @property
    def lip(self) -> tuple[int, int, int]:
        return (min(255, int(self.skin[0] * 0.75 + 50)), int(self.skin[1] * 0.55), int(self.skin[2] * 0.6))

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


def _ellipse(cx: float, cy: float, rx: float, ry: float, n: int = 32) -> np.ndarray:
    """Polygon of an axis-aligned ellipse in face coordinates: ``(n, 2)``."""
    a = np.linspace(0.0, 2.0 * math.pi, n, endpoint=False)
    return np.stack([cx + rx * np.cos(a), cy + ry * np.sin(a)], axis=1)


def _parts(ident: Identity, size: int, mouth_open: float, eyes_open: bool) -> list[tuple[np.ndarray, tuple]]:
    """The face's polygons in face coordinates (pixels, origin at the head centre, y down), in drawing order."""
    h = ident.face_frac * size  # face height in pixels
    a, b = 0.5 * ident.width_ratio * h, 0.5 * h  # face semi-axes
    parts = [(_ellipse(0.0, -0.12 * h, 1.08 * a, 0.95 * b), ident.hair), (_ellipse(0.0, 0.0, a, b), ident.skin)]
    for side in (-1.0, 1.0):
        ex, ey = side * ident.eye_dx * a, _EYE_Y * h
        if eyes_open:
            parts += [
                (_ellipse(ex, ey, 0.11 * h, 0.065 * h), EYE_WHITE),
                (_ellipse(ex, ey, 0.055 * h, 0.055 * h), ident.iris),
            ]
        else:  # a closed lid: a thin dark line
            parts.append((_ellipse(ex, ey, 0.11 * h, 0.015 * h), ident.lip))
    opening = float(np.clip(mouth_open, 0.0, 1.0)) * MAX_OPEN * h
    mw = ident.mouth_w * a
    parts.append((_ellipse(0.0, _MOUTH_Y * h, mw, 0.03 * h + opening / 2), ident.lip))
    if opening > 0:
        parts.append((_ellipse(0.0, _MOUTH_Y * h, 0.85 * mw, opening / 2), MOUTH_COLOR))
    return parts


def _place(points: np.ndarray, head: Sequence[float], tilt: float) -> np.ndarray:
    """Rotate face coordinates by ``tilt`` degrees (clockwise on screen) and move them to ``head``."""
    c, s = math.cos(math.radians(tilt)), math.sin(math.radians(tilt))
    x, y = points[..., 0], points[..., 1]
    return np.stack([head[0] + c * x - s * y, head[1] + s * x + c * y], axis=-1)


def render_face(
    ident: Identity,
    size: int = 32,
    head: Sequence[float] | None = None,
    tilt: float = 0.0,
    mouth_open: float = 0.0,
    eyes_open: bool = True,
) -> np.ndarray:
    """Draw one frame: ``(size, size, 3)`` uint8, anti-aliased (drawn at 4x, box-averaged).

    Args:
        ident: Who.
        size: Frame side in pixels.
        head: Head centre ``(x, y)`` in pixels (pixel centres at +0.5); the frame centre when None.
        tilt: Roll in degrees.
        mouth_open: Opening as a fraction of the widest, in [0, 1].
        eyes_open: False draws closed lids.
    """
    head = (size / 2, size / 2) if head is None else head
    k = _SUPERSAMPLE
    canvas = Image.new("RGB", (size * k, size * k), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    for points, color in _parts(ident, size, mouth_open, eyes_open):
        xy = _place(points, head, tilt) * k
        draw.polygon([tuple(p) for p in xy.tolist()], fill=tuple(color))
    return np.asarray(canvas.reduce(k))


def face_landmarks(ident: Identity, size: int, head: Sequence[float], tilt: float) -> dict[str, list[float]]:
    """Pixel positions ``[x, y]`` of the head, eye and mouth centres of a frame."""
    h = ident.face_frac * size
    a = 0.5 * ident.width_ratio * h
    local = np.array([[0.0, 0.0], [-ident.eye_dx * a, _EYE_Y * h], [ident.eye_dx * a, _EYE_Y * h], [0.0, _MOUTH_Y * h]])
    placed = _place(local, head, tilt)
    return {
        name: [round(float(v), 4) for v in p]
        for name, p in zip(("head", "left_eye", "right_eye", "mouth"), placed, strict=True)
    }
