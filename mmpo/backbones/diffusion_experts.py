"""TLPO's two stages (and inference) as a diffusion backbone: one LoRA expert, or frozen experts under a gate.

``stage: expert`` trains a new LoRA adapter named ``expert`` by Diffusion-DPO (pairs of one preference
dimension: ``data.init_args.dimensions``) and saves it in peft's format to ``save_dir`` (make it
``<experts_dir>/<expert>``). ``stage: gate`` loads the named experts from ``experts_dir``, frozen, fuses
them in every layer they adapt (:mod:`mmpo.backbones.experts`) and trains the gate only, on all
dimensions' pairs; it saves ``gate.safetensors`` and ``gate.json`` to ``save_dir`` (make it
``<experts_dir>/gate``). ``stage: inference`` loads experts and a saved gate (or fixed
``static_weights``) for ``mmpo validate`` / ``test``. The reference is the base denoiser (every adapter
off) with ``reference: adapter``, as in stage 1; ``reference: copy`` makes it the model at the gate's
initialisation (the equal merge, with the default gate).
"""

from __future__ import annotations

import os
import re
from typing import Literal

from torch import nn

from mmpo.backbones.diffusion import DIFFUSION_LORA_TARGETS, DiffusionBackbone
from mmpo.backbones.diffusion_model import DiffusionModel
from mmpo.backbones.expert_io import add_expert, load_expert, load_gate, save_expert, save_gate
from mmpo.backbones.experts import FUSION_NAME, GateSettings, StaticMix, TimestepLayerGate, attach_fusion
from mmpo.backbones.vlm import LoraSettings

__all__ = ["ExpertDiffusionBackbone"]

Stage = Literal["expert", "gate", "inference"]


class ExpertDiffusionBackbone(DiffusionBackbone):
    """A :class:`DiffusionBackbone` whose denoiser carries TLPO's named LoRA experts.

    Args:
        model_name_or_path: the diffusers checkpoint (hub id or local folder), as for ``DiffusionBackbone``.
        stage: ``expert`` (train one new expert), ``gate`` (train the gate over frozen experts) or
            ``inference`` (experts and a saved gate, or static weights; nothing trains).
        expert: the new expert's name (``expert`` stage), e.g. ``lip_sync``.
        lora: the new expert's LoRA settings (``expert`` stage).
        experts_dir: folder holding one saved expert per subfolder (``gate`` and ``inference`` stages).
        experts: the experts to load, in the order of the gate's weights.
        gate: the gate's form (``gate`` stage; default :class:`GateSettings`).
        gate_dir: the saved gate (``inference`` stage); its ``gate.json`` must name the loaded experts.
        static_weights: fixed weights over the experts instead of a gate (``inference`` stage): the
            equal merge ``[1/E, ...]``, one expert alone ``[1, 0, ...]``, or any tuned values.
        dtype: the denoiser's and text encoders' weights (LoRA and gate weights stay float32).
        revision: hub revision.
        gradient_checkpointing: recompute the denoiser's activations in the backward pass.
        eval_seed: seed of the evaluation draws (with each record's id); None draws at random.
    """

    def __init__(
        self,
        model_name_or_path: str,
        stage: Stage = "expert",
        expert: str | None = None,
        lora: LoraSettings | None = None,
        experts_dir: str | None = None,
        experts: list[str] | None = None,
        gate: GateSettings | None = None,
        gate_dir: str | None = None,
        static_weights: list[float] | None = None,
        dtype: Literal["float32", "bfloat16", "float16"] = "float32",
        revision: str | None = None,
        gradient_checkpointing: bool = False,
        eval_seed: int | None = 0,
    ) -> None:
        super().__init__(model_name_or_path, lora, dtype, revision, gradient_checkpointing, eval_seed)
        if stage == "expert":
            if not expert or lora is None:
                raise ValueError("stage 'expert' needs the expert's name (expert) and its LoRA settings (lora)")
            if not re.fullmatch(r"[A-Za-z0-9_-]+", expert):
                raise ValueError(f"expert name {expert!r}: use letters, digits, '_' and '-' (it names a folder)")
        elif stage in ("gate", "inference"):
            if not experts_dir or not experts:
                raise ValueError(f"stage {stage!r} needs experts_dir and the experts to load from it")
            if len(set(experts)) != len(experts):
                raise ValueError(f"experts {experts} name an expert twice")
            if stage == "gate" and (gate_dir is not None or static_weights is not None):
                raise ValueError(
                    "stage 'gate' trains a new gate: gate_dir and static_weights are for stage 'inference'"
                )
            if stage == "inference" and (gate_dir is None) == (static_weights is None):
                raise ValueError("stage 'inference' needs exactly one of gate_dir (a trained gate) and static_weights")
            if static_weights is not None and len(static_weights) != len(experts):
                raise ValueError(f"static_weights {static_weights} must give one weight per expert {experts}")
        else:
            raise ValueError(f"stage must be expert, gate or inference, got {stage!r}")
        self.stage, self.expert, self.experts_dir, self.experts = stage, expert, experts_dir, experts
        self.gate = gate if gate is not None else GateSettings()
        self.gate_dir, self.static_weights = gate_dir, static_weights

    @property
    def uses_lora(self) -> bool:
        return True  # an expert in training, or the loaded experts (disabled: the base denoiser)

    def build(self) -> DiffusionModel:
        """Load the checkpoint, freeze it, then add the new expert or load the experts under their mixer."""
        model = self.load_pretrained()
        model.vae.requires_grad_(False)
        model.text_encoders.requires_grad_(False)
        denoiser = model.denoiser.requires_grad_(False)
        if self.gradient_checkpointing:
            denoiser.enable_gradient_checkpointing()
        if self.stage == "expert":
            try:
                add_expert(denoiser, self.lora.peft_config(), self.expert)
            except ValueError as e:
                raise ValueError(
                    f"LoRA target_modules {self.lora.target_modules!r} do not fit {type(denoiser).__name__}: "
                    f"{e}; its attention projections are {DIFFUSION_LORA_TARGETS}"
                ) from e
            model.active_adapter = self.expert  # the adapter adapters_disabled() reads the config of
        else:
            digests = [load_expert(denoiser, self.experts_dir, name) for name in self.experts]
            fusion = attach_fusion(denoiser, self.experts, StaticMix([1.0] * len(self.experts)))
            if self.stage == "gate":
                mixer: nn.Module = TimestepLayerGate(len(fusion.layers), len(self.experts), self.gate)
            elif self.gate_dir is not None:
                mixer = load_gate(self.gate_dir, self.experts, digests, fusion.layers).requires_grad_(False)
            else:
                mixer = StaticMix(self.static_weights)
            fusion.set_mixer(mixer.to(next(p for n, p in denoiser.named_parameters() if "lora_" in n).device))
            fusion.digests = digests
            model.active_adapter = self.experts[0]
        for p in denoiser.parameters():
            if p.requires_grad:  # the adapter or the gate trains in float32 over a half-precision base
                p.data = p.data.float()
        return model

    @property
    def saved_artifact(self) -> str:
        """What :meth:`save` writes, for the training module's message."""
        return f"TLPO expert {self.expert!r}" if self.stage == "expert" else "TLPO gate"

    def save(self, model: nn.Module, out_dir: str | os.PathLike) -> None:
        """``expert``: the new expert in peft's format; ``gate``: the gate and ``gate.json``."""
        if self.stage == "expert":
            save_expert(model.denoiser, self.expert, out_dir)
            return
        fusion = getattr(model.denoiser, FUSION_NAME)
        save_gate(fusion, fusion.digests, out_dir)

    def describe(self, model: nn.Module) -> str:
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in model.parameters())
        denoiser = type(model.denoiser).__name__
        if self.stage == "expert":
            kind = f"TLPO expert {self.expert!r} (LoRA r={self.lora.r}) on the {denoiser}"
        else:
            fusion = getattr(model.denoiser, FUSION_NAME)
            mixer = "a gate in training" if self.stage == "gate" else type(fusion.mixer).__name__
            kind = f"TLPO experts {self.experts} fused in {len(fusion.layers)} layers of the {denoiser} by {mixer}"
        name = re.sub(r"^.*/", "", str(self.model_name_or_path).rstrip("/"))
        return f"{name}: {kind}, {trainable:,} trainable of {total:,} parameters"
