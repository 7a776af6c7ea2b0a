"""A diffusers checkpoint as one module: the trainable denoiser beside its frozen VAE and text encoders.

:func:`load_diffusion_model` reads the checkpoint's ``model_index.json`` and loads each component
with its own class's ``from_pretrained(path, subfolder=...)``, as a diffusers pipeline does, except
the scheduler: training noises with ``DDPMScheduler`` (UNet checkpoints, whatever sampler they ship)
or ``FlowMatchEulerDiscreteScheduler`` (flow-matching checkpoints), both read from the checkpoint's
``scheduler`` config, as the diffusers training scripts do. A flow-matching checkpoint that ships another
sampler (Wan 2.1: ``UniPCMultistepScheduler`` with ``use_flow_sigmas`` and ``prediction_type:
flow_prediction``) trains on ``FlowMatchEulerDiscreteScheduler`` with the sampler's ``flow_shift`` as its
shift and the same ``num_train_timesteps``, so the training sigmas follow the checkpoint's shifted schedule.
"""

from __future__ import annotations

import importlib
from typing import Any, Literal

import torch
from torch import nn

from mmpo.backbones.diffusion_noise import NoiseSchedule, noise_schedule
from mmpo.backbones.diffusion_text import Family, family_of

__all__ = ["DiffusionModel", "load_diffusion_model"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")


class DiffusionModel(nn.Module):
    """The policy of a :class:`~mmpo.backbones.DiffusionBackbone`: denoiser, VAE, text encoders.

    Only the denoiser (or its adapter) trains; the VAE and the text encoders stay in eval mode
    whatever ``train()`` is asked, so no dropout of theirs changes the encodings.

    Args:
        denoiser: ``UNet2DConditionModel``, ``SD3Transformer2DModel`` or ``WanTransformer3DModel``.
        vae: ``AutoencoderKL`` (``AutoencoderKLWan`` for Wan).
        text_encoders: the text encoders by pipeline name (``text_encoder``, ``text_encoder_2``, ...).
        tokenizers: their tokenizers by pipeline name (``tokenizer``, ``tokenizer_2``, ...).
        scheduler: the training scheduler (``schedule`` is the noising it defines).
        pipeline_class: the checkpoint's pipeline class name (its LoRA loader saves the adapter).
        denoiser_name: ``unet`` or ``transformer``, the denoiser's subfolder and LoRA prefix.
    """

    #: the adapter :func:`mmpo.backbones.adapters.adapters_disabled` switches (diffusers' add_adapter name)
    active_adapter = "default"

    def __init__(
        self,
        denoiser: nn.Module,
        vae: nn.Module,
        text_encoders: dict[str, nn.Module],
        tokenizers: dict[str, Any],
        scheduler: Any,
        pipeline_class: str,
        denoiser_name: Literal["unet", "transformer"],
    ) -> None:
        super().__init__()
        self.denoiser = denoiser
        self.vae = vae
        self.text_encoders = nn.ModuleDict(text_encoders)
        self.tokenizers = tokenizers
        self.scheduler = scheduler
        self.pipeline_class = pipeline_class
        self.denoiser_name = denoiser_name
        self.family: Family = family_of(denoiser)
        self.schedule: NoiseSchedule = noise_schedule(scheduler)

    @property
    def peft_config(self) -> dict[str, Any]:
        """The denoiser's adapter configs (empty without LoRA)."""
        return getattr(self.denoiser, "peft_config", {})

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent along a side."""
        config = self.vae.config
        if getattr(config, "scale_factor_spatial", None) is not None:  # AutoencoderKLWan
            return int(config.scale_factor_spatial)
        return 2 ** (len(config.block_out_channels) - 1)

    def train(self, mode: bool = True) -> DiffusionModel:
        super().train(mode)
        self.vae.eval()
        self.text_encoders.eval()
        return self

    def with_denoiser(self, denoiser: nn.Module) -> DiffusionModel:
        """A model that shares this one's VAE, text encoders and scheduler around another denoiser."""
        return DiffusionModel(
            denoiser,
            self.vae,
            dict(self.text_encoders),
            self.tokenizers,
            self.scheduler,
            self.pipeline_class,
            self.denoiser_name,
        )


def _component(path: str, index: dict[str, Any], name: str, revision: str | None, dtype: torch.dtype | None) -> Any:
    library, class_name = index[name]
    cls = getattr(importlib.import_module(library), class_name)
    kwargs: dict[str, Any] = {"subfolder": name}
    if revision:
        kwargs["revision"] = revision
    if dtype is not None:  # transformers names it dtype, diffusers torch_dtype
        kwargs["dtype" if library == "transformers" else "torch_dtype"] = dtype
    return cls.from_pretrained(path, **kwargs)


def load_diffusion_model(path: str, revision: str | None = None, dtype: str = "float32") -> DiffusionModel:
    """Load a diffusers checkpoint (hub id or local directory) as a :class:`DiffusionModel`.

    Args:
        path: the checkpoint, a folder with ``model_index.json``.
        revision: hub revision.
        dtype: the denoiser's and text encoders' weights; the VAE stays float32 (SDXL's VAE overflows
            in float16).
    """
    from diffusers import DDPMScheduler, DiffusionPipeline, FlowMatchEulerDiscreteScheduler

    index = DiffusionPipeline.load_config(path, revision=revision)
    present = {k for k, v in index.items() if isinstance(v, list | tuple) and len(v) == 2 and v[0] is not None}
    denoiser_name = "unet" if "unet" in present else "transformer" if "transformer" in present else None
    if denoiser_name is None or "vae" not in present or "scheduler" not in present:
        raise ValueError(f"{path}: model_index.json names no unet/transformer, vae or scheduler")
    if "transformer_2" in present:
        raise ValueError(
            f"{path}: model_index.json names two transformers (Wan 2.2's high- and low-noise experts); "
            "DiffusionBackbone trains one denoiser"
        )
    weights = _DTYPES[dtype]
    kwargs = {"subfolder": "scheduler", **({"revision": revision} if revision else {})}
    if index["scheduler"][1].startswith("FlowMatch"):
        scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(path, **kwargs)
    else:
        config = DDPMScheduler.load_config(path, **kwargs)
        if config.get("use_flow_sigmas") or config.get("prediction_type") == "flow_prediction":
            scheduler = FlowMatchEulerDiscreteScheduler(
                num_train_timesteps=config.get("num_train_timesteps", 1000), shift=float(config.get("flow_shift", 1.0))
            )
        else:
            scheduler = DDPMScheduler.from_pretrained(path, **kwargs)
    encoders = {n: _component(path, index, n, revision, weights) for n in _TEXT_ENCODERS if n in present}
    tokenizers = {
        n.replace("text_encoder", "tokenizer"): _component(
            path, index, n.replace("text_encoder", "tokenizer"), revision, None
        )
        for n in encoders
    }
    return DiffusionModel(
        denoiser=_component(path, index, denoiser_name, revision, weights),
        vae=_component(path, index, "vae", revision, torch.float32),
        text_encoders=encoders,
        tokenizers=tokenizers,
        scheduler=scheduler,
        pipeline_class=index["_class_name"],
        denoiser_name=denoiser_name,
    )
