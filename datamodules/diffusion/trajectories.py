"""D3PO data: pairs of recorded sampling trajectories, served one denoising step at a time.

A record names two trajectory files sampled from one caption (and, in D3PO, one x_T) and says which final
image is preferred, with ``label_0`` or ``scores`` as a Pick-a-Pic pair does::

    {"id": "t1", "caption": "a red circle .", "trajectory_0": "t1_0.safetensors",
     "trajectory_1": "t1_1.safetensors", "scores": [0.8, 0.3]}

A trajectory file (:func:`save_trajectory`) holds ``latents`` (S + 1, c, h, w) from x_T to x_0, ``timesteps``
(S,) and ``prev_timesteps`` (S,) of the S steps, and the sampler's ``eta`` and ``guidance_scale`` as metadata.
D3PO trains every step of both trajectories: the dataset serves (record, step) items, ``steps_per_record``
of each record's S steps per epoch (all by default), drawn from (seed, epoch, record), and an item is the
group [preferred, dispreferred] at that step: their x_t as ``latents`` and their x_{t'} in the batch's
``trajectory`` (:class:`~datamodules.diffusion.batch.TrajectoryStep`). Every problem (a missing file, a
file without those tensors, two trajectories of one record on different steps or samplers, a record with
another step count than the dataset's) names the file and the record.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor
from torch.utils.data import Dataset

from datamodules.core.atomic import atomic_file, atomic_write_text
from datamodules.core.cache_source import CacheableSplit
from datamodules.core.records import BadSampleError, load_records
from datamodules.diffusion.batch import DiffusionPreferenceCollator
from datamodules.diffusion.module import DiffusionPreferenceDataModule
from datamodules.diffusion.pairs import DiffusionPairRecord, parse_diffusion_record

__all__ = [
    "DiffusionTrajectoryDataModule",
    "DiffusionTrajectoryDataset",
    "load_trajectory",
    "load_trajectory_records",
    "save_trajectory",
    "write_trajectory_pairs",
]

_FIELDS = (("trajectory_0",), ("trajectory_1",))


def save_trajectory(
    path: str | os.PathLike,
    latents: Tensor,
    timesteps: Tensor,
    prev_timesteps: Tensor,
    eta: float,
    guidance_scale: float,
) -> None:
    """Write one trajectory (``latents`` (S + 1, c, h, w), ``timesteps`` and ``prev_timesteps`` (S,)) atomically."""
    from safetensors.torch import save_file

    tensors = {
        "latents": latents.float().contiguous(),
        "timesteps": timesteps.long().contiguous(),
        "prev_timesteps": prev_timesteps.long().contiguous(),
    }
    with atomic_file(path) as tmp:
        save_file(tensors, str(tmp), metadata={"eta": repr(float(eta)), "guidance_scale": repr(float(guidance_scale))})


def load_trajectory(path: str, where: str, step: int | None = None) -> dict[str, Any]:
    """A trajectory file's tensors and sampler settings (``eta``, ``guidance_scale``).

    With ``step`` j, ``latents`` holds x_j and x_{j+1} only (2, c, h, w), read by slice without the rest of the
    file, and ``num_steps`` the trajectory's S; without it, every latent (S + 1, c, h, w).

    Raises:
        BadSampleError: naming ``where`` and the file, when it cannot be read, lacks a tensor or setting, or
            its shapes do not fit (S + 1 latents for S timesteps).
    """
    from safetensors import safe_open

    try:
        with safe_open(path, "pt") as f:
            meta = f.metadata() or {}
            names = [n for n in ("latents", "timesteps", "prev_timesteps") if n in f.keys()]
            found = {name: f.get_tensor(name) for name in names if name != "latents"}
            if "latents" in names:
                stored = f.get_slice("latents")
                shape = tuple(stored.get_shape())
                found["latents"] = stored[:] if step is None else stored[step : step + 2]
    except Exception as e:  # a missing file (OSError) or safetensors' own SafetensorError, which derives from Exception
        raise BadSampleError(f"{where}: cannot read trajectory {path}: {e}") from e
    missing = [n for n in ("latents", "timesteps", "prev_timesteps") if n not in found]
    missing += [n for n in ("eta", "guidance_scale") if n not in meta]
    if missing:
        raise BadSampleError(f"{where}: trajectory {path} lacks {missing}")
    latents, steps = found["latents"], found["timesteps"]
    if len(shape) != 4 or steps.dim() != 1 or shape[0] != steps.shape[0] + 1:
        raise BadSampleError(
            f"{where}: trajectory {path} holds latents {shape} for timesteps {tuple(steps.shape)}; "
            "expected (S + 1, c, h, w) for (S,)"
        )
    if step is not None and not 0 <= step < steps.shape[0]:
        raise BadSampleError(f"{where}: trajectory {path} has {steps.shape[0]} steps; step {step} asked for")
    if found["prev_timesteps"].shape != steps.shape or not bool(torch.isfinite(latents).all()):
        raise BadSampleError(f"{where}: trajectory {path} has prev_timesteps of another length, or NaN latents")
    eta, guidance = float(meta["eta"]), float(meta["guidance_scale"])
    if not eta > 0:
        raise BadSampleError(f"{where}: trajectory {path} was sampled with eta = {eta}; D3PO needs eta > 0")
    return {**found, "eta": eta, "guidance_scale": guidance}


def load_trajectory_records(
    path: str | os.PathLike, data_root: str | os.PathLike | None = None, on_bad_sample: str = "error",
    drop_ties: bool = True,
) -> tuple[list[DiffusionPairRecord], list[str]]:  # fmt: skip
    """Read and validate every record of a .jsonl, .json or .parquet file of trajectory pairs."""
    root = Path(data_root) if data_root is not None else Path(path).parent

    def parse(raw: dict[str, Any], where: str) -> tuple[list[DiffusionPairRecord], list[str]]:
        rec = parse_diffusion_record(raw, where, root, image_fields=_FIELDS, kind="trajectory")
        return ([], []) if drop_ties and rec.is_tie else ([rec], [])

    return load_records(path, parse, on_bad_sample)


class DiffusionTrajectoryDataset(Dataset):
    """(record, step) items of trajectory pairs; indexed by an int or ``(index, epoch)``.

    Args:
        records: validated trajectory pairs.
        num_steps: S, the steps of every trajectory.
        steps_per_record: steps of each record served per epoch (None: all S, as D3PO's
            ``timestep_fraction: 1``), drawn from (seed, epoch, record).
        seed: seed of that draw.
        on_bad_sample: ``error`` or ``skip`` (a bad item yields None, which the collator counts).
    """

    def __init__(
        self,
        records: list[DiffusionPairRecord],
        num_steps: int,
        steps_per_record: int | None = None,
        seed: int = 0,
        on_bad_sample: str = "error",
    ) -> None:
        per_record = num_steps if steps_per_record is None else steps_per_record
        if not 1 <= per_record <= num_steps:
            raise ValueError(
                f"steps_per_record must be in [1, {num_steps}] (the trajectories' steps), got {per_record}"
            )
        self.records, self.num_steps, self.per_record = records, num_steps, per_record
        self.seed, self.on_bad_sample = seed, on_bad_sample

    def __len__(self) -> int:
        return len(self.records) * self.per_record

    def step_of(self, index: int, epoch: int) -> tuple[int, int]:
        """(record index, step j) of item ``index`` in ``epoch``: each record's steps in an order of its own."""
        record, slot = divmod(index, self.per_record)
        order = random.Random(f"{self.seed}:{epoch}:{record}:steps").sample(range(self.num_steps), self.num_steps)
        return record, order[slot]

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any] | None:
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        r, j = self.step_of(index, epoch)
        rec = self.records[r]
        try:
            # preferred first; only x_j and x_{j+1} of each file are read
            first, second = (load_trajectory(rec.images[i], rec.where, step=j) for i in rec.order)
            for path, traj in zip((rec.images[i] for i in rec.order), (first, second), strict=True):
                if traj["timesteps"].shape[0] != self.num_steps:
                    raise BadSampleError(
                        f"{rec.where}: trajectory {path} has {traj['timesteps'].shape[0]} steps, the dataset's "
                        f"{self.num_steps}"
                    )
            same = torch.equal(first["timesteps"], second["timesteps"]) and all(
                first[k] == second[k] for k in ("eta", "guidance_scale")
            )
            if not same or first["latents"].shape != second["latents"].shape:
                raise BadSampleError(
                    f"{rec.where}: the two trajectories {list(rec.images)} differ in timesteps, latent shape or sampler"
                )
        except BadSampleError:
            if self.on_bad_sample == "skip":
                return None
            raise
        pair = (first, second)
        return {
            "id": f"{rec.id}@{j}", "caption": rec.caption, "label": rec.label, "scores": rec.scores,
            "image_captions": None, "caption_dropped": False, "text": {},
            "latents": torch.stack([t["latents"][0] for t in pair]),  # (2, c, h, w) x_t
            "trajectory": {
                "next_latents": torch.stack([t["latents"][1] for t in pair]),  # (2, c, h, w) x_{t'}
                "timestep": int(first["timesteps"][j]), "prev_timestep": int(first["prev_timesteps"][j]),
                "eta": first["eta"], "guidance_scale": first["guidance_scale"],
            },
        }  # fmt: skip


class DiffusionTrajectoryDataModule(DiffusionPreferenceDataModule):
    """D3PO: pairs of sampled trajectories, one denoising step per item (see the module docstring).

    The file, loader, ``on_bad_sample`` and ``drop_ties`` arguments work as in
    :class:`~datamodules.diffusion.module.DiffusionPreferenceDataModule`; the image arguments (resolution,
    crops, flips, the latent cache, frames, caption dropout, dual captions, dimensions) do not apply: the
    trajectories are latents already.

    Args:
        steps_per_record: steps of each trajectory pair served per epoch (None: all of them).
    """

    record_kind: ClassVar[str] = "trajectory pairs"

    def __init__(self, *args: Any, steps_per_record: int | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        unsupported = {
            "cache_dir": self.cache_dir, "frames": self.frames, "caption_dropout": self.caption_dropout or None,
            "dual_captions": self.dual_captions or None, "dimensions": self.dimensions,
        }  # fmt: skip
        if given := sorted(k for k, v in unsupported.items() if v is not None):
            raise ValueError(f"DiffusionTrajectoryDataModule reads recorded latents: {given} do not apply")
        if steps_per_record is not None and steps_per_record < 1:
            raise ValueError(f"steps_per_record must be >= 1, got {steps_per_record}")
        self.steps_per_record = steps_per_record
        self.hparams["steps_per_record"] = steps_per_record

    def read_records(self, path: str, root: str) -> tuple[list[DiffusionPairRecord], list[str]]:
        return load_trajectory_records(path, root, self.on_bad_sample, self.drop_ties)

    def reference_cache_split(self, split: str) -> CacheableSplit | None:
        """Every (pair, step) item of the split, whatever ``steps_per_record`` serves per epoch: a recorded step's
        statistic draws no noise, so each item's reference value is computed once."""
        if split not in self.datasets:
            return None
        served = self.datasets[split]
        every = DiffusionTrajectoryDataset(served.records, served.num_steps, None, served.seed, served.on_bad_sample)
        settings = {"steps": served.num_steps}
        return CacheableSplit(
            every, served.records, DiffusionPreferenceCollator(), self.loader.eval_size, settings, noise_free=True
        )

    def make_dataset(self, records: list[DiffusionPairRecord], split: str) -> DiffusionTrajectoryDataset:
        first = records[0]
        steps = load_trajectory(first.images[0], first.where)["timesteps"].shape[0]
        return DiffusionTrajectoryDataset(records, steps, self.steps_per_record, self.loader.seed, self.on_bad_sample)


def write_trajectory_pairs(
    root: str | os.PathLike,
    captions: list[str],
    sampled: dict[str, Tensor],
    scores: list[tuple[float, float]],
    eta: float,
    guidance_scale: float,
    split: str = "train",
) -> Path:
    """Write sampled trajectory pairs and their records: ``root/<split>.jsonl`` and ``root/trajectories/``.

    Args:
        root: output directory.
        captions: N captions.
        sampled: what :func:`~mmpo.backbones.diffusion_trajectory.sample_trajectory_pairs` returns: ``latents``
            (N, 2, S + 1, c, h, w), ``timesteps`` and ``prev_timesteps`` (S,).
        scores: per caption the two final images' scores (higher preferred).
        eta: the sampler's η; guidance_scale: its guidance scale.
        split: the file's name.

    Returns:
        The JSONL file.
    """
    latents = sampled["latents"]
    if not len(captions) == len(scores) == latents.shape[0]:
        raise ValueError(f"{latents.shape[0]} trajectory pairs, {len(captions)} captions, {len(scores)} scores")
    root = Path(root)
    (root / "trajectories").mkdir(parents=True, exist_ok=True)
    lines = []
    for i, (caption, pair_scores) in enumerate(zip(captions, scores, strict=True)):
        names = [f"trajectories/{split}-{i:06d}-{k}.safetensors" for k in range(2)]
        for k, name in enumerate(names):
            save_trajectory(
                root / name, latents[i, k], sampled["timesteps"], sampled["prev_timesteps"], eta, guidance_scale
            )
        record = {"id": f"{split}-{i:06d}", "caption": caption, "trajectory_0": names[0], "trajectory_1": names[1]}
        lines.append(json.dumps(record | {"scores": [float(s) for s in pair_scores]}) + "\n")
    out = root / f"{split}.jsonl"
    atomic_write_text(out, "".join(lines))
    return out
