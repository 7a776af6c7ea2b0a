"""The batch contract between collators and training modules."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = ["SIDE_FIELDS", "PreferenceBatch"]


# Side information a group may carry, with its shape per group: (K,) per response, () per group.
SIDE_FIELDS = ("scores", "weights", "dimension_ids", "soft_labels", "desirable", "orientations")


@dataclass
class PreferenceBatch:
    """A batch of B groups of K responses that share a prompt (K = 2: preference pairs).

    Rows are response-major: row ``k·B + b`` holds the prompt of group b followed by its response k,
    so rows ``0..B-1`` are the first responses (the chosen ones of pairs, the best of ranked lists),
    rows ``B..2B-1`` the second ones, and so on; right-padded to a common length T. N = K·B rows.

    Attributes:
        input_ids: (N, T) token ids, image placeholders already expanded by the processor.
        attention_mask: (N, T) 1 on real tokens, 0 on padding.
        response_mask: (N, T) bool, True where the token at that position belongs to the response,
            i.e. where its log-probability (predicted from position t-1) counts.
        prompt_lengths: (N,) number of prompt tokens at the start of each row.
        media: processor outputs for the images and videos. When ``shared_prompt`` is True they are
            stored once per group (for LLaVA ``pixel_values`` (N_img, 3, H, W) over the B prompts); a
            model that runs all N rows repeats them K times (:meth:`row_media`). When False (media per
            response), they are stored in row order: the first responses' media, then the second
            ones', and so on. Empty for text-only batches.
        ids: the B record ids, for error messages and logs.
        skipped: records dropped while building this batch (``on_bad_sample: skip``).
        truncated: responses shortened to fit ``max_length`` in this batch.
        shared_prompt: the K rows of a group hold the same prompt and media, so a model may run each
            prompt once. False when the media differ per response (VDPO-style pairs).
        row_lengths: the (prompt, response) token counts of the N rows as Python ints, recorded by the
            collator on the host, so a forward can size its tensors without reading them back from an
            accelerator (each read waits for the device to finish its queued work). None for a batch
            built by hand; :meth:`host_lengths` then reads them once.
        group_size: K, responses per group (2 for pairs).
        scores: (B, K) float scores of the responses (higher is better), or None.
        weights: (B,) float weight of each group, or None.
        dimension_ids: (B,) long id of the preference dimension a group was labelled on, or None.
        soft_labels: (B,) float probability that response 0 is preferred to response 1, or None.
        desirable: (B,) bool, whether group b's response 0 is desirable (unpaired feedback: response 1
            is then a mismatched completion for KTO's reference point), or None.
        orientations: (B, D) float, per preference dimension d: 1 where response 0 is preferred on it,
            −1 where response 1 is, 0 where neither (``CombinedLoss(orient_by=...)``), or None.
        response_tags: per group, a name for each of its K responses (e.g. the augmentation that made
            a response's clip: ``("original", "reverse", ...)``), for logs; None when the data has none.
    """

    input_ids: Tensor
    attention_mask: Tensor
    response_mask: Tensor
    prompt_lengths: Tensor
    media: dict[str, Tensor] = field(default_factory=dict)
    ids: list[str] = field(default_factory=list)
    skipped: int = 0
    truncated: int = 0
    shared_prompt: bool = True
    row_lengths: tuple[tuple[int, ...], tuple[int, ...]] | None = None
    group_size: int = 2
    scores: Tensor | None = None
    weights: Tensor | None = None
    dimension_ids: Tensor | None = None
    soft_labels: Tensor | None = None
    desirable: Tensor | None = None
    orientations: Tensor | None = None
    response_tags: tuple[tuple[str, ...], ...] | None = None

    def __post_init__(self) -> None:
        if self.group_size < 2:
            raise ValueError(f"a group holds at least 2 responses, got group_size={self.group_size}")
        if self.input_ids.shape[0] % self.group_size:
            raise ValueError(f"{self.input_ids.shape[0]} rows do not split into groups of {self.group_size}")

    @property
    def num_groups(self) -> int:
        """B, the groups of the batch."""
        return self.input_ids.shape[0] // self.group_size

    @property
    def num_pairs(self) -> int:
        """B, the groups of the batch (pairs when K = 2); kept for code written for pairs."""
        return self.num_groups

    def side_info(self) -> dict[str, Tensor]:
        """The side information present in this batch, by field name (see the attributes)."""
        return {name: v for name in SIDE_FIELDS if (v := getattr(self, name)) is not None}

    def row_media(self) -> dict[str, Tensor]:
        """Media for all N rows (in row order), as a naive forward needs them."""
        if not self.shared_prompt:
            return self.media
        return {k: torch.cat([v] * self.group_size, dim=0) for k, v in self.media.items()}

    def host_lengths(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Prompt and response token counts of the N rows, as Python ints.

        Each row's response follows its prompt directly: row ``i``'s response tokens sit at columns
        ``prompt[i] .. prompt[i] + response[i] - 1``.
        """
        if self.row_lengths is None:  # one read each, for a batch the collator did not build
            prompts, counts = self.prompt_lengths, self.response_mask.sum(-1)
            cols = torch.arange(self.response_mask.shape[1], device=prompts.device)[None]
            spans = (cols >= prompts[:, None]) & (cols < (prompts + counts)[:, None])
            if not torch.equal(spans, self.response_mask.bool()):
                bad = int((spans != self.response_mask.bool()).any(-1).int().argmax())
                record = f" (record {self.ids[bad % len(self.ids)]!r})" if self.ids else ""
                raise ValueError(
                    f"row {bad} of the batch{record}: its response is not the span right after its prompt "
                    "(prompt_lengths and response_mask disagree)"
                )
            self.row_lengths = (tuple(prompts.tolist()), tuple(counts.tolist()))
        return self.row_lengths

    def _map(self, fn) -> PreferenceBatch:
        return PreferenceBatch(
            input_ids=fn(self.input_ids),
            attention_mask=fn(self.attention_mask),
            response_mask=fn(self.response_mask),
            prompt_lengths=fn(self.prompt_lengths),
            media={k: fn(v) for k, v in self.media.items()},
            ids=list(self.ids),
            skipped=self.skipped,
            truncated=self.truncated,
            shared_prompt=self.shared_prompt,
            row_lengths=self.row_lengths,
            group_size=self.group_size,
            **{name: fn(v) for name, v in self.side_info().items()},
            response_tags=self.response_tags,
        )

    def selected_rows(self, keep: Tensor) -> Tensor:
        """(M·B,) the rows of :meth:`select_responses` ``(keep)``, in its response-major order (on the CPU)."""
        b, k = self.num_groups, self.group_size
        if keep.dim() != 2 or keep.shape[0] != b or keep.shape[1] < 2:
            raise ValueError(f"keep must be (B={b}, M>=2) response indices, got {tuple(keep.shape)}")
        keep = keep.to(device="cpu", dtype=torch.long)
        if int(keep.min()) < 0 or int(keep.max()) >= k:
            raise ValueError(f"keep holds response indices outside 0..{k - 1}")
        return (keep.t() * b + torch.arange(b)).reshape(-1)

    def select_responses(self, keep: Tensor) -> PreferenceBatch:
        """The batch with, for each group b, only its responses ``keep[b]`` (in that order).

        Args:
            keep: (B, M) long response indices per group; M >= 2 (a group holds at least two). Groups
                may keep different responses, e.g. response 0 and the candidates PaMi-VDPO selected.

        Media stored per response (``shared_prompt`` False) must hold one equal-size block per row
        (e.g. one clip per row, as ``pixel_values_videos`` of LLaVA-NeXT-Video); media whose rows
        differ in size (Qwen2-VL's flattened patches) are refused with a clear error.
        """
        b, k = self.num_groups, self.group_size
        rows = self.selected_rows(keep)
        keep = keep.to(device="cpu", dtype=torch.long)
        n = self.input_ids.shape[0]
        media = dict(self.media)
        if not self.shared_prompt:
            for grid_key in ("image_grid_thw", "video_grid_thw"):  # flattened patches (Qwen2-VL): sizes per entry
                grid = self.media.get(grid_key)
                if grid is not None and grid.shape[0] and not bool((grid.prod(-1) == grid[0].prod()).all()):
                    raise ValueError(
                        f"cannot select responses: the entries of {grid_key!r} hold different numbers of patches "
                        "(rows of different sizes); responses can be selected only from media with one block per row"
                    )
            for key, value in self.media.items():
                if value.shape[0] % n:
                    raise ValueError(
                        f"cannot select responses: media {key!r} has {value.shape[0]} entries for {n} rows "
                        "(rows of different sizes); responses can be selected only from media with one block per row"
                    )
                per_row = value.shape[0] // n
                media[key] = value.view(n, per_row, *value.shape[1:])[rows.to(value.device)].flatten(0, 1)
        index = rows.to(self.input_ids.device)
        lengths = None
        if self.row_lengths is not None:
            chosen = rows.tolist()
            lengths = (tuple(self.row_lengths[0][i] for i in chosen), tuple(self.row_lengths[1][i] for i in chosen))
        side = {
            name: (v.gather(1, keep.to(v.device)) if v.dim() == 2 and v.shape == (b, k) else v)
            for name, v in self.side_info().items()
        }
        tags = None
        if self.response_tags is not None:
            tags = tuple(tuple(t[j] for j in row) for t, row in zip(self.response_tags, keep.tolist(), strict=True))
        return PreferenceBatch(
            input_ids=self.input_ids[index],
            attention_mask=self.attention_mask[index],
            response_mask=self.response_mask[index],
            prompt_lengths=self.prompt_lengths[index],
            media=media,
            ids=list(self.ids),
            skipped=self.skipped,
            truncated=self.truncated,
            shared_prompt=self.shared_prompt,
            row_lengths=lengths,
            group_size=keep.shape[1],
            **side,
            response_tags=tags,
        )

    def to(self, device: torch.device | str, non_blocking: bool | None = None) -> PreferenceBatch:
        """The batch on ``device``.

        ``non_blocking`` (default: when the batch is in page-locked memory, as a loader with
        ``pin_memory`` makes it) queues the copies on the GPU instead of waiting for them, and for
        the work queued before them (the previous step).
        """
        if self.row_lengths is None and self.input_ids.device.type == "cpu":
            self.host_lengths()  # free on the host; saves the forward a device read later
        if non_blocking is None:
            non_blocking = self.input_ids.is_pinned()
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> PreferenceBatch:
        """The batch in page-locked memory (the DataLoader calls this with ``pin_memory=True``)."""
        return self._map(lambda t: t.pin_memory())

    @classmethod
    def empty(cls, skipped: int = 0) -> PreferenceBatch:
        """A batch with no groups (every record of it was skipped)."""
        z = torch.zeros(0, 0, dtype=torch.long)
        return cls(z, z, z.bool(), torch.zeros(0, dtype=torch.long), skipped=skipped)
