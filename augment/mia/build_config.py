"""Settings of the MIA-DPO builder (``mmpo build-negatives``), as typed dataclasses read from YAML.

Every field is a typed key of the YAML file (``configs/mia_dpo/build.yaml``); jsonargparse checks
types and names unknown keys, and any key can be overridden on the command line
(``--generation.batch_size 16``).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from augment.mia.select import SelectionConfig

__all__ = [
    "BuildConfig",
    "FormatOptions",
    "GenerationSettings",
    "GridOptions",
    "PicInPicOptions",
    "SelectionSettings",
    "SequenceOptions",
    "SourceSettings",
    "config_fingerprint",
]


@dataclass
class SourceSettings:
    """The single-image dataset the builder reads.

    Args:
        path: a JSONL, JSON or Parquet file with one image per record.
        data_root: directory image paths are relative to (default: the file's folder).
        question_field: the field holding the question (a string, or chat messages whose text is used).
        answer_field: the field holding the ground-truth answer (MIA-DPO's *chosen* response).
        limit: read only the first ``limit`` records.
        on_bad_record: ``error`` stops on the first unusable record, naming its file and line;
            ``skip`` counts it (by reason) in the summary and goes on.
    """

    path: str
    data_root: str | None = None
    question_field: str = "prompt"
    answer_field: str = "chosen"
    limit: int | None = None
    on_bad_record: Literal["error", "skip"] = "error"


@dataclass
class SequenceOptions:
    """Sequence format: ``num_images`` choices (2–5 in the paper) and Gaussian corruption of the target."""

    num_images: list[int] = field(default_factory=lambda: [2, 3, 4, 5])
    noise_std: float = 0.0


@dataclass
class GridOptions:
    """Grid collage: tile counts (2, 3, 4, 6, 9), tile side, margin, label font and target-tile corruption.

    ``square`` pads the collage to a square, so a processor that centre-crops keeps every tile.
    """

    num_tiles: list[int] = field(default_factory=lambda: [2, 3, 4, 6, 9])
    tile_size: int = 448
    margin: int = 40
    font_size: int | None = None
    square: bool = True
    noise_std: float = 0.0


@dataclass
class PicInPicOptions:
    """Pic-in-pic: the target's scale inside the companion (0.7) and corruption of the composed image."""

    scale: float = 0.7
    noise_std: float = 0.0


@dataclass
class FormatOptions:
    """Which formats to build and how often: ``weights`` maps a format to its relative frequency."""

    weights: dict[str, float] = field(default_factory=lambda: {"sequence": 1.0, "grid": 1.0, "pic_in_pic": 1.0})
    sequence: SequenceOptions = field(default_factory=SequenceOptions)
    grid: GridOptions = field(default_factory=GridOptions)
    pic_in_pic: PicInPicOptions = field(default_factory=PicInPicOptions)

    def options(self, fmt: str, corrupted: bool) -> dict:
        """Keyword arguments of the format's builder; ``corrupted=False`` turns the noise off."""
        opts = asdict(getattr(self, fmt))
        if not corrupted:
            opts["noise_std"] = 0.0
        return opts


@dataclass
class GenerationSettings:
    """The base model that answers the augmented inputs (loaded with eager attention).

    Args:
        model: path (or hub id) of a LLaVA-style image-text-to-text model with its processor.
        processor: processor path when it is not stored with the model.
        dtype: ``float32``, ``bfloat16`` or ``float16``.
        device: ``auto`` (CUDA when available), ``cpu``, ``cuda``, ``cuda:1``...
        batch_size: augmented samples per ``generate`` call.
        max_new_tokens: longest answer.
        revision: model revision to load.
        trust_remote_code: run code shipped with the model (off unless set).
    """

    model: str
    processor: str | None = None
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: str = "auto"
    batch_size: int = 8
    max_new_tokens: int = 64
    revision: str | None = None
    trust_remote_code: bool = False


@dataclass
class SelectionSettings:
    """Attention-aware selection (see :class:`augment.mia.select.SelectionConfig`).

    ``thresholds`` overrides the paper's per-format, per-count thresholds, e.g. ``{"grid": {4: 0.55}}``.
    ``attention_quantile`` (a calibrated threshold), ``filter`` (``attention``, ``none``,
    ``random_matched``: the ablation) and ``balance_yes_no`` are decided once every answer is
    generated (:mod:`augment.mia.calibrate`); left at their defaults, the build is unchanged.
    """

    thresholds: dict[str, dict[int, float]] | None = None
    min_perplexity: float = 1.1
    layer: int | None = None
    attention_quantile: float | None = None
    filter: Literal["attention", "none", "random_matched"] = "attention"
    balance_yes_no: bool = False

    def build(self) -> SelectionConfig:
        return SelectionConfig(
            self.thresholds,
            self.min_perplexity,
            self.layer,
            attention_quantile=self.attention_quantile,
            filter=self.filter,
            balance_yes_no=self.balance_yes_no,
        )


@dataclass
class BuildConfig:
    """Everything ``mmpo build-negatives`` needs.

    Args:
        source: the single-image dataset.
        output: directory of the preference dataset (``train.jsonl`` + ``images/``), the decisions
            log, the summary and the resumption state.
        generation: the base model and how it generates.
        formats: formats, their weights and options.
        selection: thresholds, minimum perplexity and attention layer.
        seed: every draw (format, companions, target position, noise) derives from it and the record index.
        samples_per_source: augmented samples built from each source record.
        chunk_size: source records per unit of work; progress is saved after each chunk, so an
            interruption costs at most one chunk.
        train_on_corrupted: write the corrupted inputs (when ``noise_std`` > 0) into the training
            records; by default the corruption only provokes the rejected answers and training sees the clean input.
        overwrite: start again when ``output`` holds a build made with other settings.
    """

    source: SourceSettings
    output: str
    generation: GenerationSettings
    formats: FormatOptions = field(default_factory=FormatOptions)
    selection: SelectionSettings = field(default_factory=SelectionSettings)
    seed: int = 0
    samples_per_source: int = 1
    chunk_size: int = 64
    train_on_corrupted: bool = False
    overwrite: bool = False

    def __post_init__(self) -> None:
        unknown = set(self.formats.weights) - {"sequence", "grid", "pic_in_pic"}
        if unknown:
            raise ValueError(f"formats.weights: unknown format(s) {sorted(unknown)}; use sequence, grid, pic_in_pic")
        if any(w < 0 for w in self.formats.weights.values()) or sum(self.formats.weights.values()) <= 0:
            raise ValueError(f"formats.weights must be non-negative with a positive sum, got {self.formats.weights}")
        for name in ("samples_per_source", "chunk_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be ≥ 1, got {getattr(self, name)}")
        if self.generation.batch_size < 1 or self.generation.max_new_tokens < 1:
            raise ValueError("generation.batch_size and generation.max_new_tokens must be ≥ 1")


_WHOLE_BUILD_DEFAULTS = {"attention_quantile": None, "filter": "attention", "balance_yes_no": False}


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def config_fingerprint(config: BuildConfig) -> str:
    """A hash of everything that changes the output: the settings (not ``overwrite``) and the source file's bytes.

    ``generation.device`` and ``batch_size`` are included: they can change greedy answers in the last bits.
    """
    settings = asdict(config)
    settings.pop("overwrite")
    for key, default in _WHOLE_BUILD_DEFAULTS.items():  # builds made before these settings existed stay valid
        if settings["selection"].get(key) == default:
            settings["selection"].pop(key)
    source = Path(config.source.path)
    settings["source_sha256"] = _file_digest(source) if source.is_file() else None
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]
