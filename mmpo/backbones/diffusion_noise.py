"""Timesteps, noise and regression targets of the denoising statistic: DDPM-family and flow matching.

Diffusion-DPO compares how well the policy and the reference denoise the preferred and the
dispreferred image of a pair *at the same noise*: one timestep t and one noise ε per group, shared by
its K images and by the policy and reference passes. :class:`NoiseDraw` is that draw; a
:class:`NoiseSchedule` turns clean latents and a draw into the denoiser's input and its target:

- :class:`DiscreteSchedule` (SD 1.5, SDXL, any ``DDPMScheduler`` config): ``x_t = √ᾱ_t·x₀ + √(1−ᾱ_t)·ε``;
  the target is ε, the velocity ``√ᾱ_t·ε − √(1−ᾱ_t)·x₀`` or x₀, by the scheduler's ``prediction_type``.
- :class:`FlowMatchingSchedule` (SD3, ``FlowMatchEulerDiscreteScheduler``): ``x_σ = (1−σ)·x₀ + σ·ε``
  at one of the scheduler's (shifted) training sigmas; the target is the velocity ``ε − x₀``.

Timesteps are drawn uniformly over the scheduler's training timesteps, as Diffusion-DPO does.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from einops import repeat
from torch import Tensor

__all__ = [
    "DiscreteSchedule",
    "FlowMatchingSchedule",
    "NoiseDraw",
    "NoiseSchedule",
    "denoising_errors",
    "noise_schedule",
    "record_seed",
]


@dataclass(eq=False)
class NoiseDraw:
    """One timestep and one noise per group, for all K responses of the group and every model.

    Attributes:
        timesteps: (B,) the timestep the denoiser is given: an integer index (DDPM family) or σ·N
            (flow matching, float).
        noise: (B, c, h, w) float32 standard normal noise ε.
        sigmas: (B,) flow-matching noise levels σ; None for the DDPM family.
        row_noise: (K·B, c, h, w) float32 noise of each image, response-major, where the noise is not
            drawn but estimated from the image (``noise: inversion``, SmPO/InPO); it replaces ``noise``
            in :meth:`rows`. None when every image of a group shares the group's ``noise``.
    """

    timesteps: Tensor
    noise: Tensor
    sigmas: Tensor | None = None
    row_noise: Tensor | None = None

    @property
    def num_groups(self) -> int:
        return self.noise.shape[0]

    def rows(self, group_size: int) -> NoiseDraw:
        """The draw repeated for the K·B rows of a batch, response-major (row k·B + b is group b)."""

        def each(t: Tensor | None) -> Tensor | None:
            return None if t is None else repeat(t, "b ... -> (k b) ...", k=group_size)

        if self.row_noise is not None:
            if self.row_noise.shape[0] != group_size * self.num_groups:
                raise ValueError(
                    f"row_noise holds {self.row_noise.shape[0]} rows, not {group_size} x {self.num_groups} groups"
                )
            return NoiseDraw(each(self.timesteps), self.row_noise, each(self.sigmas))
        return NoiseDraw(each(self.timesteps), each(self.noise), each(self.sigmas))


def record_seed(seed: int, record_id: str) -> int:
    """A 63-bit seed from ``seed`` and a record id, the same in every process (SHA-256, not ``hash``)."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{record_id}".encode()).digest()[:8], "little") >> 1


class NoiseSchedule(ABC):
    """How a scheduler noises clean latents and what the denoiser regresses onto.

    Args:
        num_train_timesteps: N, the scheduler's training timesteps; draws are uniform over them.
    """

    def __init__(self, num_train_timesteps: int) -> None:
        self.num_train_timesteps = num_train_timesteps

    def draw(
        self, groups: int, latent_shape: Sequence[int], device: torch.device, seeds: Sequence[int] | None = None
    ) -> NoiseDraw:
        """A fresh draw for ``groups`` groups of latents shaped ``latent_shape`` ((c, h, w) or (c, f, h, w)).

        Args:
            groups: B.
            latent_shape: (c, h, w) of one latent.
            device: where the draw lives.
            seeds: one seed per group (evaluation: the same draw for a record every epoch); None draws
                from torch's global generators on ``device`` (training: the module's training stream).
        """
        if seeds is None:
            index = torch.randint(0, self.num_train_timesteps, (groups,), device=device)
            noise = torch.randn((groups, *latent_shape), device=device, dtype=torch.float32)
        else:
            gens = [torch.Generator().manual_seed(s) for s in seeds]
            index = torch.cat([torch.randint(0, self.num_train_timesteps, (1,), generator=g) for g in gens]).to(device)
            noise = torch.stack([torch.randn(tuple(latent_shape), generator=g) for g in gens]).to(device)
        return self.at(index, noise)

    @abstractmethod
    def at(self, index: Tensor, noise: Tensor) -> NoiseDraw:
        """The draw at training-timestep indices ``index`` (B,) with ``noise`` (B, c, h, w)."""

    @abstractmethod
    def noisy(self, latents: Tensor, draw: NoiseDraw) -> Tensor:
        """The denoiser's input from clean ``latents`` (N, c, h, w) and a per-row ``draw``."""

    @abstractmethod
    def target(self, latents: Tensor, draw: NoiseDraw) -> Tensor:
        """What the denoiser should output for clean ``latents`` (N, c, h, w) under a per-row ``draw``."""


class DiscreteSchedule(NoiseSchedule):
    """The DDPM forward process of a ``DDPMScheduler`` (ε-, v- or x₀-prediction, from its config)."""

    def __init__(self, scheduler) -> None:
        super().__init__(scheduler.config.num_train_timesteps)
        self.scheduler = scheduler
        self.prediction_type = scheduler.config.prediction_type
        if self.prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(f"unknown prediction_type {self.prediction_type!r} in the scheduler config")

    def at(self, index: Tensor, noise: Tensor) -> NoiseDraw:
        return NoiseDraw(timesteps=index.long(), noise=noise)

    def noisy(self, latents: Tensor, draw: NoiseDraw) -> Tensor:
        return self.scheduler.add_noise(latents, draw.noise, draw.timesteps)

    def target(self, latents: Tensor, draw: NoiseDraw) -> Tensor:
        if self.prediction_type == "epsilon":
            return draw.noise
        if self.prediction_type == "v_prediction":
            return self.scheduler.get_velocity(latents, draw.noise, draw.timesteps)
        return latents


class FlowMatchingSchedule(NoiseSchedule):
    """Rectified flow at the training sigmas of a ``FlowMatchEulerDiscreteScheduler`` (shift applied)."""

    def __init__(self, scheduler) -> None:
        config = scheduler.config
        if getattr(config, "use_dynamic_shifting", False):
            raise ValueError("flow-matching schedulers with use_dynamic_shifting (Flux) are not supported yet")
        super().__init__(config.num_train_timesteps)
        # the training grid as the scheduler builds it at init, kept apart from any later set_timesteps()
        sigmas = scheduler.sigmas[: self.num_train_timesteps].detach().float()  # (N,)
        timesteps = scheduler.timesteps[: self.num_train_timesteps].detach().float()  # (N,)
        self._tables = {torch.device("cpu"): torch.stack([timesteps, sigmas]).cpu()}  # (2, N) per device

    def table(self, device: torch.device) -> Tensor:
        """(2, N): the training timesteps and sigmas, copied to ``device`` once."""
        if device not in self._tables:
            self._tables[device] = self._tables[torch.device("cpu")].to(device)
        return self._tables[device]

    def at(self, index: Tensor, noise: Tensor) -> NoiseDraw:
        timesteps, sigmas = self.table(index.device)[:, index]  # (B,) each
        return NoiseDraw(timesteps=timesteps, noise=noise, sigmas=sigmas)

    def noisy(self, latents: Tensor, draw: NoiseDraw) -> Tensor:
        sigma = draw.sigmas.view(-1, *([1] * (latents.dim() - 1))).to(latents.dtype)  # (N, 1, ...)
        return (1.0 - sigma) * latents + sigma * draw.noise.to(latents.dtype)

    def target(self, latents: Tensor, draw: NoiseDraw) -> Tensor:
        return draw.noise.to(latents.dtype) - latents


def noise_schedule(scheduler) -> NoiseSchedule:
    """The schedule of a training scheduler: flow matching for ``FlowMatch*`` classes, else DDPM."""
    if type(scheduler).__name__.startswith("FlowMatch"):
        return FlowMatchingSchedule(scheduler)
    return DiscreteSchedule(scheduler)


def denoising_errors(prediction: Tensor, target: Tensor) -> Tensor:
    """Mean squared error over every dimension but the first, in float32: (N, C, H, W) or (N, C, F, H, W) -> (N,)."""
    return (prediction.float() - target.float()).pow(2).mean(dim=tuple(range(1, prediction.dim())))


def segment_errors(prediction: Tensor, target: Tensor, segments: int) -> Tensor:
    """Mean squared error of each of ``segments`` equal temporal blocks, in float32: (N, S).

    Image latents (N, C, H, W) are a film strip of frames side by side: the blocks are equal column blocks
    of the width. Video latents (N, C, F, H, W) are cut along the latent frames F.
    """
    axis = 2 if prediction.dim() == 5 else prediction.dim() - 1
    length = prediction.shape[axis]
    if length % segments:
        what = f"{length} latent frames" if axis == 2 else f"latents {length} wide"
        raise ValueError(f"{what} cannot be cut into {segments} equal segments")
    squared = (prediction.float() - target.float()).pow(2).unflatten(axis, (segments, length // segments))
    return squared.mean(dim=tuple(d for d in range(1, squared.dim()) if d != axis))  # all but N and the segment
