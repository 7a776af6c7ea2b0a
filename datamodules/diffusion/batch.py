"""The batch of diffusion preference data and its collator: B groups of K images, best first, response-major rows."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from einops import rearrange
from torch import Tensor

from datamodules.diffusion.latent_cache import TEXT_PREFIX

__all__ = ["DiffusionPreferenceBatch", "DiffusionPreferenceCollator", "TrajectoryStep"]


@dataclass
class TrajectoryStep:
    """One recorded denoising step of every row (D3PO): the batch's ``latents`` are the rows' x_t.

    Attributes:
        next_latents: (K·B, c, h, w) the sampled x_{t'} of each row, same row order as ``latents``.
        timesteps: (B,) long, t of each group (both trajectories of a group at the same step).
        prev_timesteps: (B,) long, t'.
        eta: the sampler's η (> 0), the same for the whole batch.
        guidance_scale: the sampler's classifier-free guidance scale (1: none), the same for the whole batch.
    """

    next_latents: Tensor
    timesteps: Tensor
    prev_timesteps: Tensor
    eta: float
    guidance_scale: float

    def map(self, fn: Callable[[Tensor], Tensor]) -> TrajectoryStep:
        tensors = (fn(self.next_latents), fn(self.timesteps), fn(self.prev_timesteps))
        return TrajectoryStep(*tensors, self.eta, self.guidance_scale)


@dataclass
class DiffusionPreferenceBatch:
    """A batch of B groups of K images of one caption, best first: pairs (K = 2) or ranked lists (K > 2).

    Rows are response-major, as in :class:`~datamodules.core.batch.PreferenceBatch`: row ``k·B + b``
    holds image k of group b, so with pairs rows ``0..B-1`` hold the preferred images and rows
    ``B..2B-1`` the dispreferred ones of the same pairs in the same order. The caption conditions
    every row of a group: it is encoded once per group and repeated for its K rows, unless
    ``image_captions`` gives each image its own caption (DCPO). Like a ``PreferenceBatch`` it answers
    ``num_groups``, ``group_size``, ``skipped``, ``truncated`` and :meth:`side_info`, so the training
    module reads both kinds alike.

    Attributes:
        pixel_values: (K·B, 3, R, R) float in [-1, 1]; None when read from a latent cache.
        captions: the B captions.
        label: (B,) float, preference strength of the winner in [0.5, 1]: 1 for a hard label, 0.5
            for a kept tie, in between for a soft label (SmPO-style losses).
        scores: (B, K) scores as given in the data, best first (pairs: winner, loser), NaN rows for
            pairs given by a label only; None when no group of the batch had scores.
        scores_complete: every pair of the batch gave scores (no NaN row), decided by the collator.
        ids: the B record ids.
        skipped: records dropped while building this batch (``on_bad_sample: skip``).
        latents: (K·B, c, h, w) cached latents (same row order), when a cache is used.
        text_embeds: (B, L, D) cached text embeddings, when the cache holds them.
        text_extra: further cached text-encoder outputs by name, each (B, ...) (e.g. SDXL's pooled
            embeddings), when the cache's ``encode_text`` returned a mapping.
        noise_draw: the (t, ε) of each group, set by a diffusion backbone on its first pass over this
            batch object so that later passes (the reference's) denoise at the same noise; None from
            the collator. Copies made by :meth:`to` and :meth:`pin_memory` start without one.
        image_captions: each image's own caption, ``image_captions[k][b]`` for image k of group b
            (DCPO: the preferred image's caption, then the dispreferred image's); None when every image
            of a group shares the group's caption.
        caption_dropped: (B,) bool, the groups that train unconditionally (caption dropout for
            classifier-free guidance): the backbone conditions them on the empty caption; None when
            none is dropped.
        segment_labels: (B, S) float, per temporal segment 1 where image 0 (the preferred) is better, −1 where
            image 1 is, 0 neither (DenseDPO); None when the records give none.
        condition: (B, c', h, w) each group's conditioning tensor at latent resolution (the records'
            ``condition`` files), which the backbone concatenates to every row's noisy latents as extra
            input channels; None when the records name none.
        trajectory: one recorded sampling step per row (D3PO, ``DiffusionTrajectoryDataModule``): ``latents``
            hold each row's x_t, and the backbone's statistic is the step's log-density instead of the
            denoising error; None for image data.
    """

    pixel_values: Tensor | None
    captions: list[str]
    label: Tensor
    scores: Tensor | None = None
    scores_complete: bool = False
    ids: list[str] = field(default_factory=list)
    skipped: int = 0
    latents: Tensor | None = None
    text_embeds: Tensor | None = None
    text_extra: dict[str, Tensor] = field(default_factory=dict)
    noise_draw: Any = None
    image_captions: list[list[str]] | None = None
    caption_dropped: Tensor | None = None
    condition: Tensor | None = None
    segment_labels: Tensor | None = None
    trajectory: TrajectoryStep | None = None

    @property
    def num_pairs(self) -> int:
        return self.label.shape[0]

    @property
    def num_groups(self) -> int:
        """B, the groups (pairs) of the batch."""
        return self.label.shape[0]

    @property
    def group_size(self) -> int:
        """K, images per group: 2 for pairs (winner, loser), the list length for ranked lists."""
        rows = self.pixel_values if self.pixel_values is not None else self.latents
        if rows is None or self.num_groups == 0:
            return 2
        return rows.shape[0] // self.num_groups

    @property
    def truncated(self) -> int:
        """Responses shortened to fit: none, images are never cut (captions are cut by the text encoder)."""
        return 0

    def side_info(self) -> dict[str, Tensor]:
        """Side information for the loss, by :data:`~datamodules.core.batch.SIDE_FIELDS` name.

        ``soft_labels`` (B,) is ``label``, the probability that image 0 (the winner) is preferred;
        ``scores`` (B, K) is present when every pair of the batch has scores; ``segment_labels`` (B, S) when
        the records give them (DenseDPO).
        """
        side = {"soft_labels": self.label}
        if self.segment_labels is not None:
            side["segment_labels"] = self.segment_labels
        if self.scores is not None and self.scores_complete:  # known on the host: no device read per step
            side["scores"] = self.scores
        return side

    def _map(self, fn: Callable[[Tensor], Tensor]) -> DiffusionPreferenceBatch:
        def move(t: Tensor | None) -> Tensor | None:
            return None if t is None else fn(t)

        return DiffusionPreferenceBatch(
            pixel_values=move(self.pixel_values),
            captions=list(self.captions),
            label=fn(self.label),
            scores=move(self.scores),
            scores_complete=self.scores_complete,
            ids=list(self.ids),
            skipped=self.skipped,
            latents=move(self.latents),
            text_embeds=move(self.text_embeds),
            text_extra={k: fn(v) for k, v in self.text_extra.items()},
            image_captions=None if self.image_captions is None else [list(c) for c in self.image_captions],
            caption_dropped=move(self.caption_dropped),
            condition=move(self.condition),
            segment_labels=move(self.segment_labels),
            trajectory=None if self.trajectory is None else self.trajectory.map(fn),
        )

    def to(self, device: torch.device | str, non_blocking: bool | None = None) -> DiffusionPreferenceBatch:
        """The batch on ``device``; ``non_blocking`` (default: when the batch is in page-locked
        memory) queues the copies instead of waiting for them."""
        if non_blocking is None:
            non_blocking = self.label.is_pinned()
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> DiffusionPreferenceBatch:
        """The batch in page-locked memory (the DataLoader calls this with ``pin_memory=True``)."""
        return self._map(lambda t: t.pin_memory())

    @classmethod
    def empty(cls, skipped: int = 0) -> DiffusionPreferenceBatch:
        """A batch with no pairs (every record of it was skipped)."""
        return cls(pixel_values=None, captions=[], label=torch.zeros(0), skipped=skipped)


def _stack(samples: list[dict[str, Any]], get: Any, what: str) -> Tensor:
    try:
        return torch.stack([get(s) for s in samples])
    except RuntimeError as e:
        ids = [s["id"] for s in samples]
        raise ValueError(
            f"cannot batch {what} of records {ids}: shapes differ ({e}); cache entries must share one shape "
            "(pad text embeddings to one length, encode images at one resolution)"
        ) from e


class DiffusionPreferenceCollator:
    """Turn samples of :class:`DiffusionPreferenceDataset` into a :class:`DiffusionPreferenceBatch`."""

    def __call__(self, samples: list[dict[str, Any] | None]) -> DiffusionPreferenceBatch:
        kept = [s for s in samples if s is not None]
        skipped = len(samples) - len(kept)
        if not kept:
            return DiffusionPreferenceBatch.empty(skipped=skipped)

        def winners_then_losers(t: Tensor) -> Tensor:  # (B, K, ...) -> (K·B, ...)
            return rearrange(t, "b k ... -> (k b) ...")

        rows = "pixel_values" if "pixel_values" in kept[0] else "latents"
        sizes = [s[rows].shape[0] for s in kept]  # K of each group
        if len(set(sizes)) != 1:
            found = ", ".join(f"{s['id']!r}: {k}" for s, k in zip(kept, sizes, strict=True))
            raise ValueError(
                f"cannot batch groups of different sizes (images per record: {found}): every group of a batch "
                "needs the same number of images; give every ranked list of a file the same length"
            )
        with_captions = [s["image_captions"] is not None for s in kept]
        if any(with_captions) and not all(with_captions):
            raise ValueError(f"records {[s['id'] for s in kept]}: some give per-image captions and some do not")
        image_captions = None
        if all(with_captions):
            k = len(kept[0]["image_captions"])
            image_captions = [[s["image_captions"][i] for s in kept] for i in range(k)]  # (K, B)

        pixel_values = latents = text_embeds = scores = None
        text_extra: dict[str, Tensor] = {}
        if rows == "pixel_values":
            pixel_values = winners_then_losers(torch.stack([s["pixel_values"] for s in kept]))
        else:
            latents = winners_then_losers(_stack(kept, lambda s: s["latents"], "latents"))
            names = {frozenset(s["text"]) for s in kept}
            if len(names) != 1:
                raise ValueError(f"cache entries of records {[s['id'] for s in kept]} hold different text tensors")
            for name in sorted(names.pop()):
                stacked = _stack(kept, lambda s, n=name: s["text"][n], name)
                if name == "text_embeds":
                    text_embeds = stacked
                else:
                    text_extra[name.removeprefix(TEXT_PREFIX)] = stacked
        dropped = [bool(s.get("caption_dropped", False)) for s in kept]
        if any(dropped) and image_captions is not None:
            raise ValueError(
                f"records {[s['id'] for s in kept]}: caption dropout is not supported with per-image captions"
            )
        condition = None
        with_condition = ["condition" in s for s in kept]
        if any(with_condition):
            if not all(with_condition):
                found = [s["id"] for s, c in zip(kept, with_condition, strict=True) if not c]
                raise ValueError(f"records {found} name no condition while others of their batch do")
            condition = _stack(kept, lambda s: s["condition"], "condition tensors")
        segment_labels = None
        labelled = ["segment_labels" in s for s in kept]
        if any(labelled):
            lengths = {len(s["segment_labels"]) for s in kept if "segment_labels" in s}
            if not all(labelled) or len(lengths) != 1:
                found = ", ".join(f"{s['id']!r}: {len(s.get('segment_labels', ()))}" for s in kept)
                raise ValueError(f"segment_labels per record differ within a batch (segments: {found})")
            segment_labels = torch.tensor([s["segment_labels"] for s in kept], dtype=torch.float32)
        trajectory = _trajectory_step(kept)
        if any(s["scores"] is not None for s in kept):
            nan = (math.nan,) * sizes[0]
            scores = torch.tensor([s["scores"] if s["scores"] is not None else nan for s in kept], dtype=torch.float32)
        return DiffusionPreferenceBatch(
            pixel_values=pixel_values,
            captions=[s["caption"] for s in kept],
            label=torch.tensor([s["label"] for s in kept], dtype=torch.float32),
            scores=scores,
            scores_complete=all(s["scores"] is not None for s in kept),
            ids=[s["id"] for s in kept],
            skipped=skipped,
            latents=latents,
            text_embeds=text_embeds,
            text_extra=text_extra,
            image_captions=image_captions,
            caption_dropped=torch.tensor(dropped) if any(dropped) else None,
            condition=condition,
            segment_labels=segment_labels,
            trajectory=trajectory,
        )


def _trajectory_step(kept: list[dict[str, Any]]) -> TrajectoryStep | None:
    """The samples' recorded steps as one :class:`TrajectoryStep`, or None for image data."""
    steps = [s.get("trajectory") for s in kept]
    if all(step is None for step in steps):
        return None
    settings = {(s["trajectory"]["eta"], s["trajectory"]["guidance_scale"]) for s in kept if "trajectory" in s}
    if any(step is None for step in steps) or len(settings) != 1:
        found = ", ".join(f"{s['id']!r}: {s.get('trajectory', {}).get('eta')}" for s in kept)
        raise ValueError(
            f"cannot batch recorded steps of different samplers or with images (eta per record: {found}; "
            f"(eta, guidance) settings {sorted(settings)})"
        )
    eta, guidance = settings.pop()
    return TrajectoryStep(
        next_latents=rearrange(torch.stack([s["trajectory"]["next_latents"] for s in kept]), "b k ... -> (k b) ..."),
        timesteps=torch.tensor([s["trajectory"]["timestep"] for s in kept], dtype=torch.long),
        prev_timesteps=torch.tensor([s["trajectory"]["prev_timestep"] for s in kept], dtype=torch.long),
        eta=eta,
        guidance_scale=guidance,
    )
