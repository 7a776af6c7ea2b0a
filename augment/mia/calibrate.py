"""Build-level decisions of MIA-DPO's selection: calibrated thresholds, the filter ablation, yes/no balance.

Liu et al., "MIA-DPO" (2024), attention-aware selection: an answer whose target-attention ratio is at
or below a per-format, per-count threshold is a hallucination worth training on
(:func:`augment.mia.select.select_rejected`). The paper's thresholds (sequence 0.8/0.7/0.6/0.6 for
2/3/4/5 images, …) were set for LLaVA-7B; a small model can sit entirely below them, and then the
filter decides nothing. The decisions here need every answer of a build, so the builder takes them
after generation (:mod:`augment.mia.build`):

- **calibrated threshold** (``attention_quantile`` q): per format and image count, the threshold is
  the q-quantile (linear interpolation, as ``torch.quantile``) of the ratios of this build's
  *candidates* (wrong answers that pass every check but attention). q = 0.5 keeps the half of the
  wrong answers that looked least at the target: the paper's rule "low attention on the target means
  hallucination", with the cut placed on this model's own scale instead of LLaVA-7B's.
- **filter** ``attention`` (the rule), ``none`` (every candidate kept: the ablation without the
  filter) or ``random_matched`` (per format and count, a seeded random subset of the candidates as
  large as the attention-filtered set: what the filter buys over keeping fewer pairs).
- **yes/no balance**: among the kept pairs whose chosen answer is "yes …" or "no …", the larger
  side is subsampled (seeded, per format and count) to the size of the smaller one, so the
  preference stage does not learn to answer one word to everything.

Every function is pure: lists in, decisions out.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from augment.mia.select import FILTERS, SelectionConfig, normalise_answer

__all__ = [
    "FILTERS",
    "Candidate",
    "answer_status",
    "calibrated_thresholds",
    "final_selection",
    "group_key",
    "ratio_auc",
    "ratio_distribution",
    "yes_no",
]


def group_key(fmt: str, n_images: int) -> str:
    """``"sequence/2"``: how ratios, thresholds and histograms are keyed by format and image count."""
    return f"{fmt}/{int(n_images)}"


def answer_status(response: str, ground_truth: str) -> str:
    """``right`` (equal to the truth after normalising), ``wrong`` (non-empty, different) or ``empty``."""
    response_n = normalise_answer(response)
    if not response_n or not normalise_answer(ground_truth):
        return "empty"
    return "right" if response_n == normalise_answer(ground_truth) else "wrong"


def yes_no(text: str) -> bool | None:
    """True when an answer's first word is "yes", False for "no", None otherwise (after normalising)."""
    words = normalise_answer(text).replace(",", " ").split()
    first = words[0] if words else ""
    return True if first == "yes" else False if first == "no" else None


@dataclass(frozen=True)
class Candidate:
    """A wrong answer that passed every check but attention: format, image count, ratio and the chosen answer."""

    fmt: str
    n_images: int
    ratio: float
    chosen: str = ""


def calibrated_thresholds(candidates: Sequence[Candidate], quantile: float) -> dict[str, float]:
    """Per ``group_key``, the ``quantile`` of the candidates' ratios (NaN ratios left out; a group of NaN only: none).

    Args:
        candidates: the build's candidates.
        quantile: in (0, 1]; 1 keeps every candidate with a finite ratio.

    Returns:
        ``{"sequence/2": threshold, ...}``.
    """
    if not 0.0 < quantile <= 1.0:
        raise ValueError(f"attention_quantile must be in (0, 1], got {quantile}")
    ratios: dict[str, list[float]] = {}
    for c in candidates:
        if not math.isnan(c.ratio):
            ratios.setdefault(group_key(c.fmt, c.n_images), []).append(c.ratio)
    return {key: float(torch.quantile(torch.tensor(v, dtype=torch.float64), quantile)) for key, v in ratios.items()}


def _subsample(indices: list[int], size: int, rng: random.Random) -> set[int]:
    return set(rng.sample(indices, size)) if size < len(indices) else set(indices)


def final_selection(
    candidates: Sequence[Candidate], config: SelectionConfig, seed: int = 0
) -> tuple[list[tuple[bool, str]], dict[str, float | None]]:
    """Decide every candidate of a build: attention rule (paper or calibrated), filter, then yes/no balance.

    Args:
        candidates: the build's candidates, in build order.
        config: ``attention_quantile``, ``filter`` and ``balance_yes_no`` (see :class:`SelectionConfig`).
        seed: seed of the random subsets (``random_matched``, the yes/no balance).

    Returns:
        ``(decisions, thresholds)``: per candidate ``(kept, reason)`` with reason ``""``,
        ``attention_above_threshold``, ``not_in_random_subset`` or ``yes_no_balance``; and the
        threshold applied per ``group_key`` (None where the format and count have none).
    """
    keys = [group_key(c.fmt, c.n_images) for c in candidates]
    if config.attention_quantile is not None:
        calibrated = calibrated_thresholds(candidates, config.attention_quantile)
        thresholds: dict[str, float | None] = {k: calibrated.get(k) for k in dict.fromkeys(keys)}
    else:
        thresholds = {k: config.threshold(c.fmt, c.n_images) for k, c in zip(keys, candidates, strict=True)}
    below = [
        thresholds[k] is not None and not math.isnan(c.ratio) and c.ratio <= thresholds[k]
        for k, c in zip(keys, candidates, strict=True)
    ]
    by_group: dict[str, list[int]] = {}
    for i, k in enumerate(keys):
        by_group.setdefault(k, []).append(i)
    if config.filter == "attention":
        decisions = [(True, "") if b else (False, "attention_above_threshold") for b in below]
    elif config.filter == "none":
        decisions = [(True, "")] * len(candidates)
    elif config.filter == "random_matched":
        chosen: set[int] = set()
        for k, members in by_group.items():
            rng = random.Random(f"mmpo-mia-dpo/random-matched/{seed}/{k}")
            chosen |= _subsample(members, sum(below[i] for i in members), rng)
        decisions = [(True, "") if i in chosen else (False, "not_in_random_subset") for i in range(len(candidates))]
    else:
        raise ValueError(f"unknown filter {config.filter!r}; expected one of {FILTERS}")
    if config.balance_yes_no:
        decisions = list(decisions)
        for k, members in by_group.items():
            sides: dict[bool, list[int]] = {True: [], False: []}
            for i in members:
                answer = yes_no(candidates[i].chosen)
                if decisions[i][0] and answer is not None:
                    sides[answer].append(i)
            size = min(len(sides[True]), len(sides[False]))
            rng = random.Random(f"mmpo-mia-dpo/yes-no-balance/{seed}/{k}")
            for side in (True, False):
                keep = _subsample(sides[side], size, rng)
                for i in sides[side]:
                    if i not in keep:
                        decisions[i] = (False, "yes_no_balance")
    return decisions, thresholds


def ratio_distribution(decisions: Sequence[dict]) -> dict[str, dict[str, list[float]]]:
    """``{group_key: {"right": [...], "wrong": [...]}}`` from the builder's decision lines (finite ratios only).

    Each line needs ``format``, ``n_images``, ``ratio`` (None for NaN), ``answer`` and ``ground_truth``;
    empty answers are left out.
    """
    out: dict[str, dict[str, list[float]]] = {}
    for d in decisions:
        status = answer_status(d["answer"], d["ground_truth"])
        if status == "empty" or d["ratio"] is None:
            continue
        group = out.setdefault(group_key(d["format"], d["n_images"]), {"right": [], "wrong": []})
        group[status].append(float(d["ratio"]))
    return out


def ratio_auc(wrong: Sequence[float], right: Sequence[float]) -> float | None:
    """P(a wrong answer's ratio < a right answer's ratio), ties counted half (the Mann–Whitney AUC).

    0.5: the ratio does not tell wrong from right; 1: every wrong answer looked at the target less
    than every right one (the filter's premise). None when either side is empty.
    """
    if not wrong or not right:
        return None
    w = torch.tensor(list(wrong), dtype=torch.float64)[:, None]
    r = torch.tensor(list(right), dtype=torch.float64)[None, :]
    return float(((w < r).double() + 0.5 * (w == r).double()).mean())
