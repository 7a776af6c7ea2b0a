"""D3PO's statistic: how likely one recorded denoising step is under a denoiser.

D3PO (Yang et al. 2024) samples two trajectories x_T → x_0 from one prompt and one x_T with the stochastic
DDIM sampler (η = 1), asks which final image is preferred, and trains every step of both trajectories: the
statistic of a trajectory at step t is the log-density of the recorded x_{t'} given x_t under the model,
a Gaussian with the DDIM mean and standard deviation η·σ_t,

    μ = √ᾱ_{t'}·x̂₀ + √(1 − ᾱ_{t'} − η²σ_t²)·ε̂,   σ_t² = (1 − ᾱ_{t'}) / (1 − ᾱ_t) · (1 − ᾱ_t / ᾱ_{t'}),

with x̂₀ and ε̂ from the denoiser's output by its prediction type, and the log-density averaged over the
latent's elements (as the official ``ddim_step_with_logprob`` does). The D3PO loss reads this statistic of
the policy and the reference (:class:`~mmpo.losses.D3POLoss`).

What the official code fixes and mmpo keeps: t' = max(t − N / S, 0) for S sampling steps over N training
timesteps; x̂₀ is not clipped (the Stable Diffusion DDIM config's ``clip_sample: false``); classifier-free
guidance with the same scale in sampling and training (the empty caption as unconditional input).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from einops import rearrange
from torch import Tensor

from mmpo.backbones.diffusion_text import TextConditioning
from mmpo.losses.base import ResponseStats

__all__ = ["ddim_step_distribution", "sample_trajectory_pairs", "step_log_density", "transition_statistics"]


def _per_row(values: Tensor, like: Tensor) -> Tensor:
    """(N,) -> (N, 1, ..., 1) broadcasting over ``like``'s other dimensions, in its dtype and device."""
    return values.to(like.device, like.dtype).view(-1, *([1] * (like.dim() - 1)))


def ddim_step_distribution(
    alphas_cumprod: Tensor,
    prediction_type: str,
    model_output: Tensor,
    timesteps: Tensor,
    prev_timesteps: Tensor,
    sample: Tensor,
    eta: float,
) -> tuple[Tensor, Tensor]:
    """The DDIM step's Gaussian over x_{t'} given x_t: its mean (N, ...) and standard deviation (N, 1, ...).

    Args:
        alphas_cumprod: (T,) ᾱ of the training schedule.
        prediction_type: ``epsilon``, ``v_prediction`` or ``sample``.
        model_output: (N, c, h, w) the denoiser's output at x_t.
        timesteps: (N,) t; prev_timesteps: (N,) t' (integer indices into ``alphas_cumprod``).
        sample: (N, c, h, w) x_t.
        eta: η > 0, the share of the DDPM posterior's noise the sampler adds.
    """
    a_t = _per_row(alphas_cumprod[timesteps.long().cpu()], sample)
    a_prev = _per_row(alphas_cumprod[prev_timesteps.long().cpu()], sample)
    b_t = 1 - a_t
    if prediction_type == "epsilon":
        x0, eps = (sample - b_t.sqrt() * model_output) / a_t.sqrt(), model_output
    elif prediction_type == "sample":
        x0 = model_output
        eps = (sample - a_t.sqrt() * x0) / b_t.sqrt()
    elif prediction_type == "v_prediction":
        x0 = a_t.sqrt() * sample - b_t.sqrt() * model_output
        eps = a_t.sqrt() * model_output + b_t.sqrt() * sample
    else:
        raise ValueError(f"unknown prediction_type {prediction_type!r}")
    std = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).sqrt()
    mean = a_prev.sqrt() * x0 + (1 - a_prev - std**2).sqrt() * eps
    return mean, std


def step_log_density(prev_sample: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """log N(x_{t'}; μ, σ²) averaged over each row's elements: (N, ...) -> (N,)."""
    density = -((prev_sample - mean) ** 2) / (2 * std**2) - std.log() - math.log(math.sqrt(2 * math.pi))
    return density.mean(dim=tuple(range(1, density.dim())))


def _guided(backbone: Any, model: Any, x: Tensor, timesteps: Tensor, text: TextConditioning, scale: float) -> Tensor:
    """The denoiser's output at x (N, ...) with classifier-free guidance ``scale`` (1: the conditional output)."""
    dtype = model.denoiser.dtype
    if scale == 1.0:
        return backbone.denoise(model, x.to(dtype), timesteps, text).float()
    empty = backbone.encode_text(model, [""]).rows(x.shape[0], dtype)  # the pipelines' negative prompt ""
    both = TextConditioning(
        torch.cat([empty.embeds, text.embeds]),
        None if text.pooled is None else torch.cat([empty.pooled, text.pooled]),
    )
    out = backbone.denoise(model, torch.cat([x, x]).to(dtype), torch.cat([timesteps, timesteps]), both).float()
    uncond, cond = out.chunk(2)
    return uncond + scale * (cond - uncond)


def _check_schedule(model: Any) -> None:
    if type(model.schedule).__name__ != "DiscreteSchedule":
        raise ValueError(
            f"D3PO's DDIM transitions need a DDPM-family scheduler; {type(model.scheduler).__name__} is flow matching"
        )


def transition_statistics(backbone: Any, model: Any, batch: Any) -> ResponseStats:
    """``logps`` (B, K): the log-density of each row's recorded step x_t → x_{t'} (``batch.trajectory``) under
    ``model``; ``tokens`` = 1. One denoiser forward over the K·B rows (two with guidance)."""
    _check_schedule(model)
    step = batch.trajectory
    k = batch.group_size
    x = batch.latents.float()  # (K·B, c, h, w) x_t
    text = backbone.encode_text(model, batch.captions).rows(k, model.denoiser.dtype)
    t, prev = step.timesteps.repeat(k), step.prev_timesteps.repeat(k)  # (K·B,)
    out = _guided(backbone, model, x, t.to(x.device), text, step.guidance_scale)
    schedule = model.schedule
    mean, std = ddim_step_distribution(
        schedule.scheduler.alphas_cumprod, schedule.prediction_type, out, t, prev, x, step.eta
    )
    logps = rearrange(step_log_density(step.next_latents.float(), mean, std), "(k b) -> b k", k=k)
    return ResponseStats(logps=logps, tokens=torch.ones_like(logps))


@torch.no_grad()
def sample_trajectory_pairs(
    backbone: Any,
    model: Any,
    captions: Sequence[str],
    seeds: Sequence[int],
    num_inference_steps: int = 20,
    eta: float = 1.0,
    guidance_scale: float = 5.0,
    latent_size: int | None = None,
) -> dict[str, Tensor]:
    """Two stochastic DDIM trajectories per caption from one x_T, as D3PO samples its pairs.

    Args:
        backbone: the :class:`~mmpo.backbones.DiffusionBackbone` (``denoise``, ``encode_text``).
        model: its model (policy or reference), DDPM-family scheduler.
        captions: N captions.
        seeds: N seeds: x_T from ``seeds[i]``, each trajectory's step noise from its own generator
            (seed · 2 + k), so a pair depends only on its caption and seed.
        num_inference_steps: S, the sampler's steps (D3PO: 20).
        eta: η > 0 (D3PO: 1).
        guidance_scale: classifier-free guidance (D3PO: 5; 1 turns it off).
        latent_size: side of the latents (default: the denoiser's ``sample_size``).

    Returns:
        ``latents`` (N, 2, S + 1, c, h, w) from x_T to x_0, ``timesteps`` (S,) and ``prev_timesteps`` (S,).
    """
    from diffusers import DDIMScheduler

    _check_schedule(model)
    if eta <= 0:
        raise ValueError(f"D3PO's statistic needs a stochastic sampler: eta must be > 0, got {eta}")
    n = len(captions)
    if len(seeds) != n:
        raise ValueError(f"{n} captions but {len(seeds)} seeds")
    denoiser = model.denoiser
    device = denoiser.device
    side = latent_size or denoiser.config.sample_size
    shape = (model.vae.config.latent_channels, side, side)
    ddim = DDIMScheduler.from_config(model.scheduler.config)
    ddim.set_timesteps(num_inference_steps)
    timesteps = ddim.timesteps.long()  # (S,)
    train_steps = model.scheduler.config.num_train_timesteps
    prev = (timesteps - train_steps // num_inference_steps).clamp(0, train_steps - 1)
    start = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds])
    x = torch.cat([start, start]).to(device)  # (2N, ...): trajectory 0 of every caption, then trajectory 1
    generators = [torch.Generator().manual_seed(int(s) * 2 + k) for k in range(2) for s in seeds]
    text = backbone.encode_text(model, list(captions)).rows(2, denoiser.dtype)
    alphas, prediction = model.schedule.scheduler.alphas_cumprod, model.schedule.prediction_type
    path = [x.cpu()]
    was_training = denoiser.training
    denoiser.eval()
    try:
        for t, t_prev in zip(timesteps.tolist(), prev.tolist(), strict=True):
            rows_t = torch.full((2 * n,), t, device=device)
            out = _guided(backbone, model, x, rows_t, text, guidance_scale)
            mean, std = ddim_step_distribution(alphas, prediction, out, rows_t, torch.full_like(rows_t, t_prev), x, eta)
            noise = torch.stack([torch.randn(shape, generator=g) for g in generators]).to(device)
            x = mean + std * noise
            path.append(x.cpu())
    finally:
        denoiser.train(was_training)
    latents = rearrange(torch.stack(path, 1), "(k n) s ... -> n k s ...", k=2)
    return {"latents": latents, "timesteps": timesteps, "prev_timesteps": prev}
