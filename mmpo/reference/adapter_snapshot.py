"""A frozen second LoRA adapter holding a snapshot of the policy's adapter: the reference after a refresh.

With the disabled-adapter reference, the reference pass runs the base model (adapter off). Iterative
methods (Curry-DPO's stages, APO's rounds) move the reference to an earlier policy. Without a second
model in memory, that earlier policy is a second adapter on the same peft model: same rank, targets and
``modules_to_save`` as the trained one, no dropout (the reference pass must be deterministic and draw no
random numbers), never trainable. :func:`snapshot_active` makes it the active adapter inside a block by
flipping each adapter layer's active-adapter list directly, as :mod:`mmpo.backbones.adapters` flips the
disable switch: peft's ``set_adapter`` would also change ``requires_grad`` of the trained adapter in the
middle of a training step.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Mapping

import torch
from torch import Tensor, nn

from mmpo.backbones.module_scan import modules_found_once

__all__ = [
    "SNAPSHOT_ADAPTER",
    "add_snapshot_adapter",
    "load_snapshot",
    "snapshot_active",
    "snapshot_name",
    "trained_adapter",
]

#: the peft name of the snapshot adapter (parameter names read ``...lora_A.mmpo_reference.weight``)
SNAPSHOT_ADAPTER = "mmpo_reference"


def trained_adapter(model: nn.Module) -> str:
    """The name of the peft ``model``'s one active (trained) adapter; a ValueError where no snapshot can be made."""
    from peft import PeftModel

    if not isinstance(model, PeftModel):
        raise ValueError(
            f"refreshing the disabled-adapter reference needs a peft model, got {type(model).__name__} "
            "(use reference: copy, which holds a frozen copy of the policy)"
        )
    active = model.active_adapter
    if not isinstance(active, str):
        raise ValueError(f"refreshing the disabled-adapter reference needs one active adapter, got {active!r}")
    config = model.peft_config[active]
    if config.is_prompt_learning or config.is_adaption_prompt:
        raise ValueError(
            f"refreshing the disabled-adapter reference needs a LoRA-style adapter, got {config.peft_type}"
        )
    return active


def snapshot_name(name: str, trained: str) -> str:
    """The snapshot adapter's parameter for the trained adapter's parameter ``name`` (one ``.trained.`` part).

    Raises:
        ValueError: ``name`` lies outside the adapter (e.g. a weight trained in full without ``modules_to_save``):
            a second adapter cannot hold it.
    """
    parts = name.split(".")
    hits = [i for i, part in enumerate(parts) if part == trained]
    if len(hits) != 1:
        raise ValueError(
            f"trainable weight {name!r} is not inside adapter {trained!r}: the adapter snapshot cannot hold it "
            "(use reference: copy)"
        )
    parts[hits[0]] = SNAPSHOT_ADAPTER
    return ".".join(parts)


def add_snapshot_adapter(model: nn.Module) -> None:
    """Add the frozen snapshot adapter to the peft ``model`` (once), leaving every ``requires_grad`` as it was."""
    trained = trained_adapter(model)
    if SNAPSHOT_ADAPTER in model.peft_config:
        return
    config = copy.deepcopy(model.peft_config[trained])
    if hasattr(config, "lora_dropout"):
        config.lora_dropout = 0.0  # deterministic reference pass: no draws from the training streams
    config.inference_mode = True
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    model.add_adapter(SNAPSHOT_ADAPTER, config)
    for n, p in model.named_parameters():
        # peft marks trainability while it injects; the optimizer already holds the trained adapter's weights
        p.requires_grad_(flags.get(n, False))


def load_snapshot(model: nn.Module, weights: Mapping[str, Tensor], prefix: str = "") -> None:
    """Copy the trained adapter's ``weights`` (names under ``prefix``, as the policy names them) into the snapshot.

    Raises:
        KeyError: a weight has no counterpart in the snapshot adapter.
    """
    trained = trained_adapter(model)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in weights.items():
            target = prefix + snapshot_name(name, trained)
            if target not in params:
                raise KeyError(f"snapshot adapter has no weight {target!r} for {name!r}")
            params[target].copy_(value)


def _switched_layers(model: nn.Module) -> list[nn.Module]:
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils import AuxiliaryTrainingWrapper

    switched = (BaseTunerLayer, AuxiliaryTrainingWrapper)
    return modules_found_once(model, "_mmpo_snapshot_layers", lambda m: isinstance(m, switched))


@contextlib.contextmanager
def snapshot_active(model: nn.Module) -> Iterator[None]:
    """Inside the block the peft ``model`` computes with the snapshot adapter in place of the trained one.

    For passes under ``torch.no_grad()``; ``requires_grad`` is left alone and the active adapters are
    restored on exit.
    """
    if SNAPSHOT_ADAPTER not in getattr(model, "peft_config", {}):
        raise RuntimeError("the model has no snapshot adapter (add_snapshot_adapter has not run)")
    layers = _switched_layers(model)
    before = [m._active_adapter for m in layers]
    try:
        for m in layers:
            m._active_adapter = [SNAPSHOT_ADAPTER]
        yield
    finally:
        for m, state in zip(layers, before, strict=True):
            m._active_adapter = state
