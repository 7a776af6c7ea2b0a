"""Dataset and processor-based collator for image preference pairs."""

from __future__ import annotations

import warnings
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset

from datamodules.batch import PreferenceBatch
from datamodules.records import BadSampleError, PreferenceRecord

__all__ = ["PreferenceDataset", "VisionPreferenceCollator", "load_image"]

# Keys of a processor's output that describe text, not media.
_TEXT_KEYS = frozenset({"input_ids", "attention_mask", "token_type_ids"})


def load_image(path: str, where: str) -> Image.Image:
    """Decode an image fully (not lazily) as RGB; any failure names the file and the record."""
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise BadSampleError(f"{where}: cannot decode image {path}: {e}") from e


class PreferenceDataset(Dataset):
    """Validated records whose images are decoded on access (inside DataLoader workers).

    With ``on_bad_sample="skip"`` an undecodable record yields ``None``, which the collator counts.
    """

    def __init__(self, records: list[PreferenceRecord], on_bad_sample: str = "error") -> None:
        self.records = records
        self.on_bad_sample = on_bad_sample

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict[str, Any] | None:
        rec = self.records[i]
        try:
            images = [load_image(p, rec.where) for p in rec.images]
        except BadSampleError:
            if self.on_bad_sample == "skip":
                return None
            raise
        return {"record": rec, "images": images}


class VisionPreferenceCollator:
    """Turn decoded samples into a :class:`PreferenceBatch` with the model's processor.

    The prompt (chat template, image placeholders expanded by the processor) and each response are
    tokenised separately, so the response boundary is exact. Prompts are never truncated: a prompt
    that alone does not fit ``max_length`` (which would cut image tokens) is a bad sample. Responses
    that do not fit are shortened and counted in ``batch.truncated``.

    Args:
        processor: a transformers processor (``AutoProcessor.from_pretrained``).
        max_length: maximum tokens of prompt + response; None for no limit.
        min_response_tokens: a prompt must leave room for at least this many response tokens.
        append_eos: end every response with the tokenizer's EOS token.
        on_bad_sample: ``"error"`` raises; ``"skip"`` drops the sample and counts it.
    """

    def __init__(
        self,
        processor: Any,
        max_length: int | None = None,
        min_response_tokens: int = 1,
        append_eos: bool = True,
        on_bad_sample: str = "error",
    ) -> None:
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        if self.tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer has no pad token; set one (e.g. pad_token = eos_token) before training")
        self.max_length = max_length
        self.min_response_tokens = min_response_tokens
        self.append_eos = append_eos
        self.on_bad_sample = on_bad_sample
        self._warned_truncation = False

    def _encode_prompt(self, rec: PreferenceRecord, images: list[Image.Image]) -> tuple[list[int], dict]:
        text = self.processor.apply_chat_template(rec.prompt, add_generation_prompt=True, tokenize=False)
        kwargs = {"images": images} if images else {}
        enc = self.processor(text=[text], return_tensors="pt", **kwargs)
        ids = enc["input_ids"][0].tolist()
        media = {k: v for k, v in enc.items() if k not in _TEXT_KEYS and isinstance(v, torch.Tensor)}
        return ids, media

    def _encode_response(self, text: str) -> list[int]:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if self.append_eos and self.tokenizer.eos_token_id is not None:
            ids = ids + [self.tokenizer.eos_token_id]
        return ids

    def _encode(self, sample: dict[str, Any]) -> tuple[list[int], list[int], list[int], dict, int]:
        rec: PreferenceRecord = sample["record"]
        prompt, media = self._encode_prompt(rec, sample["images"])
        chosen, rejected = self._encode_response(rec.chosen), self._encode_response(rec.rejected)
        truncated = 0
        if self.max_length is not None:
            room = self.max_length - len(prompt)
            if room < self.min_response_tokens:
                raise BadSampleError(
                    f"{rec.where}: the prompt is {len(prompt)} tokens (image tokens included) and leaves "
                    f"{max(room, 0)} of max_length={self.max_length} for the response; raise max_length "
                    "(prompts are never truncated, as that would cut image tokens)"
                )
            if len(chosen) > room or len(rejected) > room:
                truncated = int(len(chosen) > room) + int(len(rejected) > room)
                chosen, rejected = chosen[:room], rejected[:room]
        return prompt, chosen, rejected, media, truncated

    def __call__(self, samples: list[dict[str, Any] | None]) -> PreferenceBatch:
        skipped = sum(1 for s in samples if s is None)
        encoded, ids = [], []
        for s in samples:
            if s is None:
                continue
            try:
                encoded.append(self._encode(s))
                ids.append(s["record"].id)
            except BadSampleError:
                if self.on_bad_sample != "skip":
                    raise
                skipped += 1
        if not encoded:
            return PreferenceBatch.empty(skipped=skipped)

        # Rows: all prompt+chosen first, then all prompt+rejected, same order.
        rows = [(p, c) for p, c, _, _, _ in encoded] + [(p, r) for p, _, r, _, _ in encoded]
        width = max(len(p) + len(r) for p, r in rows)
        n = len(rows)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.full((n, width), pad, dtype=torch.long)
        attention_mask = torch.zeros((n, width), dtype=torch.long)
        response_mask = torch.zeros((n, width), dtype=torch.bool)
        prompt_lengths = torch.zeros(n, dtype=torch.long)
        for i, (p, r) in enumerate(rows):
            seq = p + r
            input_ids[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
            attention_mask[i, : len(seq)] = 1
            response_mask[i, len(p) : len(seq)] = True
            prompt_lengths[i] = len(p)

        media: dict[str, torch.Tensor] = {}
        keys = sorted({k for *_, m, _ in encoded for k in m})
        for k in keys:
            parts = [m[k] for *_, m, _ in encoded if k in m]
            media[k] = torch.cat(parts + parts, dim=0)  # chosen block, then rejected block

        truncated = sum(t for *_, t in encoded)
        if truncated and not self._warned_truncation:
            self._warned_truncation = True
            warnings.warn(
                f"responses longer than max_length={self.max_length} minus their prompt are being shortened "
                "(counted in data/truncated_responses); raise max_length to keep them whole",
                stacklevel=2,
            )
        return PreferenceBatch(
            input_ids=input_ids,
            attention_mask=attention_mask,
            response_mask=response_mask,
            prompt_lengths=prompt_lengths,
            media=media,
            ids=ids,
            skipped=skipped,
            truncated=truncated,
        )
