"""The base of the video augmentations: the call contract, clip and parameter checks, seeded draws.

Every augmentation maps one clip shaped ``(T, C, H, W)`` to a clip of the same shape, dtype and
device, drawing all its randomness from the ``torch.Generator`` it is given (never from torch's,
Python's or numpy's global state), so the same generator state gives the same output. Clips are
``uint8`` in [0, 255] or floating point; transforms that compute new pixel values do it in
float32 and round and clamp back for integer dtypes.

Draws happen on the generator's device (a CPU generator works for a CUDA clip and the other way
round); only the resulting indices or masks move to the clip's device.

This package imports only torch: it is usable without ``mmpo`` or ``datamodules``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch
from torch import Tensor

__all__ = [
    "FrameIndexAugmentation",
    "Others",
    "VideoAugmentation",
    "check_clip",
    "check_fraction",
    "check_range",
    "clips_identical",
    "draw_int",
    "draw_uniform",
    "to_dtype",
    "to_working",
]

# The other clips of a batch, for clip swap: (N, T, C, H, W) or N tensors (T, C, H, W).
Others = Sequence[Tensor] | Tensor


class VideoAugmentation:
    """A seeded transform of one video clip ``(T, C, H, W)``.

    Subclasses set the class attributes and implement :meth:`apply`; :meth:`__call__` checks the
    clip and the generator first, so every transform rejects bad input with the same message.

    Class attributes:
        name: the registry name (``build_augmentation(name)``).
        min_frames: the smallest T the transform accepts (a shorter clip raises ValueError).
        needs_others: whether the transform reads the other clips of the batch (clip swap).
        identical_when: when the output can equal the input, for candidate builders' logs.
    """

    name: ClassVar[str] = ""
    min_frames: ClassVar[int] = 1
    needs_others: ClassVar[bool] = False
    identical_when: ClassVar[str] = ""

    def __call__(self, clip: Tensor, generator: torch.Generator, others: Others | None = None) -> Tensor:
        """Augment ``clip``.

        Args:
            clip: ``(T, C, H, W)`` video, uint8 or floating point; left unchanged.
            generator: the only source of randomness.
            others: the other clips of the batch, ``(N, T, C, H, W)`` or a sequence of ``(T, C, H, W)``;
                read only by transforms with ``needs_others``.

        Returns:
            A new ``(T, C, H, W)`` tensor with the dtype and device of ``clip``.
        """
        check_clip(clip, self.min_frames, self.name)
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"{self.name}: generator must be a torch.Generator, got {type(generator).__name__}")
        return self.apply(clip, generator, others)

    def apply(self, clip: Tensor, generator: torch.Generator, others: Others | None) -> Tensor:
        """The transform itself, on a clip already checked; see :meth:`__call__`."""
        raise NotImplementedError

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({args})"


class FrameIndexAugmentation(VideoAugmentation):
    """A purely temporal transform: output frame ``t`` is input frame ``frame_indices(T)[t]``.

    Pixel values are never changed, so the output holds only input frames; builders can read the
    index map (for a label or a log) without touching pixels.
    """

    def frame_indices(self, num_frames: int, generator: torch.Generator) -> Tensor:
        """The source frame of every output frame.

        Args:
            num_frames: T of the clip.
            generator: the only source of randomness.

        Returns:
            ``(T,)`` int64 indices in [0, T), on the generator's device.
        """
        raise NotImplementedError

    def apply(self, clip: Tensor, generator: torch.Generator, others: Others | None) -> Tensor:
        index = self.frame_indices(clip.shape[0], generator).to(clip.device)  # (T,)
        return clip.index_select(0, index)


# --------------------------------------------------------------------------- checks


def check_clip(clip: Tensor, min_frames: int = 1, name: str = "video augmentation") -> None:
    """Raise ValueError unless ``clip`` is a ``(T, C, H, W)`` tensor with ``T >= min_frames``.

    Args:
        clip: the tensor to check.
        min_frames: the smallest T accepted.
        name: the transform's name, for the message.
    """
    if not isinstance(clip, Tensor):
        raise TypeError(f"{name}: clip must be a torch.Tensor shaped (T, C, H, W), got {type(clip).__name__}")
    shape = tuple(clip.shape)
    if clip.dim() != 4:
        raise ValueError(f"{name}: clip must be 4-D (T, C, H, W), got shape {shape}")
    if min(shape) < 1:
        raise ValueError(f"{name}: clip has an empty dimension, shape {shape}")
    if shape[0] < min_frames:
        raise ValueError(f"{name}: needs a clip of at least {min_frames} frames, got shape {shape} (T={shape[0]})")
    if clip.dtype == torch.bool or clip.is_complex():
        raise ValueError(f"{name}: clip dtype must be uint8 or floating point, got {clip.dtype}")


def check_fraction(name: str, value: float, *, allow_zero: bool = False, allow_one: bool = True) -> float:
    """A number in (0, 1] (bounds adjustable), or ValueError naming the parameter and value.

    Args:
        name: the parameter's name, for the message.
        value: the value to check.
        allow_zero: accept 0.
        allow_one: accept 1.
    """
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} must be a number, got {value!r}")
    low_ok = value >= 0 if allow_zero else value > 0
    high_ok = value <= 1 if allow_one else value < 1
    if not (low_ok and high_ok):
        interval = ("[0" if allow_zero else "(0") + ", " + ("1]" if allow_one else "1)")
        raise ValueError(f"{name} must be in {interval}, got {value!r}")
    return float(value)


def check_range(name: str, value: float | Sequence[float], low: float, high: float) -> tuple[float, float]:
    """A number or a ``(lo, hi)`` pair within ``[low, high]``, as a pair (a number gives ``(v, v)``).

    Args:
        name: the parameter's name, for the message.
        value: a number, or two numbers with ``lo <= hi``.
        low: the smallest value allowed.
        high: the largest value allowed.
    """
    if isinstance(value, int | float) and not isinstance(value, bool):
        pair: tuple = (value, value)
    else:
        pair = tuple(value) if isinstance(value, Sequence) and not isinstance(value, str) else ()
    if len(pair) != 2 or any(isinstance(v, bool) or not isinstance(v, int | float) for v in pair):
        raise ValueError(f"{name} must be a number or a (min, max) pair, got {value!r}")
    lo, hi = float(pair[0]), float(pair[1])
    if not (low <= lo <= hi <= high):
        raise ValueError(f"{name} must lie in [{low}, {high}] with min <= max, got {value!r}")
    return lo, hi


def clips_identical(a: Tensor, b: Tensor, atol: float = 0.0) -> bool:
    """Whether two clips are the same: equal shapes and values within ``atol``.

    Integer clips are compared exactly (``atol`` is ignored); floating clips exactly when ``atol``
    is 0, else element-wise within ``atol``. A NaN anywhere makes the clips differ. A candidate
    builder uses this to reject an augmentation whose output equals its input.

    Args:
        a: a clip (any shape).
        b: the clip to compare, moved to ``a``'s device.
        atol: absolute tolerance for floating clips.
    """
    if atol < 0:
        raise ValueError(f"atol must be >= 0, got {atol!r}")
    if a.shape != b.shape:
        return False
    b = b.to(a.device)
    integer = not (a.is_floating_point() or b.is_floating_point())
    if integer or atol == 0:
        if a.dtype == b.dtype:
            return bool(torch.equal(a, b))
        return bool(torch.equal(a.double(), b.double()))
    diff = (a.double() - b.double()).abs()
    return bool((diff <= atol).all())  # NaN compares False


# --------------------------------------------------------------------------- seeded draws and dtypes


def draw_int(generator: torch.Generator, low: int, high: int) -> int:
    """A uniform integer in ``[low, high)`` from ``generator`` (on its own device)."""
    return int(torch.randint(low, high, (1,), generator=generator, device=generator.device).item())


def draw_uniform(generator: torch.Generator, low: float, high: float) -> float:
    """A uniform float in ``[low, high]`` from ``generator``; no draw when ``low == high``."""
    if low == high:
        return low
    u = torch.rand((), generator=generator, device=generator.device, dtype=torch.float64).item()
    return low + (high - low) * u


def to_working(clip: Tensor) -> Tensor:
    """``clip`` as the float dtype that pixel arithmetic runs in: float64 stays, everything else float32."""
    return clip.to(torch.float64 if clip.dtype == torch.float64 else torch.float32)


def to_dtype(values: Tensor, like: Tensor) -> Tensor:
    """Cast float ``values`` back to ``like``'s dtype: integer dtypes are rounded and clamped to their range."""
    if like.is_floating_point():
        return values.to(like.dtype)
    info = torch.iinfo(like.dtype)
    return values.round().clamp(info.min, info.max).to(like.dtype)
