"""Dataset and processor-based collator for image and video preference pairs."""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset

from datamodules.core.batch import PreferenceBatch
from datamodules.core.records import BadSampleError, PreferenceRecord

__all__ = ["TOKEN_ALIGNED_MEDIA", "PreferenceDataset", "VisionPreferenceCollator", "load_image", "video_metadata"]

# Side information a sample may carry (see VisionPreferenceCollator), with its tensor dtype.
_SIDE_KEYS = {
    "scores": torch.float32,
    "weights": torch.float32,
    "dimension_ids": torch.long,
    "soft_labels": torch.float32,
    "desirable": torch.bool,
    "orientations": torch.float32,
}

# Keys of a processor's output that describe text, not media (PaliGemma's processor also returns labels).
_TEXT_KEYS = frozenset({"input_ids", "attention_mask", "labels"})

# Media inputs with one entry per prompt token, (1, Tp, ...): the collator extends them over the row's
# width T. Response (and padding) tokens take the value given here, or with None the prompt's last
# token's: token types mark image tokens (Qwen2-VL's place its multimodal rotary positions, Gemma 3's
# let an image's tokens attend to each other), and Llama 3.2 Vision's cross-attention mask lets a
# token see the images the end of its prompt sees.
TOKEN_ALIGNED_MEDIA: dict[str, int | None] = {"mm_token_type_ids": 0, "token_type_ids": 0, "cross_attention_mask": None}
# Processors whose token types mean something else: PaliGemma's mark the prefix it attends to
# bidirectionally (image and prompt, 0) and the suffix it predicts causally (the response, 1).
_RESPONSE_TOKEN_TYPE = {"PaliGemmaProcessor": 1}


def load_image(path: Any, where: str) -> Image.Image:
    """Decode an image fully (not lazily) as RGB; any failure names the file and the record.

    ``path`` is a file path, or an in-memory image from a ``datasets.Dataset`` (a PIL image, or a
    ``{"bytes": ...}`` dict).
    """
    if isinstance(path, Image.Image):
        return path.convert("RGB")
    if isinstance(path, dict):
        source, path = io.BytesIO(path["bytes"]), path.get("path") or "<in-memory image>"
    else:
        source = path
    try:
        with Image.open(source) as im:
            # PIL refuses images over twice MAX_IMAGE_PIXELS and only warns above it; refuse those too.
            # (Checked here rather than by turning the warning into an error: changing the warning
            # filters for every image would reset Python's once-only warning registry, so every
            # library's one-time warnings would repeat at each batch.)
            limit = Image.MAX_IMAGE_PIXELS
            if limit is not None and im.width * im.height > limit:
                raise Image.DecompressionBombError(
                    f"{im.width}x{im.height} = {im.width * im.height} pixels, over PIL's limit of {limit} "
                    "(Image.MAX_IMAGE_PIXELS)"
                )
            im.load()
            return im.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise BadSampleError(f"{where}: cannot decode image {path}: {e}") from e


class PreferenceDataset(Dataset):
    """Validated records whose images and videos are decoded on access (inside DataLoader workers).

    With ``on_bad_sample="skip"`` an undecodable record yields ``None``, which the collator counts.

    Args:
        records: validated records.
        on_bad_sample: ``"error"`` raises on an undecodable file; ``"skip"`` yields None for it.
        num_frames: frames sampled from each video.
        frame_sampling: ``uniform`` over the whole video, ``fps`` (one frame per 1/target_fps
            seconds, at most ``num_frames``) or ``random_segment`` (a random window; training).
        target_fps: frame rate kept by the ``fps`` strategy.
        seed: seed of ``random_segment`` (per record: the same record gets the same window in an epoch;
            call ``set_epoch`` to draw new windows).
        min_frames: a video with fewer frames is a bad sample (None: short videos repeat frames).
        max_pixels: a video whose frames hold more pixels is a bad sample, refused before decoding.
    """

    def __init__(
        self,
        records: list[PreferenceRecord],
        on_bad_sample: str = "error",
        num_frames: int = 8,
        frame_sampling: str = "uniform",
        target_fps: float | None = None,
        seed: int = 0,
        min_frames: int | None = None,
        max_pixels: int | None = None,
    ) -> None:
        self.records = records
        self.min_frames, self.max_pixels = min_frames, max_pixels
        self.on_bad_sample = on_bad_sample
        self.num_frames = num_frames
        self.frame_sampling = frame_sampling
        self.target_fps = target_fps
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.records)

    def _videos(self, paths: list[str], where: str, i: int) -> tuple[list[torch.Tensor], list[dict[str, Any]]]:
        """The decoded clips, (N, H, W, 3) uint8 each, and their ``video_metadata`` (see :func:`video_metadata`)."""
        from datamodules.vision_text.video_io import read_video

        out, metadata = [], []
        for j, path in enumerate(paths):
            g = torch.Generator().manual_seed(hash((self.seed, self.epoch, i, j)) & 0x7FFFFFFF)
            frames, meta = read_video(
                path, self.num_frames, self.frame_sampling, self.target_fps, g, where, self.min_frames, self.max_pixels
            )
            out.append(frames)
            metadata.append(video_metadata(meta))
        return out, metadata

    def __getitem__(self, i: int) -> dict[str, Any] | None:
        rec = self.records[i]
        try:
            item: dict[str, Any] = {"record": rec, "images": [load_image(p, rec.where) for p in rec.images]}
            item["videos"], item["video_metadata"] = self._videos(rec.videos, rec.where, i)
            if not rec.shared_media:
                images = rec.rejected_images if rec.rejected_images is not None else rec.images
                videos = rec.rejected_videos if rec.rejected_videos is not None else rec.videos
                item["rejected_images"] = [load_image(p, rec.where) for p in images]
                item["rejected_videos"], item["rejected_video_metadata"] = self._videos(videos, rec.where, i)
            item.update(rec.side)
        except BadSampleError:
            if self.on_bad_sample == "skip":
                return None
            raise
        return item


@dataclass
class _Encoded:
    prompts: list[list[int]]  # K prompts (all the same object when the media are shared)
    responses: list[list[int]]  # K responses
    media: list[dict[str, torch.Tensor]]  # K media dicts
    truncated: int
    different_media: bool
    side: dict[str, Any]


def _sample_responses(sample: dict[str, Any]) -> list[str]:
    rec = sample["record"]
    return list(sample["responses"]) if "responses" in sample else [rec.chosen, rec.rejected]


def _sample_media(sample: dict[str, Any], k: int) -> list[tuple[list, list, list | None]] | None:
    """Per-response (images, videos, video metadata or None), or None when the K responses share the prompt's media."""
    if "response_media" in sample:
        media = [(m[0], m[1], m[2] if len(m) > 2 else None) for m in sample["response_media"]]
        if len(media) != k:
            raise ValueError(f"{sample['record'].where}: {len(media)} response media for {k} responses")
        return media
    if "rejected_images" in sample:  # VDPO-style pair: the rejected response sees other media
        chosen = (sample["images"], sample.get("videos", []), sample.get("video_metadata"))
        return [chosen, (sample["rejected_images"], sample["rejected_videos"], sample.get("rejected_video_metadata"))]
    return None


def video_metadata(meta: dict[str, Any]) -> dict[str, Any]:
    """:func:`~datamodules.vision_text.video_io.read_video`'s metadata as transformers' ``VideoMetadata`` fields.

    Which frames of the video were kept and its frame rate: processors take a clip's timing from them
    (Qwen2.5-VL's seconds per temporal patch, 2 / (frames kept / frames in the video x fps)); without
    them they assume 24 fps.
    """
    keys = {"num_frames": "total_num_frames", "fps": "fps", "indices": "frames_indices"}
    return {new: meta[old] for old, new in keys.items()} | {k: meta[k] for k in ("duration", "height", "width")}


class VisionPreferenceCollator:
    """Turn decoded samples into a :class:`PreferenceBatch` with the model's processor.

    The prompt (chat template, image placeholders expanded by the processor) and each response are
    tokenised separately, so the response boundary is exact. Prompts are never truncated: a prompt
    that alone does not fit ``max_length`` (which would cut image tokens) is a bad sample. Responses
    that do not fit are shortened and counted in ``batch.truncated``. Media inputs with a value per
    prompt token (``TOKEN_ALIGNED_MEDIA``) are extended over the whole row.

    A sample is a dict with ``record`` (its ``prompt``, ``chosen``, ``rejected`` and ``where``),
    decoded ``images`` and ``videos``, and optionally:

    - ``responses``: K >= 2 response texts, best first, instead of the record's chosen/rejected;
    - ``response_media``: K ``(images, videos)`` tuples when each response sees its own media
      (``rejected_images``/``rejected_videos`` give the same for a pair); a third element, the
      videos' metadata, is optional;
    - ``video_metadata`` (and ``rejected_video_metadata``): one :func:`video_metadata` dict per video,
      which :class:`PreferenceDataset` writes;
    - side information: ``scores`` (K floats), ``weights`` (a float), ``dimension_ids`` (an int),
      ``soft_labels`` (a float), ``desirable`` (a bool), batched into the :class:`PreferenceBatch` fields of
      those names;
    - ``candidate_names``: the K − 1 names of responses 1..K−1 (online video negatives: the
      augmentation of each candidate clip), batched into ``response_tags`` with response 0 "original".

    Every sample of a batch has the same K.

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
        token_type = _RESPONSE_TOKEN_TYPE.get(type(processor).__name__, 0)
        self._response_values = {**TOKEN_ALIGNED_MEDIA, "token_type_ids": token_type}

    def _encode_prompt(
        self,
        rec: PreferenceRecord,
        images: list[Image.Image],
        videos: list[torch.Tensor],
        metadata: list[dict[str, Any]] | None = None,
    ) -> tuple[list[int], dict]:
        text = self.processor.apply_chat_template(rec.prompt, add_generation_prompt=True, tokenize=False)
        kwargs: dict[str, Any] = {}
        if images:
            kwargs["images"] = images
        if videos:
            kwargs["videos"] = [v.numpy() for v in videos]  # (N, H, W, 3) uint8 each
            # the frames are the ones the dataset's frame settings chose: not sampled again by the processor,
            # which reads their timing from the metadata
            kwargs["do_sample_frames"] = False
            if metadata is not None:
                kwargs["video_metadata"] = metadata
        enc = self.processor(text=[text], return_tensors="pt", **kwargs)
        ids = enc["input_ids"][0].tolist()
        media = {k: v for k, v in enc.items() if k not in _TEXT_KEYS and isinstance(v, torch.Tensor)}
        return ids, media

    def _encode_response(self, text: str) -> list[int]:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if self.append_eos and self.tokenizer.eos_token_id is not None:
            ids = ids + [self.tokenizer.eos_token_id]
        return ids

    def _fit(self, rec: PreferenceRecord, prompt: list[int], response: list[int]) -> tuple[list[int], int]:
        if self.max_length is None:
            return response, 0
        room = self.max_length - len(prompt)
        if room < self.min_response_tokens:
            raise BadSampleError(
                f"{rec.where}: the prompt is {len(prompt)} tokens (image/video tokens included) and leaves "
                f"{max(room, 0)} of max_length={self.max_length} for the response; raise max_length "
                "(prompts are never truncated, as that would cut image tokens)"
            )
        return response[:room], int(len(response) > room)

    def _encode(self, sample: dict[str, Any]) -> _Encoded:
        rec: PreferenceRecord = sample["record"]
        texts = _sample_responses(sample)
        per_response = _sample_media(sample, len(texts))
        if per_response is None:
            prompt, media = self._encode_prompt(
                rec, sample["images"], sample.get("videos", []), sample.get("video_metadata")
            )
            prompts, medias = [prompt] * len(texts), [media] * len(texts)
        else:
            encoded = [self._encode_prompt(rec, *media) for media in per_response]
            prompts, medias = [p for p, _ in encoded], [m for _, m in encoded]
        fitted = [self._fit(rec, p, self._encode_response(text)) for p, text in zip(prompts, texts, strict=True)]
        side = {name: sample[name] for name in _SIDE_KEYS if sample.get(name) is not None}
        return _Encoded(
            prompts, [r for r, _ in fitted], medias, sum(t for _, t in fitted), per_response is not None, side
        )

    def __call__(self, samples: list[dict[str, Any] | None]) -> PreferenceBatch:
        skipped = sum(1 for s in samples if s is None)
        encoded, ids, tags = [], [], []
        for s in samples:
            if s is None:
                continue
            try:
                encoded.append(self._encode(s))
                ids.append(s["record"].id)
                tags.append(("original", *s["candidate_names"]) if "candidate_names" in s else None)
            except BadSampleError:
                if self.on_bad_sample != "skip":
                    raise
                skipped += 1
        if not encoded:
            return PreferenceBatch.empty(skipped=skipped)

        k = len(encoded[0].responses)
        for e, rid in zip(encoded, ids, strict=True):
            if len(e.responses) != k:
                raise ValueError(
                    f"record {rid!r} has {len(e.responses)} responses but the batch's first has {k}: "
                    "a batch holds groups of one size"
                )
        # Rows are response-major: every group's response 0, then every group's response 1, ...
        rows = [(e.prompts[j], e.responses[j]) for j in range(k) for e in encoded]
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

        # Shared media are stored once per group; groups with media per response store them in row
        # order, response 0's block first (see PreferenceBatch.media).
        shared = not any(e.different_media for e in encoded)
        media: dict[str, torch.Tensor] = {}
        for key in sorted({key for e in encoded for m in e.media for key in m}):
            blocks = range(1 if shared else k)
            parts = [e.media[j][key] for j in blocks for e in encoded if key in e.media[j]]
            if key in self._response_values:
                parts = [_over_row(p, width, self._response_values[key]) for p in parts]
            media[key] = _concat_padded(parts, key, ids)

        truncated = sum(e.truncated for e in encoded)
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
            shared_prompt=shared,
            row_lengths=(tuple(len(p) for p, _ in rows), tuple(len(r) for _, r in rows)),
            group_size=k,
            **_side_tensors(encoded, ids),
            response_tags=tuple(tags) if all(t is not None for t in tags) else None,
        )


def _concat_padded(parts: list[torch.Tensor], key: str, ids: list[str]) -> torch.Tensor:
    """Concatenate per-prompt media along dim 0, zero-padding every other dim to the largest.

    Prompts of one batch may hold different numbers of images (Idefics3 / SmolVLM's
    ``(1, images, 3, H, W)`` pixel values and ``pixel_attention_mask``; Mllama's images axis of
    ``pixel_values``, ``aspect_ratio_ids``, ``aspect_ratio_mask`` and ``cross_attention_mask``) or
    images of different sizes (Pixtral keeps aspect ratios). Their processors pad a multi-prompt batch
    the same way: with zeros, which the models read as no image (an all-zero Idefics3 image is dropped, a
    zero cross-attention mask attends to nothing, Pixtral crops each image to its ``image_sizes``), except
    Mllama's ``aspect_ratio_mask``, whose first tile stays 1 in a padded image slot as its image processor
    leaves it (an all-masked tile attention would change the numbers of the prompt's real images).
    """
    if all(p.shape[1:] == parts[0].shape[1:] for p in parts):
        return torch.cat(parts, dim=0)
    if len({p.dim() for p in parts}) != 1:
        shapes = ", ".join(str(tuple(p.shape)) for p in parts)
        raise ValueError(
            f"media {key!r} of records {ids} have shapes of different ranks ({shapes}): they cannot share a batch"
        )
    target = [max(p.shape[d] for p in parts) for d in range(1, parts[0].dim())]
    padded = []
    for p in parts:
        out = p.new_zeros((p.shape[0], *target))
        out[(slice(None), *(slice(0, n) for n in p.shape[1:]))] = p
        if key == "aspect_ratio_mask":  # (1, images, tiles)
            out[:, p.shape[1] :, 0] = 1
        padded.append(out)
    return torch.cat(padded, dim=0)


def _over_row(values: torch.Tensor, width: int, fill: int | None) -> torch.Tensor:
    """(1, Tp, ...) per-prompt-token values extended to (1, width, ...) (see ``TOKEN_ALIGNED_MEDIA``)."""
    tail = values[:, -1:] if fill is None else torch.full_like(values[:, -1:], fill)
    return torch.cat([values, tail.expand(-1, width - values.shape[1], *values.shape[2:])], dim=1)


def _side_tensors(encoded: list[_Encoded], ids: list[str]) -> dict[str, torch.Tensor]:
    """(B, K) scores and (B,) weights, dimension ids and soft labels, for the fields every sample carries."""
    out = {}
    for name, dtype in _SIDE_KEYS.items():
        present = [name in e.side for e in encoded]
        if not any(present):
            continue
        if not all(present):
            missing = [rid for rid, p in zip(ids, present, strict=True) if not p]
            raise ValueError(f"records {missing[:5]} lack {name!r}, which other records of their batch carry")
        values = [e.side[name] for e in encoded]
        if len({len(v) for v in values if isinstance(v, list)}) > 1:
            lengths = {rid: len(v) for rid, v in zip(ids, values, strict=True)}
            raise ValueError(f"records of one batch carry {name!r} of different lengths: {lengths}")
        out[name] = torch.tensor(values, dtype=dtype)
    return out
