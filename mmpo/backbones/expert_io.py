"""Saving and loading TLPO experts (PEFT format, one folder per expert) and their gate.

Layout (the gate beside the experts it was trained against)::

    experts/
      lip_sync/  adapter_config.json  adapter_model.safetensors     (peft's own format, keys without the name)
      motion/    ...
      gate/      gate.safetensors  gate.json                         (gate.json: experts, digests, layers, form)

An expert's digest is the SHA-256 of its LoRA tensors as loaded (names and values), so a gate refuses
experts that were retrained or swapped since it was trained, naming its file and the expert.
:func:`load_tlpo` puts experts and gate on a denoiser (a pipeline's ``unet`` / ``transformer``) in one
call; the pipeline then samples with the gate as it is.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from datamodules.core.atomic import atomic_file, atomic_write_text
from mmpo.backbones.experts import (
    ExpertFusion,
    GateSettings,
    StaticMix,
    TimestepLayerGate,
    attach_fusion,
    freeze_experts,
)

__all__ = [
    "GATE_CONFIG",
    "GATE_WEIGHTS",
    "add_expert",
    "expert_digest",
    "load_expert",
    "load_gate",
    "load_tlpo",
    "read_gate_config",
    "save_expert",
    "save_gate",
]

GATE_WEIGHTS, GATE_CONFIG = "gate.safetensors", "gate.json"
_CONFIG, _WEIGHTS = "adapter_config.json", "adapter_model.safetensors"  # peft's file names


def _json_default(value: Any) -> Any:
    # what peft's own save_pretrained writes for the config's sets (target_modules) and enums
    return sorted(value) if isinstance(value, set) else getattr(value, "value", str(value))


def expert_digest(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 over an expert's LoRA tensors (sorted names, float32 values)."""
    h = hashlib.sha256()
    for key in sorted(state):
        h.update(key.encode())
        h.update(state[key].detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def add_expert(denoiser: nn.Module, config: Any, name: str) -> None:
    """A new LoRA adapter ``name`` on the denoiser (diffusers' ``add_adapter``, else peft's injection)."""
    if name in getattr(denoiser, "peft_config", {}):
        raise ValueError(f"{type(denoiser).__name__} already has an adapter named {name!r}")
    with warnings.catch_warnings():  # peft warns that a model with an adapter gets another: that is the point
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
        if hasattr(denoiser, "add_adapter"):
            denoiser.add_adapter(config, adapter_name=name)
        else:
            from peft import inject_adapter_in_model

            inject_adapter_in_model(config, denoiser, adapter_name=name)


def _expert_state(denoiser: nn.Module, name: str) -> dict[str, torch.Tensor]:
    from peft.utils import get_peft_model_state_dict

    return get_peft_model_state_dict(denoiser, adapter_name=name)  # keys without the adapter name


def save_expert(denoiser: nn.Module, name: str, out_dir: str | os.PathLike) -> str:
    """Write adapter ``name`` to ``out_dir`` in peft's format; returns its digest."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in _expert_state(denoiser, name).items()}
    with atomic_file(out / _WEIGHTS) as tmp:
        save_file(state, tmp, metadata={"format": "pt"})
    config = denoiser.peft_config[name].to_dict()
    atomic_write_text(out / _CONFIG, json.dumps(config, indent=2, sort_keys=True, default=_json_default))
    return expert_digest(state)


def load_expert(denoiser: nn.Module, experts_dir: str | os.PathLike, name: str) -> str:
    """Add the expert saved in ``experts_dir/name`` to the denoiser as adapter ``name``, frozen; its digest.

    Raises:
        FileNotFoundError: no expert of that name there (the message lists the saved ones).
        ValueError: its tensors do not fit the denoiser's layers.
    """
    from peft import LoraConfig
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    folder = Path(experts_dir) / name
    if not (folder / _CONFIG).is_file() or not (folder / _WEIGHTS).is_file():
        saved = sorted(p.parent.name for p in Path(experts_dir).glob(f"*/{_CONFIG}"))
        raise FileNotFoundError(f"{folder}: no saved expert {name!r} ({_CONFIG} + {_WEIGHTS}); saved there: {saved}")
    add_expert(denoiser, LoraConfig.from_pretrained(str(folder)), name)
    state = load_file(folder / _WEIGHTS)
    result = set_peft_model_state_dict(denoiser, state, adapter_name=name)
    unexpected = [k for k in result.unexpected_keys if "lora_" in k]
    missing = [k for k in result.missing_keys if f".{name}." in k and "lora_" in k]
    if unexpected or missing:
        raise ValueError(
            f"{folder / _WEIGHTS}: expert {name!r} does not fit {type(denoiser).__name__}: "
            f"unexpected {unexpected[:3]}, missing {missing[:3]}"
        )
    freeze_experts(denoiser)
    return expert_digest(_expert_state(denoiser, name))


def save_gate(fusion: ExpertFusion, digests: Sequence[str], out_dir: str | os.PathLike) -> None:
    """Write a fusion's mixer (``gate.safetensors``) and ``gate.json`` (experts with digests, layers, form)."""
    from safetensors.torch import save_file

    mixer = fusion.mixer
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if isinstance(mixer, StaticMix):
        form: dict[str, Any] = {"static_weights": mixer.weights.tolist()}
    else:
        form = {"settings": mixer.settings.to_dict()}
        with atomic_file(out / GATE_WEIGHTS) as tmp:
            save_file({k: v.detach().contiguous() for k, v in mixer.state_dict().items()}, tmp)
    info = {
        "format": "mmpo-tlpo-gate",
        "version": 1,
        "experts": [{"name": n, "digest": d} for n, d in zip(fusion.experts, digests, strict=True)],
        "layers": fusion.layers,
        **form,
    }
    atomic_write_text(out / GATE_CONFIG, json.dumps(info, indent=1))


def read_gate_config(gate_dir: str | os.PathLike) -> dict[str, Any]:
    path = Path(gate_dir) / GATE_CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no TLPO gate here (save_gate writes {GATE_CONFIG} and {GATE_WEIGHTS})")
    info = json.loads(path.read_text())
    if info.get("format") != "mmpo-tlpo-gate":
        raise ValueError(f"{path}: not a TLPO gate file (format {info.get('format')!r})")
    return info


def load_gate(
    gate_dir: str | os.PathLike, experts: Sequence[str], digests: Sequence[str], layers: Sequence[str]
) -> nn.Module:
    """The mixer saved in ``gate_dir``, after checking it was trained against these experts and layers.

    Raises:
        ValueError: naming ``gate.json`` and the first expert (name or digest) or layer that differs.
    """
    from safetensors.torch import load_file

    path = Path(gate_dir) / GATE_CONFIG
    info = read_gate_config(gate_dir)
    trained = [(e["name"], e["digest"]) for e in info["experts"]]
    loaded = list(zip(experts, digests, strict=True))
    if [n for n, _ in trained] != list(experts):
        raise ValueError(f"{path}: the gate was trained against experts {[n for n, _ in trained]}, not {list(experts)}")
    for (name, want), (_, got) in zip(trained, loaded, strict=True):
        if want != got:
            raise ValueError(
                f"{path}: expert {name!r} differs from the one the gate was trained against "
                f"(digest {got[:12]}…, trained with {want[:12]}…)"
            )
    if info["layers"] != list(layers):
        diff = sorted(set(info["layers"]) ^ set(layers))[:3]
        raise ValueError(f"{path}: the gate's layers differ from the experts' layers (e.g. {diff})")
    if "static_weights" in info:
        return StaticMix(info["static_weights"])
    gate = TimestepLayerGate(len(layers), len(experts), GateSettings(**info["settings"]))
    gate.load_state_dict(load_file(Path(gate_dir) / GATE_WEIGHTS))
    return gate


def load_tlpo(
    denoiser: nn.Module, gate_dir: str | os.PathLike, experts_dir: str | os.PathLike | None = None
) -> ExpertFusion:
    """Load the experts a gate names and the gate onto ``denoiser`` for inference (one call).

    Args:
        denoiser: e.g. ``pipe.unet`` or ``pipe.transformer``; sampling with the pipeline then uses the gate.
        gate_dir: the folder :func:`save_gate` wrote.
        experts_dir: the folder of the expert folders (default: the gate folder's parent).
    """
    experts_dir = Path(gate_dir).parent if experts_dir is None else Path(experts_dir)
    names = [e["name"] for e in read_gate_config(gate_dir)["experts"]]
    digests = [load_expert(denoiser, experts_dir, n) for n in names]
    fusion = attach_fusion(denoiser, names, StaticMix([1.0] * len(names)))
    mixer = load_gate(gate_dir, names, digests, fusion.layers)
    device = next(p for n, p in denoiser.named_parameters() if "lora_" in n).device
    fusion.set_mixer(mixer.to(device))
    fusion.requires_grad_(False)
    return fusion
