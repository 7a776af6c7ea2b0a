"""Online video negatives: rejected clips made on the fly from the chosen clip, the response fixed.

VDPO keeps the response y and contrasts the original clip v with an augmented clip ṽ: chosen =
(v, y), rejected = (ṽ, y). This module turns ordinary video records (a prompt, one video and one
response) into groups of 1 + K responses with the same text and different media: response 0 sees
the original clip, responses 1..K the K candidates drawn from ``augment.video``. With K = 1 a group is
a VDPO pair for any pair loss; with K > 1 PaMi-VDPO's selection (``mmpo.pami.PaMiSelector``) keeps the
candidates its close-to-far schedule asks for, and ``MultiInstanceVDPOLoss`` weighs them.

Candidates are a function of ``(seed, epoch, record index)``, so a resumed run draws the same ones.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch

from augment.video import VIDEO_AUGMENTATIONS, build_augmentation, clips_identical
from datamodules.core.records import BadSampleError, PreferenceRecord, load_preference_records
from datamodules.core.settings import as_settings, settings_dict
from datamodules.vision_text.collator import PreferenceDataset
from datamodules.vision_text.video_module import VideoPreferenceDataModule

__all__ = ["DEFAULT_NEGATIVES", "OnlineVideoNegativeDataset", "VideoNegativeSettings", "VideoVDPODataModule"]

# Augmentations that change a clip without needing another clip of the batch (clip_swap needs one).
DEFAULT_NEGATIVES = ["reverse", "shuffle", "frame_drop", "speed", "static", "crop", "blur", "color_jitter", "mask"]


@dataclass
class VideoNegativeSettings:
    """Which rejected clips are made from each record's chosen clip.

    Args:
        augmentations: names of ``augment.video.VIDEO_AUGMENTATIONS`` the candidates are drawn from.
        num_candidates: K, the candidate clips per record (1: a VDPO pair).
        sampling: ``random`` draws K distinct augmentations per record and epoch; ``fixed`` makes
            candidate k the k-th augmentation of the list (K must equal its length), so each response
            position of a group is one augmentation (``batch.response_tags`` names them).
        augmentation_args: keyword arguments per augmentation name, e.g. ``{crop: {scale: 0.4}}``.
        max_retries: redraws of a candidate that comes out identical to the original clip (a static
            video reversed); after them the record is a bad sample (an error, or a counted skip).
    """

    augmentations: list[str] = field(default_factory=lambda: list(DEFAULT_NEGATIVES))
    num_candidates: int = 1
    sampling: Literal["random", "fixed"] = "random"
    augmentation_args: dict[str, dict[str, Any]] = field(default_factory=dict)
    max_retries: int = 4

    def __post_init__(self) -> None:
        unknown = [a for a in [*self.augmentations, *self.augmentation_args] if a not in VIDEO_AUGMENTATIONS]
        if unknown:
            raise ValueError(f"negatives: unknown augmentation(s) {unknown}; known: {sorted(VIDEO_AUGMENTATIONS)}")
        if "clip_swap" in self.augmentations:
            raise ValueError("negatives: clip_swap needs the other clips of a batch and is not drawn per record")
        if len(set(self.augmentations)) != len(self.augmentations) or not self.augmentations:
            raise ValueError(f"negatives.augmentations must be distinct names, got {self.augmentations}")
        if self.num_candidates < 1:
            raise ValueError(f"negatives.num_candidates must be >= 1, got {self.num_candidates}")
        if self.num_candidates > len(self.augmentations):
            raise ValueError(
                f"negatives.num_candidates={self.num_candidates} is larger than the augmentation set "
                f"({len(self.augmentations)}: {self.augmentations}); candidates are distinct augmentations"
            )
        if self.sampling == "fixed" and self.num_candidates != len(self.augmentations):
            raise ValueError(
                "negatives.sampling='fixed' makes candidate k the k-th augmentation: num_candidates must equal "
                f"the number of augmentations ({len(self.augmentations)}), got {self.num_candidates}"
            )
        if self.max_retries < 0:
            raise ValueError(f"negatives.max_retries must be >= 0, got {self.max_retries}")

    def tags(self) -> tuple[str, ...] | None:
        """The response names of every group under ``fixed`` sampling (None under ``random``)."""
        return ("original", *self.augmentations) if self.sampling == "fixed" else None


def _seed(*parts: Any) -> int:
    # a stable seed (Python's hash() of a tuple of ints is stable, but spelt out to stay so)
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


class OnlineVideoNegativeDataset(PreferenceDataset):
    """Records with one video and one response, served as groups of the original and K augmented clips.

    An item carries ``responses`` (the response 1 + K times) and ``response_media`` (the record's
    images with the original clip, then with each candidate), the collator's per-response layout.
    """

    def __init__(
        self, records: list[PreferenceRecord], negatives: VideoNegativeSettings, *args: Any, **kwargs: Any
    ) -> None:
        super().__init__(records, *args, **kwargs)
        self.negatives = negatives
        self._transforms = {
            name: build_augmentation(name, **negatives.augmentation_args.get(name, {}))
            for name in negatives.augmentations
        }

    def candidates(self, clip: torch.Tensor, i: int, where: str) -> tuple[list[str], list[torch.Tensor]]:
        """K (name, clip) candidates of record ``i``'s ``(N, H, W, 3)`` uint8 clip, each unlike the original."""
        g = torch.Generator().manual_seed(_seed("negatives", self.seed, self.epoch, i))
        settings = self.negatives
        if settings.sampling == "fixed":
            names = list(settings.augmentations)
        else:
            order = torch.randperm(len(settings.augmentations), generator=g)[: settings.num_candidates]
            names = [settings.augmentations[j] for j in order.tolist()]
        frames = clip.permute(0, 3, 1, 2)  # (T, C, H, W), the augmentations' layout
        made = []
        for name in names:
            for _ in range(settings.max_retries + 1):
                out = self._transforms[name](frames, g)
                if not clips_identical(out, frames):
                    break
            else:
                raise BadSampleError(
                    f"{where}: augmentation {name!r} gave a clip identical to the original "
                    f"{settings.max_retries + 1} times (e.g. a still video reversed): no negative to learn from"
                )
            made.append(out.permute(0, 2, 3, 1).contiguous())  # back to (N, H, W, 3)
        return names, made

    def __getitem__(self, i: int) -> dict[str, Any] | None:
        item = super().__getitem__(i)
        if item is None:
            return None
        rec = item["record"]
        try:
            if len(item["videos"]) != 1:
                raise BadSampleError(
                    f"{rec.where}: online video negatives need exactly one video per record, got {len(item['videos'])}"
                )
            names, clips = self.candidates(item["videos"][0], i, rec.where)
        except BadSampleError:
            if self.on_bad_sample == "skip":
                return None
            raise
        images = item["images"]
        item["responses"] = [rec.chosen] * (1 + len(clips))
        # a candidate keeps the original's frame timing (the processor's temporal positions, e.g. Qwen2.5-VL's)
        timing = item.get("video_metadata")
        item["response_media"] = [(images, item["videos"], timing), *((images, [c], timing) for c in clips)]
        item["candidate_names"] = names
        return item


class VideoVDPODataModule(VideoPreferenceDataModule):
    """Video records with one response each, trained against rejected clips made on the fly (VDPO, PaMi-VDPO).

    Records hold ``prompt``, one video (``videos``) and ``response`` (or ``chosen``; a ``rejected``
    response is ignored): the rejected side of every group is the same response under an augmented
    clip. Takes every argument of :class:`VideoPreferenceDataModule`, plus:

    Args:
        negatives: the candidates (:class:`VideoNegativeSettings`: ``augmentations``,
            ``num_candidates``, ``sampling``, ``augmentation_args``, ``max_retries``). Validation and
            test draw theirs the same way, for the epoch they run in.
    """

    settings_groups: ClassVar[dict[str, type]] = {
        **VideoPreferenceDataModule.settings_groups,
        "negatives": VideoNegativeSettings,
    }

    def __init__(self, *args: Any, negatives: VideoNegativeSettings | None = None, **kwargs: Any) -> None:
        self.negatives = as_settings(VideoNegativeSettings, negatives, "negatives")
        super().__init__(*args, **kwargs)
        self.persistent_workers = False  # workers must see each epoch's new candidates (set_epoch)

    def hyperparameters(self) -> dict[str, Any]:
        return {**super().hyperparameters(), "negatives": settings_dict(self.negatives)}

    def build_dataset(self, split: str, path: str, root: str) -> tuple[PreferenceDataset, list[str]]:
        records, problems = load_preference_records(
            path, root, self.on_bad_sample, self.image_placeholder, response_only=True
        )
        f = self.frames
        sampling = f.frame_sampling if split == "train" else ("uniform" if f.frame_sampling != "fps" else "fps")
        dataset = OnlineVideoNegativeDataset(
            records, self.negatives, self.on_bad_sample, f.num_frames, sampling, f.target_fps, seed=self.loader.seed,
            min_frames=f.min_frames, max_pixels=f.max_pixels,
        )  # fmt: skip
        return dataset, problems

    def cache_settings(self, split: str) -> dict[str, Any]:
        raise ValueError(
            "online video negatives are drawn anew every epoch, so their reference log-probs cannot be cached: "
            "use reference: adapter or copy"
        )
