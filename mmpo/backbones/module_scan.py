"""Submodule lookups done once per model, for checks that run on every training step."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

__all__ = ["modules_found_once"]


def modules_found_once(model: nn.Module, key: str, keep: Callable[[nn.Module], bool]) -> list[nn.Module]:
    """The modules of ``model`` (itself included) for which ``keep`` holds, found on the first call.

    The list is remembered on ``model`` under ``key`` as a plain attribute (not a submodule, so not in
    the state dict). Modules added to the model afterwards are not seen: call it on a built model.
    """
    found = model.__dict__.get(key)
    if found is None:
        found = [m for m in model.modules() if keep(m)]
        object.__setattr__(model, key, found)
    return found
