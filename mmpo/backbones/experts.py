"""TLPO (FantasyTalking2): LoRA experts on one denoiser, fused per layer by a timestep gate.

Stage 1 trains one LoRA expert per preference dimension (Diffusion-DPO on that dimension's pairs);
stage 2 freezes the experts and trains, for every adapted layer ℓ, a gate from the timestep t to
weights over the E experts, so that the layer computes (FantasyTalking2's fusion, its Fig. 2)::

    y = W·x + Σᵢ wᵢ(t, ℓ) · ΔWᵢ·x          ΔWᵢ·x = scalingᵢ · Bᵢ Aᵢ dropoutᵢ(x)   (peft's LoRA delta)

The gate, as the figure draws it: timestep → trainable projection → softmax → plus a trainable bias.
No code or numbers are published, so each unconfirmed reading is a :class:`GateSettings` field:
the timestep embedding (sinusoidal, diffusers' ``get_timestep_embedding`` form, computed from the t the
denoiser is called with, so one gate works for any denoiser), where the bias goes (after the softmax as
drawn; inside; none), renormalisation of the weights, one gate per layer or one shared, and whether
the weights depend on t at all (a trainable static merge, a baseline).

How t reaches every layer: :func:`attach_fusion` registers a forward pre-hook on the denoiser that
reads its ``timestep`` argument (keyword, else the second positional one: UNet, SD3 and Wan
transformers) and computes all layers' weights (N, G, E) once; each fused LoRA layer reads its row.
A diffusers pipeline therefore samples with the gate unchanged (no extra step). With gradient
checkpointing the recomputed layers read the weights of the denoiser's last call with adapters on, so
between a forward and its backward only passes with every adapter off (the reference) or at the same
timesteps may run, which is how ``PreferenceModule`` steps.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

__all__ = [
    "FUSION_NAME",
    "ExpertFusion",
    "GateSettings",
    "StaticMix",
    "TimestepLayerGate",
    "attach_fusion",
    "detach_fusion",
    "expert_layers",
    "freeze_experts",
    "timestep_embedding",
]

FUSION_NAME = "tlpo_fusion"  # the fusion's attribute on the denoiser (in its state dict; no "lora_" in it)


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of timesteps (N,) -> (N, dim): [cos(t·f_j), sin(t·f_j)], f_j = max_period^(−j/(dim/2)).

    The form of diffusers' ``get_timestep_embedding`` with ``flip_sin_to_cos=True``, ``shift=0``; t is
    the value the denoiser receives (0–999 for DDPM, σ·1000 for flow matching).
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    angles = t.float()[:, None] * freqs[None]  # (N, dim/2)
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


class GateSettings:
    """The form of the timestep–layer gate (the unconfirmed choices of TLPO's stage 2).

    Args:
        embed_dim: size of the sinusoidal timestep embedding the projection reads (even).
        bias: ``after_softmax`` (as the paper's figure draws it): w = softmax(A·e(t) + a) + b, so
            Σᵢ wᵢ = 1 + Σᵢ bᵢ; ``inside_softmax``: w = softmax(A·e(t) + a + b), Σᵢ wᵢ = 1 (b then
            duplicates the projection's own bias a); ``none``: w = softmax(A·e(t) + a).
        renormalize: divide the weights by their sum after the bias (Σᵢ wᵢ = 1 whatever b).
        per_layer: one gate per adapted layer (TLPO); False shares one gate across layers.
        timestep: the weights depend on t (TLPO); False drops A·e(t), leaving trainable constants: with
            ``per_layer=False`` a tuned static merge (a baseline).
        init_std: standard deviation of A's initial entries. 0 (default) starts every layer at
            softmax = 1/E, i.e. the equal static merge (plus b = ``bias_init``).
        bias_init: initial value of every entry of b.
        max_period: the embedding's longest period.
    """

    def __init__(
        self,
        embed_dim: int = 64,
        bias: Literal["after_softmax", "inside_softmax", "none"] = "after_softmax",
        renormalize: bool = False,
        per_layer: bool = True,
        timestep: bool = True,
        init_std: float = 0.0,
        bias_init: float = 0.0,
        max_period: float = 10000.0,
    ) -> None:
        if embed_dim < 2 or embed_dim % 2:
            raise ValueError(f"embed_dim must be even and at least 2, got {embed_dim}")
        if bias not in ("after_softmax", "inside_softmax", "none"):
            raise ValueError(f"bias must be after_softmax, inside_softmax or none, got {bias!r}")
        self.embed_dim, self.bias, self.renormalize = embed_dim, bias, renormalize
        self.per_layer, self.timestep = per_layer, timestep
        self.init_std, self.bias_init, self.max_period = init_std, bias_init, max_period

    def to_dict(self) -> dict[str, Any]:
        return dict(vars(self))


class TimestepLayerGate(nn.Module):
    """Weights over E experts for G gates (G = adapted layers, or 1 shared) from timesteps.

    Parameters: ``proj_weight`` A (G, E, D) (absent when ``timestep=False``), ``proj_bias`` a (G, E),
    ``bias`` b (G, E). ``forward(t)``: (N,) -> (N, G, E), see :class:`GateSettings` for the formula.
    """

    def __init__(self, num_layers: int, num_experts: int, settings: GateSettings) -> None:
        super().__init__()
        self.settings = settings
        g, e, d = (num_layers if settings.per_layer else 1), num_experts, settings.embed_dim
        self.proj_weight = nn.Parameter(torch.randn(g, e, d) * settings.init_std) if settings.timestep else None
        self.proj_bias = nn.Parameter(torch.zeros(g, e))
        self.bias = nn.Parameter(torch.full((g, e), float(settings.bias_init))) if settings.bias != "none" else None

    def forward(self, t: Tensor) -> Tensor:
        s = self.settings
        logits = self.proj_bias.expand(t.shape[0], -1, -1)  # (N, G, E)
        if self.proj_weight is not None:
            emb = timestep_embedding(t, s.embed_dim, s.max_period).to(self.proj_weight.dtype)  # (N, D)
            logits = logits + torch.einsum("nd,ged->nge", emb, self.proj_weight)
        if s.bias == "inside_softmax":
            logits = logits + self.bias
        weights = logits.float().softmax(dim=-1)
        if s.bias == "after_softmax":
            weights = weights + self.bias
        if s.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights


class StaticMix(nn.Module):
    """Fixed weights over the experts, the same for every layer and timestep (static-merge baselines).

    ``forward(t)``: (N,) -> (1, 1, E); nothing trains. Equal weights 1/E are the gate's starting point,
    a one-hot vector is one expert alone.
    """

    def __init__(self, weights: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("weights", torch.tensor([float(w) for w in weights]), persistent=False)

    def forward(self, t: Tensor) -> Tensor:
        return self.weights.view(1, 1, -1)


class ExpertFusion(nn.Module):
    """What :func:`attach_fusion` adds to a denoiser: the experts' names, the fused layers and the mixer.

    Args:
        experts: the expert (adapter) names, in the order of the weights' last axis.
        layers: names of the fused LoRA layers in the denoiser, in the order of the gates.
        mixer: a :class:`TimestepLayerGate` (G = len(layers) or 1) or a :class:`StaticMix`.
    """

    def __init__(self, experts: list[str], layers: list[str], mixer: nn.Module) -> None:
        super().__init__()
        self.experts, self.layers = list(experts), list(layers)
        self.set_mixer(mixer)
        self._weights: Tensor | None = None  # (N or 1, G or 1, E), from the denoiser's last call
        self._hook: Any = None  # the denoiser's pre-hook handle
        self._fused: list[nn.Module] = []  # the fused layers (a plain list: not submodules of the fusion)

    def __getstate__(self) -> dict[str, Any]:
        # a copy (the frozen-copy reference) starts without the last call's weights, which are part of a graph
        return {**super().__getstate__(), "_weights": None}

    def set_mixer(self, mixer: nn.Module) -> None:
        """Use ``mixer`` from now on, after checking its weights fit the layers and experts."""
        e, g = len(self.experts), len(self.layers)
        with torch.no_grad():
            probe = mixer(torch.zeros(1, device=next(itertools.chain(mixer.parameters(), mixer.buffers())).device))
        if probe.shape[-1] != e or probe.shape[1] not in (1, g):
            raise ValueError(f"{type(mixer).__name__} gives weights {tuple(probe.shape)}, not (N, {g} or 1, {e})")
        self.mixer = mixer

    def set_timesteps(self, t: Any) -> Tensor:
        """Compute every layer's weights (N, G, E) for timesteps ``t`` (scalar or (N,)); returns them."""
        device = next(itertools.chain(self.mixer.parameters(), self.mixer.buffers())).device
        self._weights = self.mixer(torch.as_tensor(t, device=device).float().reshape(-1))
        return self._weights

    def capture(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        """Forward pre-hook of the denoiser: read its ``timestep`` argument.

        A call with every adapter disabled (the reference pass, between the policy's forward and its
        backward) keeps the weights of the call before, which checkpointed layers recompute with.
        """
        if self._fused and all(m.disable_adapters for m in self._fused):
            return
        t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        if t is None:
            raise ValueError(
                f"{type(module).__name__} was called without a timestep: the TLPO gate reads the 'timestep' "
                "argument (keyword, or the second positional one)"
            )
        self.set_timesteps(t)

    def weights_for(self, index: int, rows: int, name: str) -> Tensor:
        """Layer ``index``'s weights for ``rows`` input rows: (rows, E) or (1, E) to broadcast."""
        if self._weights is None:
            raise RuntimeError(
                f"fused layer {name} ran before any timestep was set (call the denoiser, or set_timesteps)"
            )
        w = self._weights[:, index if self._weights.shape[1] > 1 else 0]  # (N, E)
        if w.shape[0] not in (1, rows):
            raise ValueError(
                f"fused layer {name} sees {rows} input rows but the denoiser was called with {w.shape[0]} timesteps; "
                "the gate needs one timestep per row (or one for all)"
            )
        return w


def _fused_forward(layer: nn.Module, fusion: ExpertFusion, index: int, name: str, x: Tensor, *args, **kwargs) -> Tensor:
    """W·x + Σᵢ wᵢ ΔWᵢ·x for a peft LoRA Linear holding the experts (replaces its forward)."""
    if layer.disable_adapters:  # the reference pass: the base model
        return layer.base_layer(x, *args, **kwargs)
    if layer.merged:
        raise RuntimeError(f"{name}: fused experts cannot run on merged LoRA weights (unmerge them)")
    result = layer.base_layer(x, *args, **kwargs)  # (N, ..., out)
    dtype = result.dtype
    w = fusion.weights_for(index, x.shape[0], name)  # (N, E)
    shape = (w.shape[0],) + (1,) * (result.dim() - 1)
    for i, expert in enumerate(fusion.experts):
        if expert not in layer.lora_A:
            continue  # an expert that does not adapt this layer adds nothing here
        lora_a = layer.lora_A[expert]
        h = layer.lora_dropout[expert](x.to(lora_a.weight.dtype))
        delta = layer.lora_B[expert](lora_a(h)) * layer.scaling[expert]  # (N, ..., out)
        result = result + w[:, i].reshape(shape).to(delta.dtype) * delta
    return result.to(dtype)


def expert_layers(denoiser: nn.Module, experts: Sequence[str]) -> list[str]:
    """Names of the denoiser's LoRA layers that hold any of ``experts``, in module order.

    Raises:
        ValueError: an expert is held by no layer, or a layer is not a plain LoRA Linear (Conv, DoRA).
    """
    from peft.tuners.lora import Linear as LoraLinear
    from peft.tuners.lora import LoraLayer

    names, seen = [], set()
    for name, module in denoiser.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        held = [e for e in experts if e in module.lora_A]
        if not held:
            continue
        if not isinstance(module, LoraLinear) or any(e in getattr(module, "lora_variant", {}) for e in held):
            raise ValueError(f"{name}: only plain LoRA on Linear layers can be fused, not {type(module).__name__}/DoRA")
        names.append(name)
        seen.update(held)
    if missing := [e for e in experts if e not in seen]:
        raise ValueError(f"expert(s) {missing} adapt no layer of {type(denoiser).__name__}")
    return names


def freeze_experts(denoiser: nn.Module) -> None:
    """No LoRA weight of the denoiser trains (stage 2 trains the gate only)."""
    for n, p in denoiser.named_parameters():
        if "lora_" in n:
            p.requires_grad_(False)


def attach_fusion(denoiser: nn.Module, experts: Sequence[str], mixer: nn.Module | None = None) -> ExpertFusion:
    """Fuse ``experts`` (adapters already on ``denoiser``) in every layer that holds them.

    Args:
        denoiser: a diffusers UNet / transformer (or any module called with ``timestep``) with peft LoRA
            adapters named after the experts.
        experts: the expert names, in the order of the mixer's weights.
        mixer: a :class:`TimestepLayerGate` sized for the layers, a :class:`StaticMix`, or None for a
            new gate with default :class:`GateSettings`.

    Returns:
        The fusion, registered on the denoiser as ``tlpo_fusion`` (its gate is in the denoiser's
        parameters and state dict); the experts are frozen, the gate is not.
    """
    if hasattr(denoiser, FUSION_NAME):
        raise ValueError(f"{type(denoiser).__name__} already has fused experts (detach_fusion first)")
    layers = expert_layers(denoiser, experts)
    if mixer is None:
        mixer = TimestepLayerGate(len(layers), len(experts), GateSettings())
    fusion = ExpertFusion(list(experts), layers, mixer)
    freeze_experts(denoiser)
    modules = dict(denoiser.named_modules())
    for index, name in enumerate(layers):
        layer = modules[name]
        fusion._fused.append(layer)
        layer.forward = functools.partial(_fused_forward, layer, fusion, index, name)  # deep-copies with the model
    denoiser.add_module(FUSION_NAME, fusion)
    fusion._hook = denoiser.register_forward_pre_hook(fusion.capture, with_kwargs=True)
    return fusion


def detach_fusion(denoiser: nn.Module) -> None:
    """Undo :func:`attach_fusion`: the layers compute as peft's LoRA layers again (the adapters stay)."""
    fusion = getattr(denoiser, FUSION_NAME)
    modules = dict(denoiser.named_modules())
    for name in fusion.layers:
        del modules[name].forward
    fusion._hook.remove()
    delattr(denoiser, FUSION_NAME)
