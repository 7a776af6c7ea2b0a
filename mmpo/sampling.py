"""Images from a diffusion policy: the diffusers pipeline around its denoiser, seeded per prompt, in a grid.

:func:`pipeline_for` wraps a :class:`~mmpo.backbones.diffusion_model.DiffusionModel` (the policy a
:class:`~mmpo.backbones.DiffusionBackbone` builds) in the checkpoint's own diffusers pipeline class,
sharing its modules (no copy), with the checkpoint's own sampling scheduler (:func:`sampling_scheduler`;
the model's ``scheduler`` is the training one). :func:`sample_grid` runs a pipeline over prompts × seeds:
the image of a prompt depends only on the prompt, its row's seed and the settings, not on the other
prompts, so a grid drawn during training shows the model change at fixed noise. The final latents are
decoded here (:func:`decode_latents`), by the VAE in its own dtype, which a policy keeps in float32
beside a half-precision denoiser (the pipelines' own decoding would feed it the denoiser's dtype). The
reference (the base denoiser of a LoRA policy) is the same pipeline inside
``backbone.adapters_disabled(model)``.

Example:
    >>> pipe = pipeline_for(model, sampling_scheduler("stable-diffusion-v1-5/stable-diffusion-v1-5"))
    >>> grid = sample_grid(pipe, ["a red circle", "a blue square"], SampleSettings(seed=0, rows=2))
    >>> save_grid(grid, "samples/step_000100.png")  # 2 rows × 2 columns of 512 px images
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from einops import rearrange
from torch import Tensor

from datamodules.core.atomic import atomic_file
from mmpo.backbones.diffusion_noise import record_seed

__all__ = [
    "SampleSettings",
    "decode_latents",
    "grid_image",
    "pipeline_for",
    "sample_grid",
    "sampling_scheduler",
    "save_grid",
    "vae_decode",
]


@dataclass
class SampleSettings:
    """How images are drawn.

    Args:
        seed: the seed of row 0; row r draws prompt p's initial noise from ``record_seed(seed + r, p)``.
        rows: images per prompt (grid rows), each from its own seed.
        num_inference_steps: denoising steps of the sampling scheduler.
        guidance_scale: classifier-free guidance scale (≤ 1: no guidance, one denoiser pass per step).
        resolution: image side in pixels; None: the denoiser's ``sample_size`` × the VAE's scale factor.
    """

    seed: int = 0
    rows: int = 1
    num_inference_steps: int = 30
    guidance_scale: float = 7.5
    resolution: int | None = None

    def __post_init__(self) -> None:
        if self.rows < 1 or self.num_inference_steps < 1:
            raise ValueError(f"rows and num_inference_steps must be >= 1, got {self.rows}, {self.num_inference_steps}")


def sampling_scheduler(model_name_or_path: str, revision: str | None = None) -> Any:
    """The scheduler the checkpoint ships (``scheduler`` in its ``model_index.json``), as its pipeline loads it."""
    from diffusers import DiffusionPipeline

    library, class_name = DiffusionPipeline.load_config(model_name_or_path, revision=revision)["scheduler"]
    cls = getattr(importlib.import_module(library), class_name)
    return cls.from_pretrained(
        model_name_or_path, subfolder="scheduler", **({"revision": revision} if revision else {})
    )


def pipeline_for(model: Any, scheduler: Any) -> Any:
    """The checkpoint's pipeline class around ``model``'s denoiser, VAE, text encoders and tokenizers.

    Args:
        model: a :class:`~mmpo.backbones.diffusion_model.DiffusionModel`; its modules are shared, not copied,
            so the pipeline follows the training and ``adapters_disabled``.
        scheduler: the sampling scheduler (:func:`sampling_scheduler`); ``set_timesteps`` changes it, so it
            should not be the model's training scheduler.
    """
    import diffusers

    cls = getattr(diffusers, model.pipeline_class)
    components = {
        model.denoiser_name: model.denoiser,
        "vae": model.vae,
        "scheduler": scheduler,
        **dict(model.text_encoders),
        **model.tokenizers,
    }
    params = inspect.signature(cls.__init__).parameters
    for name, param in params.items():  # optional parts a training run has none of (safety checker, ...)
        if name != "self" and name not in components and param.default is inspect.Parameter.empty:
            components[name] = None
    if "requires_safety_checker" in params:
        components["requires_safety_checker"] = False
    pipe = cls(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _denoiser(pipe: Any) -> torch.nn.Module:
    unet = getattr(pipe, "unet", None)
    return unet if unet is not None else pipe.transformer


def _resolution(pipe: Any, settings: SampleSettings) -> int:
    if settings.resolution is not None:
        return settings.resolution
    return _denoiser(pipe).config.sample_size * pipe.vae_scale_factor


@contextlib.contextmanager
def _eval(module: torch.nn.Module) -> Any:
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


def sample_grid(pipe: Any, prompts: Sequence[str], settings: SampleSettings) -> Tensor:
    """Images of every prompt at every row's seed: (rows, len(prompts), 3, R, R) float32 in [0, 1], on CPU.

    The denoiser runs in eval mode (no dropout) under ``torch.no_grad()``; the global random streams are
    left as they were (noise comes from per-image CPU generators), so sampling in the middle of a training
    run changes none of its draws.
    """
    if not prompts:
        raise ValueError("no prompts to sample")
    side = _resolution(pipe, settings)
    denoiser = _denoiser(pipe)
    device = denoiser.device
    rows = []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad(), _eval(denoiser):
        for r in range(settings.rows):
            generators = [torch.Generator().manual_seed(record_seed(settings.seed + r, p)) for p in prompts]
            out = pipe(
                list(prompts), height=side, width=side, num_inference_steps=settings.num_inference_steps,
                guidance_scale=settings.guidance_scale, generator=generators, output_type="latent",
            )  # fmt: skip
            rows.append(decode_latents(pipe, out.images).cpu())  # (P, 3, R, R)
    return torch.stack(rows)


def vae_decode(vae: Any, latents: Tensor) -> Tensor:
    """Images (N, 3, H, W) in [-1, 1] from final latents (N, c, h, w), unscaled as the VAE's config says
    (``latents_mean``/``latents_std``, or ``scaling_factor`` and ``shift_factor``), in the VAE's own dtype.

    The VAE runs in its own dtype: a policy keeps it in float32 beside a half-precision denoiser, which the
    pipelines' own decoding (latents in the denoiser's dtype) would refuse.
    """
    config = vae.config
    dtype = vae.dtype
    upcast = dtype == torch.float16 and getattr(config, "force_upcast", False)  # SDXL's VAE overflows in fp16
    if upcast:
        vae.to(torch.float32)
    latents = latents.to(vae.device, vae.dtype)
    if getattr(config, "latents_mean", None) is not None and getattr(config, "latents_std", None) is not None:
        mean = torch.tensor(config.latents_mean, device=latents.device, dtype=latents.dtype).view(1, -1, 1, 1)
        std = torch.tensor(config.latents_std, device=latents.device, dtype=latents.dtype).view(1, -1, 1, 1)
        latents = latents * std / config.scaling_factor + mean
    else:
        latents = latents / config.scaling_factor + (getattr(config, "shift_factor", None) or 0.0)
    image = vae.decode(latents, return_dict=False)[0]  # (N, 3, H, W) in [-1, 1]
    if upcast:
        vae.to(dtype)
    return image


def decode_latents(pipe: Any, latents: Tensor) -> Tensor:
    """Images (N, 3, H, W) in [0, 1], float32, from a pipeline's final latents (N, c, h, w), as it decodes them
    (:func:`vae_decode`, then the pipeline's post-processing)."""
    return pipe.image_processor.postprocess(vae_decode(pipe.vae, latents), output_type="pt").float()


def grid_image(grid: Tensor) -> Any:
    """A PIL image of a grid (rows, cols, 3, H, W) in [0, 1]: rows·H pixels high, cols·W wide, no gaps."""
    from PIL import Image

    pixels = rearrange(grid.clamp(0, 1), "r c ch h w -> (r h) (c w) ch")
    return Image.fromarray((pixels * 255).round().to(torch.uint8).numpy())


def save_grid(grid: Tensor, path: str | os.PathLike, prompts: Sequence[str] | None = None) -> Path:
    """Write a grid as a PNG, atomically; with ``prompts``, their column titles beside it (``.txt``).

    Returns:
        The PNG's path.
    """
    path = Path(path)
    with atomic_file(path) as tmp:
        grid_image(grid).save(tmp, format="PNG")
    if prompts is not None:
        with atomic_file(path.with_suffix(".txt")) as tmp:
            tmp.write_text("".join(f"column {i}: {p}\n" for i, p in enumerate(prompts)), encoding="utf-8")
    return path
