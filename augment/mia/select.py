"""MIA-DPO attention-aware selection of rejected (hallucinated) answers: pure functions on tensors.

Liu et al., "MIA-DPO: Multi-Image Augmented Direct Preference Optimization for Large
Vision-Language Models" (2024), attention-aware selection. The base model answers the question
about the *target* image of a multi-image input (sequence, grid collage or picture-in-picture)
keeping one layer's attention (:mod:`augment.mia.generate`). At one middle layer (16 of 32 for
LLaVA-7B) its attention is averaged over heads and over the generated tokens, giving one weight per
key position. Each image (sequence), tile (grid) or region (pic-in-pic: the central inset vs the
rest; groups from :mod:`augment.mia.tokens`) gets the **mean** attention over its visual tokens, and

    ratio = mean(target group) / Σ_groups mean(group).

A ratio at or below the threshold of the format and image count means the model looked away from
the target, so its answer is kept as the *rejected* response of a pair whose *chosen* response is
the original ground-truth answer, provided the answer's perplexity exceeds ``min_perplexity``
(1.1), it differs from the ground truth after :func:`normalise_answer`, and neither is empty.

Nothing here touches a model or a file: the builder runs generation, hands the attention maps,
token log-probs and texts to these functions and writes the pairs it keeps.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

import torch
from einops import reduce
from torch import Tensor

__all__ = [
    "DEFAULT_THRESHOLDS",
    "DROP_REASONS",
    "FILTERS",
    "PIC_IN_PIC_KEY",
    "SelectionConfig",
    "SelectionSummary",
    "attention_to_tokens",
    "group_mean_attention",
    "normalise_answer",
    "perplexity",
    "resolve_layer",
    "select_rejected",
    "stack_attention_rows",
    "target_attention_ratio",
]

# The one key of the pic-in-pic table: the model sees one composed image, whose central inset is
# the target (the background companion is not counted, so builders pass n_images=1).
PIC_IN_PIC_KEY = 1

# Thresholds on the target-attention ratio, by format and by number of images (sequence: images
# in the prompt; grid: tiles in the collage; pic-in-pic: PIC_IN_PIC_KEY). From the official
# MIA-DPO data-generation code.
DEFAULT_THRESHOLDS: dict[str, dict[int, float]] = {
    "sequence": {2: 0.8, 3: 0.7, 4: 0.6, 5: 0.6},
    "grid": {2: 0.7, 3: 0.6, 4: 0.5, 6: 0.4, 9: 0.3},
    "pic_in_pic": {PIC_IN_PIC_KEY: 0.8},
}

# Why a response was not kept, in the order select_rejected checks them (the first failure wins).
DROP_REASONS: tuple[str, ...] = (
    "unknown_format_or_count",
    "empty_response",
    "empty_ground_truth",
    "matches_ground_truth",
    "low_perplexity",
    "attention_above_threshold",
)

# What a build does with the candidates (wrong answers passing every check but attention), see
# augment.mia.calibrate: apply the attention rule, keep every candidate, or keep a random subset as large.
FILTERS: tuple[str, ...] = ("attention", "none", "random_matched")

Group = Tensor | Sequence[int]


# --------------------------------------------------------------------------- configuration


def resolve_layer(num_layers: int, layer: int | None = None) -> int:
    """The decoder layer whose attention is read: ``num_layers // 2`` when ``layer`` is None.

    Args:
        num_layers: number of decoder layers of the language model (32 for LLaVA-7B → layer 16).
        layer: explicit 0-based layer; negative values count from the end, as in Python.

    Returns:
        A 0-based index into the per-layer tuple of attention maps.
    """
    if num_layers < 1:
        raise ValueError(f"num_layers must be positive, got {num_layers}")
    if layer is None:
        return num_layers // 2
    resolved = layer + num_layers if layer < 0 else layer
    if not 0 <= resolved < num_layers:
        raise ValueError(f"layer {layer} is out of range for a model with {num_layers} layers")
    return resolved


class SelectionConfig:
    """Thresholds and filters of MIA-DPO's attention-aware selection.

    Args:
        thresholds: per-format, per-count overrides merged over ``DEFAULT_THRESHOLDS``, e.g.
            ``{"grid": {4: 0.55}}`` changes only the 4-tile grid. Formats: ``sequence``, ``grid``,
            ``pic_in_pic`` (keyed by 1). A response is kept when its ratio is at or below the threshold.
        min_perplexity: a response is kept only when its perplexity is strictly above this.
        layer: 0-based decoder layer whose attention is read; None means the middle layer
            (``num_layers // 2``); negative counts from the end.
        attention_quantile: None uses ``thresholds``; q in (0, 1] replaces them, per format and
            count, by the q-quantile of the ratios of the build's wrong answers that pass every other
            check (:func:`augment.mia.calibrate.calibrated_thresholds`).
        filter: ``attention`` (the rule), ``none`` (keep every such wrong answer) or
            ``random_matched`` (a seeded random subset of them as large as the attention-filtered set).
        balance_yes_no: subsample kept pairs whose chosen answer starts with "yes" or "no" to as many
            of one as of the other, per format and count.

    The last three need the whole build (``whole_build``); with their defaults selection is per answer.
    """

    def __init__(
        self,
        thresholds: dict[str, dict[int, float]] | None = None,
        min_perplexity: float = 1.1,
        layer: int | None = None,
        attention_quantile: float | None = None,
        filter: str = "attention",
        balance_yes_no: bool = False,
    ) -> None:
        merged = {fmt: dict(table) for fmt, table in DEFAULT_THRESHOLDS.items()}
        for fmt, table in (thresholds or {}).items():
            if fmt not in merged:
                raise ValueError(f"unknown format {fmt!r}; expected one of {sorted(merged)}")
            for count, value in table.items():
                if int(count) < 1 or not 0.0 <= float(value) <= 1.0:
                    raise ValueError(f"bad threshold {fmt}[{count}] = {value}: need count ≥ 1, value in [0, 1]")
                merged[fmt][int(count)] = float(value)
        if min_perplexity < 0:
            raise ValueError(f"min_perplexity must be non-negative, got {min_perplexity}")
        if attention_quantile is not None and not 0.0 < attention_quantile <= 1.0:
            raise ValueError(f"attention_quantile must be in (0, 1], got {attention_quantile}")
        if filter not in FILTERS:
            raise ValueError(f"unknown filter {filter!r}; expected one of {FILTERS}")
        self.thresholds = merged
        self.min_perplexity = float(min_perplexity)
        self.layer = layer
        self.attention_quantile = None if attention_quantile is None else float(attention_quantile)
        self.filter = filter
        self.balance_yes_no = bool(balance_yes_no)

    @property
    def whole_build(self) -> bool:
        """Whether selection needs every answer of the build (calibrated threshold, ablation filter, balance)."""
        return self.attention_quantile is not None or self.filter != "attention" or self.balance_yes_no

    def threshold(self, fmt: str, n_images: int) -> float | None:
        """The ratio threshold for ``fmt`` with ``n_images`` images, or None when there is none."""
        return self.thresholds.get(fmt, {}).get(int(n_images))

    def resolve_layer(self, num_layers: int) -> int:
        """:func:`resolve_layer` with this config's ``layer``."""
        return resolve_layer(num_layers, self.layer)

    def __repr__(self) -> str:
        return (
            f"SelectionConfig(thresholds={self.thresholds}, min_perplexity={self.min_perplexity}, layer={self.layer}, "
            f"attention_quantile={self.attention_quantile}, filter={self.filter!r}, "
            f"balance_yes_no={self.balance_yes_no})"
        )


# --------------------------------------------------------------------------- attention maps


def stack_attention_rows(rows: Sequence[Tensor]) -> Tensor:
    """Per-step (B, heads, K_s) attention rows → (B, heads, S, K), zero-padded on the right.

    Row s is the last query row of generation step s, the one that produced token s: step 0 covers
    the whole prompt (K_0 = P keys), later steps one query over a growing cache (K_s = P + s). The
    padding leaves the prompt's (visual) key positions untouched.
    """
    if not rows:
        raise ValueError("no generation steps")
    keys = max(row.shape[-1] for row in rows)
    batch, heads = rows[0].shape[:2]
    out = rows[0].new_zeros(batch, heads, len(rows), keys)
    for s, row in enumerate(rows):
        out[:, :, s, : row.shape[-1]] = row
    return out


def attention_to_tokens(attentions: Tensor, generated_positions: Tensor | None = None) -> Tensor:
    """Attention paid to every key position, averaged over heads and over generated tokens.

    Args:
        attentions: one layer's attention weights, (heads, Q, K) or batched (B, heads, Q, K);
            Q indexes the query rows of the generated tokens (e.g. from
            :func:`stack_attention_rows`), K every key position (prompt, image tokens, answer).
        generated_positions: which query rows to average over. None: all Q rows. A bool mask of
            shape (Q,) or (B, Q), True for real generated tokens and False for padding (answers of
            different lengths in one batch). Or integer row indices, (Q',) or (B, Q') where
            negative entries are padding.

    Returns:
        (K,) or (B, K) float attention weights (float32, or float64 for float64 input). A sample
        with no generated token gives NaN.
    """
    unbatched = attentions.dim() == 3
    if unbatched:
        attentions = attentions.unsqueeze(0)
    if attentions.dim() != 4:
        raise ValueError(f"attentions must be (heads, Q, K) or (B, heads, Q, K), got {tuple(attentions.shape)}")
    attentions = attentions.to(torch.promote_types(attentions.dtype, torch.float32))
    batch, _, queries, _ = attentions.shape
    mask = _query_mask(generated_positions, batch, queries, unbatched, attentions.device)  # (B, Q)
    per_query = reduce(attentions, "b h q k -> b q k", "mean")
    # where, not a product: padded rows may hold NaN or inf, and 0 · NaN would leak into the mean
    summed = torch.where(mask[:, :, None], per_query, per_query.new_zeros(())).sum(dim=1)  # (B, K)
    out = summed / mask.sum(dim=1, keepdim=True).to(summed.dtype)  # 0 / 0 = NaN for an empty answer
    return out[0] if unbatched else out


def _query_mask(positions: Tensor | None, batch: int, queries: int, unbatched: bool, device: torch.device) -> Tensor:
    """(B, Q) bool mask of the generated query rows described by ``positions``."""
    if positions is None:
        return torch.ones(batch, queries, dtype=torch.bool, device=device)
    positions = torch.as_tensor(positions, device=device)
    if unbatched or positions.dim() == 1:
        positions = positions.reshape(1, -1).expand(batch, -1)
    if positions.dtype == torch.bool:
        if positions.shape != (batch, queries):
            raise ValueError(f"mask of shape {tuple(positions.shape)} does not match (B, Q) = {(batch, queries)}")
        return positions
    if positions.shape[0] != batch or bool((positions >= queries).any()):
        raise ValueError(f"row indices {tuple(positions.shape)} do not fit (B, Q) = {(batch, queries)}")
    mask = torch.zeros(batch, queries + 1, dtype=torch.bool, device=device)
    mask.scatter_(1, torch.where(positions < 0, queries, positions).long(), True)  # padding → spare column
    return mask[:, :queries]


# --------------------------------------------------------------------------- ratios and perplexity


def group_mean_attention(attn_over_keys: Tensor, groups: Sequence[Group]) -> Tensor:
    """Mean attention over each group's key positions.

    Args:
        attn_over_keys: (K,) attention per key position, from :func:`attention_to_tokens`.
        groups: per image/tile/region, its key positions as a long tensor, a list of ints, or a (K,) bool mask.

    Returns:
        (G,) means.
    """
    if attn_over_keys.dim() != 1:
        raise ValueError(f"expected (K,) attention, got {tuple(attn_over_keys.shape)}")
    means = []
    for g, group in enumerate(groups):
        index = torch.as_tensor(group, device=attn_over_keys.device)
        values = attn_over_keys[index] if index.dtype == torch.bool else attn_over_keys[index.long()]
        if values.numel() == 0:
            raise ValueError(f"group {g} has no key positions")
        means.append(values.mean())
    if not means:
        raise ValueError("no groups")
    return torch.stack(means)


def target_attention_ratio(attn_over_keys: Tensor, groups: Sequence[Group], target: int) -> float:
    """MIA-DPO's ratio: mean attention on the target group over the sum of every group's mean.

    Args:
        attn_over_keys: (K,) attention per key position.
        groups: key positions per image (sequence), per tile (grid) or [centre, rest] (pic-in-pic).
        target: 0-based index of the target group (``Image{k}`` is k − 1; pic-in-pic is 0).

    Returns:
        The ratio in [0, 1]; NaN when every group has zero attention.
    """
    if not 0 <= target < len(groups):
        raise ValueError(f"target {target} out of range for {len(groups)} groups")
    means = group_mean_attention(attn_over_keys, groups)
    return float(means[target] / means.sum())


def perplexity(token_logps: Tensor, mask: Tensor) -> Tensor:
    """``exp(−mean log p)`` over the answer tokens.

    Args:
        token_logps: (T,) or (B, T) log-probs of the generated tokens (padding may hold anything, even −inf).
        mask: same shape, True (or 1) on answer tokens.

    Returns:
        () or (B,) perplexities ≥ 1; NaN for an answer with no tokens.
    """
    mask = mask.bool()
    summed = torch.where(mask, token_logps, torch.zeros_like(token_logps)).sum(dim=-1)
    return torch.exp(-summed / mask.sum(dim=-1).to(summed.dtype))


# --------------------------------------------------------------------------- selection

_TRAILING = " \t\n\r.,!?;:…。"


def normalise_answer(text: str) -> str:
    """Lower-case, collapse whitespace and strip surrounding whitespace and trailing ``.,!?;:…``."""
    return " ".join(text.lower().split()).rstrip(_TRAILING)


def select_rejected(
    ratio: float | Tensor,
    ppl: float | Tensor,
    response: str,
    ground_truth: str,
    fmt: str,
    n_images: int,
    config: SelectionConfig | None = None,
) -> tuple[bool, str]:
    """Whether a generated answer is kept as a *rejected* (hallucinated) response.

    The pair it makes has the original ground-truth answer as *chosen* and ``response`` as
    *rejected*. Checks run in the order of ``DROP_REASONS``; the first failure is reported. Texts
    are compared, and tested for emptiness, after :func:`normalise_answer`. A NaN ratio or
    perplexity fails its check.

    Args:
        ratio: target-attention ratio from :func:`target_attention_ratio`.
        ppl: perplexity of the response from :func:`perplexity`.
        response: the base model's answer on the augmented input.
        ground_truth: the original answer.
        fmt: ``sequence``, ``grid`` or ``pic_in_pic``.
        n_images: images in the prompt (sequence), tiles (grid) or 1 (pic-in-pic).
        config: thresholds and minimum perplexity; None uses the defaults.

    Returns:
        ``(True, "")`` when kept, else ``(False, reason)`` with reason one of ``DROP_REASONS``.
    """
    config = config or SelectionConfig()
    threshold = config.threshold(fmt, n_images)
    if threshold is None:
        return False, "unknown_format_or_count"
    response_n, truth_n = normalise_answer(response), normalise_answer(ground_truth)
    if not response_n:
        return False, "empty_response"
    if not truth_n:
        return False, "empty_ground_truth"
    if response_n == truth_n:
        return False, "matches_ground_truth"
    ppl = float(ppl)
    if math.isnan(ppl) or not ppl > config.min_perplexity:
        return False, "low_perplexity"
    ratio = float(ratio)
    if math.isnan(ratio) or not ratio <= threshold:
        return False, "attention_above_threshold"
    return True, ""


class SelectionSummary:
    """Counts of kept and dropped responses, by drop reason and per format, for a builder's end-of-run report."""

    def __init__(self) -> None:
        self.kept: Counter[str] = Counter()
        self.dropped: dict[str, Counter[str]] = {}

    def add(self, fmt: str, kept: bool, reason: str = "") -> None:
        """Record one decision, e.g. ``summary.add(fmt, *select_rejected(...))``."""
        self.dropped.setdefault(fmt, Counter())  # the format appears even when nothing is dropped
        if kept:
            self.kept[fmt] += 1
        else:
            self.dropped[fmt][reason or "unspecified"] += 1

    def formats(self) -> list[str]:
        return sorted(self.dropped)

    def as_dict(self) -> dict:
        """``{"total", "kept", "dropped", "by_reason": {...}, "per_format": {fmt: {same keys}}}``."""
        per_format = {fmt: self._counts(self.kept[fmt], self.dropped[fmt]) for fmt in self.formats()}
        overall = sum(self.dropped.values(), Counter())
        return {**self._counts(sum(self.kept.values()), overall), "per_format": per_format}

    @staticmethod
    def _counts(kept: int, dropped: Counter[str]) -> dict:
        n_dropped = sum(dropped.values())
        by_reason = {reason: dropped[reason] for reason in (*DROP_REASONS, *sorted(set(dropped) - set(DROP_REASONS)))}
        return {"total": kept + n_dropped, "kept": kept, "dropped": n_dropped, "by_reason": by_reason}

    def __str__(self) -> str:
        """A table with one column per format plus ``all``, and one row per count and drop reason."""
        data = self.as_dict()
        columns = {**data["per_format"], "all": data}
        reasons = [r for r in data["by_reason"] if r in DROP_REASONS or data["by_reason"][r]]
        rows: list[list[str]] = [["", *columns]]
        for key in ("total", "kept", "kept %", "dropped", *reasons):
            label = f"  {key}" if key in reasons else key
            rows.append([label, *(self._cell(counts, key) for counts in columns.values())])
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        return "\n".join(
            "  ".join(
                cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths, strict=True))
            ).rstrip()
            for row in rows
        )

    @staticmethod
    def _cell(counts: dict, key: str) -> str:
        if key == "kept %":
            return f"{100.0 * counts['kept'] / counts['total']:.1f}" if counts["total"] else "-"
        return str(counts[key] if key in counts else counts["by_reason"].get(key, 0))
