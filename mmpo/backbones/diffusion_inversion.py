"""Noise estimated from the image by DDIM inversion, instead of drawn: SmPO-Diffusion's and InPO's x_t.

Diffusion-DPO noises each image with a random ε. SmPO-Diffusion (Lu et al., ICML 2025) and InPO
estimate instead the noise that the model itself would map to the image: the clean latents are run
*up* the DDIM trajectory with the model (no gradient), and the training target is the noise that
this inverted x_t implies. The official SmPO script (``JaydenLyh/SmPO``, ``train.py``) does, per
batch:

1. a ``DDIMInverseScheduler`` from the training scheduler's config, ``set_timesteps(5)`` for SD 1.5
   (10 for SDXL): inversion timesteps 1, 201, 401, 601, 801 for 1,000 training steps;
2. from x = x₀, for each inversion timestep s below the drawn timestep t: ε̂ = model(x, s); with
   ReNoise, x' = step(ε̂, s, x), ε̂' = model(x', s), ε̂ = (ε̂ + ε̂')/2; then x = step(ε̂, s, x);
3. the noise ε = (x − √ᾱ_t·x₀) / √(1 − ᾱ_t), with ᾱ at t (x sits at the last inversion level below t,
   so this is the noise that level's sample implies at t: the script's approximation, kept);
4. training as Diffusion-DPO with x_t = √ᾱ_t·x₀ + √(1 − ᾱ_t)·ε (that is, the inverted x when t is on
   the inversion grid) and target ε.

InPO (``JaydenLyh/InPO``, ``train.py``) inverts the same way without ReNoise and, optionally, stochastically:
after each inversion step at level s it adds η·σ·z, z ~ N(0, I), σ² the DDIM variance of the step from
s + T/n down to s, ``(1 − ᾱ_s)/(1 − ᾱ_{s+T/n})·(1 − ᾱ_{s+T/n}/ᾱ_s)`` (``DDIMScheduler._get_variance(s + T/n, s)``),
η = 0.1 in the script. At the last inversion level s + T/n can pass the end of the schedule (s = 901 of
1,000 with 10 steps), where the script would index past ``alphas_cumprod``; mmpo reads ᾱ at T − 1 there.

The model that inverts is the one being trained, as in the script (mmpo: the policy, its adapter on,
on the first pass over the batch); the reference then reads the same per-image noise. Every image is
inverted under its own conditioning, so the two images of a pair get different noise at the same t.
The script asserts ε-prediction; the inverse scheduler also converts v- and x₀-predictions, so those
run too (and their targets are computed from the estimated ε), which the paper did not test.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from mmpo.backbones.diffusion_text import TextConditioning

__all__ = ["inverted_noise"]


def _select(text: TextConditioning, rows: Tensor) -> TextConditioning:
    return TextConditioning(text.embeds[rows], None if text.pooled is None else text.pooled[rows])


def _ddim_std(scheduler, s: int, ratio: int) -> float:
    """σ of the DDIM step from level s + ratio down to s (InPO's ``_get_variance(s + ratio, s)``), ᾱ read at
    T − 1 past the end of the schedule."""
    alphas = scheduler.alphas_cumprod
    upper = float(alphas[min(s + ratio, len(alphas) - 1)])
    lower = float(alphas[s]) if s >= 0 else 1.0
    return ((1 - lower) / (1 - upper) * (1 - upper / lower)) ** 0.5


@torch.no_grad()
def inverted_noise(
    denoise: Callable[[Tensor, Tensor, TextConditioning], Tensor],
    scheduler,
    latents: Tensor,
    timesteps: Tensor,
    text: TextConditioning,
    steps: int = 5,
    renoise: bool = True,
    dtype: torch.dtype = torch.float32,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    condition: Tensor | None = None,
) -> Tensor:
    """The noise each row's DDIM inversion implies at its timestep.

    Args:
        denoise: ``denoise(noisy, timesteps, text)``, the model's output for (N, c, h, w) inputs.
        scheduler: the training scheduler (a DDPM-family scheduler; its config builds the inverse one).
        latents: (N, c, h, w) clean latents, float32.
        timesteps: (N,) integer training timesteps t, one per row.
        text: each row's conditioning (N rows), in the denoiser's dtype.
        steps: inversion timesteps over the whole schedule (the script: 5 for SD 1.5, 10 for SDXL).
        renoise: average two predictions per inversion step (ReNoise), as the script does.
        dtype: the denoiser's input dtype.
        eta: InPO's stochastic term: after each inversion step, η·σ·z is added (0: deterministic inversion).
        generator: where z is drawn from (default: torch's global generator, on the latents' device).
        condition: each row's conditioning channels (N, c', h, w); when given, ``denoise`` is called as
            ``denoise(noisy, timesteps, text, condition)`` with the active rows' conditions.

    Returns:
        (N, c, h, w) float32 noise ε with x_inv = √ᾱ_t·x₀ + √(1 − ᾱ_t)·ε.
    """
    from diffusers import DDIMInverseScheduler

    if steps < 1:
        raise ValueError(f"inversion_steps must be >= 1, got {steps}")
    if eta < 0:
        raise ValueError(f"inversion_eta must be >= 0, got {eta}")
    inverse = DDIMInverseScheduler.from_config(scheduler.config)
    inverse.set_timesteps(steps)
    x = latents.float().clone()
    t = timesteps.long()
    for s in inverse.timesteps.tolist():  # ascending: each step lifts the sample to level s
        active = (t > s).nonzero().squeeze(1)
        if active.numel() == 0:
            break
        sample = x[active]
        level = torch.full((active.numel(),), s, device=x.device, dtype=torch.long)
        rows_text = _select(text, active)
        extra = () if condition is None else (condition[active],)
        predicted = denoise(sample.to(dtype), level, rows_text, *extra).float()
        lifted = inverse.step(predicted, s, sample).prev_sample
        if renoise:
            again = denoise(lifted.to(dtype), level, rows_text, *extra).float()
            lifted = inverse.step((predicted + again) / 2, s, sample).prev_sample
        if eta > 0:
            z = torch.randn(lifted.shape, generator=generator, device=lifted.device, dtype=torch.float32)
            lifted = lifted.float() + eta * _ddim_std(scheduler, s, inverse.config.num_train_timesteps // steps) * z
        x[active] = lifted.float()
    alphas = scheduler.alphas_cumprod.to(device=x.device, dtype=torch.float32)[t].view(-1, 1, 1, 1)
    return (x - alphas.sqrt() * latents.float()) / (1.0 - alphas).sqrt()
