"""``DiffusionSamples``: a Lightning callback that draws a fixed grid of prompts as a diffusion policy trains.

Every ``every_n_steps`` optimizer steps (and after the last one) the policy samples the same prompts at
the same seeds, so two grids differ only by what training changed; at fit start the reference is drawn
once (the LoRA policy with its adapter disabled, or the starting denoiser of a full fine-tune). Each grid
is a PNG under ``out_dir`` (rows: seeds, columns: prompts, titled in the ``.txt`` beside it), written
atomically, and logged as an image where the logger takes one (TensorBoard, W&B) or as an artifact
(MLflow).

Example (YAML, under ``trainer.callbacks``)::

    - class_path: mmpo.diffusion_sampling.DiffusionSamples
      init_args:
        prompts: [a red circle above a blue square, a green triangle]
        every_n_steps: 250
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import lightning as L
from einops import rearrange
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from mmpo.sampling import SampleSettings, grid_image, pipeline_for, sample_grid, sampling_scheduler, save_grid

__all__ = ["DiffusionSamples"]


class DiffusionSamples(L.Callback):
    """Sample fixed prompts with the policy every N steps, and once with the reference.

    Args:
        prompts: the captions drawn (grid columns).
        every_n_steps: optimizer steps between two grids; 0 draws only the reference and the final grid.
        rows: images per prompt (grid rows), one seed each.
        num_inference_steps: denoising steps of the checkpoint's sampling scheduler.
        guidance_scale: classifier-free guidance scale.
        seed: seed of the first row (row r uses ``seed + r``).
        resolution: image side in pixels; None: the checkpoint's native size.
        out_dir: where the grids go (default ``<trainer.default_root_dir>/samples``).
        reference: draw the reference once at fit start (``reference.png``).
    """

    def __init__(
        self,
        prompts: list[str],
        every_n_steps: int = 500,
        rows: int = 1,
        num_inference_steps: int = 30,
        guidance_scale: float = 7.5,
        seed: int = 0,
        resolution: int | None = None,
        out_dir: str | None = None,
        reference: bool = True,
    ) -> None:
        if not prompts:
            raise ValueError("DiffusionSamples needs at least one prompt")
        if every_n_steps < 0:
            raise ValueError(f"every_n_steps must be >= 0, got {every_n_steps}")
        self.prompts = list(prompts)
        self.every_n_steps = every_n_steps
        self.settings = SampleSettings(seed, rows, num_inference_steps, guidance_scale, resolution)
        self.out_dir = out_dir
        self.reference = reference
        self.written: list[Path] = []  # the grids of this run, in order
        self._pipe: Any = None
        self._last_step = -1

    def _dir(self, trainer: L.Trainer) -> Path:
        return Path(self.out_dir) if self.out_dir is not None else Path(trainer.default_root_dir) / "samples"

    def _pipeline(self, pl_module: L.LightningModule) -> Any:
        if self._pipe is None or self._pipe.components[pl_module.policy.denoiser_name] is not pl_module.policy.denoiser:
            backbone = pl_module.backbone
            scheduler = sampling_scheduler(backbone.model_name_or_path, getattr(backbone, "revision", None))
            self._pipe = pipeline_for(pl_module.policy, scheduler)
        return self._pipe

    def _draw(self, trainer: L.Trainer, pl_module: L.LightningModule, name: str, step: int) -> None:
        grid = sample_grid(self._pipeline(pl_module), self.prompts, self.settings)  # (rows, P, 3, R, R)
        path = save_grid(grid, self._dir(trainer) / f"{name}.png", self.prompts)
        self.written.append(path)
        self._log(trainer, f"samples/{'reference' if name == 'reference' else 'policy'}", grid, path, step)
        rank_zero_info(f"[mmpo] samples: {path}")

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last_step = trainer.global_step  # a resumed run does not redraw the step it resumes at
        if not hasattr(getattr(pl_module, "policy", None), "denoiser_name"):
            raise TypeError("DiffusionSamples needs a PreferenceModule with a DiffusionBackbone (a diffusion policy)")
        if not (self.reference and trainer.is_global_zero):
            return
        backbone, policy = pl_module.backbone, pl_module.policy
        # the reference is the base denoiser: the adapter switched off, or (full fine-tune) the start itself
        off = backbone.adapters_disabled(policy) if backbone.uses_lora else contextlib.nullcontext()
        with off:
            self._draw(trainer, pl_module, "reference", trainer.global_step)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        if self.every_n_steps and step % self.every_n_steps == 0 and step != self._last_step:
            self._last_step = step  # one grid per optimizer step, even with gradient accumulation
            if trainer.is_global_zero:
                self._draw(trainer, pl_module, f"step_{step:06d}", step)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        step = trainer.global_step
        if step != self._last_step and trainer.is_global_zero:
            self._last_step = step
            self._draw(trainer, pl_module, f"step_{step:06d}", step)

    @staticmethod
    def _log(trainer: L.Trainer, tag: str, grid: Tensor, path: Path, step: int) -> None:
        """Hand the grid to every logger that takes images; the others only have the file."""
        for logger in trainer.loggers:
            experiment = getattr(logger, "experiment", None)
            if hasattr(experiment, "add_image"):  # TensorBoard: (3, H, W) in [0, 1]
                experiment.add_image(tag, _chw(grid), global_step=step)
            elif hasattr(logger, "log_image"):  # W&B
                logger.log_image(key=tag, images=[grid_image(grid)], step=step)
            elif hasattr(experiment, "log_artifact") and getattr(logger, "run_id", None):  # MLflow
                experiment.log_artifact(logger.run_id, str(path), artifact_path="samples")


def _chw(grid: Tensor) -> Tensor:
    """(rows, cols, 3, H, W) -> (3, rows·H, cols·W), the grid as one image tensor."""
    return rearrange(grid.clamp(0, 1), "r c ch h w -> ch (r h) (c w)")
