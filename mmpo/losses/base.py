"""The contract every preference loss meets: statistics in, per-example losses and rewards out.

A loss sees only per-response statistics of a batch of preference pairs (summed log-probs, token
counts and, for the few losses that need them, per-token log-probs). It never sees a model, a
batch, a trainer or a logger, so the same maths serves every modality.
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from dataclasses import dataclass, fields

import torch
from torch import Tensor

__all__ = ["LossOutput", "PairLogps", "PreferenceLoss", "mean_token_logps"]


@dataclass(eq=False)
class PairLogps:
    """Log-probabilities of the chosen and rejected responses of B preference pairs, from one model.

    Attributes:
        chosen: (B,) log-probs of the chosen responses, summed over response tokens.
        rejected: (B,) the same for the rejected responses.
        chosen_tokens: (B,) number of response tokens of each chosen response (float or long).
        rejected_tokens: (B,) the same for the rejected responses.
        chosen_token_logps: (B, T) per-token log-probs of the chosen responses, 0 where masked;
            ``chosen`` must equal their masked sum. Only losses with ``requires_token_logps`` read it.
        rejected_token_logps: (B, T') the same for the rejected responses.
        chosen_mask: (B, T) bool or 0/1, true on response tokens of ``chosen_token_logps``.
        rejected_mask: (B, T') the same for ``rejected_token_logps``.
    """

    chosen: Tensor
    rejected: Tensor
    chosen_tokens: Tensor
    rejected_tokens: Tensor
    chosen_token_logps: Tensor | None = None
    rejected_token_logps: Tensor | None = None
    chosen_mask: Tensor | None = None
    rejected_mask: Tensor | None = None

    def _map(self, fn) -> PairLogps:
        return PairLogps(**{f.name: None if (v := getattr(self, f.name)) is None else fn(v) for f in fields(self)})

    def detach(self) -> PairLogps:
        """A copy whose tensors are detached from the autograd graph."""
        return self._map(Tensor.detach)

    def to(self, device: torch.device | str) -> PairLogps:
        """A copy whose tensors live on ``device``."""
        return self._map(lambda t: t.to(device))

    @property
    def has_token_logps(self) -> bool:
        """Whether both per-token log-prob tensors are present."""
        return self.chosen_token_logps is not None and self.rejected_token_logps is not None


@dataclass(eq=False)
class LossOutput:
    """What a preference loss returns.

    Attributes:
        losses: (B,) per-example loss; the training module reduces it with ``.mean()``.
        chosen_rewards: (B,) implicit reward of each chosen response (detached), logged as
            ``rewards/chosen``; margins and accuracies are derived from the two reward tensors.
        rejected_rewards: (B,) the same for the rejected responses (``rewards/rejected``).
    """

    losses: Tensor
    chosen_rewards: Tensor
    rejected_rewards: Tensor

    def __post_init__(self) -> None:
        # Rewards are metrics: never let a caller backpropagate through them by accident.
        self.chosen_rewards = self.chosen_rewards.detach()
        self.rejected_rewards = self.rejected_rewards.detach()


def mean_token_logps(logps: Tensor, tokens: Tensor) -> Tensor:
    """Length-normalised log-probs ``logps / tokens``, with token counts clamped to at least 1.

    Args:
        logps: (B,) summed log-probs (or log-ratios).
        tokens: (B,) token counts, float or integer; a count of 0 is treated as 1 so empty
            responses give 0 instead of NaN.

    Returns:
        (B,) per-token average in the dtype of ``logps``.
    """
    return logps / tokens.to(logps.dtype).clamp(min=1.0)


class PreferenceLoss(ABC):
    """Base class of every preference loss; the class hierarchy is the registry.

    Pick a concrete loss in YAML with ``class_path: mmpo.losses.DPOLoss`` and its ``init_args``.
    Subclasses set the two flags below (as class attributes, or properties when they depend on
    the configuration) and implement :meth:`forward`; calling the loss checks its inputs first.

    Attributes:
        requires_reference: whether the loss needs the reference model's log-probs.
        requires_token_logps: whether the loss needs per-token log-probs and masks.
    """

    requires_reference: bool = True
    requires_token_logps: bool = False

    def __call__(self, policy: PairLogps, reference: PairLogps | None = None) -> LossOutput:
        """Compute the loss of B pairs.

        Args:
            policy: log-probs of the policy being trained (carries the gradient).
            reference: log-probs of the frozen reference model, or None for losses that do not
                need one (reference-free losses ignore it when given).

        Returns:
            Per-example losses and detached rewards.

        Raises:
            ValueError: the loss needs a reference and got None, or needs per-token log-probs the
                policy statistics lack.
        """
        name = type(self).__name__
        if self.requires_reference and reference is None:
            raise ValueError(
                f"{name} needs reference log-probs, but reference=None was given; compute them with the "
                "reference model (or cache them), or pick a reference-free loss such as SimPOLoss."
            )
        if self.requires_token_logps and not policy.has_token_logps:
            raise ValueError(
                f"{name} needs per-token log-probs: set chosen_token_logps/rejected_token_logps (and masks) "
                "on the policy PairLogps."
            )
        return self.forward(policy, reference)

    @abstractmethod
    def forward(self, policy: PairLogps, reference: PairLogps | None) -> LossOutput:
        """Loss maths; inputs have already been checked by ``__call__``."""

    def __repr__(self) -> str:
        params = inspect.signature(type(self).__init__).parameters
        args = ", ".join(f"{n}={getattr(self, n)!r}" for n in params if n != "self" and hasattr(self, n))
        return f"{type(self).__name__}({args})"


def check_positive(name: str, value: float) -> None:
    """Raise a ValueError unless ``value`` is a finite number > 0."""
    if not (value > 0 and value != float("inf")):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def check_range(name: str, value: float, low: float, high: float, *, high_inclusive: bool = True) -> None:
    """Raise a ValueError unless ``low <= value <= high`` (or ``< high``)."""
    ok = low <= value <= high if high_inclusive else low <= value < high
    if not ok:
        bracket = "]" if high_inclusive else ")"
        raise ValueError(f"{name} must be in [{low}, {high}{bracket}, got {value!r}")
