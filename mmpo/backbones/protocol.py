"""What :class:`~mmpo.module.PreferenceModule` needs from a model family: the backbone protocol.

A backbone builds the trainable model and turns a batch into per-response statistics (B, K): for a
vision-language model the summed response log-probs (and the per-token ones), for a diffusion model
−(denoising error) at a (t, ε) drawn once per group and step, shared by the group and by policy and
reference (drawn into the batch, so both passes read the same draw). The module never reaches into
the model: everything it asks of it goes through the methods below, and a reference strategy uses
the same methods for the reference pass.
"""

from __future__ import annotations

import contextlib
import copy
import os
from abc import ABC, abstractmethod
from contextlib import AbstractContextManager
from typing import Any

from torch import Tensor, nn

from mmpo.losses.base import ResponseStats

__all__ = ["Backbone"]


class Backbone(ABC):
    """Base class of every backbone; subclass it and implement the abstract methods.

    Attributes:
        model_name_or_path: the checkpoint the model is built from (the reference's identity).
        revision: hub revision, or None.
        token_statistics: the statistics are summed per-token log-probs (``token_logps`` with a mask), as a
            language model's; False for one number per response (a diffusion model's −(denoising error)).
    """

    model_name_or_path: str
    revision: str | None = None
    token_statistics: bool = True

    @property
    @abstractmethod
    def uses_lora(self) -> bool:
        """Whether the trainable part is an adapter (so the reference can be the adapter disabled)."""

    @abstractmethod
    def build(self) -> nn.Module:
        """The policy: loaded, frozen where it should be, adapters attached; in training mode or not."""

    @abstractmethod
    def statistics(self, model: nn.Module, batch: Any) -> ResponseStats:
        """Per-response statistics (B, K) of ``model`` on ``batch`` (gradients flow when enabled)."""

    @abstractmethod
    def save(self, model: nn.Module, out_dir: str | os.PathLike) -> None:
        """Write the trained weights (adapter or full model) in their library's standard format."""

    # -- capabilities with defaults -------------------------------------------------------------
    def unwrap(self, model: nn.Module) -> nn.Module:
        """The model under any adapter wrapper."""
        return model

    def adapters_disabled(self, model: nn.Module) -> AbstractContextManager:
        """Inside the block ``model`` computes as its base model (only with ``uses_lora``)."""
        raise NotImplementedError(f"{type(self).__name__} has no adapters to disable")

    def frozen_copy(self, model: nn.Module) -> nn.Module:
        """A frozen copy of the model as it is now, for the ``FrozenCopy`` reference."""
        ref = copy.deepcopy(self.unwrap(model)).eval()
        ref.requires_grad_(False)
        return ref

    def load_reference(self, model_name_or_path: str, revision: str | None = None) -> nn.Module:
        """A frozen model loaded from another checkpoint, for the ``SeparateCheckpoint`` reference."""
        raise NotImplementedError(f"{type(self).__name__} cannot load a separate reference checkpoint")

    def response_hidden(
        self, model: nn.Module, batch: Any, layers: bool = False
    ) -> tuple[Tensor, Tensor, nn.Module, Tensor] | tuple[Tensor, Tensor, nn.Module, Tensor, Tensor]:
        """Hidden states predicting each row's response tokens, their mask, the output head and the rows'
        response-token log-probs (PaMi-VDPO's scoring pass, which doubles as the reference pass); with
        ``layers``, every decoder layer's hidden states at those positions as a fifth element (N, L, R, H)."""
        raise NotImplementedError(f"{type(self).__name__} does not expose response hidden states")

    def media_shareable(self, model: nn.Module) -> bool:
        """Whether the policy and its adapter-disabled reference compute identical media features."""
        return False

    def media_reuse(self, model: nn.Module) -> AbstractContextManager:
        """Inside the block, media features computed once are reused by later passes of ``model``."""
        return contextlib.nullcontext()

    def fingerprint_settings(self) -> dict[str, Any]:
        """Settings besides the checkpoint that change the reference's statistics (cache identity)."""
        return {}

    def reference_cache_problem(self) -> str | None:
        """Why the reference's statistics of a record could differ between passes, so that ``reference: cached``
        cannot serve this backbone on data whose statistics draw noise; None when they cannot."""
        return None

    def describe(self, model: nn.Module) -> str:
        """One line for the log: what trains and how much."""
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in model.parameters())
        return f"{type(self).__name__}: {trainable:,} trainable of {total:,} parameters"
