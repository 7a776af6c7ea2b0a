"""Diffusion backbones: Diffusion-DPO's statistic, −(denoising error), from a diffusers checkpoint.

For a group of K images of one caption (a pair: winner, loser), the backbone noises every image's
latents with the group's one (t, ε), runs the denoiser once over all K·B rows, and reports
``logps = −mean over (C, H, W) of (prediction − target)²`` per image as a
:class:`~mmpo.losses.ResponseStats` (B, K) with ``tokens = 1``. The shared loss core then gives
Diffusion-DPO: ``DPOLoss(β)`` on these statistics is −log σ(β[(e_ref^w − e_θ^w) − (e_ref^l − e_θ^l)]),
the official objective with ``β = β_official / 2`` (docs/diffusion.md has the table of conventions).
A ranked list of K > 2 images is the same computation with more rows (RankDPO: ``LambdaRankLoss``);
a batch with ``image_captions`` conditions each image on its own caption instead of the group's (DCPO).
Video checkpoints (Wan 2.1 text-to-video, ``WanTransformer3DModel`` over ``AutoencoderKLWan``) are the same
computation on 5-D latents (K·B, c, f, h, w) from clips (K·B, 3, F, H, W): the error is the mean over every
latent element, and the group's one ε covers all its frames.
A batch with ``condition`` (B, c', h, w), or (B, c', f, h, w) for video latents (e.g. a reference image's
latents and per-frame audio features) has it concatenated to every row's noisy latents as extra input
channels, as image-to-video and InstructPix2Pix-style denoisers take their conditioning; the denoiser's
``in_channels`` must be c + c'.

Policy and reference must see the same (t, ε). The backbone draws it on its first pass over a batch
object and stores it on the batch (``batch.noise_draw``); the reference pass of the same batch reads
it back, and the next step's batch is a new object, so a draw never outlives its step. Training draws
from torch's generators (inside the module's training stream, so a resumed run draws the same);
evaluation draws each record's (t, ε) from ``eval_seed`` and its id, so validation figures of
different epochs are computed at the same noise.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import os
import re
from collections.abc import Iterator
from contextlib import AbstractContextManager
from typing import Any, Literal

import torch
from einops import rearrange
from torch import Tensor, nn

from mmpo.backbones.adapters import adapters_disabled
from mmpo.backbones.diffusion_inversion import inverted_noise
from mmpo.backbones.diffusion_model import DiffusionModel, load_diffusion_model
from mmpo.backbones.diffusion_noise import NoiseDraw, denoising_errors, record_seed, segment_errors
from mmpo.backbones.diffusion_text import TextConditioning, encode_captions
from mmpo.backbones.diffusion_trajectory import transition_statistics
from mmpo.backbones.protocol import Backbone
from mmpo.backbones.vlm import LoraSettings
from mmpo.losses.base import ResponseStats

__all__ = ["DIFFUSION_LORA_TARGETS", "DiffusionBackbone"]

#: the attention projections of diffusers' UNet and SD3 blocks (what the diffusers LoRA scripts adapt)
DIFFUSION_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


class DiffusionBackbone(Backbone):
    """How to load a diffusers text-to-image checkpoint and compute −(denoising error) per image.

    Not a module itself: ``build()`` returns the policy, a :class:`DiffusionModel` (denoiser with its
    LoRA adapter, frozen VAE and text encoders), which the Lightning module registers as its submodule.

    Args:
        model_name_or_path: hub id (``stable-diffusion-v1-5/stable-diffusion-v1-5``,
            ``stabilityai/stable-diffusion-xl-base-1.0``, ``stabilityai/stable-diffusion-3-medium-diffusers``)
            ``Wan-AI/Wan2.1-T2V-1.3B-Diffusers``, or a local pipeline folder (with ``model_index.json``).
        lora: LoRA on the denoiser (e.g. ``target_modules: [to_q, to_k, to_v, to_out.0]``, the attention
            projections); None trains the whole denoiser.
        dtype: the denoiser's and text encoders' weights at load time (the VAE stays float32; LoRA
            weights are kept in float32).
        revision: hub revision.
        gradient_checkpointing: recompute the denoiser's activations in the backward pass.
        eval_seed: seed of the evaluation draws (with each record's id); None draws at random.
        noise: ``random`` (Diffusion-DPO: one drawn ε per group) or ``inversion`` (SmPO-Diffusion, InPO:
            each image's noise estimated by DDIM inversion with the model being trained, no gradient;
            DDPM-family schedulers only, see :mod:`mmpo.backbones.diffusion_inversion`).
        inversion_steps: inversion timesteps over the schedule (SmPO's script: 5 for SD 1.5, 10 for SDXL).
        renoise: average two predictions per inversion step (ReNoise), as SmPO's script does.
        inversion_eta: InPO's stochastic inversion: η·σ·z added after each inversion step (σ the DDIM step's
            standard deviation; the InPO script uses 0.1 with ``renoise: false``); 0 inverts deterministically.
        noise_per_record: draw each training record's (t, ε) as evaluation does, from ``eval_seed`` and the
            record's id: the same in every pass and every epoch, so the reference's statistics can be computed
            once and cached (``reference: cached``). With one epoch this is as random as a fresh draw per step;
            over several epochs each pair keeps its one (t, ε).
        segments: report the statistic per temporal segment too (DenseDPO): the latents' width is cut into
            this many equal column blocks (the frames of a film strip, or groups of them), and
            ``token_logps`` (B, K, S) holds −(block error)/S, so that ``logps`` (their sum) is the usual
            −(mean error); video latents are cut along their latent frames instead. None: one statistic per image.
    """

    def __init__(
        self,
        model_name_or_path: str,
        lora: LoraSettings | None = None,
        dtype: Literal["float32", "bfloat16", "float16"] = "float32",
        revision: str | None = None,
        gradient_checkpointing: bool = False,
        eval_seed: int | None = 0,
        noise: Literal["random", "inversion"] = "random",
        inversion_steps: int = 5,
        renoise: bool = True,
        inversion_eta: float = 0.0,
        segments: int | None = None,
        noise_per_record: bool = False,
    ) -> None:
        if noise not in ("random", "inversion"):
            raise ValueError(f"noise must be 'random' or 'inversion', got {noise!r}")
        if inversion_steps < 1:
            raise ValueError(f"inversion_steps must be >= 1, got {inversion_steps}")
        if inversion_eta < 0:
            raise ValueError(f"inversion_eta must be >= 0, got {inversion_eta}")
        if segments is not None and segments < 1:
            raise ValueError(f"segments must be >= 1, got {segments}")
        self.segments = segments
        if noise_per_record and eval_seed is None:
            raise ValueError("noise_per_record draws from eval_seed and each record's id: set eval_seed")
        self.noise_per_record = noise_per_record
        self.inversion_eta = inversion_eta
        self.noise = noise
        self.inversion_steps = inversion_steps
        self.renoise = renoise
        self.model_name_or_path = model_name_or_path
        self.lora = lora
        self.dtype = dtype
        self.revision = revision
        self.gradient_checkpointing = gradient_checkpointing
        self.eval_seed = eval_seed
        self._reused: dict[int, tuple[Any, Tensor, TextConditioning]] | None = None

    @property
    def uses_lora(self) -> bool:
        return self.lora is not None

    # -- building -----------------------------------------------------------------------------
    def load_pretrained(self, model_name_or_path: str | None = None, revision: str | None = None) -> DiffusionModel:
        """Every component of the checkpoint, with this backbone's dtype (default: this backbone's checkpoint)."""
        if model_name_or_path is None:
            model_name_or_path, revision = self.model_name_or_path, self.revision
        return load_diffusion_model(model_name_or_path, revision, self.dtype)

    def build(self) -> DiffusionModel:
        """Load the checkpoint, freeze the VAE and text encoders, attach LoRA to the denoiser if configured."""
        model = self.load_pretrained()
        model.vae.requires_grad_(False)
        model.text_encoders.requires_grad_(False)
        denoiser = model.denoiser
        denoiser.requires_grad_(self.lora is None)
        if self.gradient_checkpointing:
            denoiser.enable_gradient_checkpointing()
        if self.lora is not None:
            try:
                denoiser.add_adapter(self.lora.peft_config())
            except ValueError as e:
                raise ValueError(
                    f"LoRA target_modules {self.lora.target_modules!r} do not fit {type(denoiser).__name__}: "
                    f"{e}; its attention projections are {DIFFUSION_LORA_TARGETS}"
                ) from e
            for p in denoiser.parameters():
                if p.requires_grad:  # the adapter trains in float32 over a half-precision base
                    p.data = p.data.float()
        return model

    def adapters_disabled(self, model: nn.Module) -> AbstractContextManager:
        """The denoiser's LoRA switched off inside the block (for passes under ``torch.no_grad()``)."""
        if not self.uses_lora:
            raise ValueError("the adapter-disabled reference needs a LoRA backbone (set backbone.lora)")
        return adapters_disabled(model)

    def frozen_copy(self, model: nn.Module) -> DiffusionModel:
        """A frozen copy of the denoiser as it is now, sharing the (frozen) VAE and text encoders."""
        denoiser = copy.deepcopy(model.denoiser).eval().requires_grad_(False)
        return model.with_denoiser(denoiser).eval()

    def load_reference(self, model_name_or_path: str, revision: str | None = None) -> DiffusionModel:
        ref = self.load_pretrained(model_name_or_path, revision).eval()
        return ref.requires_grad_(False)

    def media_shareable(self, model: nn.Module) -> bool:
        # the VAE and text encoders never train here, so the policy and its adapter-off reference encode alike
        frozen = [model.vae, model.text_encoders]
        return not any(p.requires_grad for m in frozen for p in m.parameters())

    @contextlib.contextmanager
    def _reuse(self) -> Iterator[None]:
        self._reused = {}
        try:
            yield
        finally:
            self._reused = None

    def media_reuse(self, model: nn.Module) -> AbstractContextManager:
        """Inside the block a batch's latents and text embeddings are encoded once for all passes."""
        return self._reuse()

    #: one statistic per image (−(denoising error)), not per-token log-probs
    token_statistics = False

    def fingerprint_settings(self) -> dict[str, Any]:
        return {"dtype": self.dtype, "eval_seed": self.eval_seed, "noise_per_record": self.noise_per_record}

    def reference_cache_problem(self) -> str | None:
        if self.noise == "inversion":
            return "noise: inversion estimates each image's noise with the policy being trained"
        if self.segments is not None:
            return "DenseDPO's per-segment statistics are not cached"
        if not self.noise_per_record:
            return "training draws a fresh (t, ε) every step; set noise_per_record: true to draw one per record"
        return None

    # -- statistics ---------------------------------------------------------------------------
    def encode_images(self, model: DiffusionModel, pixel_values: Tensor) -> Tensor:
        """Scaled VAE latents of images in [-1, 1]: (N, 3, H, W) -> (N, c, h, w) float32, no gradient.

        The posterior's mean, shifted and scaled by the VAE config (``shift_factor``, ``scaling_factor``).
        A video VAE (``AutoencoderKLWan``) takes clips (N, 3, F, H, W), F = 4n + 1 frames, to (N, c, f, h, w),
        normalised per channel by its ``latents_mean`` and ``latents_std`` as ``WanPipeline`` un-normalises them.
        """
        vae = model.vae
        video = getattr(vae.config, "scale_factor_temporal", None) is not None  # AutoencoderKLWan
        if video != (pixel_values.dim() == 5):
            raise ValueError(
                f"{type(vae).__name__} encodes {'clips (N, 3, F, H, W)' if video else 'images (N, 3, H, W)'}, "
                f"got pixels of shape {tuple(pixel_values.shape)}"
                + ("; set the datamodule's frames" if video else "; video data needs a video checkpoint (Wan)")
            )
        if video and (pixel_values.shape[2] - 1) % vae.config.scale_factor_temporal:
            step = vae.config.scale_factor_temporal
            raise ValueError(f"the Wan VAE encodes clips of {step}n + 1 frames, got {pixel_values.shape[2]}")
        with torch.no_grad():
            mean = vae.encode(pixel_values.to(vae.device, vae.dtype)).latent_dist.mean.float()
        if video:
            stats = torch.tensor([vae.config.latents_mean, vae.config.latents_std], device=mean.device)  # (2, c)
            return (mean - stats[0].view(1, -1, 1, 1, 1)) / stats[1].view(1, -1, 1, 1, 1)
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return (mean - shift) * vae.config.scaling_factor

    def encode_text(self, model: DiffusionModel, captions: list[str]) -> TextConditioning:
        """The denoiser's conditioning for ``captions`` (B), from the frozen text encoders, no gradient."""
        return encode_captions(model.family, model.text_encoders, model.tokenizers, captions)

    def cache_encoders(self, model: DiffusionModel) -> dict[str, Any]:
        """``encode_images``, ``encode_text`` and ``encoder_id`` for
        :meth:`~datamodules.diffusion.DiffusionPreferenceDataModule.build_cache`, so that cached
        latents and embeddings are exactly what this backbone computes on the fly."""

        def text(captions: list[str]) -> dict[str, Tensor]:
            cond = self.encode_text(model, captions)
            return {"text_embeds": cond.embeds} | ({"pooled": cond.pooled} if cond.pooled is not None else {})

        revision = self.revision or "main"
        encoder_id = f"{self.model_name_or_path}@{revision}:{model.family}:vae-mean:text-{self.dtype}"
        return {"encode_images": lambda x: self.encode_images(model, x), "encode_text": text, "encoder_id": encoder_id}

    def encode_image_captions(self, model: DiffusionModel, image_captions: list[list[str]]) -> TextConditioning:
        """Each image's own conditioning (K·B, ...), response-major, from ``image_captions[k][b]`` (DCPO).

        One encoder call per response k over its B captions, so that a response whose captions equal
        the groups' gets exactly the embeddings the shared-caption path repeats.
        """
        parts = [self.encode_text(model, captions) for captions in image_captions]  # K × (B, ...)
        pooled = None if parts[0].pooled is None else torch.cat([p.pooled for p in parts])
        return TextConditioning(torch.cat([p.embeds for p in parts]), pooled)

    def _inputs(self, model: DiffusionModel, batch: Any) -> tuple[Tensor, TextConditioning]:
        """Clean latents (K·B, c, h, w) and the conditioning: the groups' (B, ...) from the cache or
        encoded, or each image's (K·B, ...) when the batch has per-image captions."""
        if self._reused is not None and (kept := self._reused.get(id(batch))) is not None and kept[0] is batch:
            return kept[1], kept[2]
        if batch.latents is not None:
            latents = batch.latents.float()
        else:
            latents = self.encode_images(model, batch.pixel_values)
        if getattr(batch, "image_captions", None) is not None:
            text = self.encode_image_captions(model, batch.image_captions)
        elif batch.text_embeds is not None:
            text = TextConditioning(batch.text_embeds, batch.text_extra.get("pooled"))
            if model.family in ("sdxl", "sd3") and text.pooled is None:
                raise ValueError(
                    f"the latent cache holds no pooled text embeddings, which a {model.family} denoiser needs: "
                    "build it with DiffusionBackbone.cache_encoders"
                )
        else:
            text = self.encode_text(model, batch.captions)
        dropped = getattr(batch, "caption_dropped", None)
        if dropped is not None and bool(dropped.any()):
            text = self._unconditional(model, text, dropped.to(text.embeds.device))
        if self._reused is not None:
            self._reused[id(batch)] = (batch, latents, text)
        return latents, text

    def _unconditional(self, model: DiffusionModel, text: TextConditioning, dropped: Tensor) -> TextConditioning:
        """``text`` (B, ...) with the rows of dropped captions replaced by the empty caption's encoding, the
        unconditional input classifier-free guidance samples with (the pipelines' negative prompt ``""``)."""
        if text.embeds.shape[0] != dropped.shape[0]:
            raise ValueError("caption dropout needs one caption per group (not per-image captions)")
        empty = self.encode_text(model, [""])
        mask = dropped.view(-1, *([1] * (text.embeds.dim() - 1)))
        embeds = torch.where(mask, empty.embeds.to(text.embeds.dtype), text.embeds)
        pooled = text.pooled
        if pooled is not None:
            pooled = torch.where(dropped.view(-1, *([1] * (pooled.dim() - 1))), empty.pooled.to(pooled.dtype), pooled)
        return TextConditioning(embeds, pooled)

    def _draw(self, model: DiffusionModel, batch: Any, latents: Tensor, text: TextConditioning) -> NoiseDraw:
        """The batch's (t, ε): drawn on the first pass over this batch object, read back on later ones.

        With ``noise: inversion`` the first pass also estimates each image's noise by inverting it with
        ``model`` (``text``: each row's conditioning), which the later passes read back.
        """
        groups, shape = batch.num_groups, tuple(latents.shape[1:])
        draw = getattr(batch, "noise_draw", None)
        if draw is not None:
            if draw.num_groups != groups or tuple(draw.noise.shape[1:]) != shape:
                raise ValueError(f"batch.noise_draw is for {tuple(draw.noise.shape)} latents, not {groups} × {shape}")
            return draw
        seeds = None
        if (not model.training or self.noise_per_record) and self.eval_seed is not None:
            seeds = [record_seed(self.eval_seed, i) for i in batch.ids]
        draw = model.schedule.draw(groups, shape, latents.device, seeds)
        if self.noise == "inversion":
            if model.schedule.__class__.__name__ != "DiscreteSchedule":
                raise ValueError(
                    "noise: inversion needs a DDPM-family scheduler (DDIM inversion); "
                    f"{type(model.scheduler).__name__} is flow matching"
                )
            k = latents.shape[0] // groups
            generator = None  # training: torch's generator, inside the run's random stream
            if seeds is not None and self.inversion_eta > 0:  # evaluation: the same z for the same records
                generator = torch.Generator(latents.device).manual_seed(
                    record_seed(self.eval_seed, "|".join(batch.ids))
                )
            draw.row_noise = inverted_noise(
                lambda x, t, c, *cond: self.denoise(model, x, t, c, *cond), model.scheduler, latents,
                draw.rows(k).timesteps, text, self.inversion_steps, self.renoise, model.denoiser.dtype,
                self.inversion_eta, generator, self._condition_rows(batch, k),
            )  # fmt: skip
        batch.noise_draw = draw
        return draw

    def denoise(
        self,
        model: DiffusionModel,
        noisy: Tensor,
        timesteps: Tensor,
        text: TextConditioning,
        condition: Tensor | None = None,
    ) -> Tensor:
        """The denoiser's output for noisy latents (N, c, h, w) or (N, c, f, h, w) at ``timesteps`` (N,) under ``text``.

        ``condition`` (N, c', h, w) or (N, c', f, h, w), when given, is concatenated after the latents' channels.
        """
        in_channels = model.denoiser.config.in_channels
        if condition is not None:
            if condition.shape[0] != noisy.shape[0] or condition.shape[2:] != noisy.shape[2:]:
                raise ValueError(
                    f"condition tensors of shape {tuple(condition.shape[1:])} do not fit latents of shape "
                    f"{tuple(noisy.shape[1:])}: a condition is (channels, [frames,] height, width) at the latents' size"
                )
            noisy = torch.cat([noisy, condition.to(noisy.device, noisy.dtype)], dim=1)
        if noisy.shape[1] != in_channels:
            extra = 0 if condition is None else condition.shape[1]
            raise ValueError(
                f"the {type(model.denoiser).__name__} takes {in_channels} input channels but gets "
                f"{noisy.shape[1] - extra} latent + {extra} condition channels"
                + ("; give each record a 'condition' file" if condition is None else "")
            )
        denoiser = model.denoiser
        if model.family == "wan":
            return denoiser(
                hidden_states=noisy, timestep=timesteps, encoder_hidden_states=text.embeds, return_dict=False
            )[0]
        if model.family == "sd3":
            return denoiser(
                hidden_states=noisy, timestep=timesteps, encoder_hidden_states=text.embeds,
                pooled_projections=text.pooled, return_dict=False,
            )[0]  # fmt: skip
        added = None
        if model.family == "sdxl":  # original size, crop corner, target size: the square crop, uncropped
            side_h, side_w = (s * model.vae_scale_factor for s in noisy.shape[-2:])
            time_ids = torch.tensor([side_h, side_w, 0, 0, side_h, side_w], device=noisy.device, dtype=noisy.dtype)
            added = {"text_embeds": text.pooled, "time_ids": time_ids.expand(noisy.shape[0], -1)}
        return denoiser(
            noisy, timesteps, encoder_hidden_states=text.embeds, added_cond_kwargs=added, return_dict=False
        )[0]

    def statistics(self, model: nn.Module, batch: Any) -> ResponseStats:
        """−(mean squared denoising error) (B, K) of ``model`` on ``batch``, ``tokens`` = 1; for a batch of
        recorded sampling steps (``batch.trajectory``, D3PO) the steps' log-densities instead
        (:func:`~mmpo.backbones.diffusion_trajectory.transition_statistics`).

        One denoiser forward over the batch's K·B rows (row k·B + b: response k of group b), every row
        of a group at the group's (t, ε), conditioned on the group's caption or, with per-image
        captions (DCPO), on its own.
        """
        if getattr(batch, "trajectory", None) is not None:  # D3PO: each row a recorded sampling step
            if self.segments is not None or self.noise != "random":
                raise ValueError("recorded trajectory steps (D3PO) take neither segments nor noise: inversion")
            return transition_statistics(self, model, batch)
        k = batch.group_size
        latents, text = self._inputs(model, batch)  # (K·B, c, h, w), (B, ...) or per image (K·B, ...)
        per_image = getattr(batch, "image_captions", None) is not None
        dtype = model.denoiser.dtype
        text_rows = text.rows(1 if per_image else k, dtype)
        draw = self._draw(model, batch, latents, text_rows).rows(k)  # (K·B, ...)
        schedule = model.schedule
        noisy = schedule.noisy(latents, draw).to(dtype)
        condition = self._condition_rows(batch, k)
        extra = () if condition is None else (condition,)  # a denoise override without the argument still works
        prediction = self.denoise(model, noisy, draw.timesteps, text_rows, *extra)
        target = schedule.target(latents, draw)
        if self.segments is not None:  # DenseDPO: (K·B, S) block errors, each 1/S of the image's mean
            parts = -rearrange(segment_errors(prediction, target, self.segments), "(k b) s -> b k s", k=k)
            parts = parts / self.segments
            logps = parts.sum(-1)
            return ResponseStats(
                logps=logps, tokens=torch.ones_like(logps), token_logps=parts, mask=torch.ones_like(parts)
            )
        errors = denoising_errors(prediction, target)  # (K·B,)
        logps = -rearrange(errors, "(k b) -> b k", k=k)
        return ResponseStats(logps=logps, tokens=torch.ones_like(logps))

    @staticmethod
    def _condition_rows(batch: Any, k: int) -> Tensor | None:
        """The batch's condition (B, c', ...) repeated for the K rows of each group (K·B, ...), or None."""
        condition = getattr(batch, "condition", None)
        return None if condition is None else condition.float().repeat(k, *([1] * (condition.dim() - 1)))

    # -- saving -------------------------------------------------------------------------------
    def save(self, model: nn.Module, out_dir: str | os.PathLike) -> None:
        """The LoRA adapter as the pipeline's ``save_lora_weights`` writes it (``pytorch_lora_weights.safetensors``,
        PEFT keys under ``unet.`` / ``transformer.``, read back by ``pipeline.load_lora_weights``), or the
        full denoiser with ``save_pretrained``."""
        import diffusers
        from peft.utils import get_peft_model_state_dict

        if self.lora is None:
            model.denoiser.save_pretrained(out_dir)
            return
        name = model.denoiser_name
        writer = getattr(diffusers, model.pipeline_class).save_lora_weights
        if f"{name}_lora_adapter_metadata" not in inspect.signature(writer).parameters:
            # without the metadata a loader assumes alpha = r and rescales the adapter
            raise RuntimeError(
                f"saving a LoRA adapter with its alpha needs diffusers >= 0.34, not {diffusers.__version__}"
            )
        writer(
            out_dir,
            **{
                f"{name}_lora_layers": get_peft_model_state_dict(model.denoiser),
                f"{name}_lora_adapter_metadata": model.denoiser.peft_config[model.active_adapter].to_dict(),
            },
        )

    def describe(self, model: nn.Module) -> str:
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in model.parameters())
        denoiser = type(model.denoiser).__name__
        kind = f"LoRA r={self.lora.r} on the {denoiser}" if self.lora else f"full fine-tuning of the {denoiser}"
        target = getattr(model.scheduler.config, "prediction_type", None) or "flow matching"
        name = re.sub(r"^.*/", "", str(self.model_name_or_path).rstrip("/"))
        return f"{name}: {kind} ({target}), {trainable:,} trainable of {total:,} parameters"
