"""The contract every preference loss meets: statistics in, per-example losses and rewards out.

A loss sees only per-response statistics of a batch of preference pairs (summed log-probs, token
counts and, for the few losses that need them, per-token log-probs). It never sees a model, a
batch, a trainer or a logger, so the same maths serves every modality.
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from torch import Tensor

from mmpo.logprobs import sequence_stats

__all__ = ["LossOutput", "PairLogps", "PreferenceLoss", "ResponseStats", "mean_token_logps"]


@dataclass(eq=False)
class ResponseStats:
    """Per-response statistics of B groups of K responses that share a prompt, from one model.

    K = 2 is a preference pair: response 0 is the chosen one, response 1 the rejected one. In a
    ranked list (K > 2) the responses are ordered best first. Pair losses read responses 0 and 1;
    list losses read all K.

    Attributes:
        logps: (B, K) log-probs of each response, summed over its tokens (for a diffusion model:
            −(denoising error), the same role in the losses).
        tokens: (B, K) number of response tokens (float or long); 1 where a statistic has no tokens.
        token_logps: (B, K, T) per-token log-probs, 0 where masked; ``logps`` must equal their masked
            sum. Only losses with ``requires_token_logps`` read it.
        mask: (B, K, T) bool or 0/1, true on the response tokens of ``token_logps``.
        scores: (B, K) scores of the responses (higher is better), or ranks turned into scores.
        weights: (B,) a weight per group (per pair when K = 2).
        dimension_ids: (B,) long, the preference dimension a group was labelled on.
        soft_labels: (B,) probability that response 0 is preferred to response 1.
        candidate_weights: (B, K) non-negative weight of each response as a rejected candidate against
            response 0 (PaMi-VDPO's selection weights; column 0 is not read). Only
            :class:`~mmpo.losses.MultiInstanceVDPOLoss` reads it.
        desirable: (B,) bool (or 0/1), whether the group's response 0 is desirable (unpaired feedback;
            KTO and BCO read it).
        orientations: (B, D) per preference dimension: 1 where response 0 is preferred on it, −1 where
            response 1 is, 0 where neither. :class:`~mmpo.losses.CombinedLoss` orients each component by
            one dimension (``orient_by``).
        segment_labels: (B, S) per temporal segment s (DenseDPO): 1 where response 0 is preferred on it, −1
            where response 1 is, 0 where neither; the segments are the T axis of ``token_logps``.
        token_kl: (B, K, T) per-token KL(π_ref(·|x,y<t) ‖ πθ(·|x,y<t)) over the full vocabulary, aligned
            with ``token_logps``, 0 where masked; on the policy's statistics, with its gradient
            (``mmpo.token_kl``). Only losses with ``requires_token_kl`` read it.
        token_activation: (B, K, T) the mean over the hidden axis of the model's final hidden state at
            the position that predicts each token, 0 where masked; on the reference's statistics where
            the token KL is computed (SparsePO's activation masks read it).
        token_masks: (B, K, T, 2) learned per-token weights ≥ 0 of the reward (``[..., 0]``) and KL
            (``[..., 1]``) terms, with the mask network's gradient; on the reference's statistics where the
            training module holds a token mask network (SparsePO's learned masks, ``mmpo.token_masks``).

    Side information (``scores`` … ``segment_labels``) rides on the policy's statistics; None when
    the data has none.
    """

    logps: Tensor
    tokens: Tensor
    token_logps: Tensor | None = None
    mask: Tensor | None = None
    scores: Tensor | None = None
    weights: Tensor | None = None
    dimension_ids: Tensor | None = None
    soft_labels: Tensor | None = None
    candidate_weights: Tensor | None = None
    desirable: Tensor | None = None
    orientations: Tensor | None = None
    segment_labels: Tensor | None = None
    token_kl: Tensor | None = None
    token_activation: Tensor | None = None
    token_masks: Tensor | None = None

    def __post_init__(self) -> None:
        if self.logps.dim() != 2 or self.logps.shape[1] < 2:
            raise ValueError(f"logps must be (B, K) with K >= 2 responses per group, got {tuple(self.logps.shape)}")
        if self.tokens.shape != self.logps.shape:
            raise ValueError(f"tokens {tuple(self.tokens.shape)} must match logps {tuple(self.logps.shape)}")
        if self.candidate_weights is not None and self.candidate_weights.shape != self.logps.shape:
            raise ValueError(
                f"candidate_weights {tuple(self.candidate_weights.shape)} must match logps {tuple(self.logps.shape)}"
            )

    @classmethod
    def from_rows(cls, token_logps: Tensor, mask: Tensor, group_size: int, **side: Tensor | None) -> ResponseStats:
        """Statistics from (K·B, T) token log-probs in the batch's row layout (response k of group b in row k·B + b).

        The (B, K) and (B, K, T) fields are views of the row tensors, so response k's column is a
        contiguous (B,) or (B, T) block.
        """
        summed, _, counts = sequence_stats(token_logps, mask)  # (K·B,) each
        k, t = group_size, token_logps.shape[-1]
        return cls(
            logps=summed.view(k, -1).t(),
            tokens=counts.view(k, -1).t(),
            token_logps=token_logps.view(k, -1, t).transpose(0, 1),
            mask=mask.view(k, -1, t).transpose(0, 1),
            **side,
        )

    @property
    def group_size(self) -> int:
        """K, the responses per group."""
        return self.logps.shape[1]

    @property
    def num_groups(self) -> int:
        """B, the groups (pairs when K = 2)."""
        return self.logps.shape[0]

    # Pair view: response 0 is the chosen one, response 1 the rejected one.
    @property
    def chosen(self) -> Tensor:
        """(B,) summed log-probs of response 0."""
        return self.logps[:, 0]

    @property
    def rejected(self) -> Tensor:
        """(B,) summed log-probs of response 1."""
        return self.logps[:, 1]

    @property
    def chosen_tokens(self) -> Tensor:
        return self.tokens[:, 0]

    @property
    def rejected_tokens(self) -> Tensor:
        return self.tokens[:, 1]

    @property
    def chosen_token_logps(self) -> Tensor | None:
        return None if self.token_logps is None else self.token_logps[:, 0]

    @property
    def rejected_token_logps(self) -> Tensor | None:
        return None if self.token_logps is None else self.token_logps[:, 1]

    @property
    def chosen_mask(self) -> Tensor | None:
        return None if self.mask is None else self.mask[:, 0]

    @property
    def rejected_mask(self) -> Tensor | None:
        return None if self.mask is None else self.mask[:, 1]

    @property
    def has_token_logps(self) -> bool:
        """Whether per-token log-probs are present (a loss that needs the masks checks them itself)."""
        return self.token_logps is not None

    def _map(self, fn) -> ResponseStats:
        values = {f.name: None if (v := getattr(self, f.name)) is None else fn(v) for f in fields(ResponseStats)}
        return ResponseStats(**values)

    def detach(self) -> ResponseStats:
        """A copy whose tensors are detached from the autograd graph."""
        return self._map(Tensor.detach)

    def to(self, device: torch.device | str) -> ResponseStats:
        """A copy whose tensors live on ``device``."""
        return self._map(lambda t: t.to(device))

    def with_side(self, **side: Tensor | None) -> ResponseStats:
        """A copy carrying the given side information (``scores``, ``weights``, ...)."""
        known = {
            "scores", "weights", "dimension_ids", "soft_labels", "candidate_weights", "desirable", "orientations",
            "segment_labels",
        }  # fmt: skip
        unknown = set(side) - known
        if unknown:
            raise TypeError(f"unknown side information {sorted(unknown)}")
        values = {f.name: getattr(self, f.name) for f in fields(ResponseStats)}
        return ResponseStats(**{**values, **side})


def _stack_columns(parts: list[Tensor]) -> Tensor:
    """(B, ...) tensors as the columns of a (B, K, ...) tensor, each column a contiguous block."""
    return torch.stack(parts, dim=0).transpose(0, 1)


def _pad_last(parts: list[Tensor]) -> list[Tensor]:
    width = max(p.shape[-1] for p in parts)
    return [torch.nn.functional.pad(p, (0, width - p.shape[-1])) for p in parts]


class PairLogps(ResponseStats):
    """Statistics of B preference pairs from two (B,) tensors: the K = 2 case of :class:`ResponseStats`.

    Kept so that code calling a loss on chosen and rejected tensors works unchanged; the result is a
    ``ResponseStats`` with ``logps[:, 0] = chosen`` and ``logps[:, 1] = rejected``.

    Args:
        chosen: (B,) log-probs of the chosen responses, summed over response tokens.
        rejected: (B,) the same for the rejected responses.
        chosen_tokens: (B,) number of response tokens of each chosen response (float or long).
        rejected_tokens: (B,) the same for the rejected responses.
        chosen_token_logps: (B, T) per-token log-probs of the chosen responses, 0 where masked.
        rejected_token_logps: (B, T') the same for the rejected responses (zero-padded to a common
            width with the chosen ones).
        chosen_mask: (B, T) bool or 0/1, true on response tokens of ``chosen_token_logps``.
        rejected_mask: (B, T') the same for ``rejected_token_logps``.
        **side: side information, as in :class:`ResponseStats`.
    """

    def __init__(
        self,
        chosen: Tensor,
        rejected: Tensor,
        chosen_tokens: Tensor,
        rejected_tokens: Tensor,
        chosen_token_logps: Tensor | None = None,
        rejected_token_logps: Tensor | None = None,
        chosen_mask: Tensor | None = None,
        rejected_mask: Tensor | None = None,
        **side: Tensor | None,
    ) -> None:
        token_logps = mask = None
        if chosen_token_logps is not None and rejected_token_logps is not None:
            token_logps = _stack_columns(_pad_last([chosen_token_logps, rejected_token_logps]))
        if chosen_mask is not None and rejected_mask is not None:
            mask = _stack_columns(_pad_last([chosen_mask, rejected_mask]))
        tokens = [chosen_tokens, rejected_tokens]
        if tokens[0].dtype != tokens[1].dtype:
            tokens = [t.to(torch.promote_types(tokens[0].dtype, tokens[1].dtype)) for t in tokens]
        super().__init__(_stack_columns([chosen, rejected]), _stack_columns(tokens), token_logps, mask, **side)


@dataclass(eq=False)
class LossOutput:
    """What a preference loss returns.

    Attributes:
        losses: (B,) per-example loss; the training module reduces it with ``.mean()``.
        rewards: (B, K) implicit reward of each response (detached), logged as ``rewards/chosen``
            (response 0) and ``rewards/rejected`` (response 1; the mean of responses 1..K-1 when
            K > 2); margins and accuracies are derived from them.
        metrics: extra (scalar or (B,)) figures the loss reports, logged as ``<stage>/<name>``
            after a mean; detached.
    """

    losses: Tensor
    rewards: Tensor
    metrics: dict[str, Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Rewards are metrics: never let a caller backpropagate through them by accident.
        self.rewards = self.rewards.detach()
        self.metrics = {k: v.detach() for k, v in self.metrics.items()}
        if self.rewards.dim() != 2:
            raise ValueError(f"rewards must be (B, K), got {tuple(self.rewards.shape)}")

    @classmethod
    def pair(cls, losses: Tensor, chosen_rewards: Tensor, rejected_rewards: Tensor, **metrics: Tensor) -> LossOutput:
        """The output of a pair loss from (B,) chosen and rejected rewards."""
        return cls(losses, _stack_columns([chosen_rewards.detach(), rejected_rewards.detach()]), metrics)

    @property
    def chosen_rewards(self) -> Tensor:
        """(B,) rewards of response 0."""
        return self.rewards[:, 0]

    @property
    def rejected_rewards(self) -> Tensor:
        """(B,) rewards of response 1."""
        return self.rewards[:, 1]


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
    Subclasses set the capability flags below (as class attributes, or properties when they depend
    on the configuration) and implement :meth:`forward`; calling the loss checks its inputs first,
    so callers ask the flags instead of testing a loss's type.

    Attributes:
        requires_reference: whether the loss needs the reference model's statistics.
        requires_token_logps: whether the loss needs per-token log-probs and masks.
        max_group_size: the most responses per group the loss reads: 2 for a pair loss (responses
            0 and 1), None for a list loss that reads all K.
        requires_scores: whether the loss needs per-response ``scores``.
        requires_desirable_labels: whether the loss needs the per-group ``desirable`` labels of
            unpaired feedback (KTO, BCO).
        requires_token_kl: whether the loss needs the per-token full-vocabulary KL (``token_kl`` on the
            policy's statistics; TDPO, SparsePO): the module then runs both models to their hidden states.
        learned_token_masks: whether the training module must build and train a token mask network
            whose per-token masks reach the loss as ``token_masks`` on the reference's statistics
            (SparsePO's learned masks, ``mmpo.token_masks``).
        stateful: whether the loss keeps running statistics across steps (BCO's reward mean, LCPO's
            label-noise estimate). Such a loss updates them in its forward only while ``training`` is
            true (the module sets it per step: training steps only), reduces what it adds over ranks with
            :meth:`gather`, and returns them from :meth:`state_dict`, which the module writes into every
            Lightning checkpoint and restores on resume.
        gathers_per_call: how many times one call reduces over ranks with :meth:`gather` (0 for most losses);
            the default :meth:`idle` makes that many calls with empty tensors.
    """

    requires_reference: bool = True
    requires_token_logps: bool = False
    max_group_size: int | None = 2
    requires_scores: bool = False
    requires_desirable_labels: bool = False
    requires_token_kl: bool = False
    learned_token_masks: bool = False
    stateful: bool = False
    gathers_per_call: int = 0
    training: bool = True
    _gather_fn: Callable[[Tensor], Tensor] | None = None

    # -- running state (stateful losses); the defaults serve the stateless ones -----------------------
    def train(self, mode: bool = True) -> PreferenceLoss:
        """Set whether the following calls are training steps (which may update running statistics)."""
        self.training = mode
        return self

    def state_dict(self) -> dict[str, Any]:
        """The running statistics to checkpoint (empty for a stateless loss)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        if state:
            raise ValueError(f"{type(self).__name__} keeps no state, but a checkpoint holds {sorted(state)}")

    def idle(self, device: torch.device | str) -> None:
        """Take part in a call's reductions over ranks without data (a rank whose records were all skipped).

        Called by the module on such a rank in place of the loss. A loss that calls :meth:`gather` makes
        the same calls here with empty tensors, in the same order (the default: ``gathers_per_call`` calls),
        and a stateful one updates its state from the other ranks' values as its call would.
        """
        for _ in range(self.gathers_per_call):
            self.gather(torch.empty(0, dtype=torch.float64, device=device))

    def set_gather(self, fn: Callable[[Tensor], Tensor] | None) -> None:
        """Install how :meth:`gather` reaches the other ranks (the module does this; None: one process)."""
        self._gather_fn = fn

    def gather(self, values: Tensor) -> Tensor:
        """The (N,) ``values`` of every rank concatenated in rank order (N may differ per rank).

        In one process that is ``values`` itself.

        A loss that reduces a batch statistic over ranks (KTO's reference point, a stateful loss's running
        statistics) calls this on 1-D tensors, and makes :meth:`idle` make the same calls with empty ones,
        so that every rank computes the same value.
        """
        if values.dim() != 1:
            raise ValueError(f"gather takes 1-D tensors, got {tuple(values.shape)}")
        return values if self._gather_fn is None else self._gather_fn(values)

    def __call__(self, policy: ResponseStats, reference: ResponseStats | None = None) -> LossOutput:
        """Compute the loss of B groups (pairs when K = 2).

        Args:
            policy: statistics of the policy being trained (carries the gradient) and the batch's
                side information.
            reference: statistics of the frozen reference model, or None for losses that do not
                need one (reference-free losses ignore it when given).

        Returns:
            Per-example losses, detached (B, K) rewards and any extra metrics.

        Raises:
            ValueError: the loss needs a reference and got None, needs per-token log-probs or scores
                the policy statistics lack, or reads fewer responses than the groups hold.
        """
        name = type(self).__name__
        if self.requires_reference and reference is None:
            raise ValueError(
                f"{name} needs reference log-probs, but reference=None was given; compute them with the "
                "reference model (or cache them), or pick a reference-free loss such as SimPOLoss."
            )
        if self.requires_token_logps and not policy.has_token_logps:
            raise ValueError(
                f"{name} needs per-token log-probs: give token_logps and mask (chosen_token_logps/"
                "rejected_token_logps and masks for a PairLogps) on the policy statistics."
            )
        k = policy.group_size
        if self.max_group_size is not None and k > self.max_group_size:
            raise ValueError(
                f"{name} compares {self.max_group_size} responses, but the groups hold {k}: pick a list loss "
                "or serve the data as pairs"
            )
        if reference is not None and reference.logps.shape != policy.logps.shape:
            raise ValueError(
                f"policy statistics are {tuple(policy.logps.shape)} but reference ones {tuple(reference.logps.shape)}"
            )
        if self.requires_scores and policy.scores is None:
            raise ValueError(f"{name} needs per-response scores (B, K); the data carries none")
        if self.requires_desirable_labels and policy.desirable is None:
            raise ValueError(
                f"{name} needs per-group 'desirable' labels (unpaired feedback); the data carries none: "
                "serve unpaired records (datamodules.UnpairedPreferenceDataModule)"
            )
        if self.requires_token_kl and policy.token_kl is None:
            raise ValueError(
                f"{name} needs the per-token KL over the full vocabulary (token_kl on the policy statistics), "
                "computed from both models' hidden states (mmpo.token_kl.token_kl_statistics); cached reference "
                "log-probs cannot give it"
            )
        return self.forward(policy, reference)

    @abstractmethod
    def forward(self, policy: ResponseStats, reference: ResponseStats | None) -> LossOutput:
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
