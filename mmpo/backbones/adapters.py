"""Switching a LoRA policy's adapters off for the reference pass, without peft's per-call model scan.

``PeftModel.disable_adapter()`` computes the model's adapter status (a walk over every module and
parameter) and then walks the modules again on entry and on exit: milliseconds per call, paid on every
training step when the reference is the disabled adapter. :func:`adapters_disabled` finds the adapter
layers once per model and flips their switch directly. The switched layers are the ones peft's own
context switches: the tuner layers (LoRA) and the auxiliary training wrappers, i.e. the
``modules_to_save`` copies (e.g. a projector trained in full), which then serve their original module,
and trainable tokens. It leaves ``requires_grad`` alone (peft's context turns the adapters' and the
copies' gradients off and on again), so it is meant for passes under ``torch.no_grad()``, which the
reference pass is. Models whose adapters are not plain tuner layers (prompt learning, adaption prompts)
use peft's own context.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn

from mmpo.backbones.module_scan import modules_found_once

__all__ = ["adapters_disabled"]


def _adapter_layers(model: nn.Module) -> list[nn.Module] | None:
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils import AuxiliaryTrainingWrapper

    # the modules peft's disable_adapter_layers() switches (BaseTuner._enable_adapter_layers)
    switched = (BaseTunerLayer, AuxiliaryTrainingWrapper)
    layers = modules_found_once(model, "_mmpo_adapter_layers", lambda m: isinstance(m, switched))
    config = getattr(model, "peft_config", {}).get(getattr(model, "active_adapter", None))
    plain = config is not None and not config.is_prompt_learning and not config.is_adaption_prompt
    return layers if plain and layers and all(hasattr(m, "_disable_adapters") for m in layers) else None


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """Run the base model of the peft ``model`` inside the block; the adapters are restored on exit."""
    layers = _adapter_layers(model)
    if layers is None:
        with model.disable_adapter():
            yield
        return
    before = [m._disable_adapters for m in layers]
    try:
        for m in layers:
            m._disable_adapters = True
        yield
    finally:
        for m, state in zip(layers, before, strict=True):
            m._disable_adapters = state
