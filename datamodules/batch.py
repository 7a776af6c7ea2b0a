"""The batch contract between collators and training modules."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = ["PreferenceBatch"]


@dataclass
class PreferenceBatch:
    """A batch of B preference pairs, chosen and rejected stacked along the first axis.

    Rows ``0..B-1`` hold prompt + chosen response, rows ``B..2B-1`` the same prompts + rejected
    response, in the same order, right-padded to a common length T.

    Attributes:
        input_ids: (2B, T) token ids, image placeholders already expanded by the processor.
        attention_mask: (2B, T) 1 on real tokens, 0 on padding.
        response_mask: (2B, T) bool, True where the token at that position belongs to the response,
            i.e. where its log-probability (predicted from position t-1) counts.
        prompt_lengths: (2B,) number of prompt tokens at the start of each row.
        media: processor outputs for the images and videos. When ``shared_prompt`` is True they are
            stored once per pair (for LLaVA ``pixel_values`` (N_img, 3, H, W) over the B prompts); a
            model that runs 2B rows repeats them (:meth:`row_media`). When False, the chosen rows'
            media come first, then the rejected rows'. Empty for text-only batches.
        ids: the B record ids, for error messages and logs.
        skipped: records dropped while building this batch (``on_bad_sample: skip``).
        truncated: responses shortened to fit ``max_length`` in this batch.
        shared_prompt: chosen and rejected rows of a pair hold the same prompt and media, so a model
            may run each prompt once. False when the media differ (VDPO-style pairs).
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

    @property
    def num_pairs(self) -> int:
        return self.input_ids.shape[0] // 2

    def row_media(self) -> dict[str, Tensor]:
        """Media for all 2B rows (chosen block, then rejected block), as a naive forward needs them."""
        if not self.shared_prompt:
            return self.media
        return {k: torch.cat([v, v], dim=0) for k, v in self.media.items()}

    def to(self, device: torch.device | str) -> PreferenceBatch:
        return PreferenceBatch(
            input_ids=self.input_ids.to(device),
            attention_mask=self.attention_mask.to(device),
            response_mask=self.response_mask.to(device),
            prompt_lengths=self.prompt_lengths.to(device),
            media={k: v.to(device) for k, v in self.media.items()},
            ids=list(self.ids),
            skipped=self.skipped,
            truncated=self.truncated,
            shared_prompt=self.shared_prompt,
        )

    @classmethod
    def empty(cls, skipped: int = 0) -> PreferenceBatch:
        """A batch with no pairs (every record of it was skipped)."""
        z = torch.zeros(0, 0, dtype=torch.long)
        return cls(z, z, z.bool(), torch.zeros(0, dtype=torch.long), skipped=skipped)
