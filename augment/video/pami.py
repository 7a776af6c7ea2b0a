"""PaMi-VDPO's close-to-far choice of rejected clips from a candidate set: pure functions on scores.

PaMi-VDPO (video DPO without preference annotation) keeps the response y fixed and contrasts the
original clip (chosen) with augmented clips (rejected). Each sample has K augmented candidates, each
with a prompt-aware distinctness score, higher = more distinct from the original *for this prompt*
(by default the mean per-token Jensen–Shannon divergence of the reference model's next-token
distributions over y, in nats; :func:`mmpo.divergence.chunked_js_divergence` computes it). Early in
training the rejected clips are the closest candidates that are still distinct enough; as training
goes on the choice moves to the most distinct ones. Candidates whose score is below a threshold are
judged semantically identical for the prompt (reversing a clip does not change "what colour is the
ball"): false rejections, down-weighted.

The paper's exact schedule is not published (only its abstract was read), so every choice here is
a parameter, and the defaults are mmpo's:

* Candidates are ranked by score, ascending (ties: lower candidate index first). Those with
  score ≥ ``min_distinct`` are *eligible*; they are the top ``n_e`` of the ranking.
* A target quantile q(progress) moves from ``start`` to ``end`` over the first ``ramp_fraction``
  of training (linearly, or along a half cosine) and stays at ``end`` after.
* The M kept candidates are a window of M consecutive ranks centred on rank
  ``(K − n_e) + q·(n_e − 1)`` (quantile q among the eligible), shifted to stay inside the eligible
  ranks, and to the top M when fewer than M are eligible (the most distinct of the rest fill up).
* Weight 1 for a kept candidate with score ≥ ``identical_threshold``, ``identical_weight`` below it.

Only torch is imported: usable without ``mmpo``. Nothing syncs with the device: the window is
computed with tensor ops.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

__all__ = ["CandidateSelection", "CloseToFar", "Ramp", "close_to_far_target", "select_candidates"]

Ramp = Literal["linear", "cosine"]


def _check_unit(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:  # also false for NaN
        raise ValueError(f"{name} must be in [0, 1], got {value!r}")


def close_to_far_target(
    progress: float, start: float = 0.0, end: float = 1.0, ramp_fraction: float = 0.5, ramp: Ramp = "linear"
) -> float:
    """The target quantile among the eligible candidates at a point of training.

    Args:
        progress: share of training done, in [0, 1] (e.g. step / total steps).
        start: quantile at progress 0 (0 = the closest eligible candidate).
        end: quantile from ``ramp_fraction`` on (1 = the most distinct candidate).
        ramp_fraction: share of training over which the quantile moves, in (0, 1].
        ramp: "linear", or "cosine" for the half cosine (1 − cos(πx))/2, which lingers at both ends.

    Returns:
        q in [0, 1].

    Raises:
        ValueError: progress, start or end outside [0, 1], ramp_fraction outside (0, 1], or an unknown ramp.
    """
    _check_unit("progress", progress)
    _check_unit("start", start)
    _check_unit("end", end)
    if not 0.0 < ramp_fraction <= 1.0:
        raise ValueError(f"ramp_fraction must be in (0, 1], got {ramp_fraction!r}")
    x = min(progress / ramp_fraction, 1.0)
    if ramp == "cosine":
        x = 0.5 * (1.0 - math.cos(math.pi * x))
    elif ramp != "linear":
        raise ValueError(f"ramp must be 'linear' or 'cosine', got {ramp!r}")
    return start + (end - start) * x


@dataclass(frozen=True, eq=False)
class CandidateSelection:
    """The candidates kept for each sample, their loss weights and what to log about them.

    Attributes:
        indices: (B, M) long, candidate indices in [0, K), closest first.
        weights: (B, M) per-candidate loss weights: 1, or ``identical_weight`` for a candidate judged
            semantically identical.
        scores: (B, M) distinctness scores of the kept candidates.
        identical: (B, K) bool, true for every candidate (kept or not) judged identical.
        target: the target quantile the selection used.
    """

    indices: Tensor
    weights: Tensor
    scores: Tensor
    identical: Tensor
    target: float

    @property
    def num_identical(self) -> Tensor:
        """(B,) long, candidates of each sample judged identical, out of K."""
        return self.identical.sum(-1)

    @property
    def selected_identical(self) -> Tensor:
        """(B, M) bool, kept candidates judged identical."""
        return self.identical.gather(-1, self.indices)

    @property
    def all_identical(self) -> Tensor:
        """(B,) bool, samples whose kept candidates are all judged identical (all weighted ``identical_weight``)."""
        return self.selected_identical.all(-1)

    def group_weights(self) -> Tensor:
        """(B, 1 + M) weights in a group's layout: the original clip first (weight 1), then the kept candidates."""
        return torch.cat([torch.ones_like(self.weights[:, :1]), self.weights], dim=-1)

    def summary(self) -> dict[str, Tensor]:
        """Scalar figures for a logger: mean kept score, shares judged identical, the target quantile."""
        return {
            "target_quantile": torch.tensor(self.target),
            "selected_score": self.scores.float().mean(),
            "identical_share": self.identical.float().mean(),
            "selected_identical_share": self.selected_identical.float().mean(),
            "all_identical_share": self.all_identical.float().mean(),
        }


def select_candidates(
    scores: Tensor,
    target: float,
    num_keep: int,
    min_distinct: float,
    identical_threshold: float,
    identical_weight: float = 0.0,
) -> CandidateSelection:
    """Keep ``num_keep`` candidates per sample around a target quantile of the eligible ones.

    See the module docstring for the rule. A NaN score (a failed measurement) counts as −inf: never
    eligible, judged identical.

    Args:
        scores: (B, K) distinctness of each candidate from the original clip, higher = more distinct.
        target: quantile in [0, 1] among the eligible candidates (0 = closest, 1 = most distinct).
        num_keep: M, candidates kept per sample, 1 ≤ M ≤ K.
        min_distinct: the lowest score a candidate may have to be chosen while enough others qualify.
        identical_threshold: candidates scoring below it are judged semantically identical.
        identical_weight: weight of a kept candidate judged identical (0 drops it from the loss).

    Returns:
        The selection; a sample whose kept candidates are all judged identical has every weight equal
        to ``identical_weight`` (see :attr:`CandidateSelection.all_identical`).

    Raises:
        ValueError: scores not (B, K), M outside [1, K], or target outside [0, 1].
    """
    if scores.dim() != 2:
        raise ValueError(f"scores must be (B, K), got {tuple(scores.shape)}")
    k = scores.shape[1]
    if not 1 <= num_keep <= k:
        raise ValueError(f"num_keep must be in [1, K={k}], got {num_keep}")
    _check_unit("target", target)
    scores = torch.nan_to_num(scores, nan=-math.inf)
    # stable ascending sort: equal scores keep the candidate order, so ties break by index
    order = torch.argsort(scores, dim=-1, stable=True)  # (B, K) candidate index at each rank
    eligible = (scores >= min_distinct).sum(-1)  # (B,) n_e, the top n_e ranks
    n_e = eligible.to(torch.float32)
    # target rank among the eligible; with none eligible, the most distinct rank
    centre = torch.where(eligible > 0, (k - n_e) + target * (n_e - 1.0), torch.full_like(n_e, k - 1.0))  # (B,)
    first = torch.floor(centre - (num_keep - 1) / 2.0 + 0.5).long()  # (B,) round half up: deterministic
    lowest = k - torch.clamp(eligible, min=num_keep)  # stay inside the eligible ranks while M fit there
    first = torch.clamp(first, min=lowest, max=torch.full_like(lowest, k - num_keep))
    ranks = first.unsqueeze(-1) + torch.arange(num_keep, device=scores.device)  # (B, M)
    indices = order.gather(-1, ranks)  # (B, M) closest first
    kept = scores.gather(-1, indices)  # (B, M)
    identical = scores < identical_threshold  # (B, K)
    one = torch.ones((), dtype=kept.dtype, device=kept.device)
    weights = torch.where(identical.gather(-1, indices), one * identical_weight, one)  # (B, M)
    return CandidateSelection(indices, weights, kept, identical, float(target))


@dataclass(frozen=True)
class CloseToFar:
    """The close-to-far schedule of PaMi-VDPO: a typed config, called with scores and training progress.

    Defaults are mmpo's choices (the paper's are not published). The thresholds are in the units of
    the scores: for mean per-token JS divergence, nats in [0, ln 2 ≈ 0.693]; calibrate them on the
    logged score distribution (:meth:`CandidateSelection.summary`) of a few batches.

    Args:
        start: target quantile at the start of training (0 = the closest eligible candidate).
        end: target quantile once the ramp is over (1 = the most distinct candidate).
        ramp_fraction: share of training over which the quantile moves from ``start`` to ``end``, in (0, 1].
        ramp: "linear" or "cosine" (a half cosine, slow at both ends).
        identical_threshold: scores below it mark a candidate as semantically identical for the prompt
            (a false rejection). 1e-3 nats by default; 0 judges nothing identical.
        min_distinct: the lowest score a candidate needs to be eligible; None uses ``identical_threshold``.
            Must be ≥ ``identical_threshold`` so that an eligible candidate is never judged identical.
        identical_weight: loss weight of a kept candidate judged identical, in [0, 1]. 0 (the default)
            drops it; a sample whose kept candidates are all identical then has all-zero weights and
            contributes no loss.
    """

    start: float = 0.0
    end: float = 1.0
    ramp_fraction: float = 0.5
    ramp: Ramp = "linear"
    identical_threshold: float = 1e-3
    min_distinct: float | None = None
    identical_weight: float = 0.0

    def __post_init__(self) -> None:
        close_to_far_target(0.0, self.start, self.end, self.ramp_fraction, self.ramp)  # validates them
        _check_unit("identical_weight", self.identical_weight)
        if math.isnan(self.identical_threshold):
            raise ValueError("identical_threshold must be a number, got NaN")
        if self.min_distinct is not None and not self.min_distinct >= self.identical_threshold:
            raise ValueError(
                f"min_distinct ({self.min_distinct}) must be >= identical_threshold ({self.identical_threshold})"
            )

    @property
    def eligible_threshold(self) -> float:
        """``min_distinct``, or ``identical_threshold`` when it is None."""
        return self.identical_threshold if self.min_distinct is None else self.min_distinct

    def target(self, progress: float) -> float:
        """The target quantile at ``progress`` (share of training done, in [0, 1])."""
        return close_to_far_target(progress, self.start, self.end, self.ramp_fraction, self.ramp)

    def __call__(self, scores: Tensor, progress: float, num_keep: int) -> CandidateSelection:
        """Keep ``num_keep`` of the K candidates of each sample.

        Args:
            scores: (B, K) distinctness scores, higher = more distinct from the original.
            progress: share of training done, in [0, 1].
            num_keep: M, candidates kept per sample, 1 ≤ M ≤ K.

        Returns:
            The selection (indices, weights, kept scores, identical mask, target).
        """
        return select_candidates(
            scores,
            self.target(progress),
            num_keep,
            self.eligible_threshold,
            self.identical_threshold,
            self.identical_weight,
        )
