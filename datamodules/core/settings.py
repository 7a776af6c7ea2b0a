"""Settings every datamodule family shares, grouped in small dataclasses.

A datamodule takes each group as one argument (``loader``, ``frames``, ``curriculum``), so a subclass
adds its own group instead of re-declaring the base class's arguments. In YAML a group is a nested
mapping::

    data:
      class_path: datamodules.VideoPreferenceDataModule
      init_args:
        train_file: data/train.jsonl
        loader: {batch_size: 2, num_workers: 4}
        frames: {num_frames: 16, frame_sampling: uniform}

Before these groups existed the same settings were flat arguments (``batch_size: 2``,
``num_frames: 16``, ``curriculum_stages: 3``). Flat names still work, from Python and from YAML or the
command line, with a warning that names the new key: :func:`migrate_flat_settings` moves them.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, TypeVar

__all__ = [
    "CurriculumSettings",
    "FrameSettings",
    "LoaderSettings",
    "as_settings",
    "flat_names",
    "migrate_flat_settings",
    "settings_dict",
    "warn_grouped",
]


# A settings group is a plain dataclass (jsonargparse reads it as a nested mapping); its optional
# ``flat_prefix`` class variable is what the fields' old flat argument names started with.


@dataclass
class LoaderSettings:
    """How batches are drawn: sizes, workers, order.

    Args:
        batch_size: groups (pairs, for K = 2) per training batch.
        eval_batch_size: groups per validation/test batch (None: ``batch_size``).
        num_workers: DataLoader worker processes.
        shuffle: shuffle the training set each epoch (seeded).
        seed: seed of the shuffling (and of anything a dataset draws per record and epoch).
        pin_memory: collate batches into page-locked memory, so their copy to the GPU runs without the
            host waiting for it. None: when training on a CUDA device.
    """

    batch_size: int = 4
    eval_batch_size: int | None = None
    num_workers: int = 0
    shuffle: bool = True
    seed: int = 0
    pin_memory: bool | None = None

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"loader.batch_size must be >= 1, got {self.batch_size}")
        if self.eval_batch_size is not None and self.eval_batch_size < 1:
            raise ValueError(f"loader.eval_batch_size must be >= 1, got {self.eval_batch_size}")
        if self.num_workers < 0:
            raise ValueError(f"loader.num_workers must be >= 0, got {self.num_workers}")

    @property
    def eval_size(self) -> int:
        """The validation/test batch size in effect."""
        return self.eval_batch_size or self.batch_size


@dataclass
class FrameSettings:
    """Which frames of a video are decoded.

    Args:
        num_frames: frames sampled per video.
        frame_sampling: ``uniform`` (spread over the whole video), ``fps`` (one frame every
            1/target_fps seconds from the start, at most ``num_frames``), or ``random_segment`` (a
            random window per record and epoch, for training; validation and test use ``uniform``).
        target_fps: frame rate of the ``fps`` strategy.
        min_frames: a video with fewer frames is a bad sample (an error naming it, or a counted skip);
            None lets a short video repeat frames to give ``num_frames``.
        max_pixels: a video whose frames hold more pixels (height × width) is a bad sample, refused from
            its header before any frame is decoded; None for no cap.
    """

    num_frames: int = 8
    frame_sampling: Literal["uniform", "fps", "random_segment"] = "uniform"
    target_fps: float | None = None
    min_frames: int | None = None
    max_pixels: int | None = None

    def __post_init__(self) -> None:
        if self.num_frames < 1:
            raise ValueError(f"frames.num_frames must be >= 1, got {self.num_frames}")
        for name in ("min_frames", "max_pixels"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"frames.{name} must be >= 1 or null, got {value}")
        if self.frame_sampling not in ("uniform", "fps", "random_segment"):
            raise ValueError(
                f"frames.frame_sampling must be uniform, fps or random_segment, got {self.frame_sampling!r}"
            )
        if self.frame_sampling == "fps" and not self.target_fps:
            raise ValueError("frames.frame_sampling='fps' needs frames.target_fps")


@dataclass
class CurriculumSettings:
    """Easy-to-hard stages over the pairs cut from ranked records (Curry-DPO).

    Args:
        stages: split training pairs into this many stages (largest score gap first); None trains on
            every pair.
        stage: which stage the training split serves (0 = easiest); None for all pairs.
        epochs_per_stage: walk the stages in one run instead, this many epochs each: epoch e serves
            stage ``min(e // epochs_per_stage, stages - 1)``. The stage is a function of the trainer's
            epoch, which checkpoints restore, so a resumed run serves the stage (and the order) an
            uninterrupted one does. Needs ``trainer.reload_dataloaders_every_n_epochs: 1``.
    """

    flat_prefix: ClassVar[str] = "curriculum_"

    stages: int | None = None
    stage: int | None = None
    epochs_per_stage: int | None = None

    def __post_init__(self) -> None:
        if self.stages is not None and self.stages < 1:
            raise ValueError(f"curriculum.stages must be >= 1, got {self.stages}")
        if self.stage is not None and self.stages is not None and not 0 <= self.stage < self.stages:
            raise ValueError(f"curriculum.stage must lie in [0, {self.stages}), got {self.stage}")
        if self.epochs_per_stage is not None:
            if self.epochs_per_stage < 1:
                raise ValueError(f"curriculum.epochs_per_stage must be >= 1, got {self.epochs_per_stage}")
            if self.stages is None:
                raise ValueError("curriculum.epochs_per_stage needs curriculum.stages")
            if self.stage is not None:
                raise ValueError("give curriculum.stage (one fixed stage) or curriculum.epochs_per_stage, not both")

    @property
    def active(self) -> bool:
        return self.stages is not None or self.stage is not None


G = TypeVar("G")


def as_settings(cls: type[G], value: G | Mapping[str, Any] | None, group: str) -> G:
    """``value`` as a ``cls``: None gives the defaults, a mapping (from YAML or a checkpoint's saved
    hyper-parameters) is checked for unknown keys."""
    if value is None:
        return cls()
    if isinstance(value, cls):
        return value
    if isinstance(value, Mapping):
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise TypeError(f"{group}: unknown setting(s) {unknown}; {cls.__name__} takes {sorted(known)}")
        return cls(**value)
    raise TypeError(f"{group} must be a {cls.__name__} or a mapping, got {type(value).__name__}")


def flat_names(groups: Mapping[str, type]) -> dict[str, tuple[str, str]]:
    """Old flat argument name → (group, field) for a datamodule's ``groups``."""
    return {
        getattr(cls, "flat_prefix", "") + f.name: (group, f.name)
        for group, cls in groups.items()
        for f in dataclasses.fields(cls)
    }


def migrate_flat_settings(
    owner: str, groups: Mapping[str, type], args: dict[str, Any], *, warn: bool = True
) -> dict[str, Any]:
    """Move old flat arguments of ``args`` (``batch_size``, ``num_frames``, ``curriculum_stages``, ...)
    into their groups (``loader``, ``frames``, ``curriculum``); returns the new mapping.

    A value given both ways (``batch_size: 2`` and ``loader: {batch_size: 4}``) is an error, not a
    silent choice. ``owner`` names the class in the warning and errors.
    """
    names = flat_names(groups)
    moved = [k for k in args if k in names]
    if not moved:
        return dict(args)
    out = {k: v for k, v in args.items() if k not in names}
    for key in moved:
        group, field = names[key]
        current = out.get(group)
        if current is None:
            current = {}
        elif dataclasses.is_dataclass(current) and not isinstance(current, type):
            current = {f.name: getattr(current, f.name) for f in dataclasses.fields(current)}
            if current[field] != getattr(type(out[group])(), field):
                raise ValueError(f"{owner}: {key} and {group}.{field} are both set; keep {group}.{field}")
        elif isinstance(current, Mapping):
            current = dict(current)
            if field in current:
                raise ValueError(f"{owner}: {key} and {group}.{field} are both set; keep {group}.{field}")
        current[field] = args[key]
        out[group] = current
    if warn:
        warn_grouped(owner, {k: ".".join(names[k]) for k in moved}, stacklevel=4)
    return out


def warn_grouped(owner: str, renames: Mapping[str, str], stacklevel: int = 2) -> None:
    """One ``FutureWarning`` naming each old flat key (``renames``: old → new) that was read."""
    listed = ", ".join(f"{old} → {new}" for old, new in renames.items())
    warnings.warn(
        f"{owner}: flat settings are grouped now ({listed}); the old keys still work but will be removed. "
        "See docs/data.md, 'Settings groups'.",
        FutureWarning,
        stacklevel=stacklevel,
    )


def settings_dict(value: Any) -> Any:
    """A settings dataclass as a plain dict (what checkpoints and YAML store); other values unchanged."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    return value
