"""Samples from a denoiser that takes conditioning channels (a reference image's latents, per-frame audio features).

The diffusers text-to-image pipelines cannot feed a record's ``condition`` tensor to the denoiser, so
:func:`sample_conditioned` runs the sampling loop itself: the scheduler's timesteps, each step's input the
noisy latents with the condition concatenated after them (:meth:`DiffusionBackbone.denoise
<mmpo.backbones.DiffusionBackbone.denoise>`, the same call training makes), ``scheduler.step`` for the next
latents, and the VAE decoding the final ones. Each row's initial noise comes from its own seed, so a sample
depends only on its condition, caption and seed, not on the rows beside it.

Example:
    >>> scheduler = DDIMScheduler.from_pretrained(path, subfolder="scheduler")
    >>> images = sample_conditioned(backbone, model, scheduler, condition, ["a face talking"] * 4, seeds=[0, 1, 2, 3])
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from mmpo.sampling import vae_decode

__all__ = ["sample_conditioned"]


@torch.no_grad()
def sample_conditioned(
    backbone: Any,
    model: Any,
    scheduler: Any,
    condition: Tensor,
    captions: Sequence[str],
    seeds: Sequence[int],
    num_inference_steps: int = 20,
    decode: bool = True,
) -> Tensor:
    """Sample one image per row of ``condition``.

    Args:
        backbone: the :class:`~mmpo.backbones.DiffusionBackbone` (its ``denoise`` and ``encode_text``).
        model: its :class:`~mmpo.backbones.diffusion_model.DiffusionModel` (policy or reference).
        scheduler: a sampling scheduler (DDIM for samples that are a deterministic function of the noise);
            ``set_timesteps`` changes it, so not the model's training scheduler.
        condition: (N, c', h, w), each row's conditioning channels at latent resolution.
        captions: N captions (the cross-attention's text).
        seeds: N seeds; row i's initial noise is drawn from a CPU generator seeded with ``seeds[i]``.
        num_inference_steps: denoising steps.
        decode: return images (N, 3, H, W) in [0, 1]; False returns the final latents (N, c, h, w).

    The denoiser runs in eval mode; the global random streams are left as they were.
    """
    n = condition.shape[0]
    if len(captions) != n or len(seeds) != n:
        raise ValueError(f"{n} condition rows but {len(captions)} captions and {len(seeds)} seeds")
    denoiser = model.denoiser
    device, dtype = denoiser.device, denoiser.dtype
    channels = model.vae.config.latent_channels
    shape = (channels, *condition.shape[2:])
    latents = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds])
    latents = latents.to(device) * scheduler.init_noise_sigma
    text = backbone.encode_text(model, list(captions)).rows(1, dtype)
    condition = condition.to(device, dtype)
    scheduler.set_timesteps(num_inference_steps, device=device)
    was_training = denoiser.training
    denoiser.eval()
    try:
        for t in scheduler.timesteps:
            x = scheduler.scale_model_input(latents, t).to(dtype)
            prediction = backbone.denoise(model, x, t.expand(n).to(device), text, condition).float()
            latents = scheduler.step(prediction, t, latents).prev_sample
    finally:
        denoiser.train(was_training)
    if not decode:
        return latents.cpu()
    return (vae_decode(model.vae, latents).float() * 0.5 + 0.5).clamp(0, 1).cpu()  # the pipelines' post-processing
